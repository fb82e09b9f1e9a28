"""`cascade sample` end to end on the tiny recipe (random weights, few steps) and from saved weights."""

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from cascade.cli import main
from cascade.data.video import read_video
from cascade.recipe import load_recipe
from cascade.recipe.build import build_unet

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"
FAST = [f"stages.{s}.sampler.steps=2" for s in ("base", "tsr1", "ssr1", "ssr2")]


def test_sample_writes_videos_stage_outputs_and_report(tmp_path, tiny_t5, capsys):
    out = tmp_path / "video.mp4"
    code = main(["sample", str(TINY), f"text_encoder.path={tiny_t5}", *FAST, "--up-to", "ssr2",
                 "--prompt", "a red circle moving left on a black background", "--out", str(out), "--seed", "3"])
    assert code == 0
    frames, fps = read_video(out)
    recipe = load_recipe(TINY)
    last = recipe.stage("ssr2")
    assert frames.shape == (last.frames, last.height, last.width, 3) and abs(fps - last.fps) < 0.1
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["seed"] == 3 and list(report["per_stage"]) == ["base", "tsr1", "ssr1", "ssr2"]
    # base is guided (2 passes per step), the SR stages of tiny.yaml are guided too (weight 1).
    assert report["per_stage"]["base"]["nfe_per_video"] == 4
    assert report["nfe_per_video"] == sum(s["nfe_per_video"] for s in report["per_stage"].values())
    for name, path in report["outputs"][0]["stages"].items():
        stage = recipe.stage(name)
        assert read_video(path)[0].shape == (stage.frames, stage.height, stage.width, 3)
    assert "total NFE per video" in capsys.readouterr().out


def test_sample_gif_from_checkpoints(tmp_path, tiny_t5):
    recipe = load_recipe(TINY)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file(build_unet(recipe.stage("base"), recipe).state_dict(), str(weights / "base.safetensors"))
    out = tmp_path / "base.gif"
    code = main(["sample", str(TINY), f"text_encoder.path={tiny_t5}", "stages.base.sampler.steps=2", "--up-to",
                 "base", "--prompt", "a blue square moving up on a gray background", "--out", str(out),
                 "--checkpoints", str(weights)])
    assert code == 0 and read_video(out)[0].shape[0] == recipe.stage("base").frames


@pytest.mark.parametrize("args, message", [
    (["--up-to", "nope"], "no such stage"),
    (["--checkpoints", "MISSING"], "no weights for stage base"),
])
def test_sample_errors_are_clear(tmp_path, tiny_t5, capsys, args, message):
    args = [a.replace("MISSING", str(tmp_path / "none")) for a in args]
    code = main(["sample", str(TINY), f"text_encoder.path={tiny_t5}", "--prompt", "x", "--out",
                 str(tmp_path / "v.mp4"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
