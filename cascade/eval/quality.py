"""Pixel measures of a stage's videos against their ground truth: PSNR, SSIM and, for the synthetic dataset, how far
the background is from its true colour.

In ``gt`` mode (`cascade eval --modes gt`) a stage is given the ground truth at its input's resolution, so PSNR and
SSIM against the ground truth at its own resolution measure what the stage itself adds or loses; in ``cascade``
mode they also carry the earlier stages' errors. SSIM is torchmetrics' (Wang et al. 2004: Gaussian window of
sigma 1.5, 11 pixels or the largest odd size that fits a smaller frame), per frame on [0, 1] colours in float32
(float64 is 15x slower on a CPU: 40 s for the demo's 28 final-stage videos; float32 is within 1e-3), averaged.

The background deviation reads the caption's background (`cascade.eval.probes.parse_caption`): the mean absolute
difference, in uint8 levels over the three channels, between the video and the background's palette colour, over the
pixels that are background in both videos, each object grown by one pixel (the anti-aliased edge does not count):
the ground truth's background is within `PURE_LEVELS` of the colour (its codec's noise), the video's within
`OBJECT_LEVELS` (half the distance from either background to the nearest object colour). Both are needed: in
``cascade`` mode the sampled object is elsewhere than the ground truth's (the base draws its own start), and its
pixels there are the object, not a cast of the background. A colour cast such as the demo's green tint shows up here
and not in the background probe, which only names the nearer of black and gray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cascade.data.synthetic import BACKGROUNDS

__all__ = ["OBJECT_LEVELS", "PURE_LEVELS", "background_deviation", "psnr_db", "quality_scores", "ssim"]

MAX_KERNEL = 11  # SSIM's Gaussian window (Wang et al. 2004)
PURE_LEVELS = 8.0  # a ground-truth pixel within this of the background colour is background (its codec's noise)
OBJECT_LEVELS = 64.0  # a sampled pixel further than this from it is the object: every object colour is >= 127 away


def psnr_db(video: np.ndarray, truth: np.ndarray) -> float:
    """PSNR (dB, peak 255) of one uint8 video (or frame) against its ground truth of the same shape; inf when
    equal."""
    a, b = np.asarray(video, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr_db needs videos of one shape, got {a.shape} and {b.shape}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim(video: np.ndarray, truth: np.ndarray) -> float:
    """Mean SSIM over the frames of one uint8 video (T, H, W, 3) against its ground truth."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if np.shape(video) != np.shape(truth):
        raise ValueError(f"ssim needs videos of one shape, got {np.shape(video)} and {np.shape(truth)}")
    frames = lambda v: torch.from_numpy(np.asarray(v, dtype=np.float32) / 255.0).permute(0, 3, 1, 2)  # noqa: E731
    side = min(np.shape(video)[1:3])
    kernel = min(MAX_KERNEL, side if side % 2 else side - 1)
    value = structural_similarity_index_measure(frames(video), frames(truth), data_range=1.0, kernel_size=kernel,
                                                sigma=1.5 * kernel / MAX_KERNEL)
    return float(value)


def _grow(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation of (T, H, W) bool."""
    h, w = mask.shape[1:]
    p = np.pad(mask, [(0, 0), (1, 1), (1, 1)])
    return np.any([p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def background_deviation(video: np.ndarray, truth: np.ndarray, background: str) -> float | None:
    """Mean |video - background colour| (uint8 levels) over the pixels that are background in `truth` (within
    `PURE_LEVELS`) and in `video` (within `OBJECT_LEVELS`), each object grown by a pixel; None when there is no such
    pixel."""
    colour = np.array(BACKGROUNDS[background], dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    deviation = np.abs(np.asarray(video, dtype=np.float64) - colour)
    pure = ~_grow(np.abs(truth - colour).max(axis=-1) > PURE_LEVELS)  # (T, H, W)
    pure &= ~_grow(deviation.max(axis=-1) > OBJECT_LEVELS)
    if not pure.any():
        return None
    return float(deviation[pure].mean())


def quality_scores(videos: Sequence[np.ndarray], truths: Sequence[np.ndarray], captions: Sequence[str] | None,
                   pixels: bool = True) -> dict:
    """Sums over videos, to be merged across ranks and divided by the counts: psnr_db (infinite values, a video
    equal to its ground truth, count at 100 dB), ssim, background (with `captions` of the synthetic dataset).
    `pixels` False (the ground truth scored against itself): the background only. Returns {name: [sum, count]}."""
    from cascade.eval.probes import parse_caption

    out = {"psnr_db": [0.0, 0], "ssim": [0.0, 0], "background": [0.0, 0]}
    for i, (video, truth) in enumerate(zip(videos, truths)):
        if pixels:
            out["psnr_db"][0] += min(psnr_db(video, truth), 100.0)
            out["ssim"][0] += ssim(video, truth)
            out["psnr_db"][1] += 1
            out["ssim"][1] += 1
        try:  # the synthetic dataset's captions name the background; other captions do not
            background = parse_caption(captions[i])["background"] if captions is not None else None
        except ValueError:
            background = None
        if background is not None:
            deviation = background_deviation(video, truth, background)
            if deviation is not None:
                out["background"][0] += deviation
                out["background"][1] += 1
    return out
