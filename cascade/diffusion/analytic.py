"""Exact ideal denoisers E[x | z_t] for simple data, and the exact output law of samplers on Gaussian data.

Used as ground truth by tests of the samplers and of distillation: with x ~ N(m, s^2) per element every
sampler step is affine in z plus independent Gaussian noise, so its output law is known in closed form.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from cascade.diffusion.param import append_dims
from cascade.diffusion.schedule import alpha_sigma

SAMPLER_KINDS = ("ddim", "ancestral", "stochastic")


def _broadcast_alpha_sigma(z: Tensor, logsnr: Tensor | float) -> tuple[Tensor, Tensor]:
    logsnr = torch.as_tensor(logsnr, dtype=z.dtype, device=z.device)
    if logsnr.ndim == 1 and z.ndim > 1:
        logsnr = append_dims(logsnr, z.ndim)  # (B,) -> (B, 1, ...)
    return alpha_sigma(logsnr)


class GaussianDenoiser:
    """Ideal denoiser for data x ~ N(mean, std^2) i.i.d. per element: (z, logsnr) -> E[x | z]."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    def __call__(self, z: Tensor, logsnr: Tensor | float) -> Tensor:
        alpha, sigma = _broadcast_alpha_sigma(z, logsnr)
        s2 = self.std ** 2
        # E[x|z] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha m) (Gaussian conditioning)
        return self.mean + alpha * s2 / (alpha ** 2 * s2 + sigma ** 2) * (z - alpha * self.mean)

    def sample(self, n: int | Sequence[int], generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> Tensor:
        """Data samples of shape n (int or shape)."""
        shape = (n,) if isinstance(n, int) else tuple(n)
        return self.mean + self.std * torch.randn(shape, generator=generator, dtype=dtype)

    def moments(self) -> tuple[float, float]:
        """(mean, variance) of the data."""
        return self.mean, self.std ** 2

    def sampler_moments(self, logsnrs: Sequence[float] | Tensor, kind: str = "ddim",
                        gamma: float = 0.0) -> tuple[float, float]:
        """Exact (mean, variance) of a sampler's output from z ~ N(0, 1); see `gaussian_sampler_moments`."""
        return gaussian_sampler_moments(self.mean, self.std, logsnrs, kind, gamma)


class GaussianMixtureDenoiser:
    """Ideal denoiser for a 1-D Gaussian mixture, i.i.d. per element: (z, logsnr) -> E[x | z]."""

    def __init__(self, weights: Sequence[float], means: Sequence[float], stds: Sequence[float]) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)  # (K,)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K,)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)  # (K,)
        if not self.weights.shape == self.means.shape == self.stds.shape or self.weights.ndim != 1:
            raise ValueError("weights, means and stds must be 1-D and of equal length")
        self.weights = self.weights / self.weights.sum()

    def __call__(self, z: Tensor, logsnr: Tensor | float) -> Tensor:
        alpha, sigma = _broadcast_alpha_sigma(z, logsnr)
        # components lead: (K, 1, ..., 1) against z[None]: (1, ...)
        w, m, s = (append_dims(p.to(z), z.ndim + 1) for p in (self.weights, self.means, self.stds))
        var_z = alpha ** 2 * s ** 2 + sigma ** 2  # Var[z | k] = alpha^2 s_k^2 + sigma^2
        resid = z[None] - alpha * m  # z - E[z | k]
        # responsibilities r_k ∝ w_k N(z; alpha m_k, Var[z | k]) (Bayes, in log space)
        log_r = torch.log(w) - 0.5 * torch.log(2 * math.pi * var_z) - resid ** 2 / (2 * var_z)
        r = torch.softmax(log_r, dim=0)
        # E[x | z, k] = m_k + alpha s_k^2 / Var[z | k] (z - alpha m_k)
        x_k = m + alpha * s ** 2 / var_z * resid
        return (r * x_k).sum(dim=0)

    def sample(self, n: int | Sequence[int], generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> Tensor:
        """Data samples of shape n (int or shape)."""
        shape = (n,) if isinstance(n, int) else tuple(n)
        k = torch.multinomial(self.weights, math.prod(shape), replacement=True, generator=generator)
        eps = torch.randn(k.shape, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * eps).reshape(shape).to(dtype)

    def moments(self) -> tuple[float, float]:
        """(mean, variance) of the data."""
        mean = (self.weights * self.means).sum()
        var = (self.weights * (self.stds ** 2 + self.means ** 2)).sum() - mean ** 2
        return mean.item(), var.item()


def _ab(logsnr: float) -> tuple[float, float]:
    # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)
    return math.sqrt(1.0 / (1.0 + math.exp(-logsnr))), math.sqrt(1.0 / (1.0 + math.exp(logsnr)))


def gaussian_step_maps(mean: float, std: float, logsnrs: Sequence[float] | Tensor, kind: str = "ddim",
                       gamma: float = 0.0) -> list[tuple[float, float, float]]:
    """Per-step maps z_next = A z + B + S eps of a sampler driven by the ideal N(mean, std^2) denoiser.

    One (A, B, S) per network evaluation on the grid `logsnrs` (N+1 values, noisiest first); the last
    step outputs x_hat. Derived independently of `cascade.sampling.steps`: the ancestral step is the
    Gaussian-conditioning posterior q(z_s | z_t, x) (VDM sec. 2), the stochastic one a DDIM jump
    to k = t - 2/N followed by q(z_s | z_k) (Meng et al. 2023).
    """
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"kind must be one of {SAMPLER_KINDS}, got {kind!r}")
    lams = [float(x) for x in logsnrs]
    num_steps = len(lams) - 1
    m, s2 = float(mean), float(std) ** 2
    maps = []
    for i in range(num_steps):
        a_t, sig_t = _ab(lams[i])
        c = a_t * s2 / (a_t ** 2 * s2 + sig_t ** 2)  # x_hat = c z + d
        d = m - c * a_t * m
        if i == num_steps - 1:
            maps.append((c, d, 0.0))
            continue
        if kind == "ancestral":
            a_s, sig_s = _ab(lams[i + 1])
            a_ts = a_t / a_s
            k = a_ts * sig_s ** 2 / sig_t ** 2  # posterior mean: alpha_s x + k (z_t - alpha_t x)
            # Var[z_s | z_t, x] = sigma_s^2 - Cov(z_s, z_t)^2 / sigma_t^2 with Cov = alpha_{t|s} sigma_s^2
            post_var = sig_s ** 2 - k * a_ts * sig_s ** 2
            fwd_var = sig_t ** 2 - a_ts ** 2 * sig_s ** 2  # Var[z_t | z_s] = sigma^2_{t|s}
            var = post_var ** (1.0 - gamma) * fwd_var ** gamma
            maps.append((k + (a_s - k * a_t) * c, (a_s - k * a_t) * d, math.sqrt(var)))
            continue
        j = i + 2 if kind == "stochastic" else i + 1  # DDIM target index
        a_j, sig_j = _ab(lams[j])
        # DDIM: z_j = alpha_j x_hat + sigma_j eps_hat, eps_hat = (z_t - alpha_t x_hat) / sigma_t
        r = sig_j / sig_t
        A, B = r + (a_j - r * a_t) * c, (a_j - r * a_t) * d
        if kind == "ddim":
            maps.append((A, B, 0.0))
            continue
        a_s, sig_s = _ab(lams[i + 1])
        # renoise q(z_s | z_k): z_s = (alpha_s / alpha_k) z_k + sqrt(sigma_s^2 - (alpha_s / alpha_k)^2 sigma_k^2) eps
        q = a_s / a_j
        maps.append((q * A, q * B, math.sqrt(sig_s ** 2 - q ** 2 * sig_j ** 2)))
    return maps


