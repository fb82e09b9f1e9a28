"""`cascade eval-nfe`: quality against network evaluations for the teacher and every student a run holds, per stage
and for the whole cascade, on random-init weights laid out as `cascade run` leaves them."""

import json
from pathlib import Path

import pytest
import torch

from cascade.cli import main
from cascade.eval.nfe import best_within, candidates, cascade_combinations
from cascade.recipe import load_recipe
from cascade.recipe.build import build_unet
from cascade.weights import WeightsInfo, save_weights

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def _save(path: Path, net, info: WeightsInfo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, {k: v.contiguous() for k, v in net.state_dict().items()}, info, {})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_t5):
    """A run folder: teachers of every stage (2 sampler steps each), the base's guidance-distilled student at 2
    steps (the final one, also in distilled/), progressive students of every SR stage at 1 step and of tsr1 at 2
    as well."""
    root = tmp_path_factory.mktemp("nfe")
    overrides = [f"text_encoder.path={tiny_t5}", f"run_dir={root / 'run'}", f"data.root={root / 'data'}",
                 "eval.metrics=[probes,quality]"]  # FVD's I3D would take most of the test
    overrides += [f"stages.{s}.sampler.steps=2" for s in ("base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3")]
    recipe = load_recipe(TINY, overrides)
    for stage in recipe.stages:
        torch.manual_seed(0)
        net = build_unet(stage, recipe)
        _save(recipe.run_folder() / "teachers" / f"{stage.name}.safetensors", net, WeightsInfo(kind="ema"))
        if stage.kind == "base":
            student = build_unet(stage, recipe, guidance_conditioning=True)
            info = WeightsInfo(kind="distilled", method="progressive", steps=2, sampler="ddim", guidance_input=True,
                               w_range=(0.0, 4.0))
            _save(recipe.run_folder(stage.name) / "distill" / "steps-0002" / "student.safetensors", student, info)
            _save(recipe.run_folder() / "distilled" / "base.safetensors", student, info)
            continue
        for steps in (2, 1) if stage.name == "tsr1" else (1,):
            info = WeightsInfo(kind="distilled", method="progressive", steps=steps, sampler="ddim")
            _save(recipe.run_folder(stage.name) / "distill" / f"steps-{steps:04d}" / "student.safetensors", net, info)
    return recipe, overrides


def test_candidates_and_combinations_follow_the_run_folder(run):
    recipe, _ = run
    found = candidates(recipe)
    assert [c.label for c in found["base"]] == ["teacher", "progressive-2"]
    assert [c.label for c in found["tsr1"]] == ["teacher", "progressive-2", "progressive-1"]
    assert [c.label for c in found["ssr3"]] == ["teacher", "progressive-1"]
    combos = cascade_combinations(recipe, found)  # SR at 2 steps: only tsr1 has it, so no such cascade
    assert [label for label, _ in combos] == ["teachers", "base progressive-2 + SR progressive-1"]
    assert {n: c.label for n, c in combos[1][1].items()} == dict(base="progressive-2", **{
        n: "progressive-1" for n in ("tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3")})


