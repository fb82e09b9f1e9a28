import math

import pytest
import torch

from cascade.diffusion.analytic import (
    GaussianDenoiser, GaussianMixtureDenoiser, gaussian_sampler_moments, gaussian_step_maps,
)
from cascade.diffusion.schedule import CosineSchedule

X_GRID = torch.linspace(-8.0, 8.0, 40_001, dtype=torch.float64)
LOGSNR = torch.tensor([-8.0, -1.0, 0.0, 1.5, 6.0], dtype=torch.float64)
Z = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)


def quadrature_posterior_mean(log_prior, z, logsnr):
    """E[x | z] by brute-force quadrature of p(x) N(z; alpha x, sigma^2) on a fine x grid; z: (n,)."""
    a2, s2 = torch.sigmoid(logsnr), torch.sigmoid(-logsnr)
    log_post = log_prior[None, :] - (z[:, None] - a2.sqrt() * X_GRID[None, :]) ** 2 / (2 * s2)
    return (torch.softmax(log_post, dim=1) * X_GRID).sum(1)


def log_mixture(weights, means, stds):
    comps = [math.log(w) - math.log(s) - (X_GRID - m) ** 2 / (2 * s * s) for w, m, s in zip(weights, means, stds)]
    return torch.logsumexp(torch.stack(comps), dim=0)


@pytest.mark.parametrize("logsnr", LOGSNR.tolist())
def test_gaussian_denoiser_is_posterior_mean(logsnr):
    den = GaussianDenoiser(0.3, 0.5)
    ref = quadrature_posterior_mean(log_mixture([1.0], [0.3], [0.5]), Z, torch.tensor(logsnr, dtype=torch.float64))
    torch.testing.assert_close(den(Z, logsnr), ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("logsnr", LOGSNR.tolist())
def test_mixture_denoiser_is_posterior_mean(logsnr):
    params = ([0.3, 0.7], [-0.6, 0.5], [0.2, 0.3])
    den = GaussianMixtureDenoiser(*params)
    ref = quadrature_posterior_mean(log_mixture(*params), Z, torch.tensor(logsnr, dtype=torch.float64))
    torch.testing.assert_close(den(Z, logsnr), ref, atol=1e-7, rtol=0)


def test_broadcast_per_sample_logsnr():
    z = torch.randn(5, 2, 3, 4, dtype=torch.float64)
    for den in (GaussianDenoiser(0.3, 0.5), GaussianMixtureDenoiser([0.5, 0.5], [-1, 1], [0.3, 0.3])):
        out = den(z, LOGSNR)
        assert out.shape == z.shape
        for i in range(5):
            torch.testing.assert_close(out[i], den(z[i], LOGSNR[i]))
    one = GaussianMixtureDenoiser([1.0], [0.3], [0.5])
    torch.testing.assert_close(one(z, LOGSNR), GaussianDenoiser(0.3, 0.5)(z, LOGSNR))


def test_sample_moments():
    g = torch.Generator().manual_seed(0)
    for den in (GaussianDenoiser(0.3, 0.5), GaussianMixtureDenoiser([0.3, 0.7], [-0.6, 0.5], [0.2, 0.3])):
        x = den.sample((4, 50_000), g)
        mean, var = den.moments()
        assert x.shape == (4, 50_000)
        assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / x.numel())
        assert abs(x.var().item() / var - 1) < 0.02


def test_ancestral_maps_plus_posterior_variance_are_exact():
    """The gamma=0 map is the posterior q(z_s | z_t, x = x_hat); adding the variance it ignores,
    (alpha_s (1 - e^{lt-ls}))^2 Var[x | z_t], gives the exact reverse process, which keeps every
    marginal N(alpha m, alpha^2 s^2 + sigma^2) of the forward process."""
    m, s = 0.3, 0.5
    lams = CosineSchedule()(torch.linspace(1, 0, 65, dtype=torch.float64)).tolist()
    maps = gaussian_step_maps(m, s, lams, "ancestral", gamma=0.0)
    a1, sig1 = math.sqrt(1 / (1 + math.exp(-lams[0]))), math.sqrt(1 / (1 + math.exp(lams[0])))
    mu, var = a1 * m, a1 ** 2 * s ** 2 + sig1 ** 2
    for i, (A, B, S) in enumerate(maps[:-1]):
        lt, ls = lams[i], lams[i + 1]
        a_t, sig_t = math.sqrt(1 / (1 + math.exp(-lt))), math.sqrt(1 / (1 + math.exp(lt)))
        a_s, sig_s = math.sqrt(1 / (1 + math.exp(-ls))), math.sqrt(1 / (1 + math.exp(ls)))
        post_var = s ** 2 * sig_t ** 2 / (a_t ** 2 * s ** 2 + sig_t ** 2)
        mu, var = A * mu + B, A ** 2 * var + S ** 2 + (a_s * (1 - math.exp(lt - ls))) ** 2 * post_var
        assert mu == pytest.approx(a_s * m, abs=1e-12)
        assert var == pytest.approx(a_s ** 2 * s ** 2 + sig_s ** 2, rel=1e-9)


@pytest.mark.parametrize("kind,gamma", [("ddim", 0.0), ("ancestral", 0.0), ("ancestral", 1.0), ("stochastic", 0.0)])
def test_exact_moments_converge_at_first_order(kind, gamma):
    """Discretization error of the output variance is O(1/N): quadrupling N cuts it about 4x.
    The mean is exact from the exact top marginal mean alpha_1 m, and off by < 1e-4 from z_1 ~ N(0, 1)."""
    sched = CosineSchedule()
    top_mean = math.sqrt(1 / (1 + math.exp(20.0))) * 0.3  # alpha_1 m at logsnr -20
    err = []
    for n in (256, 1024, 4096):
        lams = sched(torch.linspace(1, 0, n + 1, dtype=torch.float64))
        mean, var = gaussian_sampler_moments(0.3, 0.5, lams, kind, gamma)
        assert mean == pytest.approx(0.3, rel=1e-4)
        exact_start = gaussian_sampler_moments(0.3, 0.5, lams, kind, gamma, init=(top_mean, 1.0))
        assert exact_start[0] == pytest.approx(0.3, rel=1e-12)
        err.append(abs(var / 0.25 - 1))
    assert 3.0 < err[0] / err[1] < 5.0 and 3.0 < err[1] / err[2] < 5.0
    assert err[2] < 0.002
