import math

import pytest
import torch

from cascade.diffusion.schedule import CosineSchedule
from cascade.sampling.steps import ancestral_step, ddim_step, renoise_step, time_grid

PAIRS = [(-20.0, -12.0), (-3.0, -1.0), (0.0, 0.5), (2.0, 7.0), (12.0, 20.0)]  # (logsnr_t, logsnr_s), s cleaner


def ab(lam):
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


def test_time_grid():
    sched = CosineSchedule(-20.0, 20.0)
    grid = time_grid(8, sched)
    assert grid.shape == (9,) and grid.dtype == torch.float64
    torch.testing.assert_close(grid, sched(torch.tensor([1 - i / 8 for i in range(9)], dtype=torch.float64)))
    assert grid[0] == pytest.approx(-20.0) and grid[-1] == pytest.approx(20.0)  # top step at SNR ~ 0
    with pytest.raises(ValueError):
        time_grid(0, sched)


@pytest.mark.parametrize("lt,ls", PAIRS)
def test_ddim_keeps_the_noise_of_the_true_x(lt, ls):
    # with x_hat = x, DDIM maps alpha_t x + sigma_t eps to alpha_s x + sigma_s eps (Song et al. 2021)
    x, eps = torch.randn(2, 3, 4, dtype=torch.float64).unbind(0)
    (a_t, s_t), (a_s, s_s) = ab(lt), ab(ls)
    out = ddim_step(a_t * x + s_t * eps, x, lt, ls)
    torch.testing.assert_close(out, a_s * x + s_s * eps, atol=1e-9, rtol=0)


@pytest.mark.parametrize("lt,ls", PAIRS)
def test_ancestral_gamma0_is_gaussian_posterior(lt, ls):
    """gamma=0: N(E[z_s | z_t, x], Var[z_s | z_t, x]) of the joint Gaussian (z_s, z_t) given x,
    with Cov(z_t, z_s) = alpha_{t|s} sigma_s^2 (forward process z_t = alpha_{t|s} z_s + noise)."""
    (a_t, s_t), (a_s, s_s) = ab(lt), ab(ls)
    a_ts = a_t / a_s
    x, z_t = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    mean = a_s * x + a_ts * s_s ** 2 / s_t ** 2 * (z_t - a_t * x)
    var = s_s ** 2 - (a_ts * s_s ** 2) ** 2 / s_t ** 2
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    torch.testing.assert_close(ancestral_step(z_t, x, lt, ls, 0.0, zero), mean, atol=1e-10, rtol=0)
    got_std = ancestral_step(z_t, x, lt, ls, 0.0, one) - ancestral_step(z_t, x, lt, ls, 0.0, zero)
    torch.testing.assert_close(got_std ** 2, torch.tensor([var], dtype=torch.float64), rtol=1e-8, atol=1e-300)


@pytest.mark.parametrize("lt,ls", PAIRS)
@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_ancestral_variance_interpolates(lt, ls, gamma):
    (a_t, s_t), (a_s, s_s) = ab(lt), ab(ls)
    post = s_s ** 2 - (a_t / a_s) ** 2 * s_s ** 4 / s_t ** 2  # sigma~^2_{s|t}
    fwd = s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2  # sigma^2_{t|s} = Var[z_t | z_s]
    z, x = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)
    std = ancestral_step(z, x, lt, ls, gamma, torch.ones(1, dtype=torch.float64)) - \
        ancestral_step(z, x, lt, ls, gamma, torch.zeros(1, dtype=torch.float64))
    assert std.item() ** 2 == pytest.approx(post ** (1 - gamma) * fwd ** gamma, rel=1e-8)


@pytest.mark.parametrize("lt,ls", PAIRS)
def test_renoise_is_forward_process(lt, ls):
    # q(z_s | z_k) from clean k = ls to noisy s = lt keeps the marginal: a^2 sigma_k^2 + std^2 = sigma_s^2
    (a_s, s_s), (a_k, s_k) = ab(lt), ab(ls)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    coef = renoise_step(one, ls, lt, zero).item()
    std = renoise_step(zero, ls, lt, one).item()
    assert coef == pytest.approx(a_s / a_k, rel=1e-12)
    assert coef ** 2 * s_k ** 2 + std ** 2 == pytest.approx(s_s ** 2, rel=1e-10)


def test_per_sample_levels_and_float32_extremes():
    z = torch.randn(5, 3, 2, 4, 4)
    x_hat, noise = torch.randn_like(z), torch.randn_like(z)
    lt = torch.tensor([p[0] for p in PAIRS])
    ls = torch.tensor([p[1] for p in PAIRS])
    batched = ddim_step(z, x_hat, lt, ls)  # (B,) levels against python floats per sample
    for i in range(5):
        torch.testing.assert_close(batched[i:i + 1], ddim_step(z[i:i + 1], x_hat[i:i + 1], lt[i].item(), ls[i].item()))
    batched = ancestral_step(z, x_hat, lt, ls, 0.3, noise)
    renoised = renoise_step(z, ls, lt, noise)
    assert batched.dtype == torch.float32 and torch.isfinite(batched).all() and torch.isfinite(renoised).all()
    for i in range(5):
        torch.testing.assert_close(batched[i], ancestral_step(z[i], x_hat[i], lt[i], ls[i], 0.3, noise[i]))
        torch.testing.assert_close(renoised[i], renoise_step(z[i], ls[i], lt[i], noise[i]))
