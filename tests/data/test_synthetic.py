"""The synthetic dataset: captions and splits, determinism, renders that agree across scales and frame rates,
motion in the caption's direction, and `cascade data synth` end to end."""

import itertools
import json
import re
import tarfile

import numpy as np
import pytest

from cascade.cli import main
from cascade.data.shards import Manifest
from cascade.data.synthetic import (
    ALL_COMBOS, BACKGROUNDS, COLORS, DIRECTIONS, HELD_OUT, SHAPES, TRAIN_COMBOS, Scene, render, render_image,
    sample_scene, write_synthetic,
)
from cascade.data.video import read_video

WORDS = "|".join
CAPTION = re.compile(rf"a ({WORDS(COLORS)}) ({WORDS(SHAPES)}) moving ({WORDS(DIRECTIONS)}) on a "
                     rf"({WORDS(BACKGROUNDS)}) background")
IMAGE_CAPTION = re.compile(rf"a ({WORDS(COLORS)}) ({WORDS(SHAPES)}) on a ({WORDS(BACKGROUNDS)}) background")


def draw(split, n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def alpha(video, scene):
    """Per-pixel coverage recovered from the colors: (T, H, W) in [0, 1]."""
    background, foreground = np.array(BACKGROUNDS[scene.background]), np.array(COLORS[scene.color])
    channel = np.argmax(np.abs(foreground - background))
    return (video[..., channel].astype(float) - background[channel]) / (foreground[channel] - background[channel])


def test_captions_follow_the_template():
    for scene in draw("train", 300):
        match = CAPTION.fullmatch(scene.caption)
        assert match and match.groups() == scene.combo
        assert IMAGE_CAPTION.fullmatch(scene.image_caption).groups() == (scene.color, scene.shape, scene.background)


def test_held_out_combinations():
    assert len(ALL_COMBOS) == 168 and len(set(HELD_OUT)) == len(HELD_OUT) == 14
    assert set(HELD_OUT) <= set(ALL_COMBOS) and not set(HELD_OUT) & set(TRAIN_COMBOS)
    # Every attribute value, and every pair of values, is still seen in training.
    for i, j in itertools.combinations(range(4), 2):
        assert {(c[i], c[j]) for c in TRAIN_COMBOS} == {(c[i], c[j]) for c in ALL_COMBOS}
    for i, vocabulary in enumerate((COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)):
        assert {c[i] for c in TRAIN_COMBOS} == set(vocabulary)
        assert {c[i] for c in HELD_OUT} == set(vocabulary)  # and each is also tested
    train = {s.combo for s in draw("train", 3000)}
    assert not train & set(HELD_OUT) and len(train) == len(TRAIN_COMBOS)
    assert {s.combo for s in draw("heldout", 300)} == set(HELD_OUT)
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "test")


def test_scene_round_trips_and_validates():
    scene = draw("train", 1)[0]
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    with pytest.raises(ValueError, match="unknown"):
        Scene.from_dict({**scene.to_dict(), "rotation": 0.0})
    with pytest.raises(ValueError, match="color 'purple'"):
        Scene.from_dict({**scene.to_dict(), "color": "purple"})


def test_sampling_is_deterministic_per_seed():
    assert draw("train", 20, seed=3) == draw("train", 20, seed=3)
    assert draw("train", 20, seed=3) != draw("train", 20, seed=4)


@pytest.mark.parametrize("shape", SHAPES)
def test_coverage_is_the_exact_area(shape):
    """Against brute force: the fraction of a 64x64 grid of points per pixel inside the shape (an error of at most
    about one grid row per edge pixel, 1/64 of 255 ~ 4 uint8) and the total area."""
    scene = Scene("white", shape, "right", "black", size=0.6, start_x=0.47, start_y=0.53, speed=0.0)
    exact = alpha(render_image(scene, 12, 12).astype(float), scene)
    k = 64
    u = (np.arange(12 * k) + 0.5) / k - np.array([0.47 * 12, 0.53 * 12])[:, None]  # (2, 12k): x, y from center
    x, y, r = u[0][None, :], u[1][:, None], 0.6 * 12 / 2
    inside = {"circle": x ** 2 + y ** 2 <= r ** 2, "square": (np.abs(x) <= r) & (np.abs(y) <= r),
              "triangle": (np.abs(y) <= r) & (np.abs(x) <= (y + r) / 2)}[shape]
    brute = inside.reshape(12, k, 12, k).mean((1, 3))
    assert np.abs(exact - brute).max() * 255 < 5
    area = {"circle": np.pi * r ** 2, "square": 4 * r ** 2, "triangle": 2 * r ** 2}[shape]
    assert abs(exact.sum() - area) < 12 * 12 * 0.5 / 255  # rounding to uint8 only


