"""Parameterizations (x, eps, v) and the `Denoiser` adapter that turns any of them into x_hat.

With z = alpha x + sigma eps and v = alpha eps - sigma x (Salimans & Ho 2022, sec. 4), all seven
conversions below are exact; alpha and sigma must already broadcast against z (see `append_dims`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from cascade.diffusion.schedule import alpha_sigma

PARAMETERIZATIONS = ("v", "eps", "x")


def append_dims(a: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims: (B,) -> (B, 1, ..., 1) with `ndim` dims in all."""
    if a.ndim > ndim:
        raise ValueError(f"cannot broadcast a {a.ndim}-d tensor to {ndim} dims")
    return a.reshape(*a.shape, *([1] * (ndim - a.ndim)))


def diffuse(x: Tensor, logsnr: Tensor, noise: Tensor) -> Tensor:
    """The forward process: x (B, ...) noised to the levels logsnr (B,) with `noise` shaped like x."""
    alpha, sigma = (append_dims(c.to(x.dtype), x.ndim) for c in alpha_sigma(logsnr))
    # z_t = alpha_t x + sigma_t eps, q(z_t | x) (Kingma et al. 2021)
    return alpha * x + sigma * noise


def v_from_x_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # v = alpha eps - sigma x (PD sec. 4)
    return alpha * eps - sigma * x


def x_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # x = alpha z - sigma v (PD sec. 4)
    return alpha * z - sigma * v


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # eps = sigma z + alpha v (PD sec. 4)
    return sigma * z + alpha * v


def v_from_eps(z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # v = (eps - sigma z) / alpha, from eps = sigma z + alpha v
    return (eps - sigma * z) / alpha


def v_from_x(z: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # v = (alpha z - x) / sigma, from x = alpha z - sigma v
    return (alpha * z - x) / sigma


def x_from_eps(z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # x = (z - sigma eps) / alpha, from z = alpha x + sigma eps
    return (z - sigma * eps) / alpha


def eps_from_x(z: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # eps = (z - alpha x) / sigma, from z = alpha x + sigma eps
    return (z - alpha * x) / sigma


class Denoiser(nn.Module):
    """Adapter from a bare network to the denoiser x_hat(z, logsnr).

    `net(z, logsnr, **cond) -> raw` with z: (B, C, T, H, W) (any trailing dims), logsnr: (B,);
    `raw` is read as v, eps or x according to `parameterization`. The network never sees alpha or sigma.
    """

    def __init__(self, net: Callable[..., Tensor] | nn.Module, parameterization: str = "v") -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.net = net
        self.parameterization = parameterization

    def _raw(self, z: Tensor, logsnr: Tensor | float, **cond) -> tuple[Tensor, Tensor, Tensor]:
        dtype = torch.promote_types(z.dtype, torch.float32)  # keep log-SNR precise for half-precision z
        logsnr = torch.as_tensor(logsnr, dtype=dtype, device=z.device).expand(z.shape[0])  # (B,)
        alpha, sigma = (append_dims(c, z.ndim) for c in alpha_sigma(logsnr))
        return self.net(z, logsnr, **cond), alpha, sigma

    def forward(self, z: Tensor, logsnr: Tensor | float, **cond) -> Tensor:
        """x_hat: same shape as z."""
        raw, alpha, sigma = self._raw(z, logsnr, **cond)
        if self.parameterization == "v":
            return x_from_v(z, raw, alpha, sigma)
        if self.parameterization == "eps":
            return x_from_eps(z, raw, alpha, sigma)
        return raw

    def predict_v(self, z: Tensor, logsnr: Tensor | float, **cond) -> Tensor:
        """v_hat: same shape as z; the raw output for a v-network, else one direct conversion."""
        raw, alpha, sigma = self._raw(z, logsnr, **cond)
        if self.parameterization == "v":
            return raw
        if self.parameterization == "eps":
            return v_from_eps(z, raw, alpha, sigma)
        return v_from_x(z, raw, alpha, sigma)
