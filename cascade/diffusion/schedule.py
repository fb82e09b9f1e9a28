"""Continuous-time log-SNR schedules: the clipped cosine schedule and its resolution shift."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _cosine_bounds(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    # angles at the clip points: t=0 -> b, t=1 -> a + b (Kingma et al. 2021; PD schedules.py)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return a, b


def logsnr_cosine(t: Tensor | float, logsnr_min: float = -20.0, logsnr_max: float = 20.0,
                  shift: float = 0.0) -> Tensor:
    """Clipped cosine log-SNR: t=0 -> logsnr_max, t=1 -> logsnr_min, plus `shift` everywhere.

    t: any shape in [0, 1]; the result has t's shape and floating dtype (computed in float64).
    The shift moves the endpoints too: lambda(0) = logsnr_max + shift.
    """
    t = torch.as_tensor(t)
    dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    a, b = _cosine_bounds(logsnr_min, logsnr_max)
    # lambda(t) = -2 log tan(a t + b) + shift (cosine schedule; Hoogeboom et al. 2023 shift)
    logsnr = -2.0 * torch.log(torch.tan(a * t.double() + b)) + shift
    return logsnr.to(dtype)


def t_from_logsnr(logsnr: Tensor | float, logsnr_min: float = -20.0, logsnr_max: float = 20.0,
                  shift: float = 0.0) -> Tensor:
    """Inverse of `logsnr_cosine` (same arguments): log-SNR -> t in [0, 1]."""
    logsnr = torch.as_tensor(logsnr)
    dtype = logsnr.dtype if logsnr.is_floating_point() else torch.get_default_dtype()
    a, b = _cosine_bounds(logsnr_min, logsnr_max)
    # t = (atan(exp(-(lambda - shift) / 2)) - b) / a
    t = (torch.atan(torch.exp(-0.5 * (logsnr.double() - shift))) - b) / a
    return t.to(dtype)


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Variance-preserving (alpha, sigma) from log-SNR lambda, same shape and dtype."""
    # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) (variance preserving; Kingma et al. 2021)
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def resolution_shift(resolution: float, base_resolution: float) -> float:
    """Log-SNR shift for training at `resolution` a schedule tuned at `base_resolution`."""
    # lambda_shifted(t) = lambda(t) + 2 log(base / resolution) (Hoogeboom et al. 2023, simple diffusion)
    return 2.0 * math.log(base_resolution / resolution)


@dataclass(frozen=True)
class CosineSchedule:
    """The clipped (and optionally shifted) cosine schedule as a value a recipe can build."""

    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max, got {self.logsnr_min} >= {self.logsnr_max}")

    def __call__(self, t: Tensor | float) -> Tensor:
        return logsnr_cosine(t, self.logsnr_min, self.logsnr_max, self.shift)

    def t(self, logsnr: Tensor | float) -> Tensor:
        """Inverse schedule: log-SNR -> t."""
        return t_from_logsnr(logsnr, self.logsnr_min, self.logsnr_max, self.shift)