def gaussian_sampler_moments(mean: float, std: float, logsnrs: Sequence[float] | Tensor, kind: str = "ddim",
                             gamma: float = 0.0, init: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """Exact (mean, variance) of a sampler's output on N(mean, std^2) data from z ~ N(init).

    Composes `gaussian_step_maps`: mean <- A mean + B, var <- A^2 var + S^2.
    """
    mu, var = init
    for A, B, S in gaussian_step_maps(mean, std, logsnrs, kind, gamma):
        mu, var = A * mu + B, A ** 2 * var + S ** 2
    return mu, var


def gaussian_flow_map(mean: float, std: float, logsnr_t: float, logsnr_s: float | None) -> tuple[float, float]:
    """The probability-flow ODE's solution map z_s = A z_t + B on N(mean, std^2) data, from level t to level s
    (`logsnr_s` None: to the data, t = 0).

    Per element the marginal at a level is N(alpha m, alpha^2 s^2 + sigma^2) and the ODE's velocity is affine in z,
    so its flow is affine and increasing and carries one marginal onto the other: the unique such map,
    A = sqrt(v_s / v_t), B = alpha_s m - A alpha_t m with v = alpha^2 s^2 + sigma^2.
    """
    a_t, sig_t = _ab(float(logsnr_t))
    a_s, sig_s = (1.0, 0.0) if logsnr_s is None else _ab(float(logsnr_s))
    s2, m = float(std) ** 2, float(mean)
    A = math.sqrt((a_s ** 2 * s2 + sig_s ** 2) / (a_t ** 2 * s2 + sig_t ** 2))
    return A, a_s * m - A * a_t * m
