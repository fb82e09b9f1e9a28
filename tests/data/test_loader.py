"""The per-stage loader: clips at the stage's fps and size, SR inputs from the same clip, stills, splitting,
bad data counted and skipped, the error budget, and exact resume across processes with 2 workers."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cascade.data.clips import (BadSample, ClipSpec, DecodedVideo, FrameCache, crop, decode_frames, downsample,
                                make_example)
from cascade.data.loader import DataBudgetExceeded, LoaderConfig, StageDataset, StageLoader, to_model_input
from cascade.data.shards import ShardSink
from cascade.data.video import encode_image, encode_video

SOURCE_FPS = 16


def ramp_video(index: int, frames: int = 32, width: int = 48, height: int = 32) -> np.ndarray:
    """Frame t has value (index * 7 + t * 5) in the red channel: the frame index can be read back from pixels."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        video[t, :, :, 0] = (index * 7 + t * 5) % 256
        video[t, :, :, 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        video[t, :, :, 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    return video


def make_dataset(folder, videos=12, images=0, per_shard=4, frames=32):
    with ShardSink(folder, samples_per_shard=per_shard) as sink:
        for i in range(videos):
            meta = dict(kind="video", fps=SOURCE_FPS, frames=frames, duration=frames / SOURCE_FPS, width=48,
                        height=32, source=f"ramp{i}")
            sink.write(f"v{i:04d}", encode_video(ramp_video(i, frames), SOURCE_FPS, crf=0), "mp4",
                       f"caption {i}", meta)
        for i in range(images):
            meta = dict(kind="image", fps=0, frames=1, duration=0, width=48, height=32, source=f"still{i}")
            sink.write(f"i{i:04d}", encode_image(ramp_video(100 + i, 1)[0]), "png", f"still {i}", meta)
    return folder


BASE = ClipSpec(frames=4, width=16, height=16, fps=4)
TSR = ClipSpec(frames=8, width=16, height=16, fps=8, cond_frames=4, cond_width=16, cond_height=16)
SSR = ClipSpec(frames=8, width=32, height=32, fps=8, cond_frames=8, cond_width=16, cond_height=16)


def test_clip_is_taken_at_the_stage_fps(tmp_path):
    """A 4 fps clip of a 16 fps source takes every 4th frame: the red channel steps by 4 * 5."""
    data = encode_video(ramp_video(0), SOURCE_FPS, crf=0)
    frames = decode_frames(data, 4, 4.0, np.random.default_rng(0), (16, 16))
    red = frames[:, 0, 0, 0].astype(int)
    assert np.allclose(np.diff(red), 20, atol=2)
    with pytest.raises(BadSample, match="too_short"):
        decode_frames(data, 10, 4.0, np.random.default_rng(0), (16, 16))  # needs 37 source frames
    with pytest.raises(BadSample, match="fps_too_low"):
        decode_frames(data, 4, 32.0, np.random.default_rng(0), (16, 16))


def test_clips_start_at_a_random_frame_or_the_first():
    """"random" draws the clip's first source frame; "first" always starts at source frame 0, for stages whose
    frame 0 must be the video's start (the tiny base learns the sign of the motion only then)."""
    data = encode_video(ramp_video(0), SOURCE_FPS, crf=0)
    every = decode_frames(data, 32, SOURCE_FPS, np.random.default_rng(0), (16, 16))  # all 32: starts at 0

    def start_of(clip):  # a 4 fps clip is every 4th source frame from its start
        return [s for s in range(32 - 12) if np.array_equal(clip, every[s:s + 13:4])]

    def start_of_cropped(clip, frames):  # make_example crops the decoded frames to the stage's size
        return [s for s in range(32 - 12) if np.array_equal(clip, crop(frames[s:s + 13:4], 16, 16, None))]

    starts = {tuple(start_of(decode_frames(data, 4, 4.0, np.random.default_rng(seed), (16, 16))))
              for seed in range(16)}
    assert all(len(s) == 1 for s in starts) and len(starts) > 4
    for seed in range(4):
        assert start_of(decode_frames(data, 4, 4.0, np.random.default_rng(seed), (16, 16), start="first")) == [0]
    example = make_example({"mp4": data, "txt": b"x"}, ClipSpec(**{**BASE.__dict__, "clip_start": "first"}),
                           np.random.default_rng(3))
    assert start_of_cropped(example["video"].permute(1, 2, 3, 0).numpy(), every) == [0]
    with pytest.raises(ValueError, match="clip start"):
        decode_frames(data, 4, 4.0, np.random.default_rng(0), (16, 16), start="middle")


def test_sr_inputs_come_from_the_same_clip():
    sample = {"mp4": encode_video(ramp_video(3), SOURCE_FPS, crf=0), "txt": b"a caption", "json": b"{}"}
    tsr = make_example(sample, TSR, np.random.default_rng(1))
    assert tsr["video"].shape == (3, 8, 16, 16) and tsr["cond"].shape == (3, 4, 16, 16)
    assert torch.equal(tsr["cond"], tsr["video"][:, ::2])  # the input stage's fps: every second frame
    ssr = make_example(sample, SSR, np.random.default_rng(1))
    assert ssr["video"].shape == (3, 8, 32, 32) and ssr["cond"].shape == (3, 8, 16, 16)
    expected = ssr["video"].float().unflatten(2, (16, 2)).unflatten(4, (16, 2)).mean(dim=(3, 5))
    assert (ssr["cond"].float() - expected).abs().max() <= 0.5  # 2x2 area average, rounded


def test_random_crops_for_fully_convolutional_stages():
    spec = ClipSpec(frames=8, width=32, height=32, fps=8, cond_frames=8, cond_width=16, cond_height=16,
                    crop_width=16, crop_height=16)
    sample = {"mp4": encode_video(ramp_video(3), SOURCE_FPS, crf=0), "txt": b"x"}
    example = make_example(sample, spec, np.random.default_rng(5))
    assert example["video"].shape == (3, 8, 16, 16) and example["cond"].shape == (3, 8, 8, 8)
    assert torch.equal(example["cond"], downsample(example["video"], 8, 8, 8))


def test_frame_windows_start_on_an_input_frame_and_keep_cond_aligned():
    """A TSR stage (8 frames from 4) trained on 4-frame windows: each window is frames [s, s + 4) of the full clip
    with s even, and its input is the window's every second frame, as at sampling."""
    window = ClipSpec(**{**TSR.__dict__, "crop_frames": 4})
    sample = {"mp4": encode_video(ramp_video(3), SOURCE_FPS, crf=0), "txt": b"x"}
    starts = set()
    for seed in range(12):
        full = make_example(sample, TSR, np.random.default_rng(seed))["video"]
        example = make_example(sample, window, np.random.default_rng(seed))  # same clip, then a window of it
        assert example["video"].shape == (3, 4, 16, 16) and example["cond"].shape == (3, 2, 16, 16)
        matches = [s for s in range(0, 5) if torch.equal(example["video"], full[:, s:s + 4])]
        assert matches and matches[0] % 2 == 0
        starts.add(matches[0])
        assert torch.equal(example["cond"], example["video"][:, ::2])
    assert starts == {0, 2, 4}
    still = {"png": encode_image(ramp_video(3)[0]), "txt": b"x"}  # a still fills a window-long slot too
    example = make_example(still, window, np.random.default_rng(0))
    assert example["is_image"] and example["video"].shape == (3, 4, 16, 16) and example["cond"].shape == (3, 2, 16, 16)


def test_decode_cache_cuts_the_clips_decoding_would():
    """With a FrameCache a video is decoded once, whole; every later clip (random starts, first-frame starts, frame
    windows, SR inputs, stills) is cut from memory and equals the clip decoded from the bytes, draw for draw."""
    videos = {f"v{i}": {"mp4": encode_video(ramp_video(i), SOURCE_FPS, crf=0), "txt": b"x"} for i in range(3)}
    videos["still"] = {"png": encode_image(ramp_video(9)[0]), "txt": b"x"}
    specs = [TSR, SSR, ClipSpec(**{**BASE.__dict__, "clip_start": "first"}),
             ClipSpec(**{**TSR.__dict__, "crop_frames": 4})]
    for spec in specs:
        cache = FrameCache(64 * 2**20)
        starts = set()
        for seed in range(6):
            for key, sample in videos.items():
                plain = make_example(sample, spec, np.random.default_rng(seed))
                cached = make_example(sample, spec, np.random.default_rng(seed), cache, ("shard", key))
                assert torch.equal(plain["video"], cached["video"]), (spec, key, seed)
                assert plain.keys() == cached.keys() and all(
                    torch.equal(plain[k], cached[k]) for k in ("video", "cond") if k in plain)
                starts.add(int(plain["video"][0, 0, 0, 0]))
        assert len(cache) == len(videos) and cache.misses == len(videos)
        assert cache.hits == 5 * len(videos)  # every sample decoded once in six epochs
        assert len(starts) > (2 if spec.clip_start == "random" else 1)  # the draws did vary


def test_decode_cache_keeps_bad_samples_bad():
    """A cut or garbled video fails with the same reason whether it is decoded or cut from the cache, every time."""
    rng = np.random.default_rng(0)
    good = encode_video(ramp_video(0), SOURCE_FPS, crf=0)
    broken = [good[: int(rng.integers(10, len(good)))] for _ in range(20)] + [good[:200] + rng.bytes(3000)]
    short = encode_video(ramp_video(0, frames=8), SOURCE_FPS, crf=0)  # 8 frames: too short for 8 at 8 fps
    cache = FrameCache(64 * 2**20)

    def reason(data, seed, with_cache):
        try:
            make_example({"mp4": data, "txt": b"x"}, TSR, np.random.default_rng(seed),
                         cache if with_cache else None, ("s", len(data)))
        except BadSample as bad:
            return bad.reason
        return "ok"

    reasons = []
    for data in [*broken, short]:
        for seed in range(2):
            plain = reason(data, seed, False)
            assert reason(data, seed, True) == plain == reason(data, seed, True)  # decoded, then from the cache
            reasons.append(plain)
    assert {"undecodable", "too_short"} <= set(reasons)


def test_decode_cache_stays_within_its_budget():
    def video(n):
        return DecodedVideo(np.zeros((n, 10, 10, 3), np.uint8), 16.0, n, None)  # n * 300 bytes

    cache = FrameCache(max_bytes=1000)
    cache.put("a", video(1)), cache.put("b", video(1))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", video(2))  # 600 more: b, the least recently used, goes
    assert cache.get("b") is None and cache.bytes == 900 and len(cache) == 2
    cache.put("d", video(1))  # a is now the least recently used
    assert cache.get("a") is None and cache.get("c") is not None and cache.get("d") is not None
    assert cache.bytes == 900
    cache.put("huge", video(4))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 2 and cache.bytes == 900 and cache.too_large == {"huge"}
    # A real video over budget is never decoded whole: its clips are decoded one by one, as without a cache.
    data = encode_video(ramp_video(0), SOURCE_FPS, crf=0)  # 32 frames of 48x32, 24x16 once resized
    small = FrameCache(max_bytes=10 * 24 * 16 * 3)  # room for 10 of them
    for seed in range(3):
        clip = decode_frames(data, 4, 4.0, np.random.default_rng(seed), (16, 16), cache=small, key="v")
        assert np.array_equal(clip, decode_frames(data, 4, 4.0, np.random.default_rng(seed), (16, 16)))
    assert len(small) == 0 and small.too_large == {("v", (16, 16))} and small.misses == 1


def test_loader_with_a_decode_cache_yields_the_same_batches(tmp_path):
    """Three epochs with and without `decode_cache_bytes`: the same keys and the same pixels, batch for batch."""
    folder = make_dataset(tmp_path / "d", videos=6, images=2, per_shard=3)

    def batches(cache_bytes):
        config = LoaderConfig(batch_size=2, seed=1, image_fraction=0.25, decode_cache_bytes=cache_bytes)
        return [b for _, b in zip(range(12), StageLoader(StageDataset(folder, TSR, config)))]

    for plain, cached in zip(batches(0), batches(32 * 2**20), strict=True):
        assert plain["keys"] == cached["keys"]
        assert torch.equal(plain["video"], cached["video"]) and torch.equal(plain["cond"], cached["cond"])


def test_batches_shapes_and_device_conversion(tmp_path):
    folder = make_dataset(tmp_path / "d", videos=6, images=3, per_shard=4)
    dataset = StageDataset(folder, TSR, LoaderConfig(batch_size=3, seed=0, image_fraction=0.3))
    batches = [b for _, b in zip(range(4), StageLoader(dataset))]
    batch = batches[0]
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 3, 8, 16, 16)
    assert batch["cond"].shape == (3, 3, 4, 16, 16) and batch["fps"].tolist() == [8.0] * 3
    stills = [k for b in batches for k, image in zip(b["keys"], b["is_image"]) if image]
    assert stills and all(k.startswith("i") for k in stills)
    for b in batches:  # a still occupies a video slot with the same frame everywhere
        for video, image in zip(b["video"], b["is_image"]):
            if image:
                assert torch.equal(video, video[:, :1].expand_as(video))
    model = to_model_input(batch, "cpu")
    assert model["video"].dtype == torch.float32 and model["video"].min() >= -1 and model["video"].max() <= 1


def test_stills_are_dropped_when_the_stage_trains_on_videos_only(tmp_path):
    folder = make_dataset(tmp_path / "d", videos=4, images=4)
    dataset = StageDataset(folder, BASE, LoaderConfig(batch_size=2, image_fraction=0.0))
    keys = [k for _, b in zip(range(6), StageLoader(dataset)) for k in b["keys"]]
    assert all(k.startswith("v") for k in keys)


def test_two_ranks_see_disjoint_samples(tmp_path):
    folder = make_dataset(tmp_path / "d", videos=16, per_shard=4)
    seen = []
    for rank in (0, 1):
        config = LoaderConfig(batch_size=2, seed=3, rank=rank, world_size=2)
        loader = StageLoader(StageDataset(folder, BASE, config))
        seen.append({k for _, b in zip(range(4), loader) for k in b["keys"]})  # 8 samples = one epoch
    assert len(seen[0]) == 8 and len(seen[1]) == 8 and not seen[0] & seen[1]


def write_bad_samples(sink, count, rng):
    """Mutations of good samples; returns the expected reason of each."""
    good = encode_video(ramp_video(0), SOURCE_FPS, crf=0)
    png = encode_image(ramp_video(1, 1)[0])
    huge = bytearray(png)  # claim a 60000 x 60000 image in the PNG header (CRC fixed): refused before decoding
    import zlib
    huge[16:24] = (60000).to_bytes(4, "big") * 2
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")
    kinds = {
        "truncated_mp4": lambda: {"mp4": good[: int(rng.integers(10, len(good) // 2))], "txt": b"x"},
        "random_bytes": lambda: {"mp4": rng.bytes(int(rng.integers(1, 4000))), "txt": b"x"},
        "wrong_keys": lambda: {"avi": good, "txt": b"x"},
        "no_caption": lambda: {"mp4": good},
        "empty_caption": lambda: {"mp4": good, "txt": b"   "},
        "non_utf8_caption": lambda: {"mp4": good, "txt": b"\xff\xfe\xfa"},
        "huge_dimensions": lambda: {"png": bytes(huge), "txt": b"x"},
        "bad_json": lambda: {"mp4": good, "txt": b"x", "json": b"{not json"},
    }
    names = list(kinds)
    chosen = []
    for i in range(count):
        name = names[i % len(names)]
        sink.write_sample({"__key__": f"bad{i:05d}", **kinds[name]()}, kind="image" if name == "huge_dimensions"
                          else "video")
        chosen.append(name)
    return chosen


@pytest.mark.parametrize("workers", [0, 2])
def test_fuzz_1000_mutated_samples_never_raise_and_are_all_counted(tmp_path, workers):
    folder = tmp_path / "fuzz"
    rng = np.random.default_rng(0)
    with ShardSink(folder, samples_per_shard=250) as sink:
        kinds = write_bad_samples(sink, 1000, rng)
        good = encode_video(ramp_video(0), SOURCE_FPS, crf=0)
        for i in range(4):  # a few good samples so batches complete
            sink.write(f"good{i}", good, "mp4", "fine", dict(kind="video", fps=16, frames=32, duration=2))
    # image_fraction equal to the share of stills in the shards: every sample is used, none left out.
    share = kinds.count("huge_dimensions") / (len(kinds) + 4)
    config = LoaderConfig(batch_size=1, max_bad_fraction=None, epochs=1, image_fraction=share)
    loader = StageLoader(StageDataset(folder, BASE, config), num_workers=workers)
    assert sorted(k for b in loader for k in b["keys"]) == [f"good{i}" for i in range(4)]
    counts = loader.total_bad
    assert sum(counts.values()) == 1000, counts
    assert counts["missing_media"] == kinds.count("wrong_keys")
    assert counts["missing_caption"] == kinds.count("no_caption")
    assert counts["empty_caption"] == kinds.count("empty_caption")
    assert counts["caption_not_utf8"] == kinds.count("non_utf8_caption")
    assert counts["too_large"] == kinds.count("huge_dimensions")
    assert counts["bad_metadata"] == kinds.count("bad_json")
    broken = ("undecodable", "too_short", "no_video_stream")
    assert sum(counts.get(r, 0) for r in broken) == kinds.count("truncated_mp4") + kinds.count("random_bytes")


def test_error_budget_stops_loudly(tmp_path):
    folder = tmp_path / "bad"
    with ShardSink(folder, samples_per_shard=100) as sink:
        write_bad_samples(sink, 60, np.random.default_rng(1))
    dataset = StageDataset(folder, BASE, LoaderConfig(batch_size=1, max_bad_fraction=0.01, window=50))
    # two bad samples in the first two read: data with 1% bad would show that less than once in 10,000 runs
    with pytest.raises(DataBudgetExceeded, match=r": 2 bad samples in the first 2 read, more than the budget allows "
                       r"\(data within it would show that many less than once in 1,000 runs\) "
                       r"\(data.max_bad_fraction 1.0%\); counts by reason: \w+ 1, \w+ 1;"):
        next(iter(StageLoader(dataset)))


def test_budget_tail_is_the_binomial_one():
    """bad_tail against the binomial sum written out, and the rule's verdicts on the cases it exists for."""
    from math import comb

    from cascade.data.loader import BUDGET_CERTAINTY, bad_tail

    for bad, seen, p in [(11, 17, 0.01), (1, 31, 0.01), (4, 31, 0.01), (8, 200, 0.01), (20, 32, 0.5), (0, 5, 0.1)]:
        exact = sum(comb(seen, k) * p**k * (1 - p) ** (seen - k) for k in range(bad, seen + 1))
        assert bad_tail(bad, seen, p) == pytest.approx(exact, rel=1e-9, abs=1e-300), (bad, seen, p)
    assert bad_tail(1, 31, 0.01) > BUDGET_CERTAINTY  # one bad video among 31: not enough to judge 1%
    assert bad_tail(3, 31, 0.01) > BUDGET_CERTAINTY
    assert bad_tail(4, 31, 0.01) < BUDGET_CERTAINTY  # four among 31 (13%): data within 1% would almost never
    assert bad_tail(1, 10, 0.0) == 0.0 and bad_tail(5, 10, 1.0) == 1.0


def test_one_bad_video_among_many_good_does_not_stop_the_run(tmp_path):
    """One sample without a caption among 39 good ones, at the default 1% budget, over two epochs: 2.5% of what is read
    is bad, but 2 in 80 is no evidence against 1% (the window would judge it after 1,000 samples): no stop."""
    spec = ClipSpec(frames=2, width=16, height=16, fps=4)
    folder = mixed_dataset(tmp_path / "one", good=39, bad=1, per_shard=40)
    loader = StageLoader(StageDataset(folder, spec, LoaderConfig(batch_size=1, max_bad_fraction=0.01, epochs=2)))
    assert len(list(loader)) == 78
    assert loader.report() == "data: 2 of 80 samples read were bad (2.5%): missing_caption 2"


def mixed_dataset(folder, good, bad, per_shard=5):
    """`good` decodable videos and `bad` samples without a caption (refused before decoding), interleaved."""
    video = encode_video(ramp_video(0, frames=8), SOURCE_FPS, crf=0)
    meta = dict(kind="video", fps=SOURCE_FPS, frames=8, duration=0.5, width=48, height=32)
    with ShardSink(folder, samples_per_shard=per_shard) as sink:
        for i in range(good + bad):
            if i * bad // (good + bad) != (i + 1) * bad // (good + bad):
                sink.write_sample({"__key__": f"bad{i:03d}", "mp4": video})
            else:
                sink.write(f"good{i:03d}", video, "mp4", f"caption {i}", meta)
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_short_run_on_mostly_bad_data_stops_within_its_first_epoch(tmp_path, workers):
    """64% bad data and the default 1% budget: the run stops within its first few samples, long before the
    1,000-sample window is full, in the main process, with one line and no DataLoader worker traceback; 40% bad
    data under a 50% budget passes two whole epochs."""
    spec = ClipSpec(frames=2, width=16, height=16, fps=4)
    folder = mixed_dataset(tmp_path / "bad64", good=9, bad=16)
    config = LoaderConfig(batch_size=1, max_bad_fraction=0.01, window=1000)
    loader = StageLoader(StageDataset(folder, spec, config), num_workers=workers)
    batches = []
    with pytest.raises(DataBudgetExceeded) as caught:
        for batch in loader:
            batches.append(batch)
    message = str(caught.value)
    assert caught.value.code == 1 and "\n" not in message and "Traceback" not in message, message
    assert "read, more than the budget allows (data within it would show that many less than once in 1,000 runs) " \
           "(data.max_bad_fraction 1.0%)" in message, message
    assert "counts by reason: missing_caption " in message and str(folder) in message
    assert loader.total_seen <= 12 and len(batches) < 5, (loader.total_seen, len(batches))

    folder = mixed_dataset(tmp_path / "bad40", good=15, bad=10)
    loader = StageLoader(StageDataset(folder, spec, LoaderConfig(batch_size=1, max_bad_fraction=0.5, epochs=2)),
                         num_workers=workers)
    assert len(list(loader)) == 30
    assert loader.total_bad == {"missing_caption": 20} and loader.total_seen == 50
    assert loader.report() == "data: 20 of 50 samples read were bad (40.0%): missing_caption 20"


@pytest.mark.parametrize("workers", [0, 2])
def test_unsafe_member_names_are_skipped_and_counted(tmp_path, workers):
    """Members named ../../x or /abs/x are never read as samples, in the loader and in the shard index; each is
    counted once, also when two workers share the one shard."""
    import io
    import tarfile

    from cascade.data.loader import read_tar_index
    from cascade.data.shards import Manifest, scan_tar

    folder = tmp_path / "evil"
    folder.mkdir()
    video = encode_video(ramp_video(0, frames=8), SOURCE_FPS, crf=0)
    names = ["good0", "../../evil", "good1", "/abs/path/evil", "sub/../../evil2", "sub/good2"]
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for name in names:
            for ext, data in (("mp4", video), ("txt", f"caption of {name}".encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    Manifest(shards=[dict(path="shard-000000.tar", samples=len(names))], videos=len(names)).write(folder)

    index = scan_tar(folder / "shard-000000.tar")
    assert [key for key, _ in index.samples] == ["good0", "good1", "sub/good2"]
    assert index.unsafe == [f"{n}.{e}" for n in names if ".." in n or n.startswith("/") for e in ("mp4", "txt")]
    assert index.unsafe_samples == 3 and index.problem is None
    assert [key for key, _ in read_tar_index(folder / "shard-000000.tar")[0]] == ["good0", "good1", "sub/good2"]

    spec = ClipSpec(frames=2, width=16, height=16, fps=4)
    loader = StageLoader(StageDataset(folder, spec, LoaderConfig(batch_size=1, max_bad_fraction=None, epochs=1)),
                         num_workers=workers)
    assert sorted(k for batch in loader for k in batch["keys"]) == ["good0", "good1", "sub/good2"]
    assert loader.total_bad == {"unsafe_member_name": 3} and loader.total_seen == 6
    # and under a budget they count as bad data: two such samples before any good one are beyond 1%
    loader = StageLoader(StageDataset(folder, spec, LoaderConfig(batch_size=1, max_bad_fraction=0.01, epochs=1)))
    with pytest.raises(DataBudgetExceeded, match="counts by reason: unsafe_member_name 2;"):
        list(loader)


def test_truncated_shard_is_counted_and_its_complete_samples_used(tmp_path):
    folder = make_dataset(tmp_path / "d", videos=8, per_shard=8)
    shard = folder / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    loader = StageLoader(StageDataset(folder, BASE, LoaderConfig(batch_size=1, max_bad_fraction=None, epochs=1)))
    keys = [k for batch in loader for k in batch["keys"]]
    assert loader.total_bad.get("truncated_shard") == 1
    assert 0 < len(keys) < 8

    # cut exactly where a member's header starts: tarfile itself ends there without a word
    import tarfile

    folder = make_dataset(tmp_path / "e", videos=8, per_shard=8)
    shard = folder / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        third = [m.offset for m in tar if m.name.startswith("v0002.")][0]
    shard.write_bytes(shard.read_bytes()[:third])
    loader = StageLoader(StageDataset(folder, BASE, LoaderConfig(batch_size=1, max_bad_fraction=None, epochs=1)))
    assert sorted(k for batch in loader for k in batch["keys"]) == ["v0000", "v0001"]
    assert loader.total_bad == {"truncated_shard": 1}


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from cascade.data.clips import ClipSpec
    from cascade.data.loader import LoaderConfig, StageDataset, StageLoader
    folder, state_in, state_out, skip, take = sys.argv[1:6]
    spec = ClipSpec(frames=4, width=16, height=16, fps=4)
    loader = StageLoader(StageDataset(folder, spec, LoaderConfig(batch_size=2, seed=7)), num_workers=2)
    if state_in != "-":
        loader.load_state_dict(json.load(open(state_in)))
    out = []
    for batch in loader:
        out.append(dict(keys=batch["keys"], sum=int(batch["video"].long().sum())))
        if len(out) == int(skip) and state_out != "-":
            json.dump(loader.state_dict(), open(state_out, "w"))
        if len(out) == int(skip) + int(take):
            break
    print(json.dumps(out))
""")


def test_resume_in_a_new_process_sees_the_same_batches(tmp_path):
    """Stop after k batches, restore the position in a new process: the next batches equal an uninterrupted
    run's, with 2 DataLoader workers (k odd, so the restored loader starts on the second worker's turn)."""
    folder = make_dataset(tmp_path / "d", videos=10, per_shard=3)  # 4 shards, uneven
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)

    def run(*args):
        result = subprocess.run([sys.executable, str(script), str(folder), *args], capture_output=True, text=True,
                                check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    k, more = 5, 9  # 14 batches of 2 = 28 samples: crosses epochs of 10 samples
    full = run("-", "-", str(k + more), "0")
    first = run("-", str(tmp_path / "state.json"), str(k), "0")
    assert first == full[:k]
    resumed = run(str(tmp_path / "state.json"), "-", "0", str(more))
    assert resumed == full[k:]


def test_restoring_with_other_worker_count_is_refused(tmp_path):
    folder = make_dataset(tmp_path / "d", videos=4)
    loader = StageLoader(StageDataset(folder, BASE, LoaderConfig(batch_size=2)), num_workers=0)
    next(iter(loader))
    other = StageLoader(StageDataset(folder, BASE, LoaderConfig(batch_size=2)), num_workers=2)
    with pytest.raises(ValueError, match="the order would differ"):
        other.load_state_dict(loader.state_dict())
