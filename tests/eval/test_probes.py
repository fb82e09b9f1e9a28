"""Synthetic-data probes: accuracy on exact renders, robustness to noise and blur, a wrong-caption control, captions.

Measured on the 200 scenes below (seed 7, train and heldout alternating), 2 s each: 100 % on all four fields at
64x64 x 32 frames (16 fps) and at 32x32 x 8 frames (4 fps), clean and after a 3x3 box blur plus Gaussian noise
(std 20, uint8 units). Bounds sit a little below: 0.99 for color, background and direction, 0.95 for shape.
"""

import itertools

import numpy as np
import pytest

from cascade.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, render, sample_scene
from cascade.eval.probes import parse_caption, probe, probe_accuracy

SCENES = 200
BOUNDS = dict(color=0.99, shape=0.95, direction=0.99, background=0.99)
SIZES = {"64x64x32": (64, 32, 16.0), "32x32x8": (32, 8, 4.0)}  # side px, frames, fps (2 s either way)


def _degrade(video: np.ndarray, seed: int) -> np.ndarray:
    """3x3 box blur (edges replicated), then Gaussian noise of std 20, rounded and clipped to uint8."""
    x = np.pad(video.astype(np.float32), [(0, 0), (1, 1), (1, 1), (0, 0)], mode="edge")
    h, w = video.shape[1:3]
    blurred = sum(x[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    noisy = blurred + 20 * np.random.default_rng(seed).standard_normal(video.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=list(SIZES))
def renders(request):
    side, frames, fps = SIZES[request.param]
    scenes = [sample_scene(np.random.default_rng([7, n]), "train" if n % 2 == 0 else "heldout")
              for n in range(SCENES)]
    return [render(s, frames, side, side, fps) for s in scenes], [s.caption for s in scenes]


def _check(summary: dict) -> None:
    assert summary["count"] == SCENES
    for field, bound in BOUNDS.items():
        assert summary[field] >= bound, (field, summary)


def test_exact_renders(renders):
    videos, captions = renders
    summary, rows = probe_accuracy(videos, captions)
    _check(summary)
    assert len(rows) == SCENES and rows[0]["expected"] == parse_caption(captions[0])
    # Control: against another scene's caption, color agreement falls to chance (1/7 ~ 14 %).
    shuffled = captions[1:] + captions[:1]
    wrong = np.mean([row["probed"]["color"] == parse_caption(c)["color"] for row, c in zip(rows, shuffled)])
    assert wrong < 0.3, wrong


def test_blur_and_noise(renders):
    videos, captions = renders
    summary, _ = probe_accuracy([_degrade(v, n) for n, v in enumerate(videos)], captions)
    _check(summary)


def test_empty_and_still():
    gray = np.full((4, 16, 16, 3), 128, np.uint8)
    assert probe(gray) == dict(color=None, shape=None, direction=None, background="gray")
    scene = sample_scene(np.random.default_rng(0))
    still = probe(render(scene, 1, 64, 64, 16.0)[0])
    assert still["direction"] is None and still["color"] == scene.color and still["shape"] == scene.shape
    summary, _ = probe_accuracy([render(scene, 1, 64, 64, 16.0)], [scene.image_caption])
    assert summary["direction"] is None and summary["color"] == 1.0


def test_parse_caption_vocabulary():
    for color, shape, direction, background in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS):
        video = f"a {color} {shape} moving {direction} on a {background} background"
        assert parse_caption(video) == dict(color=color, shape=shape, direction=direction, background=background)
        still = parse_caption(f"a {color} {shape} on a {background} background")
        assert still == dict(color=color, shape=shape, direction=None, background=background)


@pytest.mark.parametrize("text", [
    "", "a dog", "a purple circle moving left on a black background", "a red hexagon on a gray background",
    "a red circle moving sideways on a black background", "a red circle moving left on a white background",
    "a red circle moving left", "A red circle moving left on a black background"])
def test_parse_caption_rejects(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_probe_accuracy_checks_lengths():
    with pytest.raises(ValueError):
        probe_accuracy([np.zeros((1, 8, 8, 3), np.uint8)], [])


def test_a_frame_whose_foreground_changes_color_is_not_a_crash():
    """Generated videos can switch color midway: a frame with foreground but zero coverage of the detected color."""
    video = np.zeros((4, 16, 16, 3), np.uint8)
    video[:3, 4:10, 4:10] = (255, 0, 0)
    video[3, 4:10, 4:10] = (0, 255, 0)
    result = probe(video)
    assert result["color"] == "red" and result["shape"] == "square" and result["direction"] is None
    video[:3] = 0  # only the green frame shows anything: still a result
    video[3] = 0
    video[3, 4:10, 4:10] = (0, 255, 0)
    assert probe(video)["color"] == "green"
