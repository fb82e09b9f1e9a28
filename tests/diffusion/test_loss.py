import pytest
import torch

from cascade.diffusion.analytic import GaussianDenoiser
from cascade.diffusion.loss import diffusion_loss, loss_weight, sample_logsnr_train
from cascade.diffusion.param import Denoiser, append_dims
from cascade.diffusion.schedule import CosineSchedule, alpha_sigma, t_from_logsnr

MEAN, STD = 0.3, 0.5
LOGSNR = torch.tensor([-6.0, -2.0, 0.0, 2.0, 6.0], dtype=torch.float64)


def x_net(fn):
    """An x-parameterized network from a function (z, logsnr) -> x_hat."""
    return Denoiser(lambda z, logsnr: fn(z, logsnr), "x")


def v_net(fn):
    """A v-parameterized network: v_hat = alpha eps_hat - sigma x_hat, eps_hat = (z - alpha x_hat) / sigma."""
    def net(z, logsnr):
        a, s = (append_dims(c, z.ndim) for c in alpha_sigma(logsnr))
        x_hat = fn(z, logsnr)
        return a * (z - a * x_hat) / s - s * x_hat
    return Denoiser(net, "v")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = MEAN + STD * torch.randn(len(LOGSNR), 40_000, generator=g, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, noise


def test_loss_weight_formulas():
    lam = torch.linspace(-20, 20, 81, dtype=torch.float64)
    torch.testing.assert_close(loss_weight(lam, "snr+1"), 1 + torch.exp(lam))
    torch.testing.assert_close(loss_weight(lam, "truncated_snr"), torch.clamp(torch.exp(lam), min=1.0))
    with pytest.raises(ValueError):
        loss_weight(lam, "snr")


def test_weightings_match_definitions(data):
    x, noise = data
    ideal = GaussianDenoiser(MEAN, STD)
    fn = lambda z, logsnr: 0.9 * ideal(z, logsnr) + 0.1  # any imperfect denoiser
    a, s = (append_dims(c, x.ndim) for c in alpha_sigma(LOGSNR))
    z = a * x + s * noise
    x_hat = fn(z, LOGSNR)
    v = a * noise - s * x
    v_hat = a * (z - a * x_hat) / s - s * x_hat
    mse_x = (x - x_hat).square().mean(1)
    for den in (x_net(fn), v_net(fn)):
        # "snr+1" is the plain v-MSE (PD sec. 4)
        torch.testing.assert_close(diffusion_loss(den, x, LOGSNR, noise, "snr+1"), (v - v_hat).square().mean(1))
        # "truncated_snr" is max(SNR, 1) ||x - x_hat||^2
        torch.testing.assert_close(diffusion_loss(den, x, LOGSNR, noise, "truncated_snr"),
                                   torch.clamp(torch.exp(LOGSNR), min=1) * mse_x)


@pytest.mark.parametrize("weighting", ["snr+1", "truncated_snr"])
def test_ideal_denoiser_minimizes_expected_loss(data, weighting):
    x, noise = data
    ideal = GaussianDenoiser(MEAN, STD)
    loss_ideal = diffusion_loss(v_net(ideal), x, LOGSNR, noise, weighting)
    # E loss = w(lambda) Var[x | z], Var[x | z] = s^2 sigma^2 / (alpha^2 s^2 + sigma^2) (Gaussian posterior)
    a, s = alpha_sigma(LOGSNR)
    expected = loss_weight(LOGSNR, weighting) * STD ** 2 * s ** 2 / (a ** 2 * STD ** 2 + s ** 2)
    torch.testing.assert_close(loss_ideal, expected, rtol=0.04, atol=0)  # 40k samples: ~0.7% MC error
    perturbed = [lambda z, l: 1.05 * ideal(z, l), lambda z, l: 0.95 * ideal(z, l),
                 lambda z, l: ideal(z, l) + 0.05, lambda z, l: ideal(z, l) - 0.05]
    for fn in perturbed:
        assert (diffusion_loss(v_net(fn), x, LOGSNR, noise, weighting) > loss_ideal).all()


def test_loss_backpropagates():
    net = torch.nn.Conv3d(3, 3, 1)
    den = Denoiser(lambda z, logsnr: net(z), "v")
    x = torch.randn(2, 3, 2, 4, 4)
    loss = diffusion_loss(den, x, torch.tensor([-3.0, 5.0]), torch.randn_like(x), "truncated_snr")
    assert loss.shape == (2,)
    loss.mean().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_sample_logsnr_train():
    sched = CosineSchedule(-20.0, 20.0)
    lam = sample_logsnr_train(50_000, sched, torch.Generator().manual_seed(0))
    assert lam.shape == (50_000,) and lam.min() >= -20 and lam.max() <= 20
    t = t_from_logsnr(lam.double())  # t ~ U[0, 1]: mean 1/2, variance 1/12
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.003
    again = sample_logsnr_train(50_000, sched, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lam, again, atol=0, rtol=0)
    lam = sample_logsnr_train(16, sched, torch.Generator().manual_seed(1), stratified=True)
    bins = torch.floor(t_from_logsnr(lam.double()) * 16).long().clamp(max=15)
    assert sorted(bins.tolist()) == list(range(16))  # one t per stratum [i/B, (i+1)/B)
