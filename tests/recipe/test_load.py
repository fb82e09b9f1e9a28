"""Loading recipes: every shipped recipe validates and builds; dotted overrides; YAML numbers; `extends:`;
the JSON schema for editors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cascade.cli import main
from cascade.recipe import Recipe, load_recipe
from cascade.recipe.load import apply_override, parse_override

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "recipes" / "tiny.yaml"
TINY_DATA = yaml.safe_load(TINY.read_text())
SCHEMA_FILE = ROOT / "recipes" / "recipe.schema.json"


def stage(data: dict, name: str) -> dict:
    return next(s for s in data["stages"] if s["name"] == name)


# --- every shipped recipe ------------------------------------------------------------------------------------

def test_shipped_recipes_include_tiny():
    assert TINY in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates_with_one_row_per_stage(path, capsys):
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    recipe = load_recipe(path)
    assert lines[0].startswith(f"{path}: {recipe.name}, {len(recipe.stages)} stages")
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    total = next(i for i, line in enumerate(lines) if line.startswith("total: "))
    rows = lines[rule + 1:total]
    assert len(rows) == len(recipe.stages) == 7
    assert [row.split()[0] for row in rows] == [s.name for s in recipe.stages]
    assert [row.split()[1] for row in rows] == [s.kind for s in recipe.stages]
    assert rows[0].split()[2:4] == ["noise", "+"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_json_and_meta_build(path, capsys):
    from cascade.recipe.build import build_unet

    assert main(["validate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    recipe = load_recipe(path)
    assert report["recipe"] == str(path)
    assert report["name"] == recipe.name
    assert [row["name"] for row in report["stages"]] == [s.name for s in recipe.stages]
    for row, stage_ in zip(report["stages"], recipe.stages):
        assert set(row) == {"name", "kind", "input", "input_shape", "output_shape", "parameters", "sampler"}
        assert row["kind"] == stage_.kind and row["input"] == stage_.input
        assert row["output_shape"] == [stage_.frames, stage_.width, stage_.height, stage_.fps]
        if stage_.input is None:
            assert row["input_shape"] is None
        else:
            source = recipe.stage(stage_.input)
            assert row["input_shape"] == [source.frames, source.width, source.height, source.fps]
        assert row["sampler"] == f"{stage_.sampler.kind}/{stage_.sampler.steps}"
        net = build_unet(stage_, recipe, device="meta")
        parameters = list(net.parameters())
        assert parameters and all(p.is_meta for p in parameters)
        assert row["parameters"] == sum(p.numel() for p in parameters) > 0


# --- dotted overrides ----------------------------------------------------------------------------------------

def test_override_float_in_scientific_notation():
    recipe = load_recipe(TINY, ["stages.base.train.lr=3e-4"])
    lr = recipe.stage("base").train.lr
    assert type(lr) is float and lr == 3e-4
    assert recipe.stage("tsr1").train.lr == stage(TINY_DATA, "tsr1")["train"]["lr"] != 3e-4  # only base changes


def test_override_by_stage_index():
    base = TINY_DATA["stages"][0]
    frames, fps = base["frames"] // 2, base["fps"] / 2  # the same duration, so the cascade still chains
    recipe = load_recipe(TINY, [f"stages.0.frames={frames}", f"stages.0.fps={fps}", "stages.0.known_frames.clip_frames=1"])
    assert (recipe.stages[0].frames, recipe.stages[0].fps) == (frames, fps)
    data = copy.deepcopy(TINY_DATA)
    apply_override(data, *parse_override("stages.1.frames=16"))
    assert data["stages"][1]["name"] == "tsr1" and data["stages"][1]["frames"] == 16


def test_override_creates_a_nested_section():
    assert load_recipe(TINY).stage("base").train.crop is None
    recipe = load_recipe(TINY, ["stages.base.train.crop={width: 8, height: 8}"])
    crop = recipe.stage("base").train.crop
    assert (crop.width, crop.height) == (8, 8)
    recipe = load_recipe(TINY, ["stages.base.train.crop.width=8", "stages.base.train.crop.height=4"])
    crop = recipe.stage("base").train.crop
    assert (crop.width, crop.height) == (8, 4)
    recipe = load_recipe(TINY, ["stages.base.guidance.oscillate={high: 7.0, low: 1.0, constant_steps: 4}"])
    assert recipe.stage("base").guidance.oscillate.constant_steps == 4


@pytest.mark.parametrize("overrides, get, expected", [
    (["name=other"], lambda r: r.name, "other"),
    (["stages.base.unet.checkpointing=true"], lambda r: r.stage("base").unet.checkpointing, True),
    (["stages.ssr3.unet.temporal=[conv, none]"], lambda r: r.stage("ssr3").unet.temporal, ["conv", "none"]),
    (["stages.base.guidance.dynamic_threshold=null"], lambda r: r.stage("base").guidance.dynamic_threshold, None),
    (["stages.base.guidance.dynamic_threshold="], lambda r: r.stage("base").guidance.dynamic_threshold, None),
    (["stages.base.launch.time=48:00:00"], lambda r: r.stage("base").launch.time, "48:00:00"),
    (["stages.base.launch.time=1-00:00:00"], lambda r: r.stage("base").launch.time, "1-00:00:00"),
    (["data.kind=shards", "data.shards=data/webvid/shard-{000000..000009}.tar"],
     lambda r: (r.data.kind, r.data.shards), ("shards", "data/webvid/shard-{000000..000009}.tar")),
], ids=["string", "bool", "list", "null", "empty-is-null", "time-unquoted", "time-days", "two-overrides"])
def test_override_values_are_yaml(overrides, get, expected):
    assert get(load_recipe(TINY, overrides)) == expected


def test_override_through_the_cli(capsys):
    assert main(["validate", str(TINY), "stages.ssr3.sampler.steps=32", "stages.ssr3.sampler.kind=ancestral",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"][-1]["sampler"] == "ancestral/32"
    assert report["stages"][0]["sampler"] == "ddim/16"


def test_overrides_leave_the_file_alone():
    before = TINY.read_text()
    load_recipe(TINY, ["stages.base.train.lr=3e-4"])
    assert TINY.read_text() == before
    assert load_recipe(TINY).stage("base").train.lr == stage(TINY_DATA, "base")["train"]["lr"]


# --- numbers in YAML files -----------------------------------------------------------------------------------

def test_scientific_notation_in_a_file_is_a_float(tmp_path):
    text = TINY.read_text()
    for old, new in [("lr: 2.0e-3", "lr: 3e-4"), ("eps: 1.0e-8", "eps: 1E-8"), ("lr: 1.0e-4", "lr: 5e-5")]:
        assert old in text
        text = text.replace(old, new, 1)
    text = text.replace('time: "00:30:00"', "time: 48:00:00", 1)  # YAML 1.1 would read the int 172800
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["stages"][0]["train"]["lr"] == "3e-4"  # what plain PyYAML would give
    base = load_recipe(path).stage("base")
    assert type(base.train.lr) is float and base.train.lr == 3e-4
    assert type(base.train.optimizer.eps) is float and base.train.optimizer.eps == 1e-8
    assert base.distill.guidance.lr == 5e-5
    assert base.launch.time == "48:00:00"
    assert type(base.frames) is int


# --- extends -------------------------------------------------------------------------------------------------

def _child(extends: str) -> dict:
    new = copy.deepcopy(stage(TINY_DATA, "ssr3"))
    new.update(name="ssr4", input="ssr3", width=2 * new["width"], height=2 * new["height"])
    return {
        "extends": extends,
        "name": "child",
        "eval": {"num_videos": 8},
        "stages": [{"name": "ssr1", "sampler": {"steps": 8}}, new],
    }


def test_extends_merges_stages_by_name_and_sections_by_key(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(yaml.safe_dump(_child(str(TINY))))
    recipe, tiny = load_recipe(path), load_recipe(TINY)
    assert recipe.name == "child"
    assert recipe.extends == str(TINY.resolve())
    assert [s.name for s in recipe.stages] == [s.name for s in tiny.stages] + ["ssr4"]
    assert recipe.stage("ssr1").sampler.steps == 8
    assert recipe.stage("ssr1").sampler.kind == tiny.stage("ssr1").sampler.kind  # merged, not replaced
    assert recipe.stage("ssr1").unet == tiny.stage("ssr1").unet
    for name in ("base", "tsr1", "ssr2", "tsr2", "tsr3", "ssr3"):
        assert recipe.stage(name) == tiny.stage(name)
    assert recipe.eval.num_videos == 8 and recipe.eval.steps == tiny.eval.steps
    assert (recipe.text_encoder, recipe.data, recipe.cluster) == (tiny.text_encoder, tiny.data, tiny.cluster)
    assert (recipe.stage("ssr4").input, recipe.stage("ssr4").width) == ("ssr3", 2 * tiny.stage("ssr3").width)


def test_extends_is_resolved_from_the_childs_folder(tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(TINY.read_text())
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    path = tmp_path / "runs" / "exp" / "child.yaml"
    path.write_text(yaml.safe_dump(_child("../../shared/base.yaml")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(os.path.relpath(path, elsewhere))
    assert recipe.extends == str((tmp_path / "shared" / "base.yaml").resolve())
    assert len(recipe.stages) == 8
    relative_to_shipped = tmp_path / "relative.yaml"
    relative_to_shipped.write_text(yaml.safe_dump(_child(os.path.relpath(TINY, tmp_path))))
    assert load_recipe(relative_to_shipped).stage("ssr1").sampler.steps == 8


def test_extends_then_overrides_through_the_cli(tmp_path, capsys):
    path = tmp_path / "child.yaml"
    path.write_text(yaml.safe_dump(_child(str(TINY))))
    assert main(["validate", str(path), "stages.ssr4.sampler.steps=4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == "child"
    assert len(report["stages"]) == 8
    assert report["stages"][-1]["name"] == "ssr4" and report["stages"][-1]["sampler"] == "ddim/4"
    ssr3 = stage(TINY_DATA, "ssr3")
    assert report["stages"][-1]["output_shape"] == [ssr3["frames"], 2 * ssr3["width"], 2 * ssr3["height"], ssr3["fps"]]


# --- JSON schema ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def schema_text() -> str:
    return json.dumps(Recipe.model_json_schema(), indent=2) + "\n"


def test_schema_command_prints_valid_json(capsys, schema_text):
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert out == schema_text
    schema = json.loads(out)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"name", "stages"}
    stage_schema = schema["$defs"]["Stage"]
    assert stage_schema["additionalProperties"] is False
    assert {"name", "kind", "input", "frames", "width", "height", "fps", "unet", "train"} <= set(
        stage_schema["properties"])
    assert stage_schema["properties"]["kind"]["enum"] == ["base", "tsr", "ssr"]
    assert stage_schema["properties"]["name"]["description"]  # attribute docstrings become descriptions
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name


def test_schema_out_writes_the_same_text(tmp_path, capsys, schema_text):
    out = tmp_path / "recipe.schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_text() == schema_text


def test_shipped_schema_file_is_current(schema_text):
    assert SCHEMA_FILE.exists(), "run: cascade schema --out recipes/recipe.schema.json"
    assert SCHEMA_FILE.read_text() == schema_text, "stale: run cascade schema --out recipes/recipe.schema.json"


def test_shipped_recipes_point_editors_at_the_schema():
    for path in RECIPES:
        assert path.read_text().startswith("# yaml-language-server: $schema=./recipe.schema.json"), path.name


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_matches_the_json_schema(path, schema_text):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(schema_text)
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    bad = yaml.safe_load(path.read_text())
    bad["stages"][0]["frmes"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_console_script_schema(tmp_path):
    script = Path(sys.executable).parent / "cascade"
    result = subprocess.run([str(script), "schema"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == Recipe.model_json_schema()


def test_a_crop_must_cover_whole_input_pixels():
    """An SR crop starts on an input pixel and spans whole ones, so its input covers the same region: 8 -> 12 (a
    ratio of 1.5) cannot be cropped at all; 8 -> 16 crops any even size."""
    from cascade.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"stages\.ssr1\.train\.crop\.width: crop width 8 does not cover whole"):
        load_recipe(TINY, ["stages.ssr1.width=12", "stages.ssr1.height=12", "stages.ssr1.train.crop={width: 8, height: 8}"])
    assert load_recipe(TINY, ["stages.ssr1.train.crop={width: 8, height: 8}"]).stage("ssr1").train.crop.width == 8


def test_resolution_shift_of_a_frame_is_that_of_the_square_with_its_pixel_count():
    """simple diffusion's shift 2 log(base / d) is defined for d x d images; a W x H frame counts as
    sqrt(W H) (not max(W, H)), so 80x48 and its 61.97 x 61.97 square get the same schedule."""
    import math

    import torch

    from cascade.recipe.build import build_schedule

    recipe = load_recipe(TINY, ["stages.ssr1.width=32", "stages.ssr1.height=8",
                                "stages.ssr1.diffusion.schedule.shift_base_resolution=64"])
    schedule = build_schedule(recipe.stage("ssr1"))
    assert schedule.shift == pytest.approx(2 * math.log(64 / 16))  # sqrt(32 * 8) = 16
    assert float(schedule(torch.tensor(0.5))) == pytest.approx(2 * math.log(64 / 16), abs=1e-6)


def test_extends_on_the_command_line_is_refused(tmp_path):
    """`extends=other.yaml` as an override would be ignored (extends is resolved from the file first): refused."""
    from cascade.recipe import RecipeError, load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe, ["extends=other.yaml"])
    assert "extends" in str(error.value) and "command line" in str(error.value)
