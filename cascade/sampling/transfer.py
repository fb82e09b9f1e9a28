"""Carrying an edit's colours onto the input's structure: the colour guided filter (He, Sun and Tang, "Guided Image
Filtering", TPAMI 2013, §3.5) and its coefficients brought to a finer stage (Chen et al., "Bilateral Guided
Upsampling", 2016: fit locally affine maps at low resolution, upsample the maps, apply them at high resolution).

In every window of (2r + 1)^2 pixels and a few frames the edited video is modelled as an affine map of the input's
colours,
q = A^T I + b (A 3x3, b 3): least squares with the ridge `eps` on A (eq. 14 of the paper). Each pixel then takes the
mean of the maps of the windows covering it and applies it to its own input colour. Where the edit only changes
colours (a red object turned blue, a tint, a lighting change), the map is exact and the output has the input's edges
and positions exactly; where an edit moves an edge by less than r pixels, the edge stays where the input has it and
takes the edit's colours; what an edit adds that the input has no edge for (a new shape) is lost, so structure
transfer is for appearance edits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["apply_maps", "fit_maps", "guided_transfer", "transfer_radius", "upsample_maps"]

EPS = 1e-3  # the ridge on A, in [-1, 1] units squared (a colour step of 0.1 weighs 10x the ridge)


def transfer_radius(height: int, width: int) -> int:
    """The window radius for a frame size: a quarter of the smaller side, at least 1 (8x8: 5x5 windows; 64x64:
    33x33). Windows of an eighth let a lower stage's maps, held over frames where the object has moved on, paint the
    edit's colour where the object was (tiny cascade: 7 of 8 held-out edits within 2 px at 64x64 instead of 8 of 8)."""
    return max(1, round(min(height, width) / 4))


def _frames(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B T, C, H, W)."""
    return x.transpose(1, 2).flatten(0, 1)


def _videos(x: Tensor, batch: int) -> Tensor:
    """(B T, C, H, W) -> (B, C, T, H, W)."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


def _box(x: Tensor, radius: int) -> Tensor:
    """Mean over the (2r + 1)^2 window at each pixel of (N, C, H, W), over the pixels inside the frame: a column
    pass, then a row pass (the window and its count of inside pixels both factor; 2 (2r + 1) additions a pixel
    instead of (2r + 1)^2)."""
    size = 2 * radius + 1
    x = F.avg_pool2d(x, (size, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return F.avg_pool2d(x, (1, size), stride=1, padding=(0, radius), count_include_pad=False)


def _box_time(x: Tensor, batch: int, radius: int) -> Tensor:
    """Mean over the 2r + 1 frames around each frame of (B T, C, H, W), over the frames inside the clip."""
    if radius == 0:
        return x
    shape = x.shape
    flat = x.unflatten(0, (batch, -1)).transpose(1, 2).flatten(3)  # (B, C, T, H W)
    flat = F.avg_pool2d(flat, (2 * radius + 1, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return flat.unflatten(3, shape[-2:]).transpose(1, 2).flatten(0, 1)


def fit_maps(guide: Tensor, target: Tensor, radius: int, eps: float = EPS, time_radius: int | None = None
             ) -> Tensor:
    """The per-pixel mean affine colour maps from `guide` to `target`, both (B, 3, T, H, W): (B, 12, T, H, W),
    channels 3 i + j = A[i, j] (input channel i to output channel j), then 9 + j = b[j]. Each map is fitted over a
    window of (2 radius + 1)^2 pixels and 2 time_radius + 1 frames (default: a quarter of the clip on each side), so
    one frame where the edit went astray (an object the sampler drew dim) takes its neighbours' colours."""
    if guide.shape != target.shape or guide.shape[1] != 3:
        raise ValueError(f"fit_maps needs two (B, 3, T, H, W) videos of one shape, got {tuple(guide.shape)} "
                         f"and {tuple(target.shape)}")
    batch, frames = guide.shape[0], guide.shape[2]
    span = max(1, frames // 4) if time_radius is None else time_radius
    window = lambda x: _box_time(_box(x, radius), batch, span)  # noqa: E731
    i, p = _frames(guide.double()), _frames(target.double())  # (N, 3, H, W)
    mean_i, mean_p = window(i), window(p)
    products = torch.cat([i[:, a:a + 1] * torch.cat([i, p], dim=1) for a in range(3)], dim=1)  # (N, 18, H, W)
    moments = window(products).unflatten(1, (3, 6))  # E[I_a I_c], E[I_a p_j] per window
    var = moments[:, :, :3] - mean_i[:, :, None] * mean_i[:, None]  # (N, 3, 3, H, W): cov(I_a, I_c)
    cov = moments[:, :, 3:] - mean_i[:, :, None] * mean_p[:, None]  # (N, 3, 3, H, W): cov(I_a, p_j)
    ridge = eps * torch.eye(3, dtype=var.dtype, device=var.device)
    a = torch.linalg.solve(var.permute(0, 3, 4, 1, 2) + ridge, cov.permute(0, 3, 4, 1, 2))  # (N, H, W, 3, 3)
    a = a.permute(0, 3, 4, 1, 2)  # (N, 3, 3, H, W): A[i, j]
    b = mean_p - (a * mean_i[:, :, None]).sum(dim=1)  # (N, 3, H, W)
    maps = _box(torch.cat([a.flatten(1, 2), b], dim=1), radius)  # (N, 12, H, W)
    return _videos(maps, batch).to(guide.dtype)


def apply_maps(maps: Tensor, guide: Tensor) -> Tensor:
    """q_j = sum_i A[i, j] I_i + b_j per pixel: maps (B, 12, T, H, W), guide (B, 3, T, H, W) -> (B, 3, T, H, W)."""
    a = maps[:, :9].unflatten(1, (3, 3))  # (B, 3, 3, T, H, W)
    return (a * guide[:, :, None]).sum(dim=1) + maps[:, 9:]


def upsample_maps(maps: Tensor, frames: int, height: int, width: int) -> Tensor:
    """Maps at a lower stage's shape -> (B, 12, frames, height, width): linear in time (the lower stage's frame i
    at frame r i, held after the last, as `cascade.sampling.cascade.spread_in_time`), bilinear in space."""
    from cascade.sampling.cascade import spread_in_time

    x = spread_in_time(maps, frames)
    if x.shape[-2:] != (height, width):
        x = _videos(F.interpolate(_frames(x), size=(height, width), mode="bilinear", align_corners=False),
                    x.shape[0])
    return x


def guided_transfer(guide: Tensor, target: Tensor, radius: int | None = None, eps: float = EPS,
                    time_radius: int | None = None) -> Tensor:
    """`target`'s colours on `guide`'s structure, both (B, 3, T, H, W) in [-1, 1]: the colour guided filter of
    `target` with guide `guide` (radius: `transfer_radius` of the frame; time_radius: `fit_maps`'), clamped to
    [-1, 1]."""
    radius = transfer_radius(*guide.shape[-2:]) if radius is None else radius
    return apply_maps(fit_maps(guide, target, radius, eps, time_radius), guide).clamp(-1.0, 1.0)
