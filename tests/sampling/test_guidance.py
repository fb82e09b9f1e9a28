import pytest
import torch

from cascade.diffusion.schedule import CosineSchedule
from cascade.sampling.guidance import GuidedModel, cfg, dynamic_threshold, guidance_weights
from cascade.sampling.samplers import sample_ddim, sample_stochastic
from cascade.sampling.steps import time_grid


def test_cfg_formula_and_w0():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).unbind(0)
    assert torch.equal(cfg(c, u, 0.0), c)  # w = 0 is the conditional model exactly
    torch.testing.assert_close(cfg(c, u, 6.0), 7.0 * c - 6.0 * u)  # (1 + w) x_c - w x_u
    w = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)  # per-sample weights (guided distillation)
    out = cfg(c, u, w)
    for i in range(3):
        torch.testing.assert_close(out[i], (1 + w[i]) * c[i] - w[i] * u[i])


def test_guidance_weights():
    assert guidance_weights(4, 6.0) == [6.0] * 4
    assert guidance_weights(6, 6.0, oscillate=(15, 1)) == [15, 1, 15, 1, 15, 1]
    assert guidance_weights(6, 6.0, oscillate=(15, 1), constant_steps=1) == [15, 1, 15, 1, 15, 1]
    assert guidance_weights(8, 6.0, oscillate=(15, 1), constant_steps=3) == [15, 15, 15, 1, 15, 1, 15, 1]
    assert guidance_weights(3, 6.0, oscillate=(15, 1), constant_steps=5) == [15, 15, 15]


def test_dynamic_threshold_definition():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.2, 0.9, 1.5, 4.0, 30.0], dtype=torch.float64)
    x = torch.randn(5, 3, 4, 9, 7, generator=g, dtype=torch.float64) * scales[:, None, None, None, None]
    out = dynamic_threshold(x, 99.5)
    # s = max(99.5th percentile of |x| over non-batch dims, 1); x -> clip(x, -s, s) / s (Imagen sec. 2.3)
    s = torch.quantile(x.abs().flatten(1), 0.995, dim=1).clamp(min=1.0)
    for i in range(5):
        torch.testing.assert_close(out[i], x[i].clamp(-s[i], s[i]) / s[i], atol=1e-12, rtol=0)
        if s[i] == 1.0:
            assert torch.equal(out[i], x[i].clamp(-1, 1))
    untouched = x[0].abs().max() <= 1  # a sample already inside [-1, 1] is returned as is
    assert untouched and torch.equal(out[0], x[0])
    assert out.abs().max() <= 1.0
    torch.testing.assert_close(dynamic_threshold(x, 100.0)[4], x[4] / x[4].abs().max())
    odd = torch.randn(3, 101, generator=g) * 5
    ref = torch.quantile(odd.abs(), 0.9, dim=1)
    torch.testing.assert_close(dynamic_threshold(odd, 90.0), odd.clamp(-ref[:, None], ref[:, None]) / ref[:, None])


@pytest.mark.parametrize("percentile", [0.995, 1.0, 0.0, -5.0, 100.5])
def test_dynamic_threshold_rejects_fractions(percentile):
    with pytest.raises(ValueError, match="percentage"):
        dynamic_threshold(torch.zeros(2, 3), percentile)


def fake_fn(calls):
    """fn(z, logsnr, uncond): x_hat = 0.5 z (conditional) or -0.5 z (unconditional); records batch sizes."""
    def fn(z, logsnr, uncond):
        calls.append(z.shape[0])
        sign = 1.0 - 2.0 * uncond.to(z.dtype)
        return 0.5 * sign.view(-1, *([1] * (z.ndim - 1))) * z
    return fn


@pytest.mark.parametrize("batched", [True, False])
def test_guided_model_weights_and_nfe(batched):
    calls = []
    model = GuidedModel(fake_fn(calls), [3.0, 0.0, 3.0, 1.0], batched=batched)
    z = torch.randn(2, 3, 4)
    lam = torch.zeros(2)
    torch.testing.assert_close(model(z, lam, 0), (1 + 3.0) * 0.5 * z - 3.0 * (-0.5) * z)
    assert model.nfe == 2
    assert torch.equal(model(z, lam, 1), 0.5 * z)  # w = 0: conditional only, no unconditional pass
    assert model.nfe == 3
    assert calls[-1] == 2
    assert calls[:-1] == ([4] if batched else [2, 2])
    model.nfe = 0
    sample_ddim(model, z, time_grid(4, CosineSchedule()))
    assert model.nfe == 2 + 1 + 2 + 2  # two evaluations per guided step, one when w = 0


def test_guided_model_from_pair_and_thresholding():
    cond = lambda z, logsnr: z + 1.0
    uncond = lambda z, logsnr: z - 1.0
    z = torch.randn(3, 2, 5) * 3
    lam = torch.zeros(3)
    model = GuidedModel.from_pair(cond, uncond, 2.0)
    torch.testing.assert_close(model(z, lam, 0), 3.0 * (z + 1) - 2.0 * (z - 1))
    unbatched = GuidedModel.from_pair(cond, uncond, 2.0, batched=False)
    torch.testing.assert_close(unbatched(z, lam, 0), model(z, lam, 0))
    static = GuidedModel.from_pair(cond, uncond, 2.0, thresholding="static")
    assert static(z, lam, 0).abs().max() <= 1.0
    dyn = GuidedModel.from_pair(cond, uncond, 2.0, thresholding="dynamic", percentile=99.5)
    torch.testing.assert_close(dyn(z, lam, 0), dynamic_threshold(model(z, lam, 0), 99.5))
    with pytest.raises(ValueError):
        GuidedModel(fake_fn([]), 1.0, thresholding="clip")
    with pytest.raises(ValueError, match="percentage"):
        GuidedModel(fake_fn([]), 1.0, thresholding="dynamic", percentile=0.995)


def test_guided_model_drives_a_sampler_with_oscillating_weights():
    calls = []
    weights = guidance_weights(6, 6.0, oscillate=(15.0, 0.0), constant_steps=2)  # 15 15 0 15 0 15
    model = GuidedModel(fake_fn(calls), weights)
    out = sample_stochastic(model, torch.randn(2, 4), time_grid(6, CosineSchedule()),
                            generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4) and model.nfe == 4 * 2 + 2 * 1
    assert calls == [4, 4, 2, 4, 2, 4]
