import math

import pytest
import torch

from cascade.diffusion.schedule import CosineSchedule, alpha_sigma, logsnr_cosine, resolution_shift, t_from_logsnr

T = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)


def test_endpoints_and_midpoint():
    lam = logsnr_cosine(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    # clipped range [-20, 20]; the symmetric range puts SNR = 1 at t = 1/2
    torch.testing.assert_close(lam, torch.tensor([20.0, 0.0, -20.0], dtype=torch.float64), atol=1e-10, rtol=0)
    lam = logsnr_cosine(torch.tensor([0.0, 1.0]), logsnr_min=-15.0, logsnr_max=10.0)
    assert lam.dtype == torch.float32
    torch.testing.assert_close(lam, torch.tensor([10.0, -15.0]), atol=1e-5, rtol=0)


def test_matches_unclipped_cosine_in_the_interior():
    # alpha_t = cos(pi t / 2) gives lambda = -2 log tan(pi t / 2) (PD sec. 4); clipping at +-20 barely moves it
    t = T[100:-100]
    ref = -2.0 * torch.log(torch.tan(0.5 * math.pi * t))
    torch.testing.assert_close(logsnr_cosine(t), ref, atol=1e-3, rtol=0)


def test_strictly_decreasing():
    assert (logsnr_cosine(T).diff() < 0).all()


def test_inverse():
    torch.testing.assert_close(t_from_logsnr(logsnr_cosine(T)), T, atol=1e-9, rtol=0)
    lam = torch.linspace(-20, 20, 101, dtype=torch.float64)
    kw = dict(logsnr_min=-10.0, logsnr_max=12.0, shift=-1.5)
    lam = lam.clamp(-10 - 1.5, 12 - 1.5)
    torch.testing.assert_close(logsnr_cosine(t_from_logsnr(lam, **kw), **kw), lam, atol=1e-8, rtol=0)


def test_alpha_sigma():
    lam = torch.linspace(-30, 30, 601, dtype=torch.float64)
    alpha, sigma = alpha_sigma(lam)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(lam), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.log(alpha ** 2 / sigma ** 2), lam, atol=1e-9, rtol=0)
    a32, s32 = alpha_sigma(torch.tensor([-20.0, 20.0]))
    assert torch.isfinite(a32).all() and torch.isfinite(s32).all() and (s32 > 0).all() and (a32 > 0).all()


def test_shift_is_additive_in_logsnr():
    shift = resolution_shift(256, 64)
    assert shift == pytest.approx(2 * math.log(64 / 256))
    torch.testing.assert_close(logsnr_cosine(T, shift=shift) - logsnr_cosine(T), torch.full_like(T, shift))
    # SNR scales by (base / resolution)^2 (Hoogeboom et al. 2023)
    snr_ratio = torch.exp(logsnr_cosine(T, shift=shift)) / torch.exp(logsnr_cosine(T))
    torch.testing.assert_close(snr_ratio, torch.full_like(T, (64 / 256) ** 2))


def test_cosine_schedule_dataclass():
    sched = CosineSchedule(-18.0, 16.0, 0.5)
    torch.testing.assert_close(sched(T), logsnr_cosine(T, -18.0, 16.0, 0.5))
    torch.testing.assert_close(sched.t(sched(T)), T, atol=1e-9, rtol=0)
    with pytest.raises(ValueError):
        CosineSchedule(5.0, -5.0)
    with pytest.raises(Exception):
        sched.shift = 1.0  # frozen
