"""The diffusion training loss in v-space, its log-SNR weightings, and the training-time log-SNR draw."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.diffusion.param import Denoiser, append_dims, diffuse, v_from_x_eps
from cascade.diffusion.schedule import alpha_sigma

WEIGHTINGS = ("snr+1", "truncated_snr")


def _log_loss_weight(logsnr: Tensor, weighting: str) -> Tensor:
    if weighting == "snr+1":
        return F.softplus(logsnr)  # log(1 + SNR)
    if weighting == "truncated_snr":
        return F.relu(logsnr)  # log max(SNR, 1)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def loss_weight(logsnr: Tensor, weighting: str = "snr+1") -> Tensor:
    """w(lambda) of the x-space loss w(lambda) ||x - x_hat||^2; same shape as logsnr."""
    # "snr+1": w = 1 + SNR; "truncated_snr": w = max(SNR, 1) (PD sec. 4)
    return torch.exp(_log_loss_weight(logsnr, weighting))


def diffusion_loss(denoiser: Denoiser, x: Tensor, logsnr: Tensor, noise: Tensor,
                   weighting: str = "snr+1", **cond) -> Tensor:
    """Per-sample loss (B,): w(lambda) ||x - x_hat||^2, computed as w / (1 + SNR) ||v - v_hat||^2.

    x, noise: (B, C, T, H, W) (any trailing dims); logsnr: (B,). `denoiser` needs `predict_v`.
    "snr+1" is the plain v-MSE; means are over all non-batch dims.
    """
    alpha, sigma = (append_dims(c, x.ndim) for c in alpha_sigma(logsnr))
    z = diffuse(x, logsnr, noise)
    v = v_from_x_eps(x, noise, alpha, sigma)
    v_hat = denoiser.predict_v(z, logsnr, **cond)
    mse_v = (v - v_hat).square().flatten(1).mean(dim=1)  # (B,)
    # ||x - x_hat||^2 = ||v - v_hat||^2 / (1 + SNR), so the v-space factor is w / (1 + SNR)
    return torch.exp(_log_loss_weight(logsnr, weighting) - F.softplus(logsnr)) * mse_v


def sample_logsnr_train(batch: int, schedule: Callable[[Tensor], Tensor],
                        generator: torch.Generator | None = None, stratified: bool = False,
                        device: torch.device | str | None = None) -> Tensor:
    """Training noise levels (B,): t ~ U[0, 1] mapped through `schedule`.

    `stratified=True` draws the low-discrepancy t_i = (u + i / B) mod 1 (Kingma et al. 2021,
    variational diffusion models), which lowers the variance of the batch loss.
    """
    if stratified:
        u = torch.rand((), generator=generator, device=device)
        t = torch.remainder(u + torch.arange(batch, device=device) / batch, 1.0)
    else:
        t = torch.rand(batch, generator=generator, device=device)
    return schedule(t)