@pytest.mark.parametrize("shape", SHAPES)
def test_scale_agreement(shape):
    """A 4x render averaged over 4x4 blocks matches the 1x render: max abs error <= 1.0 and mean < 0.05 (uint8).

    Coverage is exact at both sizes, so the only difference is uint8 rounding: up to 0.5 in the 1x render plus up to
    0.5 in the mean of 16 rounded 4x pixels. Measured over 30 random scenes (40x24, 4 frames): max 0.625, mean
    0.012."""
    rng = np.random.default_rng(1)
    for _ in range(4):
        scene = Scene(**{**sample_scene(rng).to_dict(), "shape": shape})
        low = render(scene, 4, 40, 24, fps=8.0).astype(float)
        high = render(scene, 4, 160, 96, fps=8.0).astype(float).reshape(4, 24, 4, 40, 4, 3).mean((2, 4))
        error = np.abs(low - high)
        assert error.max() <= 1.0 and error.mean() < 0.05


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("fps", [8.0, 12.0])
def test_frame_rate_agreement(k, fps):
    """Every k-th frame at k x fps (same duration) is the render at fps, exactly: frame i shows t0 + i / fps."""
    for scene in draw("train", 3, seed=2):
        slow = render(scene, 12, 32, 24, fps, t0=0.25)
        fast = render(scene, 12 * k, 32, 24, fps * k, t0=0.25)
        np.testing.assert_array_equal(fast[::k], slow)
    assert np.array_equal(render_image(scene, 32, 24), render(scene, 3, 32, 24, fps)[0])


def test_shapes_stay_inside_the_frame():
    """Over the sampled duration (both ends included) each frame shows the shape's whole area, at any aspect: the
    coverage sums to the area up to uint8 rounding (0.5 / 255 on each of at most 8r + 8 edge pixels)."""
    for seconds, (width, height) in ((2.0, (32, 32)), (1.0, (48, 16)), (3.0, (16, 40))):
        rng = np.random.default_rng(5)
        for _ in range(40):
            scene = sample_scene(rng, seconds=seconds)
            r = scene.size * min(width, height) / 2
            area = {"circle": np.pi * r ** 2, "square": 4 * r ** 2, "triangle": 2 * r ** 2}[scene.shape]
            covered = alpha(render(scene, 9, width, height, fps=8 / seconds), scene).sum((1, 2))
            np.testing.assert_allclose(covered, area, atol=(8 * r + 8) * 0.5 / 255)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_motion_follows_the_caption(direction):
    scenes = [s for s in draw("train", 100, seed=6) if s.direction == direction]
    assert len(scenes) >= 10
    for scene in scenes:
        a = alpha(render(scene, 32, 64, 64, fps=16.0), scene)
        ys, xs = np.mgrid[:64, :64]
        centroid = np.stack([(a * xs).sum((1, 2)), (a * ys).sum((1, 2))], 1) / a.sum((1, 2))[:, None]
        moved = centroid[-1] - centroid[0]
        dx, dy = DIRECTIONS[direction]
        along, across = (moved[0] * dx, moved[1]) if dx else (moved[1] * dy, moved[0])
        # The whole shape is in view, so its centroid moves by speed x time (up to uint8 rounding of the pixels);
        # the smallest sampled travel over 2 s is 0.5 * (1 - 0.4 - 2 * 0.02) of the frame, 17 px here.
        assert along == pytest.approx(scene.speed * 31 / 16 * 64, abs=0.05) and along > 17 and abs(across) < 0.05


