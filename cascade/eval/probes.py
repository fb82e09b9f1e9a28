"""Attribute probes for the synthetic dataset: read a video's color, shape, direction and background from its pixels.

No learned weights: the background is the nearer of black/gray to the border's median; the foreground is what
differs from it by more than half the smallest color-background gap (127 in some channel, see
`cascade.data.synthetic.COLORS`), after a 3x3 box filter so that noise and blur in generated videos matter little.

- color: the palette color nearest the median of the raw foreground pixels away from its edges;
- direction: the axis and sign of the larger least-squares slope of the foreground centroid over frames;
- shape: each shape is rendered (exactly, then box-filtered like the video) with the foreground's area at its
  centroid, on up to `SHAPE_FRAMES` frames; the template nearest the foreground's coverage (sum of squares) wins.

`probe_accuracy` scores probes against captions (`parse_caption`), e.g. of videos sampled from a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from cascade.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, Scene, render

FIELDS = ("color", "shape", "direction", "background")
THRESHOLD = 64.0  # uint8 units: half the smallest gap (127) between a color and a background in its widest channel
MIN_PIXELS = 4  # a frame with fewer foreground pixels counts as empty
SHAPE_FRAMES = 4  # frames (evenly spaced) on which shape templates are compared

_VIDEO = re.compile(r"a (\w+) (\w+) moving (\w+) on a (\w+) background")
_IMAGE = re.compile(r"a (\w+) (\w+) on a (\w+) background")


def parse_caption(caption: str) -> dict:
    """"a {color} {shape} moving {direction} on a {background} background" -> dict of the four words; a still's
    caption (no "moving ...") gives direction None. ValueError for any other text or an unknown word."""
    text = caption.strip()
    if match := _VIDEO.fullmatch(text):
        color, shape, direction, background = match.groups()
    elif match := _IMAGE.fullmatch(text):
        (color, shape, background), direction = match.groups(), None
    else:
        raise ValueError(f"not a synthetic caption: {caption!r}")
    for name, value, allowed in (("color", color, COLORS), ("shape", shape, SHAPES),
                                 ("direction", direction, DIRECTIONS), ("background", background, BACKGROUNDS)):
        if value is not None and value not in allowed:
            raise ValueError(f"caption {caption!r}: {name} {value!r} is not one of {', '.join(allowed)}")
    return dict(color=color, shape=shape, direction=direction, background=background)


def probe(video: np.ndarray) -> dict:
    """video: (T, H, W, 3) uint8 (or a still, (H, W, 3)) -> dict(color, shape, direction, background) of names.

    With no foreground pixels color, shape and direction are None; direction is None with fewer than 2 frames
    showing a foreground or no motion at all.
    """
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[1:3]) < 3:
        raise ValueError(f"probe needs a (T, H, W, 3) video with H, W >= 3, got shape {video.shape}")
    raw = video.astype(np.float32)
    smooth = _box3(raw)  # (T, H, W, 3)
    border = np.concatenate([raw[:, 0], raw[:, -1], raw[:, :, 0], raw[:, :, -1]], axis=1).reshape(-1, 3)
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    mask = np.abs(smooth - bg).max(axis=-1) > THRESHOLD  # (T, H, W)
    result = dict(color=None, shape=None, direction=None, background=background)
    if mask.sum() < MIN_PIXELS:
        return result
    core = _erode(mask)  # away from the edges, where colors blend with the background
    pixels = raw[core] if core.sum() >= MIN_PIXELS else raw[mask]
    pixels = pixels[::max(1, len(pixels) // 4096)]  # an even subsample bounds the median's cost
    result["color"] = color = _nearest(np.median(pixels, axis=0), COLORS)
    # Coverage: the projection of (pixel - background) on (color - background), kept near the foreground.
    delta = np.array(COLORS[color], dtype=np.float32) - bg
    alpha = np.clip((smooth - bg) @ delta / (delta @ delta), 0, 1) * _dilate(_dilate(mask))  # (T, H, W)
    area = alpha.sum(axis=(1, 2))  # (T,)
    # Frames showing the object: enough foreground pixels, and some of them in the detected color (a frame whose
    # foreground is another color has zero coverage; generated videos can change color midway).
    shown = np.flatnonzero((mask.sum(axis=(1, 2)) >= MIN_PIXELS) & (area > 1e-6))
    if len(shown) == 0:
        return result
    rows, cols = np.arange(alpha.shape[1]), np.arange(alpha.shape[2])
    cy = (alpha[shown].sum(axis=2) @ rows) / area[shown] + 0.5  # centroid in pixel units, (len(shown),)
    cx = (alpha[shown].sum(axis=1) @ cols) / area[shown] + 0.5
    result["direction"] = _direction(shown, cx, cy)
    picks = shown[np.linspace(0, len(shown) - 1, min(SHAPE_FRAMES, len(shown))).round().astype(int)]
    errors = {shape: 0.0 for shape in SHAPES}
    for k, t in enumerate(picks):
        j = int(np.searchsorted(shown, t))
        for shape in SHAPES:
            template = _template(shape, area[t], cx[j], cy[j], alpha.shape[2], alpha.shape[1])
            errors[shape] += float(((template - alpha[t]) ** 2).sum())
    result["shape"] = min(errors, key=errors.get)
    return result


def probe_accuracy(videos: Sequence[np.ndarray], captions: Sequence[str]) -> tuple[dict, list[dict]]:
    """Probe each video against its caption -> (summary, per-sample rows).

    summary: dict(color, shape, direction, background) of accuracies in [0, 1] over the samples whose caption names
    that field (stills have no direction; None where none does), and count (samples). Each row holds `probed`,
    `expected` (parsed caption) and `correct` (field -> bool, fields the caption names).
    """
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
    rows = []
    for video, caption in zip(videos, captions):
        expected, probed = parse_caption(caption), probe(video)
        correct = {f: probed[f] == expected[f] for f in FIELDS if expected[f] is not None}
        rows.append(dict(caption=caption, probed=probed, expected=expected, correct=correct))
    summary = {}
    for f in FIELDS:
        hits = [row["correct"][f] for row in rows if f in row["correct"]]
        summary[f] = sum(hits) / len(hits) if hits else None
    summary["count"] = len(rows)
    return summary, rows


def _direction(shown: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> str | None:
    """Least-squares slopes (px per frame) of the centroid over frame index -> the larger one's direction."""
    if len(shown) < 2:
        return None
    t = shown - shown.mean()
    sx, sy = (t @ (c - c.mean()) / (t @ t) for c in (cx, cy))
    if sx == 0 and sy == 0:
        return None
    if abs(sx) >= abs(sy):
        return "right" if sx > 0 else "left"
    return "down" if sy > 0 else "up"


