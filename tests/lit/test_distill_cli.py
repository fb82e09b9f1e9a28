"""`cascade distill` on the tiny recipe through the CLI: guidance distillation, two halvings, lineage, resume by
rerunning, and `cascade sample` from the distilled students."""

import json

import pytest
from safetensors import safe_open

from cascade.cli import main
from cascade.data.video import read_video
from cascade.recipe import load_recipe

from .conftest import TINY


@pytest.fixture
def distilled(overrides, tmp_path):
    rounds = ["stages.base.distill.guidance.max_steps=2", "stages.base.distill.progressive.steps_per_round=2",
              "stages.base.distill.progressive.start_steps=16", "stages.base.distill.progressive.end_steps=4"]
    assert main(["train", str(TINY), "--stage", "base", *overrides, "stages.base.train.max_steps=2"]) == 0
    assert main(["distill", str(TINY), "--stage", "base", *overrides, *rounds]) == 0
    return tmp_path / "runs", overrides + rounds


def test_two_halvings_with_lineage(distilled):
    runs, _ = distilled
    rounds = runs / "base" / "distill"
    assert sorted(p.name for p in rounds.iterdir()) == ["guidance", "steps-0004", "steps-0008"]
    with safe_open(str(runs / "distilled" / "base.safetensors"), "pt") as file:
        meta = file.metadata()
    assert meta["cascade.steps"] == "4" and meta["cascade.guidance_distilled"] == "true"
    lineage = json.loads(meta["cascade.lineage"])
    assert [r["kind"] for r in lineage] == ["teacher", "guidance", "progressive"]
    assert [r["steps"] for r in lineage] == [16, 16, 8]
    assert all(len(r["sha256"]) == 64 for r in lineage)
    assert json.loads(meta["cascade.w_range"]) == [0.0, 4.0]
    for folder in rounds.iterdir():  # every round is a Lightning run with its own checkpoints and journal
        assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "train_steps.jsonl").is_file()


def test_rerunning_skips_finished_rounds(distilled, capsys):
    runs, overrides = distilled
    capsys.readouterr()
    assert main(["distill", str(TINY), "--stage", "base", *overrides]) == 0
    assert "== distilling" not in capsys.readouterr().out


def test_sample_from_distilled_student_one_pass_per_step(distilled, tmp_path):
    runs, overrides = distilled
    out = tmp_path / "student.mp4"
    assert main(["sample", str(TINY), *overrides, "--checkpoints", str(runs / "distilled"), "--up-to", "base",
                 "--prompt", "a red circle moving left on a black background", "--out", str(out)]) == 0
    stage = load_recipe(TINY).stage("base")
    frames, _ = read_video(out)
    assert frames.shape == (stage.frames, stage.height, stage.width, 3)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["per_stage"]["base"]["nfe_per_video"] == 4  # 4 steps, no unconditional pass
    assert report["weights"]["base"] == dict(distilled=True, guidance_distilled=True, steps=4)


def test_distill_without_a_trained_stage_is_a_clear_error(overrides, capsys):
    assert main(["distill", str(TINY), "--stage", "tsr1", *overrides]) == 2
    assert "train it first" in capsys.readouterr().err


class StopAt:
    """Stops training after a given global step, as a preemption would (last.ckpt is saved at train end)."""

    def __init__(self, step):
        import lightning as L

        class _Stop(L.Callback):
            def on_train_batch_end(inner, trainer, *args):
                if trainer.global_step >= step:
                    trainer.should_stop = True
        self.callback = _Stop()


def test_an_interrupted_round_resumes_exactly(overrides, tmp_path):
    """A distillation round stopped mid-way and rerun gives the same student, bit for bit, as an uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    from cascade.lit.distill import distill

    rounds = ["stages.base.distill.guidance.max_steps=4", "stages.base.distill.progressive.steps_per_round=3",
              "stages.base.distill.progressive.start_steps=16", "stages.base.distill.progressive.end_steps=8",
              "stages.base.train.deterministic=true", "stages.base.train.checkpoint_every=1"]
    students = []
    for name, stop in (("straight", None), ("interrupted", 2)):
        recipe = load_recipe(TINY, [*overrides, f"run_dir={tmp_path / name}", *rounds])
        assert main(["train", str(TINY), "--stage", "base", *overrides, f"run_dir={tmp_path / name}",
                     "stages.base.train.max_steps=2"]) == 0
        if stop is not None:
            with pytest.raises(SystemExit):  # the guidance round stops at step 2 of 4: not finished
                distill(recipe, "base", extra_callbacks=[StopAt(stop).callback])
            assert not (tmp_path / name / "base" / "distill" / "guidance" / "student.safetensors").exists()
        students.append(load_file(str(distill(recipe, "base"))))
    assert students[0].keys() == students[1].keys()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
