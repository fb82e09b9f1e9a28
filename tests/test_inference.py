"""The sampling library (`cascade.inference`): one random stream per video, no global RNG side effects, no Lightning
or CLI, other precisions."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade.inference import Cascade
from cascade.recipe import load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
STAGES = ["base", "tsr1", "ssr1", "ssr2"]
PROMPTS = ["a red circle moving left on a black background", "a cyan square moving up on a gray background",
           "a blue triangle moving down on a black background"]


@pytest.fixture(scope="module")
def cascade(tiny_t5):
    recipe = load_recipe(TINY, [f"text_encoder.path={tiny_t5}"] + [f"stages.{s}.sampler.steps=2" for s in STAGES])
    return Cascade.from_recipe(recipe, stages=STAGES, device="cpu")


def test_a_video_depends_only_on_the_seed_its_index_and_its_prompt(cascade):
    """Bitwise, at every stage: the batch size does not matter, nor do the other prompts (base is guided: its
    conditional and unconditional passes share a batch of 2B)."""
    together = cascade.generate(PROMPTS, seed=7, batch_size=3, progress=False)
    alone = cascade.generate(PROMPTS, seed=7, batch_size=1, progress=False)
    pairs = cascade.generate(PROMPTS, seed=7, batch_size=2, progress=False)
    other = cascade.generate([PROMPTS[0], "a white star moving right on a gray background", PROMPTS[2]], seed=7,
                             batch_size=3, progress=False)
    for name in STAGES:
        assert torch.equal(together.videos[name], alone.videos[name]), name
        assert torch.equal(together.videos[name], pairs.videos[name]), name
        assert torch.equal(together.videos[name][0], other.videos[name][0]), name
        assert torch.equal(together.videos[name][2], other.videos[name][2]), name
    reseeded = cascade.generate(PROMPTS[:1], seed=8, batch_size=1, up_to="base", progress=False)
    assert not torch.equal(reseeded.videos["base"][0], together.videos["base"][0])


def test_loading_and_sampling_leave_the_global_rng_alone(tiny_t5):
    recipe = load_recipe(TINY, [f"text_encoder.path={tiny_t5}", "stages.base.sampler.steps=2"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    cascade = Cascade.from_recipe(recipe, stages=["base"], device="cpu")
    cascade.generate(PROMPTS[:1], progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    # A random initialisation comes from the stage's seed: two loads hold the same weights.
    again = Cascade.from_recipe(recipe, stages=["base"], device="cpu", text_encoder=False)
    first, second = cascade.stages["base"].net.state_dict(), again.stages["base"].net.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_library_needs_neither_lightning_nor_the_command_line(tiny_t5, tmp_path):
    code = f"""
import sys
from cascade.inference import Cascade, write_samples
from cascade.recipe import load_recipe
recipe = load_recipe({str(TINY)!r}, ["text_encoder.path={tiny_t5}", "stages.base.sampler.steps=2"])
cascade = Cascade.from_recipe(recipe, stages=["base"], device="cpu")
report = write_samples(cascade, ["a red circle moving left on a black background"], {str(tmp_path / 'v.mp4')!r},
                       progress=False)
assert report["per_stage"]["base"]["nfe_per_video"] == 4
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")
                or m in ("cascade.cli", "cascade.demo") or m.startswith("cascade.lit"))
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_bfloat16_networks_sample_close_to_float32(cascade, tiny_t5):
    recipe = cascade.recipe
    half = Cascade.from_recipe(recipe, stages=["base"], device="cpu", dtype="bfloat16")
    assert next(half.stages["base"].net.parameters()).dtype == torch.bfloat16
    full = cascade.generate(PROMPTS[:2], seed=1, up_to="base", progress=False).videos["base"]
    low = half.generate(PROMPTS[:2], seed=1, progress=False).videos["base"]
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().mean() < 0.05  # same noise, same weights up to bf16 rounding


def test_unknown_stage_and_a_broken_chain_are_errors(cascade, tiny_t5):
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        cascade.generate(PROMPTS[:1], up_to="nope", progress=False)
    partial = Cascade(cascade.recipe, {"tsr1": cascade.stages["tsr1"]}, cascade.encoder)
    with pytest.raises(ValueError, match="from the first on"):
        partial.generate(PROMPTS[:1], progress=False)
