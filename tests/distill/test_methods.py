"""The distillation methods behind one protocol, against closed forms on Gaussian data: what a step draws, the target
(with a dropped caption too), the loss, what the student takes; and the rounds a stage's recipe gives."""

from pathlib import Path

import pytest
import torch

from cascade.diffusion.analytic import GaussianDenoiser
from cascade.distill import (Draw, GuidanceDistillation, ProgressiveDistillation, distillation_loss,
                             distillation_rounds)
from cascade.recipe import load_recipe
from cascade.recipe.build import build_distillation_rounds
from cascade.sampling.steps import time_grid

from .test_targets import DATA, SCHED, closed_form, f64

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
COND, UNCOND = GaussianDenoiser(0.5, 0.3), GaussianDenoiser(0.0, 0.6)


def text_teacher(z, logsnr, text_mask, guidance=None):
    """The ideal denoiser of N(0.5, 0.3^2) data for a caption, of N(0, 0.6^2) for a dropped one (no token)."""
    kept = text_mask.any(dim=1)[:, None]
    return torch.where(kept, COND(z, logsnr), UNCOND(z, logsnr))


@pytest.mark.parametrize("n", [1, 2, 8])
def test_progressive_target_is_the_closed_form_at_the_drawn_levels(n):
    method = ProgressiveDistillation(SCHED, n)
    draw = method.draw(64, torch.Generator().manual_seed(n), torch.device("cpu"))
    assert draw.guidance is None and not method.guidance_input and method.sampler == "ddim"
    torch.testing.assert_close(draw.logsnr, time_grid(n, SCHED)[draw.index].float())
    z = 1.5 * torch.randn(64, 5, dtype=f64)
    target = method.target(lambda z_, l_, **cond: DATA(z_, l_), z, Draw(draw.logsnr.double(), draw.index), {})
    for b, k in enumerate(draw.index.tolist()):
        (P, Q), _ = closed_form(k, n)
        torch.testing.assert_close(target[b], P * z[b] + Q, atol=1e-9, rtol=0)


def test_progressive_levels_are_uniform_over_the_student_grid():
    method = ProgressiveDistillation(SCHED, 4)
    draw = method.draw(8000, torch.Generator().manual_seed(0), torch.device("cpu"))
    counts = torch.bincount(draw.index, minlength=4)
    assert counts.shape == (4,) and (counts - 2000).abs().max() < 200  # 4.5 sigma


def test_a_guided_progressive_round_gives_teacher_and_student_the_same_w():
    method = ProgressiveDistillation(SCHED, 4, w_range=(1.0, 3.0))
    draw = method.draw(2000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert method.guidance_input and draw.guidance.min() >= 1.0 and draw.guidance.max() <= 3.0
    assert abs(draw.guidance.mean().item() - 2.0) < 0.05
    seen = {}

    def teacher(z, logsnr, **cond):
        seen.setdefault("w", cond["guidance"])
        return DATA(z, logsnr)

    small = Draw(draw.logsnr[:6].double(), draw.index[:6], draw.guidance[:6])
    method.target(teacher, torch.randn(6, 3, dtype=f64), small, {})
    assert torch.equal(seen["w"], small.guidance)
    assert torch.equal(method.student_inputs({"fps": 1}, small)["guidance"], small.guidance)
    assert "guidance" not in ProgressiveDistillation(SCHED, 4).student_inputs({"fps": 1}, Draw(small.logsnr))


def test_guidance_target_is_cfg_of_the_teacher_and_a_dropped_caption_learns_the_unconditional():
    method = GuidanceDistillation(SCHED, 8, w_range=(0.0, 4.0))
    draw = method.draw(256, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert method.guidance_input and method.student_steps == 8 and method.name == "guidance"
    assert 0.0 <= draw.guidance.min() and draw.guidance.max() <= 4.0
    grid = time_grid(8, SCHED)[draw.index].float()
    on_grid = draw.logsnr == grid
    assert 0.35 < on_grid.float().mean() < 0.65  # half on the sampler's grid (the top step included), half not
    z = torch.randn(256, 4, dtype=f64)
    mask = torch.ones(256, 3, dtype=torch.bool)
    mask[::4] = False  # every 4th caption dropped (caption dropout in training)
    lam, w = draw.logsnr.double(), draw.guidance.double()
    target = method.target(text_teacher, z, Draw(lam, draw.index, w), dict(text_mask=mask))
    expect = (1 + w[:, None]) * COND(z, lam) - w[:, None] * UNCOND(z, lam)
    expect[::4] = UNCOND(z, lam)[::4]  # no caption: conditional = unconditional, whatever w
    torch.testing.assert_close(target, expect, atol=1e-12, rtol=0)


def test_both_methods_weight_the_loss_as_distillation_loss():
    x_hat, target, lam = torch.randn(5, 3), torch.randn(5, 3), torch.linspace(-6, 6, 5)
    for method in (ProgressiveDistillation(SCHED, 2, weighting="snr+1"), GuidanceDistillation(SCHED, 2)):
        torch.testing.assert_close(method.loss(x_hat, target, Draw(lam)),
                                   distillation_loss(x_hat, target, lam, method.weighting))


def test_rounds_from_the_recipe():
    recipe = load_recipe(TINY, ["stages.base.distill.progressive.start_steps=16",
                                "stages.base.distill.progressive.end_steps=4"])
    rounds = build_distillation_rounds(recipe.stage("base"))
    assert [r.name for r in rounds] == ["guidance", "steps-0008", "steps-0004"]
    assert [r.method.name for r in rounds] == ["guidance", "progressive", "progressive"]
    assert [r.method.student_steps for r in rounds] == [16, 8, 4]
    assert all(r.method.guidance_input and r.method.w_range == (0.0, 4.0) for r in rounds)
    assert [r.max_steps for r in rounds] == [300, 300, 300] and rounds[0].lr == 1e-4 and rounds[1].lr == 2e-4
    unguided = build_distillation_rounds(recipe.stage("tsr1"))  # distill.guidance: null; 8 -> 1
    assert [(r.name, r.method.guidance_input) for r in unguided] == [("steps-0004", False), ("steps-0002", False),
                                                                     ("steps-0001", False)]


@pytest.mark.parametrize("start, end", [(8, 8), (12, 4), (8, 16)])
def test_rounds_need_halvings(start, end):
    with pytest.raises(ValueError, match="power of two"):
        distillation_rounds(SCHED, start_steps=start, end_steps=end, steps_per_round=1, lr=1e-4)
    with pytest.raises(ValueError, match="optimizer steps"):
        distillation_rounds(SCHED, start_steps=8, end_steps=4, steps_per_round=1, lr=1e-4, guidance=(0.0, 1.0))
