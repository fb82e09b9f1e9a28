"""Every stage of recipes/tiny.yaml loads its own clips from the same synthetic shards."""

from pathlib import Path

import pytest
import torch

from cascade.data.synthetic import write_synthetic
from cascade.recipe import load_recipe
from cascade.recipe.build import build_stage_loader

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic(folder, count=8, seed=0, images=4, width=64, height=64, fps=16.0, seconds=2.0,
                    samples_per_shard=5)
    return load_recipe(TINY, [f"data.root={folder}", "data.num_workers=0"])


@pytest.mark.parametrize("name", ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"])
def test_stage_batch_shapes(recipe, name):
    stage = recipe.stage(name)
    batch = next(iter(build_stage_loader(stage, recipe)))
    crop = stage.train.crop
    width, height = (crop.width, crop.height) if crop else (stage.width, stage.height)
    assert batch["video"].shape == (stage.train.batch_size, 3, stage.frames, height, width)
    assert batch["video"].dtype == torch.uint8
    if stage.input:
        source = recipe.stage(stage.input)
        fx, fy = stage.width // source.width, stage.height // source.height
        assert batch["cond"].shape == (stage.train.batch_size, 3, source.frames, height // fy, width // fx)
    assert all(c.startswith("a ") for c in batch["captions"])


def test_base_stage_mixes_stills(recipe):
    """tiny.yaml trains the base stage with a share of stills; the other stages on videos only."""
    stills = sum(int(b["is_image"].sum()) for _, b in zip(range(6), build_stage_loader(recipe.stage("base"), recipe)))
    assert stills > 0
    videos_only = [b for _, b in zip(range(3), build_stage_loader(recipe.stage("tsr1"), recipe))]
    assert not any(b["is_image"].any() for b in videos_only)
