"""Sampling videos longer than a stage's clip length with overlapping temporal windows.

A stage is trained on clips of F frames. To super-resolve a longer video, the sampler keeps the full-length z
and, at every denoising step, `WindowedDenoiser` runs the network on overlapping windows of F frames and blends
their x_hat predictions into one full-length x_hat (MultiDiffusion, Bar-Tal et al. 2023: the per-step
least-squares fusion of the window predictions is their per-frame weighted mean; fusing x_hat instead of the
next z is the same for steps affine in x_hat given z, as DDIM's). Each window's weights ramp linearly across
its overlaps and the weights of the windows covering a frame sum to one, so the blend is a convex combination
per frame: no seam, and a prediction that every window agrees on (e.g. the identity) passes through unchanged.
Memory is bounded by one window, since the windows run one after another.

Stages with temporal convolutions are local in time: a frame's output depends only on frames within the
network's temporal receptive field, so a window reproduces the full-length pass exactly on frames that lie
further than that field from its cut edges, and the overlaps only have to cover the cut edges.
Stages with temporal attention are not local: each window attends only within itself, so frames further apart
than a window are never attended together and are coupled only through the blended overlaps, step after step.
Consistency across windows then comes from the shared conditioning (text, the lower stage's video, known
frames) and the overlap blending, not from attention. Either way a window has the clip length the stage was
trained on (frame-time embeddings, where used, are measured from the window's centre, as in training).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]  # denoiser(z, logsnr, **cond) -> x_hat, z: (B, C, T, H, W)


def _check_window(window: int, overlap: int, align: int) -> None:
    if window < 1 or align < 1:
        raise ValueError(f"window ({window}) and align/ratio ({align}) must be at least 1")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must satisfy 0 <= overlap < window ({window}), got {overlap}")
    if window % align:
        raise ValueError(f"window ({window}) must be a multiple of align/ratio ({align}) so that every "
                         f"window spans whole input frames")


def window_starts(total: int, window: int, overlap: int, align: int = 1) -> list[int]:
    """Start frames of windows of `window` frames covering [0, total): the first at 0, stride
    `window - overlap` rounded down to a multiple of `align` (at least `align`), the last ending at `total`.
    `align` is the temporal upsampling ratio r of a TSR stage: every window starts on an input frame."""
    _check_window(window, overlap, align)
    if total < window:
        raise ValueError(f"a video of {total} frames is shorter than the window ({window} frames): "
                         f"sample it without windows")
    if (total - window) % align:
        raise ValueError(f"the last window would start at frame {total - window}, not a multiple of "
                         f"align/ratio {align}: the total frame count ({total}) must be a multiple of {align}")
    stride = max((window - overlap) // align * align, align)
    starts = list(range(0, total - window, stride))
    return starts + [total - window]


def blend_weights(total: int, window: int, starts: list[int], overlap: int) -> Tensor:
    """Per-frame blending weights (len(starts), window) float64: a linear ramp (k+1)/(overlap+1) up over a
    window's first `overlap` frames (not the first window's) and down over its last (not the last window's),
    divided by the per-frame sum so that the windows covering any frame of [0, total) sum to exactly one."""
    if not starts or any(a < 0 or a + window > total for a in starts):
        raise ValueError(f"window starts {starts} must lie in [0, {total - window}] for {total} frames")
    ramp = torch.arange(1, window + 1, dtype=torch.float64) / (overlap + 1)  # (k+1)/(overlap+1)
    up, down = ramp.clamp(max=1.0), ramp.flip(0).clamp(max=1.0)
    weights = torch.ones(len(starts), window, dtype=torch.float64)
    weights[1:] = weights[1:].minimum(up)
    weights[:-1] = weights[:-1].minimum(down)
    index = torch.tensor(starts)[:, None] + torch.arange(window)  # (N, window) absolute frame indices
    coverage = torch.zeros(total, dtype=torch.float64).index_add_(0, index.flatten(), weights.flatten())
    if (coverage == 0).any():
        raise ValueError(f"window starts {starts} leave frames of [0, {total}) uncovered")
    return weights / coverage[index]  # w_i(t) / sum_j w_j(t)


def _window_kwargs(cond: dict, a: int, window: int, ratio: int) -> dict:
    """The conditioning of window [a, a + window): per-frame tensors sliced, per-sample ones unchanged."""
    out = dict(cond)
    if out.get("cond") is not None:
        out["cond"] = out["cond"][:, :, a // ratio:(a + window) // ratio]  # (B, C, window / r, h, w)
    if out.get("known") is not None:
        out["known"] = out["known"][:, :, a:a + window]  # (B, C, window, H, W)
    if out.get("known_mask") is not None:
        out["known_mask"] = out["known_mask"][:, a:a + window]  # (B, window)
    return out


class WindowedDenoiser:
    """Wraps a denoiser of clip length `window` to run on longer videos by blending x_hat over overlapping
    windows (see the module docstring). `ratio` is the stage's temporal upsampling factor r: `cond` has
    T / r frames. `calls` counts network calls, so a sampling step costs len(self.windows(T)) of them."""

    def __init__(self, denoiser: Denoiser, window: int, overlap: int, ratio: int = 1) -> None:
        _check_window(window, overlap, ratio)
        self.denoiser, self.window, self.overlap, self.ratio = denoiser, window, overlap, ratio
        self.calls = 0

    def windows(self, total: int) -> list[int]:
        """Start frames of the windows over a video of `total` frames."""
        return window_starts(total, self.window, self.overlap, align=self.ratio)

    def __call__(self, z: Tensor, logsnr: Tensor, **cond) -> Tensor:
        """z: (B, C, T, H, W), logsnr: (B,), cond: the denoiser's keywords at full length -> x_hat like z."""
        total = z.shape[2]
        if total == self.window:  # one clip: the denoiser itself
            self.calls += 1
            return self.denoiser(z, logsnr, **cond)
        if cond.get("cond") is not None and cond["cond"].shape[2] * self.ratio != total:
            raise ValueError(f"cond has {cond['cond'].shape[2]} frames but z has {total}: at ratio "
                             f"{self.ratio} cond needs {total // self.ratio}")
        starts = self.windows(total)
        weights = blend_weights(total, self.window, starts, self.overlap).to(z.device)
        out = None
        for a, w in zip(starts, weights):
            kwargs = _window_kwargs(cond, a, self.window, self.ratio)
            x_hat = self.denoiser(z[:, :, a:a + self.window], logsnr, **kwargs)
            self.calls += 1
            if out is None:  # accumulate in at least float32, return in x_hat's dtype
                acc = torch.promote_types(x_hat.dtype, torch.float32)
                out = x_hat.new_zeros((*x_hat.shape[:2], total, *x_hat.shape[3:]), dtype=acc)
            # x_hat(t) = sum_i w_i(t) x_hat_i(t), sum_i w_i(t) = 1 (MultiDiffusion's weighted fusion)
            out[:, :, a:a + self.window] += x_hat.to(acc) * w.to(acc)[:, None, None]
        return out.to(x_hat.dtype)
