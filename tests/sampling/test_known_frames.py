"""Known-frame conditioning: the training draw, the network's mask semantics, reconstruction guidance against an
analytic posterior, SDEdit's grid, and a stage without known frames sampling bitwise as before."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.diffusion import KnownFrameDraw, first_frames, stage_inputs
from cascade.diffusion.augment import NoiseAugmentation
from cascade.diffusion.cfg import drop_captions
from cascade.diffusion.param import diffuse
from cascade.diffusion.schedule import CosineSchedule
from cascade.inference import load_stage
from cascade.nn import VideoUNet
from cascade.recipe import RecipeError, load_recipe
from cascade.recipe.build import build_stage_spec
from cascade.sampling.cascade import (CascadeSampler, StageSpec, ddim_invert, edit_grid, reconstruction_guided,
                                      spread_in_time)
from cascade.sampling.samplers import sample_ddim
from cascade.sampling.steps import time_grid

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "no-known-frames-tiny.npz"


def test_draw_gives_prefixes_at_the_recipe_rates():
    draw = KnownFrameDraw(first_prob=0.25, clip_prob=0.15, clip_frames=2)
    mask = draw.draw(40_000, 4, torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert mask.dtype == torch.bool and mask.shape == (40_000, 4)
    # every mask is a prefix: frame f known implies frame f - 1 known
    assert not (mask[:, 1:] & ~mask[:, :-1]).any()
    for count, p in ((0, 0.60), (1, 0.25), (2, 0.15)):
        share = (counts == count).double().mean().item()
        assert abs(share - p) < 4 * (p * (1 - p) / 40_000) ** 0.5, (count, share)
    assert first_frames(3, 4, 1).tolist() == [[True, False, False, False]] * 3
    with pytest.raises(ValueError, match="first_prob"):
        KnownFrameDraw(first_prob=0.7, clip_prob=0.5)


def test_training_inputs_carry_the_clip_and_augment_it_like_the_low_resolution_input():
    video = torch.rand(3, 3, 4, 8, 8) * 2 - 1
    batch = dict(text=torch.randn(3, 5, 8), text_mask=torch.ones(3, 5, dtype=torch.bool), fps=4.0, video=video,
                 cond=torch.rand(3, 3, 4, 4, 4))
    draw = KnownFrameDraw(first_prob=0.5, clip_prob=0.5, clip_frames=2)
    aug = NoiseAugmentation(-2.0, 20.0, sample_logsnr=1.6)
    out = stage_inputs(batch, aug, training=True, generator=torch.Generator().manual_seed(1), known_frames=draw)
    # replay the draws in their documented order: caption dropout, augmentation (level, noise), known mask, its noise
    g = torch.Generator().manual_seed(1)
    drop_captions(batch["text_mask"], 0.0, g)
    noisy, level = aug.train(batch["cond"], generator=g)
    mask = draw.draw(3, 4, g)
    expected = diffuse(video, level, torch.randn(video.shape, generator=g))
    assert torch.equal(out["cond"], noisy) and torch.equal(out["aug_logsnr"], level)
    assert torch.equal(out["known_mask"], mask) and torch.equal(out["known"], expected)
    # without the draw nothing is added and the draws before it are unchanged
    plain = stage_inputs(batch, aug, training=True, generator=torch.Generator().manual_seed(1))
    assert "known" not in plain and torch.equal(plain["cond"], noisy)


def _unet(known: bool) -> VideoUNet:
    torch.manual_seed(0)
    net = VideoUNet(channels=8, channel_mults=(1, 2), num_res_blocks=1, cross_attention=False, temporal="conv",
                    text_dim=8, head_dim=8, known_frames=known)
    torch.nn.init.normal_(net.out.weight, std=0.1)  # the output layer starts at zero: make the output see the input
    return net.eval()


def test_network_sees_only_the_frames_the_mask_marks():
    net = _unet(known=True)
    x, known = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    mask = first_frames(2, 4, 1)
    with torch.no_grad():
        out = net(x, torch.zeros(2), fps=4.0, known=known, known_mask=mask)
        changed = known.clone()
        changed[:, :, 1:] += 5.0  # frames the mask does not mark
        assert torch.equal(net(x, torch.zeros(2), fps=4.0, known=changed, known_mask=mask), out)
        changed[:, :, 0] += 1.0  # the known frame
        assert not torch.allclose(net(x, torch.zeros(2), fps=4.0, known=changed, known_mask=mask), out)
        # nothing given = nothing known
        none = net(x, torch.zeros(2), fps=4.0)
        assert torch.equal(none, net(x, torch.zeros(2), fps=4.0, known=known, known_mask=torch.zeros(2, 4).bool()))
        with pytest.raises(ValueError, match="without the known frames"):
            net(x, torch.zeros(2), fps=4.0, known_mask=mask)
    plain = _unet(known=False)
    assert plain.stem.in_channels == 3 and net.stem.in_channels == 7
    with pytest.raises(ValueError, match="without known-frame input"):
        plain(x, torch.zeros(2), fps=4.0, known=known, known_mask=mask)


def test_stage_without_known_frames_samples_bitwise_as_before():
    """The fixture is this cascade's output before known-frame conditioning existed (commit ede838a)."""
    recipe = load_recipe(TINY, ["stages.base.known_frames=null",  # ssr1 as it was then: plain, sampled at 1.6
                                "stages.ssr1.diffusion.residual=false", "stages.ssr1.augmentation.sample_logsnr=1.6"])
    specs = []
    for name in ("base", "tsr1", "ssr1"):
        loaded = load_stage(recipe, name)
        specs.append(build_stage_spec(loaded.stage, loaded.net, steps=3))
    g = torch.Generator().manual_seed(7)
    text = torch.randn(2, 5, 64, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    result = CascadeSampler(specs).sample(text, mask, seed=3, progress=False)
    before = np.load(FIXTURE)
    for name, video in result.videos.items():
        assert np.array_equal(video.numpy(), before[name]), name


def test_recipe_refuses_known_frames_that_fill_the_clip():
    with pytest.raises(RecipeError, match="known_frames.clip_frames"):
        load_recipe(TINY, ["stages.base.known_frames.clip_frames=4"])


class ConstantVideoDenoiser:
    """The ideal denoiser of videos whose T frames are one value c ~ N(0, s^2) per pixel: with z_f = alpha c +
    sigma eps_f, E[c | z] = (alpha / sigma^2) sum_f z_f / (1 / s^2 + T alpha^2 / sigma^2), every frame."""

    def __init__(self, std: float) -> None:
        self.var = std * std

    def __call__(self, z, logsnr, step):
        a2 = torch.sigmoid(logsnr.double())[:, None, None, None, None]
        s2 = 1 - a2
        frames = z.shape[2]
        c = (a2.sqrt() / s2) * z.sum(2, keepdim=True) / (1 / self.var + frames * a2 / s2)
        return c.expand_as(z).to(z.dtype)


def test_reconstruction_guidance_finds_the_analytic_conditional():
    """Given frame 0 = a, the exact conditional of the other frames is a (every frame is the same value).
    Unguided sampling ignores a; reconstruction guidance pulls the unknown frames to it as w_r grows."""
    torch.manual_seed(0)
    denoiser, shape = ConstantVideoDenoiser(std=1.0), (256, 1, 4, 2, 2)
    a = torch.randn(shape[0], 1, 1, 2, 2, dtype=torch.float64).expand(shape)
    mask = first_frames(shape[0], 4, 1)
    logsnrs = time_grid(32, CosineSchedule())
    z = torch.randn(shape, dtype=torch.float64)
    errors = {}
    for w in (0.0, 1.0, 4.0, 16.0):
        model = reconstruction_guided(denoiser, a, mask, w) if w else denoiser
        x = sample_ddim(model, z.clone(), logsnrs)
        errors[w] = (x[:, :, 1:] - a[:, :, 1:]).pow(2).mean().sqrt().item()
        if w:
            assert torch.equal(x[:, :, :1], a[:, :, :1])  # the known frame is imposed
    assert errors[0.0] > 1.0  # unguided: independent of a (two unit-variance values: rms ~ 1.4)
    assert errors[1.0] < 0.5 * errors[0.0], errors
    assert errors[4.0] < 1e-3 and errors[16.0] < 1e-3, errors


def test_edit_grid_starts_at_the_strength():
    schedule = CosineSchedule()
    assert torch.equal(edit_grid(16, schedule, 1.0), time_grid(16, schedule))
    grid = edit_grid(16, schedule, 0.5)
    assert len(grid) == 9 and torch.allclose(grid[0], schedule(torch.tensor(0.5, dtype=torch.float64)))
    assert grid[-1] == time_grid(16, schedule)[-1]
    assert len(edit_grid(16, schedule, 0.01)) == 2  # at least one step


def test_edit_strength_zero_returns_the_input_and_small_strength_stays_near_it():
    net = _unet(known=False)
    from cascade.diffusion import Denoiser

    spec = StageSpec(name="base", kind="base", frames=4, height=8, width=8, fps=4.0,
                     denoiser=Denoiser(net, "v"), schedule=CosineSchedule(), steps=8, dynamic_threshold=None)
    text, mask = torch.zeros(1, 1, 8), torch.zeros(1, 1, dtype=torch.bool)
    init = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    same, nfe = CascadeSampler.sample_stage(spec, text, mask, None, torch.Generator().manual_seed(0), init=init,
                                            strength=0.0)
    assert nfe == 0 and torch.equal(same, init)
    near, nfe = CascadeSampler.sample_stage(spec, text, mask, None, torch.Generator().manual_seed(0), init=init,
                                            strength=0.1)
    far, _ = CascadeSampler.sample_stage(spec, text, mask, None, torch.Generator().manual_seed(0), init=init,
                                         strength=1.0)
    assert nfe == 1
    assert (near - init).abs().mean() < 0.5 * (far - init).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        CascadeSampler.sample_stage(spec, text, mask, None, None, init=init, strength=1.5)


def test_known_frames_through_a_network_without_them_counts_its_evaluations():
    net = _unet(known=False)
    from cascade.diffusion import Denoiser

    spec = StageSpec(name="base", kind="base", frames=4, height=8, width=8, fps=4.0, denoiser=Denoiser(net, "v"),
                     schedule=CosineSchedule(), steps=5, dynamic_threshold=None, guidance=2.0)
    text, mask = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    known = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    video, nfe = CascadeSampler.sample_stage(spec, text, mask, None, torch.Generator().manual_seed(0), known=known,
                                             known_mask=first_frames(1, 4, 1))
    assert nfe == 10  # 5 guided steps, two passes each
    assert torch.equal(video[:, :, 0], known[:, :, 0].clamp(-1, 1))  # imposed by the replacement


def test_input_consistency_makes_shared_frames_exact_and_shrinks_the_spatial_residual():
    from cascade.sampling.cascade import input_consistency_guided, input_view

    torch.manual_seed(0)
    x_hat = torch.randn(2, 3, 8, 16, 16)
    model = lambda z, logsnr, step: x_hat  # noqa: E731  (a prediction that ignores the input)
    same_size = torch.randn(2, 3, 4, 16, 16)  # a TSR input: every second frame is shared
    out = input_consistency_guided(model, same_size, 1.0)(x_hat, torch.zeros(2), 0)
    torch.testing.assert_close(out[:, :, ::2], same_size, atol=1e-6, rtol=0)  # x + (low - x): exact to rounding
    residual = same_size - x_hat[:, :, ::2]  # the frames between get the mean of their neighbours' residuals
    torch.testing.assert_close(out[:, :, 1:7:2], x_hat[:, :, 1:7:2] + (residual[:, :, :-1] + residual[:, :, 1:]) / 2)
    torch.testing.assert_close(out[:, :, 7], x_hat[:, :, 7] + residual[:, :, 3])  # past the last: held
    low = torch.randn(2, 3, 8, 8, 8)  # an SSR input at half the size
    before = (input_view(x_hat, 8, 8, 8) - low).pow(2).mean()
    out = input_consistency_guided(model, low, 1.0)(x_hat, torch.zeros(2), 0)
    after = (input_view(out, 8, 8, 8) - low).pow(2).mean()
    assert after < 0.3 * before, (before, after)  # white-noise residuals: bilinear spreading leaves ~0.19
    assert torch.equal(input_consistency_guided(model, low, 0.0)(x_hat, torch.zeros(2), 0), x_hat)


def test_spread_in_time_puts_frames_back_and_interpolates_between():
    x = torch.arange(3, dtype=torch.float64).reshape(1, 1, 3, 1, 1) * 2  # frames 0, 2, 4
    assert spread_in_time(x, 6).flatten().tolist() == [0, 1, 2, 3, 4, 4]
    assert spread_in_time(x, 3) is x
    constant = torch.full((1, 3, 4, 2, 2), 0.7)
    assert torch.equal(spread_in_time(constant, 16), torch.full((1, 3, 16, 2, 2), 0.7))


def test_trained_stage_keeps_the_known_frames_exactly_unless_told_not_to():
    from cascade.diffusion import Denoiser

    spec = StageSpec(name="base", kind="base", frames=4, height=8, width=8, fps=4.0,
                     denoiser=Denoiser(_unet(True), "v"), schedule=CosineSchedule(), steps=4, dynamic_threshold=None,
                     known_frames=True)
    text, mask = torch.zeros(1, 1, 8), torch.zeros(1, 1, dtype=torch.bool)
    known = torch.rand(1, 3, 4, 8, 8) * 1.6 - 0.8
    run = lambda keep: CascadeSampler.sample_stage(  # noqa: E731
        spec, text, mask, None, torch.Generator().manual_seed(0), known=known, known_mask=first_frames(1, 4, 2),
        keep_known=keep)
    kept, nfe = run(True)
    free, _ = run(False)
    assert nfe == 4
    assert torch.equal(kept[:, :, :2], known[:, :, :2])  # the replacement: exactly the known frames
    assert (free[:, :, :2] - known[:, :, :2]).abs().max() > 1e-2  # the random network alone does not give them


class IidGaussianDenoiser:
    """The ideal denoiser of data x ~ N(0, c^2 I): E[x | z_t] = alpha c^2 z / (alpha^2 c^2 + sigma^2)."""

    def __init__(self, std: float) -> None:
        self.var, self.calls = std * std, 0

    def __call__(self, z, logsnr, step):
        self.calls += 1
        a2 = torch.sigmoid(logsnr.double()).reshape(-1, *[1] * (z.ndim - 1))
        return (a2.sqrt() * self.var * z / (a2 * self.var + 1 - a2)).to(z.dtype)


def test_ddim_inversion_follows_the_gaussian_probability_flow():
    """For x ~ N(0, c^2) the probability-flow ODE carries x at t = 0 to z_t = x sqrt(alpha_t^2 c^2 + sigma_t^2) / c:
    the inversion converges to it as the grid refines, and DDIM from there returns x."""
    torch.manual_seed(0)
    std, strength = 0.5, 0.6
    x = torch.randn(64, 3, 2, 4, 4, dtype=torch.float64) * std
    errors, round_trip = {}, {}
    for steps in (8, 64, 512):
        grid = edit_grid(steps, CosineSchedule(), strength)
        denoiser = IidGaussianDenoiser(std)
        z = ddim_invert(denoiser, x, grid)
        assert denoiser.calls == len(grid) - 1
        a2 = torch.sigmoid(grid[0]).item()
        flow = x * ((a2 * std ** 2 + 1 - a2) ** 0.5) / std
        errors[steps] = ((z - flow).abs().max() / flow.abs().max()).item()
        back = sample_ddim(denoiser, z, grid)
        round_trip[steps] = ((back - x).abs().max() / x.abs().max()).item()
    assert errors[512] < 0.005 and errors[512] < errors[64] < errors[8], errors  # measured 0.0027, 0.019, 0.048
    assert round_trip[512] < 0.01 and round_trip[512] < round_trip[64] < round_trip[8], round_trip  # 0.0054


def test_edit_region_is_where_the_caption_changes_the_prediction_and_only_it_changes():
    """A denoiser whose prediction depends on the caption inside a box only: DiffEdit's mask is the box, and an
    edit with it leaves every pixel outside the box at the input."""
    box = torch.zeros(1, 1, 4, 8, 8)
    box[..., 2:5, 3:7] = 1.0

    def denoiser(z, logsnr, *, text, text_mask, fps, **kw):
        return 0.5 * z + box * text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)

    spec = StageSpec(name="base", kind="base", frames=4, height=8, width=8, fps=4.0, denoiser=denoiser,
                     schedule=CosineSchedule(), steps=8, dynamic_threshold=None)
    new, old = torch.full((1, 2, 8), 0.5), torch.full((1, 2, 8), -0.5)
    mask = torch.ones(1, 2, dtype=torch.bool)
    video = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    region = CascadeSampler.edit_region(spec, new, mask, old, mask, video, generator=torch.Generator().manual_seed(0))
    assert torch.equal(region, box)
    edited, _ = CascadeSampler.sample_stage(spec, new, mask, None, torch.Generator().manual_seed(0), init=video,
                                            strength=0.5, invert_text=(old, mask), edit_region=region)
    assert torch.equal(edited * (1 - box), video * (1 - box))
    assert (edited - video).mul(box).abs().max() > 0.1
