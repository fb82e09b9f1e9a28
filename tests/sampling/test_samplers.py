"""Samplers against exact answers, with the ideal denoiser of known data.

Exact output variance / data variance for x ~ N(0.3, 0.5^2) per element, the ideal denoiser, the uniform
t-grid of the cosine schedule clipped to log-SNR [-20, 20], z_1 ~ N(0, 1) and x_hat returned at the last
step (`gaussian_sampler_moments`; see EXACT_VARIANCE_RATIO):

    sampler               8 steps   64 steps   256 steps
    ddim                  0.67691   0.95294    0.98802
    ancestral gamma=0     0.55097   0.89849    0.97095
    ancestral gamma=0.3   0.66715   0.93331    0.98140
    ancestral gamma=1     1.10410   1.02694    1.00710
    stochastic (Meng)     0.44676   0.88512    0.96937

All means are exact to 1e-4. The errors are discretization errors, O(1/N) (tests/diffusion/test_analytic.py):
within 2% of the data at 256 steps for ddim and ancestral gamma >= 0.3 only, and for no sampler at 64 steps.
"""

import math

import numpy as np
import pytest
import torch

from cascade.diffusion.analytic import GaussianDenoiser, GaussianMixtureDenoiser, gaussian_sampler_moments, \
    gaussian_step_maps
from cascade.diffusion.schedule import CosineSchedule
from cascade.sampling.samplers import SAMPLERS, sample, sample_ancestral, sample_consistency, sample_ddim, \
    sample_stochastic
from cascade.sampling.steps import ancestral_step, ddim_step, renoise_step, time_grid

MEAN, STD = 0.3, 0.5
CONFIGS = [("ddim", 0.0), ("ancestral", 0.0), ("ancestral", 0.3), ("ancestral", 1.0), ("stochastic", 0.0)]
IDS = ["ddim", "ancestral-g0", "ancestral-g0.3", "ancestral-g1", "stochastic"]
STEPS = (8, 64, 256)
EXACT_VARIANCE_RATIO = {  # (kind, gamma) -> output variance / data variance at 8, 64, 256 steps
    ("ddim", 0.0): (0.67691, 0.95294, 0.98802),
    ("ancestral", 0.0): (0.55097, 0.89849, 0.97095),
    ("ancestral", 0.3): (0.66715, 0.93331, 0.98140),
    ("ancestral", 1.0): (1.10410, 1.02694, 1.00710),
    ("stochastic", 0.0): (0.44676, 0.88512, 0.96937),
}
WITHIN_2PCT_AT_256 = {("ddim", 0.0), ("ancestral", 0.3), ("ancestral", 1.0)}
N_MC = (16, 8192)  # 131k samples per run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these loops are many small ops: faster, and fair to parallel jobs
    yield
    torch.set_num_threads(threads)


def grid(num_steps):
    return time_grid(num_steps, CosineSchedule(-20.0, 20.0))


def run(kind, gamma, model, z, num_steps, seed):
    kw = {} if kind == "ddim" else {"generator": torch.Generator().manual_seed(seed)}
    if kind == "ancestral":
        kw["gamma"] = gamma
    return sample(kind, lambda z, logsnr, step: model(z, logsnr), z, grid(num_steps), **kw)


