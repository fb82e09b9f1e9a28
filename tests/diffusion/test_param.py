import pytest
import torch

from cascade.diffusion.analytic import GaussianDenoiser
from cascade.diffusion.param import (
    Denoiser, append_dims, diffuse, eps_from_v, eps_from_x, v_from_eps, v_from_x, v_from_x_eps, x_from_eps, x_from_v,
)
from cascade.diffusion.schedule import alpha_sigma


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 2, 4, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    logsnr = torch.tensor([-12.0, -3.0, -0.5, 0.0, 4.0, 12.0], dtype=torch.float64)
    alpha, sigma = (append_dims(c, x.ndim) for c in alpha_sigma(logsnr))
    return x, eps, logsnr, alpha, sigma


def test_append_dims():
    a = torch.arange(3.0)
    assert append_dims(a, 5).shape == (3, 1, 1, 1, 1)
    assert append_dims(torch.tensor(2.0), 3).shape == (1, 1, 1)
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 2), 1)


def test_conversions_match_definitions(batch):
    x, eps, _, alpha, sigma = batch
    z = alpha * x + sigma * eps  # z = alpha x + sigma eps
    v = alpha * eps - sigma * x  # v = alpha eps - sigma x
    tol = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(v_from_x_eps(x, eps, alpha, sigma), v, atol=0, rtol=0)
    torch.testing.assert_close(x_from_v(z, v, alpha, sigma), x, **tol)
    torch.testing.assert_close(eps_from_v(z, v, alpha, sigma), eps, **tol)
    torch.testing.assert_close(v_from_eps(z, eps, alpha, sigma), v, **tol)
    torch.testing.assert_close(v_from_x(z, x, alpha, sigma), v, **tol)
    torch.testing.assert_close(x_from_eps(z, eps, alpha, sigma), x, **tol)
    torch.testing.assert_close(eps_from_x(z, x, alpha, sigma), eps, **tol)


def test_round_trips(batch):
    x, eps, _, alpha, sigma = batch
    z = alpha * x + sigma * eps
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # any prediction
    tol = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(v_from_x(z, x_from_v(z, v, alpha, sigma), alpha, sigma), v, **tol)
    torch.testing.assert_close(v_from_eps(z, eps_from_v(z, v, alpha, sigma), alpha, sigma), v, **tol)
    torch.testing.assert_close(eps_from_x(z, x_from_eps(z, v, alpha, sigma), alpha, sigma), v, **tol)
    torch.testing.assert_close(x_from_eps(z, eps_from_x(z, v, alpha, sigma), alpha, sigma), v, **tol)


@pytest.mark.parametrize("parameterization", ["v", "eps", "x"])
def test_denoiser_adapts_ideal_network(batch, parameterization):
    x, eps, logsnr, alpha, sigma = batch
    z = alpha * x + sigma * eps
    ideal = GaussianDenoiser(0.3, 0.5)

    def net(z, logsnr, scale):
        assert logsnr.shape == (z.shape[0],)
        x_hat = ideal(z, logsnr) * scale
        a, s = (append_dims(c, z.ndim) for c in alpha_sigma(logsnr))
        eps_hat = (z - a * x_hat) / s  # from z = alpha x + sigma eps
        return {"x": x_hat, "eps": eps_hat, "v": a * eps_hat - s * x_hat}[parameterization]

    den = Denoiser(net, parameterization)
    x_ref = ideal(z, logsnr) * 1.1
    eps_ref = (z - alpha * x_ref) / sigma
    v_ref = alpha * eps_ref - sigma * x_ref
    # float64 and |logsnr| <= 12, so dividing by alpha (eps) or sigma (x) stays exact to 1e-6
    torch.testing.assert_close(den(z, logsnr, scale=1.1), x_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(den.predict_v(z, logsnr, scale=1.1), v_ref, atol=1e-6, rtol=0)


def test_denoiser_scalar_logsnr_and_bad_parameterization():
    den = Denoiser(lambda z, logsnr: torch.zeros_like(z) + logsnr[:, None], "x")
    out = den(torch.zeros(3, 2), 1.5)
    torch.testing.assert_close(out, torch.full((3, 2), 1.5))
    with pytest.raises(ValueError):
        Denoiser(lambda z, l: z, "score")


def test_half_precision_z_gets_float32_logsnr():
    seen = []
    den = Denoiser(lambda z, logsnr: seen.append(logsnr.dtype) or torch.zeros_like(z), "v")
    den(torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([13.7, -2.0]))
    assert seen == [torch.float32]


def test_diffuse_is_forward_noising_per_sample():
    cond = torch.randn(3, 2, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(cond)
    lam = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    out = diffuse(cond, lam, noise)
    for i in range(3):
        a, s = torch.sigmoid(lam[i]).sqrt(), torch.sigmoid(-lam[i]).sqrt()
        torch.testing.assert_close(out[i], a * cond[i] + s * noise[i])