@pytest.mark.slow  # about 20 s: every stage's candidates and two whole cascades
def test_eval_nfe_through_the_cli(run, tmp_path, capsys):
    recipe, overrides = run
    out = tmp_path / "nfe"
    assert main(["eval-nfe", str(TINY), *overrides, "--num-videos", "2", "--batch-size", "2", "--out", str(out),
                 "--teacher-steps", "1"]) == 0
    result = json.loads((out / "nfe.json").read_text())
    tsr1 = {r["label"]: r for r in result["stages"]["tsr1"]["rows"]}
    # the teacher at its recipe steps, at every student step count and at --teacher-steps; each student once
    assert set(tsr1) == {"teacher", "teacher-1", "progressive-2", "progressive-1"}
    assert [tsr1[k]["nfe_per_video"] for k in ("teacher", "teacher-1", "progressive-2", "progressive-1")] == [2, 1, 2, 1]
    base = {r["label"]: r for r in result["stages"]["base"]["rows"]}
    assert base["teacher"]["nfe_per_video"] == 4  # guided (w = 1): two passes per step
    assert base["progressive-2"]["nfe_per_video"] == 2  # guidance-distilled: one pass per step
    assert result["stages"]["base"]["mode"] == "text" and result["stages"]["ssr1"]["mode"] == "gt"
    for part in result["stages"].values():
        for r in part["rows"]:
            assert set(r["probes"]) == {"color", "shape", "direction", "background"}
            assert 0 < r["psnr_db"] < 100 and r["seconds_per_video"] > 0
    cascade = {r["label"]: r for r in result["cascade"]}
    assert cascade["teachers"]["nfe_per_video"] == 4 + 6 * 2
    assert cascade["base progressive-2 + SR progressive-1"]["nfe_per_video"] == 2 + 6 * 1
    assert cascade["base progressive-2 + SR progressive-1"]["nfe_per_stage"]["ssr3"] == 1
    best = result["best"]  # random networks: it may pass or fail the targets, but it is the one within 10
    assert best["label"] == "base progressive-2 + SR progressive-1" and best["nfe_per_video"] == 8
    assert best["teacher_nfe_per_video"] == 16 and set(best["probe_share"]) <= {"color", "shape", "direction",
                                                                                 "background"}
    table = (out / "nfe.md").read_text()
    assert "## ssr3 (alone on ground-truth input)" in table and "Best within 10 evaluations" in table
    assert (out / "nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_eval_nfe_without_teachers_names_the_file(tiny_t5, tmp_path, capsys):
    code = main(["eval-nfe", str(TINY), f"text_encoder.path={tiny_t5}", f"run_dir={tmp_path / 'empty'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "teachers/base.safetensors" in err and "train it first" in err


def _row(label, nfe, probes, fvd, seconds=1.0):
    return dict(label=label, nfe_per_video=nfe, seconds_per_video=seconds, fvd=fvd,
                probes=dict(zip(("color", "shape", "direction", "background"), probes)))


def test_best_within_checks_every_probe_and_the_fvd():
    teacher = _row("teachers", 80, (1.0, 0.4, 1.0, 1.0), 1000.0, 4.0)
    good = _row("good", 10, (1.0, 0.39, 0.96, 1.0), 1090.0)  # shape 97.5 %, direction 96 %, FVD +9 %
    cheap_bad = _row("cheap", 7, (1.0, 0.30, 1.0, 1.0), 900.0)  # shape 75 %
    over = _row("over", 28, (1.0, 0.4, 1.0, 1.0), 1000.0)  # over budget
    best = best_within([teacher, good, cheap_bad, over], 10)
    assert best["label"] == "good" and best["passed"] and best["fvd_ratio"] == pytest.approx(1.09)
    assert best["probe_share"]["shape"] == pytest.approx(0.975)
    blurry = _row("blurry", 10, (1.0, 0.4, 1.0, 1.0), 1200.0)  # probes kept, FVD +20 %: fails
    best = best_within([teacher, blurry, cheap_bad], 10)
    assert not best["passed"] and best["label"] == "blurry"  # the one that keeps the most of the probes
    assert best_within([teacher, over], 10) is None


def test_report_section_shows_the_cascade_table_and_the_verdict(tmp_path):
    from cascade.eval.nfe import markdown
    from cascade.report import nfe_section

    teacher = _row("teachers", 80, (1.0, 0.4, 1.0, 1.0), 1000.0, 4.0)
    student = _row("base progressive-4 + SR progressive-1", 10, (1.0, 0.39, 0.96, 1.0), 1090.0)
    for r in (teacher, student):
        r.update(psnr_db=14.0, ssim=0.4, background=8.0)
    plot = tmp_path / "eval" / "nfe" / "nfe.png"
    result = dict(recipe="tiny", videos=28, budget=10, stages={}, cascade=[teacher, student], seconds=1.0,
                  best=best_within([teacher, student], 10), plots=[str(plot)])
    lines = "\n".join(nfe_section(result, tmp_path))
    assert "| base progressive-4 + SR progressive-1 | 10 |" in lines and "| teachers | 80 |" in lines
    assert "It meets the targets" in lines and "FVD 109 % of the teacher's" in lines
    assert "(eval/nfe/nfe.png)" in lines  # the plot, relative to the run folder
    assert markdown(result).count("## The whole cascade") == 1