# ---------------------------------------------------------------- Gaussian data: exact law


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_exact_variance_table(config):
    ratios = [gaussian_sampler_moments(MEAN, STD, grid(n), *config)[1] / STD ** 2 for n in STEPS]
    assert ratios == pytest.approx(EXACT_VARIANCE_RATIO[config], abs=1e-5)
    assert (abs(ratios[2] - 1) < 0.02) == (config in WITHIN_2PCT_AT_256)
    assert abs(ratios[1] - 1) > 0.02  # none within 2% at 64 steps
    for n in STEPS:
        assert gaussian_sampler_moments(MEAN, STD, grid(n), *config)[0] == pytest.approx(MEAN, rel=1e-4)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gaussian_sample_by_sample(config, num_steps):
    """Each output equals the closed-form affine map of its own z_1 and noise draws (one randn per
    non-final stochastic step, in order), composed from `gaussian_step_maps`."""
    kind, gamma = config
    z = torch.randn(4, 512, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = run(kind, gamma, GaussianDenoiser(MEAN, STD), z, num_steps, seed=2)
    replay, rng = z.clone(), torch.Generator().manual_seed(2)
    maps = gaussian_step_maps(MEAN, STD, grid(num_steps), kind, gamma)
    for i, (A, B, S) in enumerate(maps):
        replay = A * replay + B
        if kind != "ddim" and i < len(maps) - 1:
            replay = replay + S * torch.randn(z.shape, generator=rng, dtype=z.dtype)
    torch.testing.assert_close(out, replay, atol=1e-10, rtol=0)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gaussian_monte_carlo_moments(config, num_steps):
    """Monte-Carlo moments (131k samples) within 5 standard errors of the exact law; at 256 steps the
    samplers listed in WITHIN_2PCT_AT_256 are within 2% of the data moments."""
    z = torch.randn(N_MC, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = run(*config, GaussianDenoiser(MEAN, STD), z, num_steps, seed=4)
    mean, var = gaussian_sampler_moments(MEAN, STD, grid(num_steps), *config)
    n = out.numel()
    assert abs(out.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(out.var().item() / var - 1) < 5 * math.sqrt(2 / n)
    if num_steps == 256 and config in WITHIN_2PCT_AT_256:
        assert abs(out.mean().item() / MEAN - 1) < 0.02 and abs(out.var().item() / STD ** 2 - 1) < 0.02


# ---------------------------------------------------------------- mixture data: quadrature reference


MIXTURE = ([0.3, 0.7], [-0.4, 0.8], [0.2, 0.3])  # mean 0.44, variance 0.3774


def quadrature_moments(model, logsnrs, kind, gamma=0.0, half_width=7.0, num_points=3001, num_nodes=24):
    """(mean, variance) of a sampler's output from z_1 ~ N(0, 1), without Monte-Carlo error.

    DDIM is deterministic: push a fine z_1 grid through it and integrate against N(0, 1). The stochastic
    samplers, z_next = F(z) + S eps, use backward induction of V_i(z) = E[f(output) | z_i = z] for
    f = x, x^2: V_i(z) = E_eps V_{i+1}(F(z) + S eps) by Gauss-Hermite in eps and linear interpolation
    in z (error ~ N h^2 / 8 |V''|, about 1e-4 here).
    """
    zg = torch.linspace(-half_width, half_width, num_points, dtype=torch.float64)
    h = (zg[1] - zg[0]).item()
    density = torch.exp(-0.5 * zg ** 2) / math.sqrt(2 * math.pi) * h
    lams = [float(x) for x in logsnrs]
    if kind == "ddim":
        out = sample_ddim(lambda z, logsnr, step: model(z, logsnr), zg, lams)
        mean = (density * out).sum().item()
        return mean, (density * out ** 2).sum().item() - mean ** 2
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    nodes = torch.as_tensor(nodes)
    weights = torch.as_tensor(weights / math.sqrt(2 * math.pi))
    zero, one = torch.zeros_like(zg), torch.ones_like(zg)
    x_last = model(zg, lams[-2])
    value = torch.stack([x_last, x_last ** 2])  # (2, P): V at the last step, which returns x_hat
    for i in reversed(range(len(lams) - 2)):
        x_hat = model(zg, lams[i])
        if kind == "ancestral":
            F = ancestral_step(zg, x_hat, lams[i], lams[i + 1], gamma, zero)
            S = ancestral_step(zero, zero, lams[i], lams[i + 1], gamma, one)
        else:
            F = renoise_step(ddim_step(zg, x_hat, lams[i], lams[i + 2]), lams[i + 2], lams[i + 1], zero)
            S = renoise_step(zero, lams[i + 2], lams[i + 1], one)
        y = F[None, :] + S[None, :] * nodes[:, None]  # (Q, P) next states
        pos = ((y - zg[0]) / h).clamp(0, num_points - 1 - 1e-9)
        lo, frac = pos.floor().long(), pos - pos.floor()
        interp = value[:, lo] * (1 - frac) + value[:, lo + 1] * frac  # (2, Q, P)
        value = (interp * weights[None, :, None]).sum(1)
    ex, ex2 = (density * value).sum(1).tolist()
    return ex, ex2 - ex ** 2


@pytest.mark.parametrize("config", CONFIGS[1:], ids=IDS[1:])
def test_quadrature_reference_reproduces_exact_gaussian_law(config):
    mean, var = quadrature_moments(GaussianDenoiser(MEAN, STD), grid(64), *config)
    ref_mean, ref_var = gaussian_sampler_moments(MEAN, STD, grid(64), *config)
    assert mean == pytest.approx(ref_mean, rel=1e-4) and var == pytest.approx(ref_var, rel=1e-3)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_mixture_at_256_steps(config):
    """Two-component mixture: Monte-Carlo moments match the quadrature reference, and at 256 steps the
    reference is within 2% of the data mean and variance for every sampler."""
    den = GaussianMixtureDenoiser(*MIXTURE)
    data_mean, data_var = den.moments()
    ref_mean, ref_var = quadrature_moments(den, grid(256), *config)
    assert abs(ref_mean / data_mean - 1) < 0.02 and abs(ref_var / data_var - 1) < 0.02
    z = torch.randn(N_MC, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = run(*config, den, z, 256, seed=6)
    n = out.numel()
    assert abs(out.mean().item() - ref_mean) < 5 * math.sqrt(ref_var / n)
    assert abs(out.var().item() / ref_var - 1) < 5 * math.sqrt(2 / n)


# ---------------------------------------------------------------- the sampler contract


class Recorder:
    """A model that records its calls and returns a known x_hat."""

    def __init__(self):
        self.calls, self.outputs = [], []

    def __call__(self, z, logsnr, step):
        self.calls.append((step, logsnr.clone(), z.clone()))
        x_hat = 0.5 * z + 0.01 * step
        self.outputs.append(x_hat)
        return x_hat


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_contract(kind):
    z = torch.randn(3, 2, 4, 5, 5)
    lams = grid(5)
    model, seen = Recorder(), []
    out = sample(kind, model, z, lams, callback=lambda i, z_i, x_i: seen.append((i, z_i, x_i)),
                 **({} if kind == "ddim" else {"generator": torch.Generator().manual_seed(0)}))
    assert [c[0] for c in model.calls] == list(range(5))  # step indices, N evaluations
    for i, (_, logsnr, _) in enumerate(model.calls):
        assert logsnr.shape == (3,) and logsnr.dtype == z.dtype
        torch.testing.assert_close(logsnr, torch.full((3,), lams[i].item()))
    torch.testing.assert_close(model.calls[0][2], z, atol=0, rtol=0)
    assert torch.equal(out, model.outputs[-1])  # the last step returns x_hat itself
    assert [s[0] for s in seen] == list(range(5))
    for (_, z_i, x_i), (_, _, z_call), x_out in zip(seen, model.calls, model.outputs):
        assert torch.equal(z_i, z_call) and torch.equal(x_i, x_out)


def test_dispatch_progress_and_reproducibility():
    assert SAMPLERS == {"ddim": sample_ddim, "ancestral": sample_ancestral, "stochastic": sample_stochastic,
                        "consistency": sample_consistency}
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("euler", Recorder(), torch.zeros(1, 1), grid(2))
    model = lambda z, logsnr, step: 0.9 * z
    z = torch.randn(2, 8)
    a = sample_stochastic(model, z, grid(4), generator=torch.Generator().manual_seed(0), progress=True)
    b = sample_stochastic(model, z, grid(4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    single = sample_ancestral(model, z, grid(1))  # one step: x_hat at the top level
    torch.testing.assert_close(single, 0.9 * z)


def test_half_precision_video_gets_float32_levels():
    seen = []

    def model(z, logsnr, step):
        seen.append(logsnr.dtype)
        return 0.5 * z

    out = sample_ancestral(model, torch.randn(2, 3, 4, dtype=torch.bfloat16), grid(3),
                           generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and seen == [torch.float32] * 3


# --- multistep consistency sampling against the closed form ------------------------------------------------------
def _consistency_moments(mean: float, std: float, lams: list[float]) -> tuple[float, float]:
    """Exact (mean, variance) of multistep consistency sampling driven by the exact consistency function of
    N(mean, std^2) data, f(z, lambda) = A z + B with (A, B) the probability-flow ODE's map to the data (derived
    here from the marginals, not from the library): x = f(z); z' = alpha' x + sigma' eps at the next level."""
    def flow(lam):  # marginal at lam: N(alpha m, alpha^2 s^2 + sigma^2); f carries it onto N(m, s^2), increasing
        a2 = 1 / (1 + math.exp(-lam))
        A = std / math.sqrt(a2 * std ** 2 + (1 - a2))
        return A, mean - A * math.sqrt(a2) * mean

    mu, var = 0.0, 1.0  # z_1 ~ N(0, 1)
    for i, lam in enumerate(lams[:-1]):
        A, B = flow(lam)
        mu, var = A * mu + B, A ** 2 * var  # x = f(z)
        if i < len(lams) - 2:
            a2 = 1 / (1 + math.exp(-lams[i + 1]))
            mu, var = math.sqrt(a2) * mu, a2 * var + (1 - a2)  # fresh noise to the next level
    return mu, var


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_multistep_consistency_sampling_of_the_exact_consistency_function(num_steps):
    """With the exact consistency function of Gaussian data, every step's x is a data sample, so K-step sampling
    returns N(m, s^2) at every K (closed form above); the library's sampler must match it by Monte Carlo, and
    a sampler that reused the model's own noise estimate instead of fresh noise (DDIM) would not at K > 1."""
    mean, std = 0.5, 0.4
    schedule = CosineSchedule(logsnr_min=-20.0, logsnr_max=20.0)
    lams = time_grid(num_steps, schedule)

    def f(z, logsnr, step):  # the probability-flow ODE's solution map to the data, per level
        a2 = torch.sigmoid(logsnr.double())[:, None]
        A = std / torch.sqrt(a2 * std ** 2 + (1 - a2))
        return (A * z.double() + mean - A * a2.sqrt() * mean).to(z.dtype)

    z = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample_consistency(f, z, lams, generator=torch.Generator().manual_seed(2))
    mu, var = _consistency_moments(mean, std, [float(x) for x in lams])
    assert mu == pytest.approx(mean, abs=1e-4) and var == pytest.approx(std ** 2, rel=1e-4)  # z_1 is not quite the top level's marginal
    assert out.mean().item() == pytest.approx(mu, abs=0.004)
    assert out.var().item() == pytest.approx(var, rel=0.015)
    if num_steps > 1:  # the same x's, carried by deterministic DDIM steps instead: not the data's law
        ddim = sample_ddim(f, z, lams)
        assert abs(ddim.var().item() - var) > 0.1 * var or abs(ddim.mean().item() - mu) > 0.05
    again = sample_consistency(f, z, lams, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)  # reproducible from its generator
