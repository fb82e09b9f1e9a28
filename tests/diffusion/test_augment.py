import math

import pytest
import torch

from cascade.diffusion.augment import NoiseAugmentation
from cascade.diffusion.schedule import t_from_logsnr


def test_validation():
    with pytest.raises(ValueError, match="sample_logsnr"):
        NoiseAugmentation(0.0, 10.0, sample_logsnr=-1.0)
    with pytest.raises(ValueError):
        NoiseAugmentation(5.0, 1.0, sample_logsnr=3.0)
    with pytest.raises(TypeError):
        NoiseAugmentation(0.0, 10.0)  # the sampling level must be stated


def test_train_levels_in_range_and_uniform_in_t():
    aug = NoiseAugmentation(-3.0, 12.0, sample_logsnr=math.log(3.0))
    cond = torch.zeros(20_000, 1, 1, 1, 1)
    noisy, lam = aug.train(cond, torch.Generator().manual_seed(0))
    assert noisy.shape == cond.shape and lam.shape == (20_000,)
    assert lam.min() >= -3.0 and lam.max() <= 12.0
    t = t_from_logsnr(lam.double(), -3.0, 12.0)  # uniform in t of the restricted cosine schedule
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.003


def test_sample_uses_fixed_level_and_right_statistics():
    lam0 = math.log(5.0)  # Imagen Video samples at SNR 5
    aug = NoiseAugmentation(-5.0, sample_logsnr=lam0)
    c = 0.7
    cond = torch.full((4, 3, 8, 32, 32), c, dtype=torch.float64)
    noisy, lam = aug.sample(cond, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lam, torch.full((4,), lam0, dtype=torch.float64))
    alpha, sigma = math.sqrt(1 / (1 + math.exp(-lam0))), math.sqrt(1 / (1 + math.exp(lam0)))
    n = noisy[0].numel()
    for row in noisy:  # z = alpha c + sigma eps
        assert abs(row.mean().item() - alpha * c) < 5 * sigma / math.sqrt(n)
        assert abs(row.var().item() / sigma ** 2 - 1) < 5 * math.sqrt(2 / n)
