"""Noise conditioning augmentation for the super-resolution stages (Imagen Video sec. 2.5)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cascade.diffusion.noise import Generator, randn
from cascade.diffusion.param import diffuse
from cascade.diffusion.schedule import logsnr_cosine


def _level_dtype(cond: Tensor) -> torch.dtype:
    return torch.promote_types(cond.dtype, torch.float32)  # levels stay float32 for half-precision videos


@dataclass(frozen=True)
class NoiseAugmentation:
    """Noises the low-resolution conditioning video and reports the level as a log-SNR.

    Training draws one level per sample, uniform in t of the cosine schedule clipped to
    [logsnr_min, logsnr_max]; sampling uses the fixed `sample_logsnr`, in the same log-SNR units
    (Imagen Video samples at SNR 3 or 5, i.e. log-SNR log 3 or log 5).
    """

    logsnr_min: float
    logsnr_max: float = 20.0
    sample_logsnr: float = field(kw_only=True)

    def __post_init__(self) -> None:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max, got {self.logsnr_min} >= {self.logsnr_max}")
        if not self.logsnr_min <= self.sample_logsnr <= self.logsnr_max:
            raise ValueError(f"sample_logsnr={self.sample_logsnr} is outside the training range "
                             f"[{self.logsnr_min}, {self.logsnr_max}]; the sampling level must be one seen in training")

    def train(self, cond: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(noisy_cond, aug_logsnr (B,)) with a random level per sample."""
        t = torch.rand(cond.shape[0], generator=generator, device=cond.device, dtype=_level_dtype(cond))
        aug_logsnr = logsnr_cosine(t, self.logsnr_min, self.logsnr_max)  # (B,)
        return self._noised(cond, aug_logsnr, generator)

    def sample(self, cond: Tensor, generator: Generator = None) -> tuple[Tensor, Tensor]:
        """(noisy_cond, aug_logsnr (B,)) at the fixed sampling level."""
        aug_logsnr = torch.full((cond.shape[0],), self.sample_logsnr, device=cond.device, dtype=_level_dtype(cond))
        return self._noised(cond, aug_logsnr, generator)

    def _noised(self, cond: Tensor, aug_logsnr: Tensor, generator: Generator) -> tuple[Tensor, Tensor]:
        noise = randn(cond.shape, generator, device=cond.device, dtype=cond.dtype)
        return diffuse(cond, aug_logsnr, noise), aug_logsnr
