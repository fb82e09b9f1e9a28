"""Single solver steps between two noise levels: pure functions shared by the samplers and distillation.

Noise levels are log-SNRs lambda; `t` is the noisier level and `s` the target. Each may be a python
float, a 0-d tensor or a (B,) tensor; coefficients are computed in float64 and cast to z's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.diffusion.param import append_dims

LogSNR = Tensor | float


def _lam(logsnr: LogSNR, like: Tensor) -> Tensor:
    return torch.as_tensor(logsnr, dtype=torch.float64, device=like.device)


def _coef(c: Tensor, like: Tensor) -> Tensor:
    c = c.to(like.dtype)
    return append_dims(c, like.ndim) if c.ndim == 1 else c  # (B,) -> (B, 1, ..., 1)


def time_grid(num_steps: int, schedule: Callable[[Tensor], Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """Log-SNRs (N+1,) at t_i = 1 - i/N: index 0 is t=1 (the SNR ~ 0 top step), index N is t=0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = (num_steps - torch.arange(num_steps + 1, dtype=torch.float64)) / num_steps
    return schedule(t).to(dtype)


def ddim_step(z_t: Tensor, x_hat: Tensor, logsnr_t: LogSNR, logsnr_s: LogSNR) -> Tensor:
    """Deterministic DDIM step z_t -> z_s given x_hat = x_hat(z_t); shapes (B, ...)."""
    lam_t, lam_s = _lam(logsnr_t, z_t), _lam(logsnr_s, z_t)
    alpha_t, sigma_t = torch.sigmoid(lam_t).sqrt(), torch.sigmoid(-lam_t).sqrt()
    alpha_s, sigma_s = torch.sigmoid(lam_s).sqrt(), torch.sigmoid(-lam_s).sqrt()
    # z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t (Song et al. 2021; PD Alg. 2)
    return _coef(alpha_s, z_t) * x_hat + _coef(sigma_s / sigma_t, z_t) * (z_t - _coef(alpha_t, z_t) * x_hat)


def ancestral_step(z_t: Tensor, x_hat: Tensor, logsnr_t: LogSNR, logsnr_s: LogSNR, gamma: float,
                   noise: Tensor) -> Tensor:
    """Ancestral step z_t -> z_s ~ N(mu~_{s|t}(z_t, x_hat), (sigma~^2_{s|t})^{1-gamma} (sigma^2_{t|s})^gamma).

    gamma = 0 samples the posterior q(z_s | z_t, x = x_hat); gamma = 1 uses the forward variance.
    """
    lam_t, lam_s = _lam(logsnr_t, z_t), _lam(logsnr_s, z_t)
    log_rho = lam_t - lam_s  # rho = e^{lambda_t - lambda_s} = SNR_t / SNR_s
    one_minus_rho = -torch.expm1(log_rho)
    # mu~ = e^{lt-ls} (alpha_s / alpha_t) z_t + (1 - e^{lt-ls}) alpha_s x_hat (VDM sec. 2, Sampling)
    c_z = torch.exp(log_rho + 0.5 * (F.logsigmoid(lam_s) - F.logsigmoid(lam_t)))
    c_x = one_minus_rho * torch.sigmoid(lam_s).sqrt()
    # sigma~^2_{s|t} = (1 - e^{lt-ls}) sigma_s^2, sigma^2_{t|s} = (1 - e^{lt-ls}) sigma_t^2 (VDM sec. 2)
    log_var = torch.log(one_minus_rho) + (1.0 - gamma) * F.logsigmoid(-lam_s) + gamma * F.logsigmoid(-lam_t)
    std = torch.exp(0.5 * log_var)
    return _coef(c_z, z_t) * z_t + _coef(c_x, z_t) * x_hat + _coef(std, z_t) * noise


def renoise_step(z_k: Tensor, logsnr_k: LogSNR, logsnr_s: LogSNR, noise: Tensor) -> Tensor:
    """Forward diffusion q(z_s | z_k) from a cleaner level k to a noisier level s (logsnr_s <= logsnr_k)."""
    lam_k, lam_s = _lam(logsnr_k, z_k), _lam(logsnr_s, z_k)
    # alpha_{s|k} = alpha_s / alpha_k, sigma^2_{s|k} = (1 - e^{ls-lk}) sigma_s^2 (VDM sec. 2, q(z_t | z_s))
    alpha_sk = torch.exp(0.5 * (F.logsigmoid(lam_s) - F.logsigmoid(lam_k)))
    sigma_sk = (torch.sigmoid(-lam_s) * -torch.expm1(lam_s - lam_k)).sqrt()
    return _coef(alpha_sk, z_k) * z_k + _coef(sigma_sk, z_k) * noise
