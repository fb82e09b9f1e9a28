"""The cascade sampler chains stages: shapes, conditioning passed down, guidance passes, NFE accounting."""

import pytest
import torch

from cascade.diffusion import CosineSchedule, NoiseAugmentation
from cascade.sampling.cascade import CascadeSampler, StageSpec


class Spy:
    """Denoiser that records its conditioning and returns a fixed blend, so every call is visible."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, logsnr, **cond):
        self.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in cond.items()} | {"batch": z.shape[0]})
        return torch.tanh(z) * 0.5


def spec(name, kind, frames, size, fps, denoiser, **kw):
    return StageSpec(name=name, kind=kind, frames=frames, height=size, width=size, fps=fps, denoiser=denoiser,
                     schedule=CosineSchedule(), steps=3, **kw)


def text(batch=2, tokens=5, dim=8):
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, 3:] = False
    return torch.randn(batch, tokens, dim), mask


def test_stages_chain_with_their_shapes_and_conditioning():
    spies = [Spy() for _ in range(3)]
    aug = NoiseAugmentation(-2.0, 20.0, sample_logsnr=1.6)
    sampler = CascadeSampler([
        spec("base", "base", 2, 8, 2, spies[0], guidance=3.0),
        spec("tsr", "tsr", 4, 8, 4, spies[1], augmentation=aug),
        spec("ssr", "ssr", 4, 16, 4, spies[2], augmentation=aug, sampler="ancestral"),
    ])
    emb, mask = text()
    result = sampler.sample(emb, mask, seed=0, progress=False)
    assert [tuple(v.shape) for v in result.videos.values()] == [(2, 3, 2, 8, 8), (2, 3, 4, 8, 8), (2, 3, 4, 16, 16)]
    assert all(v.abs().max() <= 1 for v in result.videos.values())
    # Base: guided, so one batched call of 2B per step; the second half has every token masked.
    first = spies[0].calls[0]
    assert first["batch"] == 4 and first["text_mask"][:2].equal(mask) and not first["text_mask"][2:].any()
    assert torch.equal(first["fps"], torch.full((4,), 2.0))
    # TSR: conditioned on the base output (2 frames, upsampled inside the U-Net), noised at the fixed level.
    tsr_call = spies[1].calls[0]
    assert tsr_call["batch"] == 2 and tsr_call["cond"].shape == (2, 3, 2, 8, 8)
    assert torch.equal(tsr_call["aug_logsnr"], torch.full((2,), 1.6))
    assert not torch.allclose(tsr_call["cond"], result.videos["base"])  # augmentation noise was added
    assert spies[2].calls[0]["cond"].shape == (2, 3, 4, 8, 8)
    # NFE per video: 2 per guided step, 1 per unguided step.
    assert [s["nfe_per_video"] for s in result.stats] == [6, 3, 3]
    assert all(s["seconds"] > 0 for s in result.stats)


def test_oscillating_guidance_skips_unconditional_passes_at_weight_zero():
    spy = Spy()
    stage = spec("base", "base", 1, 8, 1, spy, guidance=0.0, oscillate=(5.0, 0.0), constant_steps=1)
    stage.steps = 4  # weights 5, 0, 5, 0
    result = CascadeSampler([stage]).sample(*text(), progress=False)
    assert [c["batch"] for c in spy.calls] == [4, 2, 4, 2]
    assert result.stats[0]["nfe_per_video"] == 6


def test_guidance_distilled_student_gets_w_and_one_pass_per_step():
    spy = Spy()
    stage = spec("base", "base", 1, 8, 1, spy, guidance=4.0, guidance_distilled=True)
    result = CascadeSampler([stage]).sample(*text(), progress=False)
    assert [c["batch"] for c in spy.calls] == [2, 2, 2]
    assert all(torch.equal(c["guidance"], torch.full((2,), 4.0)) for c in spy.calls)
    assert result.stats[0]["nfe_per_video"] == 3


def test_up_to_stops_and_unknown_stage_is_an_error():
    sampler = CascadeSampler([spec("base", "base", 1, 8, 1, Spy()), spec("ssr", "ssr", 1, 16, 1, Spy())])
    result = sampler.sample(*text(), up_to="base", progress=False)
    assert list(result.videos) == ["base"]
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        sampler.sample(*text(), up_to="nope", progress=False)


def test_seeded_sampling_is_reproducible():
    def run():
        sampler = CascadeSampler([spec("base", "base", 2, 8, 1, Spy(), sampler="ancestral")])
        return sampler.sample(*text(), seed=3, progress=False).final

    torch.manual_seed(0)
    a = run()
    torch.manual_seed(1)  # the global seed does not matter, only the generator
    assert torch.equal(a, run())
