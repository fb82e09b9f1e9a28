"""Classifier-free guidance, oscillating guidance schedules and Imagen's dynamic thresholding."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from cascade.diffusion.param import append_dims

# fn(z, logsnr, uncond) -> x_hat, with uncond: (B,) bool, True where the text condition is dropped
GuidedFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def cfg(x_cond: Tensor, x_uncond: Tensor, w: float | Tensor) -> Tensor:
    """Classifier-free guidance in the (1 + w) convention of VDM, Imagen Video and Meng et al.

    w = 0 is the conditional model. Imagen writes w x_c + (1 - w) x_u instead, where w = 1 means no
    guidance: Imagen Video's "w = 6" is Imagen's 7. The combination is the same in x, eps or v space
    (it is affine and all three are affine in each other). w may be a (B,) tensor.
    """
    if isinstance(w, Tensor) and w.ndim == 1:
        w = append_dims(w.to(x_cond.dtype), x_cond.ndim)
    # x~ = (1 + w) x_hat(z, c) - w x_hat(z) (Imagen Video sec. 2.6.1)
    return (1 + w) * x_cond - w * x_uncond


def guidance_weights(num_steps: int, weight: float, oscillate: tuple[float, float] | None = None,
                     constant_steps: int = 0) -> list[float]:
    """Per-step guidance weights, noisiest step first.

    Constant `weight`, or with `oscillate=(high, low)` (Imagen Video sec. 2.6.2; `weight` is then unused):
    `high` for the first max(constant_steps, 1) steps, then alternating low, high, low, ...
    E.g. (15, 1) with constant_steps=3 gives 15, 15, 15, 1, 15, 1, ...; constant_steps=0 or 1 gives 15, 1, 15, ...
    """
    if oscillate is None:
        return [float(weight)] * num_steps
    high, low = (float(w) for w in oscillate)
    first_low = max(constant_steps, 1)
    return [high if i < first_low or (i - first_low) % 2 == 1 else low for i in range(num_steps)]


def _quantile(a: Tensor, q: float) -> Tensor:
    # per-row linear-interpolation quantile via kthvalue (torch.quantile refuses inputs over 2^24 elements)
    n = a.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = a.kthvalue(lo + 1, dim=1).values
    v_hi = a.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def _check_percentile(percentile: float) -> None:
    if not 1.0 < percentile <= 100.0:
        raise ValueError(f"percentile is a percentage in (1, 100], e.g. 99.5 (not a fraction like 0.995); "
                         f"got {percentile}")


def dynamic_threshold(x: Tensor, percentile: float = 99.5) -> Tensor:
    """Imagen's dynamic thresholding of x_hat: (B, ...) -> (B, ...) within [-1, 1].

    `percentile` is in 0-100 (Imagen shows 99.5), not a fraction. s is at least 1, so a sample whose percentile
    is at most 1 is clipped to [-1, 1] (static thresholding), not left unchanged.
    """
    _check_percentile(percentile)
    # s = max(p-th percentile of |x|, 1); x <- clip(x, -s, s) / s (Imagen sec. 2.3)
    a = x.abs().flatten(1)  # (B, D)
    s = _quantile(a.to(torch.promote_types(a.dtype, torch.float32)), percentile / 100.0).clamp(min=1.0)  # (B,)
    s = append_dims(s.to(x.dtype), x.ndim)
    return torch.maximum(torch.minimum(x, s), -s) / s


class GuidedModel:
    """Guided denoiser in the sampler contract `model(z, logsnr, step) -> x_hat`.

    `fn(z, logsnr, uncond) -> x_hat` evaluates the network, dropping the text condition where the
    (B,) bool `uncond` is True. With guidance the conditional and unconditional passes run as one
    batch of 2B (`batched=True`) or as two calls; a step whose weight is 0 runs only the conditional
    pass. `nfe` counts network evaluations per sample (2 per guided step, 1 otherwise).
    `thresholding` is None, "static" (clip to [-1, 1]) or "dynamic" (at `percentile`).
    """

    def __init__(self, fn: GuidedFn, weights: float | Sequence[float], thresholding: str | None = None,
                 percentile: float = 99.5, batched: bool = True) -> None:
        if thresholding not in (None, "static", "dynamic"):
            raise ValueError(f"thresholding must be None, 'static' or 'dynamic', got {thresholding!r}")
        if thresholding == "dynamic":
            _check_percentile(percentile)
        self.fn, self.weights, self.batched = fn, weights, batched
        self.thresholding, self.percentile = thresholding, percentile
        self.nfe = 0

    @classmethod
    def from_pair(cls, cond_fn: Callable[[Tensor, Tensor], Tensor], uncond_fn: Callable[[Tensor, Tensor], Tensor],
                  weights: float | Sequence[float], **kw) -> GuidedModel:
        """Build from separate conditional and unconditional denoisers `(z, logsnr) -> x_hat`."""
        def fn(z: Tensor, logsnr: Tensor, uncond: Tensor) -> Tensor:
            if not uncond.any():
                return cond_fn(z, logsnr)
            if uncond.all():
                return uncond_fn(z, logsnr)
            x_hat = torch.empty_like(z)
            x_hat[~uncond] = cond_fn(z[~uncond], logsnr[~uncond])
            x_hat[uncond] = uncond_fn(z[uncond], logsnr[uncond])
            return x_hat
        return cls(fn, weights, **kw)

    def weight(self, step: int) -> float:
        """Guidance weight w of step `step`."""
        return float(self.weights) if isinstance(self.weights, (int, float)) else float(self.weights[step])

    def __call__(self, z: Tensor, logsnr: Tensor, step: int) -> Tensor:
        w = self.weight(step)
        batch = z.shape[0]
        cond = torch.zeros(batch, dtype=torch.bool, device=z.device)
        if w == 0:
            x_hat = self.fn(z, logsnr, cond)
            self.nfe += 1
        else:
            if self.batched:
                x_both = self.fn(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([cond, ~cond]))
                x_cond, x_uncond = x_both[:batch], x_both[batch:]
            else:
                x_cond, x_uncond = self.fn(z, logsnr, cond), self.fn(z, logsnr, ~cond)
            x_hat = cfg(x_cond, x_uncond, w)
            self.nfe += 2
        if self.thresholding == "static":
            return x_hat.clamp(-1.0, 1.0)
        if self.thresholding == "dynamic":
            return dynamic_threshold(x_hat, self.percentile)
        return x_hat
