"""recipes/imagen-video.yaml reproduces the paper's cascade: shapes, order, and parameter counts within 15 %."""

from pathlib import Path

import pytest

from cascade.recipe import load_recipe
from cascade.recipe.build import count_parameters

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "imagen-video.yaml"

# Imagen Video Fig. 6 (via the reference notes): stage, kind, frames x width x height @ fps, parameters.
PAPER = [
    ("base", "base", 16, 40, 24, 3, 5.6e9),
    ("tsr1", "tsr", 32, 40, 24, 6, 1.7e9),
    ("ssr1", "ssr", 32, 80, 48, 6, 1.4e9),
    ("ssr2", "ssr", 32, 320, 192, 6, 1.2e9),
    ("tsr2", "tsr", 64, 320, 192, 12, 780e6),
    ("tsr3", "tsr", 128, 320, 192, 24, 630e6),
    ("ssr3", "ssr", 128, 1280, 768, 24, 340e6),
]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(RECIPE)


def test_stage_order_and_shapes(recipe):
    got = [(s.name, s.kind, s.frames, s.width, s.height, s.fps) for s in recipe.stages]
    assert got == [row[:6] for row in PAPER]
    assert recipe.text_encoder.dim == 4096 and "t5-v1_1-xxl" in recipe.text_encoder.path


@pytest.mark.parametrize("name, paper", [(row[0], row[6]) for row in PAPER])
def test_parameter_count_within_15_percent(recipe, name, paper):
    count = count_parameters(recipe.stage(name), recipe)
    assert abs(count / paper - 1) <= 0.15, f"{name}: {count / 1e6:.0f}M vs the paper's {paper / 1e6:.0f}M"


def test_paper_choices(recipe):
    assert all(s.diffusion.parameterization == "v" for s in recipe.stages)
    assert recipe.stage("base").unet.temporal == ["attention"] * 4
    assert all(set(s.unet.temporal) == {"conv"} for s in recipe.stages[1:])
    assert not any(recipe.stage("ssr3").unet.spatial_attention)  # fully convolutional, trained on crops
    assert recipe.stage("ssr3").train.crop is not None
    assert recipe.stage("base").sampler.steps == 256 and all(s.sampler.steps == 128 for s in recipe.stages[1:])
    assert all(s.distill.progressive.end_steps == 8 for s in recipe.stages)