def _template(shape: str, area: float, cx: float, cy: float, width: int, height: int) -> np.ndarray:
    """Box-filtered coverage (H, W) of `shape` with `area` px^2 and its centroid at (cx, cy) px."""
    # Half-extent r from the area: circle pi r^2, square 4 r^2, triangle 2 r^2 (base and height 2r).
    r = math.sqrt(area / {"circle": math.pi, "square": 4.0, "triangle": 2.0}[shape])
    if shape == "triangle":
        cy -= r / 3  # the centroid of an upward triangle lies r/3 below its bounding box's center
    scene = Scene("white", shape, "right", "black", size=2 * r / min(width, height), start_x=cx / width,
                  start_y=cy / height, speed=0.0)
    return _box3(render(scene, 1, width, height, fps=1.0).astype(np.float32))[0, ..., 0] / 255


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(((np.array(palette[name]) - rgb) ** 2).sum()))


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box filter over axes 1, 2 of (T, H, W, ...), edges replicated."""
    pad = [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3)
    p = np.pad(x, pad, mode="edge")
    h, w = x.shape[1:3]
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:])[:, :h, :w] / 9


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion of (T, H, W) bool."""
    p = np.pad(mask, [(0, 0), (1, 1), (1, 1)], constant_values=False)
    return mask & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation of (T, H, W) bool."""
    p = np.pad(mask, [(0, 0), (1, 1), (1, 1)], constant_values=False)
    h, w = mask.shape[1:]
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= p[:, dy:dy + h, dx:dx + w]
    return out