def test_write_is_deterministic_and_a_prefix(tmp_path):
    def samples(folder, **kwargs):
        write_synthetic(folder, seed=kwargs.pop("seed", 7), width=8, height=8, fps=4.0, seconds=1.0, **kwargs)
        with tarfile.open(folder / "shard-000000.tar") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".mp4")}

    first = samples(tmp_path / "a", count=3, images=1)
    assert first == samples(tmp_path / "b", count=3, images=1)
    assert first != samples(tmp_path / "c", count=3, images=1, seed=8)
    larger = samples(tmp_path / "d", count=6, images=0)
    assert all(larger[f"synth-7-{i:08d}.json"] == first[f"synth-7-{i:08d}.json"] for i in (0, 1))  # videos 0, 1


def test_cli_writes_shards(tmp_path):
    """Decoded mp4s match `render(scene)`: mean abs error < 3 (uint8). H.264 at crf 4 is near-lossless; what is
    left is yuv420p's half-resolution chroma at the shape's saturated edges (measured: mean 0.8-1.6 at 32x32)."""
    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--count", "3", "--images", "2", "--seed", "1", "--width", "32",
            "--height", "24", "--fps", "8", "--seconds", "1.5", "--samples-per-shard", "2"]
    assert main(args) == 0
    manifest = Manifest.read(out)
    assert (manifest.videos, manifest.images, manifest.samples) == (3, 2, 5)
    assert [s["samples"] for s in manifest.shards] == [2, 2, 1] and manifest.video_seconds == pytest.approx(4.5)
    kinds = []
    for shard in manifest.shards:
        with tarfile.open(out / shard["path"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[:-5]
            assert re.fullmatch(r"synth-1-\d{8}", key)
            meta, caption = json.loads(files[name]), files[f"{key}.txt"].decode()
            scene = Scene.from_dict(meta["scene"])
            assert (meta["split"], meta["source"], meta["width"], meta["height"]) == ("train", "synthetic", 32, 24)
            kinds.append(meta["kind"])
            if meta["kind"] == "image":
                assert caption == scene.image_caption and f"{key}.png" in files
                continue
            assert caption == scene.caption and scene.combo not in HELD_OUT
            assert (meta["fps"], meta["frames"], meta["duration"]) == (8.0, 12, 1.5)
            frames, fps = read_video(files[f"{key}.mp4"])
            assert frames.shape == (12, 24, 32, 3) and fps == pytest.approx(8.0)
            assert np.abs(frames.astype(float) - render(scene, 12, 32, 24, 8.0)).mean() < 3.0
    assert sorted(kinds) == ["image"] * 2 + ["video"] * 3 and kinds != sorted(kinds)  # stills spread among videos

    assert main(["data", "synth", "--out", str(tmp_path / "h"), "--count", "4", "--split", "heldout", "--width",
                 "8", "--height", "8", "--fps", "2", "--seconds", "1"]) == 0
    with tarfile.open(tmp_path / "h" / "shard-000000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 4 and all(m["split"] == "heldout" and Scene.from_dict(m["scene"]).combo in HELD_OUT
                                   for m in metas)


@pytest.mark.parametrize("flags, message", [
    (["--count", "0"], "count must be >= 1"),
    (["--images", "-1"], "images must be >= 0"),
    (["--seed", "-3"], "seed must be >= 0"),
    (["--width", "2"], "width and height"),
    (["--height", "33"], "even"),
    (["--fps", "0"], "fps and seconds must be > 0"),
    (["--seconds", "-1"], "fps and seconds must be > 0"),
    (["--samples-per-shard", "0"], "samples-per-shard"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, flags, message):
    args = ["data", "synth", "--out", str(tmp_path / "x"), "--count", "2", *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_all_captions_is_every_caption_the_dataset_can_hold():
    """The tiny T5's tokenizer is trained on `all_captions()` where the dataset is not at hand (`cascade demo`):
    one list, derived from the dataset's own vocabulary, so the two cannot drift apart."""
    from cascade.data.synthetic import all_captions

    captions = set(all_captions())
    assert len(captions) == len(ALL_COMBOS) + len(COLORS) * len(SHAPES) * len(BACKGROUNDS)
    rng = np.random.default_rng(0)
    for split in ("train", "heldout"):
        for _ in range(300):
            scene = sample_scene(rng, split)
            assert scene.caption in captions and scene.image_caption in captions
