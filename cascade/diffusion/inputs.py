"""A stage network's conditioning, built in one place for training, distillation and sampling.

The U-Net of a stage takes, beside z and its log-SNR: the T5 token embeddings and their mask (a dropped caption is a
mask with no token), the frame rate, `is_image` for stills in joint training and, for super-resolution stages, the
low-resolution input `cond` and the log-SNR `aug_logsnr` of the noise added to it (Imagen Video sec. 2.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from cascade.diffusion.augment import NoiseAugmentation
from cascade.diffusion.cfg import drop_captions
from cascade.diffusion.noise import Generator, randn
from cascade.diffusion.param import diffuse

NO_AUGMENTATION = 20.0
"""The `aug_logsnr` of a clean low-resolution input (a stage without noise conditioning augmentation): the top of
the default training range, sigma ~ 4.5e-5."""


@dataclass(frozen=True)
class KnownFrameDraw:
    """Which frames a training sample is given (known-frame conditioning): its first frame with probability
    `first_prob`, its first `clip_frames` frames with probability `clip_prob`, none otherwise."""

    first_prob: float = 0.0
    clip_prob: float = 0.0
    clip_frames: int = 2

    def __post_init__(self) -> None:
        if not (0 <= self.first_prob and 0 <= self.clip_prob and self.first_prob + self.clip_prob <= 1):
            raise ValueError(f"need probabilities with first_prob + clip_prob <= 1, got {self.first_prob}, "
                             f"{self.clip_prob}")

    def draw(self, batch: int, frames: int, generator: Generator = None, device=None) -> Tensor:
        """(B, T) bool: the known frames of each sample. One uniform draw per sample."""
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        count = torch.where(u < self.first_prob, 1, torch.where(u < self.first_prob + self.clip_prob,
                                                                 min(self.clip_frames, frames), 0))
        return torch.arange(frames, device=device)[None, :] < count[:, None]


def first_frames(batch: int, frames: int, count: int, device=None) -> Tensor:
    """(B, T) bool: the first `count` frames of every sample known."""
    return (torch.arange(frames, device=device) < count)[None, :].expand(batch, frames).clone()


def stage_inputs(batch: Mapping[str, Tensor | float], augmentation: NoiseAugmentation | None = None, *,
                 training: bool = False, text_drop_prob: float = 0.0, generator: Generator = None,
                 known_frames: KnownFrameDraw | None = None) -> dict[str, Tensor]:
    """The network's keyword inputs for one stage.

    batch: text (B, L, D), text_mask (B, L) bool, fps (B,) or one number, optionally is_image (B,) bool and, for
    super-resolution, cond (B, 3, T', H', W') in [-1, 1]: the input stage's clip (training) or samples (sampling).
    training: a share `text_drop_prob` of the captions is dropped and each sample's augmentation level is drawn
    from the training range; otherwise captions stay and the input is noised at the fixed sampling level. Draws
    come from `generator`, in this order: caption dropout (training only), then augmentation, then known frames.

    Known frames (a stage with `known_frames`): in training `known_frames` draws each sample's known frames of its
    own clip (batch["video"]); at sampling batch["known"] (B, 3, T, H, W) and batch["known_mask"] (B, T) are
    given. In a stage with augmentation they are noised like `cond`, at the same level per sample.
    Returns text, text_mask, fps (B,), is_image when given, cond with aug_logsnr (B,) when given, and known with
    known_mask when drawn or given.
    """
    text, text_mask = batch["text"], batch["text_mask"]
    size, device = text.shape[0], text.device
    if training:
        text_mask = drop_captions(text_mask, text_drop_prob, generator)
    fps = batch["fps"]
    fps = fps if isinstance(fps, Tensor) else torch.full((size,), float(fps), device=device)
    inputs = dict(text=text, text_mask=text_mask, fps=fps)
    if batch.get("is_image") is not None:
        inputs["is_image"] = batch["is_image"]
    low = batch.get("cond")
    if low is not None:
        if augmentation is None:
            inputs.update(cond=low, aug_logsnr=torch.full((size,), NO_AUGMENTATION, device=device))
        else:  # a random level per sample in training, the fixed level at sampling, in the same units
            noisy, aug_logsnr = (augmentation.train if training else augmentation.sample)(low, generator=generator)
            inputs.update(cond=noisy, aug_logsnr=aug_logsnr)
    known, known_mask = batch.get("known"), batch.get("known_mask")
    if training and known_frames is not None:
        known = batch["video"]
        known_mask = known_frames.draw(size, known.shape[2], generator, device)
    if known is not None:
        if known_mask is None:
            raise ValueError("known frames need known_mask (B, T) bool")
        if "aug_logsnr" in inputs and augmentation is not None:  # the same level as the low-resolution input
            level = inputs["aug_logsnr"]
            known = diffuse(known, level, randn(known.shape, generator, device=known.device, dtype=known.dtype))
        inputs.update(known=known, known_mask=known_mask)
    return inputs
