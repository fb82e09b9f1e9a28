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

    from cascade.lit.rounds import distill

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


def test_a_student_says_how_it_samples_and_loaders_hold_it_to_that(distilled, tmp_path, capsys):
    """The student records its method, steps and sampler; an explicit step count or a guidance weight it cannot
    honour is refused naming the stage; eval sweeps guidance only within the w range it learned."""
    runs, overrides = distilled
    with safe_open(str(runs / "distilled" / "base.safetensors"), "pt") as file:
        meta = file.metadata()
    assert (meta["cascade.method"], meta["cascade.steps"], meta["cascade.sampler"]) == ("progressive", "4", "ddim")
    with safe_open(str(runs / "base" / "distill" / "guidance" / "student.safetensors"), "pt") as file:
        assert (file.metadata()["cascade.method"], file.metadata()["cascade.steps"]) == ("guidance", "16")
    sample = ["sample", str(TINY), *overrides, "--checkpoints", str(runs / "distilled"), "--up-to", "base",
              "--prompt", "a red circle moving left on a black background", "--out", str(tmp_path / "s.mp4")]
    capsys.readouterr()
    assert main([*sample, "stages.base.sampler.steps=8"]) == 2
    err = capsys.readouterr().err
    assert "stages.base.sampler.steps" in err and "distilled student" in err and "4 ddim steps" in err
    assert main([*sample, "stages.base.sampler.steps=4"]) == 0  # what it was distilled for: fine
    assert main([*sample, "stages.base.guidance.weight=6"]) == 2
    assert "outside [0, 4]" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert main(["eval", str(TINY), *overrides, "--checkpoints", str(runs / "distilled"), "--stages", "base",
                 "--num-videos", "2", "--batch-size", "2", "--guidance", "0,2,6", "--steps", "8,16", "--aug", "",
                 "--metrics", "probes", "--out", str(out), f"data.root={tmp_path / 'heldout'}"]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert sorted({r["guidance"] for r in rows}) == [0.0, 1.0, 2.0] and {r["steps"] for r in rows} == {4}


class Regression:
    """A third distillation method, written as a user would: plain knowledge distillation (the student regresses
    the teacher's x_hat at continuous levels). It records what the loop gives it."""

    name, sampler, guidance_input, w_range = "regression", "ddim", False, None

    def __init__(self, schedule, steps):
        self.schedule, self.student_steps, self.masks = schedule, steps, []

    def draw(self, batch, generator, device):
        from cascade.diffusion import sample_logsnr_train
        from cascade.distill import Draw

        return Draw(sample_logsnr_train(batch, self.schedule, generator=generator, device=device).float())

    def target(self, teacher, z, draw, cond):
        import torch

        self.masks.append(cond["text_mask"].any(dim=1))
        with torch.no_grad():
            return teacher(z, draw.logsnr, **cond)

    def loss(self, x_hat, target, draw):
        return (x_hat - target).square().flatten(1).mean(1)

    def student_inputs(self, cond, draw):
        return cond


def test_a_new_method_plugs_into_the_distillation_loop_with_caption_dropout(overrides, tmp_path):
    import torch

    from cascade.lit.distill import DistillModule
    from cascade.lit.train import fit
    from cascade.recipe.build import build_augmentation, build_schedule, build_unet

    recipe = load_recipe(TINY, overrides)
    stage = recipe.stage("tsr1")
    teacher, student = build_unet(stage, recipe), build_unet(stage, recipe)
    with torch.no_grad():  # a teacher whose (zero-initialised) output layer is not zero: something to learn
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method = Regression(build_schedule(stage), 4)
    module = DistillModule(student, teacher, method, augmentation=build_augmentation(stage), text_drop_prob=0.5,
                           lr=1e-3, max_steps=3, journal=tmp_path / "journal.jsonl")
    before = [p.clone() for p in student.parameters()]
    trainer = fit(recipe, stage, tmp_path / "round", module, max_steps=3, samples=False)
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert trainer.global_step == 3 and len(journal) == 3 and all(r["loss"] > 0 for r in journal)
    kept = torch.cat(method.masks)
    assert len(method.masks) == 3 and kept.any() and not kept.all()  # some captions dropped, some kept
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_distillation_drops_captions_at_the_stage_rate(overrides, monkeypatch):
    """Every round gets the stage's guidance.text_drop_prob, so even a student of progressive rounds alone learns
    the unconditional model that classifier-free guidance needs."""
    import cascade.lit.distill as lit_distill
    from cascade.lit.rounds import distill

    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(kwargs["text_drop_prob"])
        raise Stop

    monkeypatch.setattr(lit_distill, "DistillModule", spy)
    recipe = load_recipe(TINY, [*overrides, "stages.tsr1.guidance.text_drop_prob=0.25"])
    teacher = recipe.run_folder() / "tsr1.safetensors"
    from safetensors.torch import save_file

    from cascade.recipe.build import build_unet

    teacher.parent.mkdir(parents=True, exist_ok=True)
    save_file(build_unet(recipe.stage("tsr1"), recipe).state_dict(), str(teacher))
    with pytest.raises(Stop):
        distill(recipe, "tsr1", teacher=teacher)
    assert seen == [0.25]


def test_consistency_distillation_through_the_cli(overrides, tmp_path):
    """distill.method consistency: guidance distillation, then one consistency round to 1 step whose target network
    (the student's EMA) is updated and checkpointed; the student says so and samples in one pass."""
    import torch

    rounds = ["stages.base.distill.guidance.max_steps=2", "stages.base.distill.method=consistency",
              "stages.base.distill.consistency.steps=1", "stages.base.distill.consistency.substeps=4",
              "stages.base.distill.consistency.max_steps=3", "stages.base.distill.consistency.target_ema=0.5"]
    assert main(["train", str(TINY), "--stage", "base", *overrides, "stages.base.train.max_steps=2"]) == 0
    assert main(["distill", str(TINY), "--stage", "base", *overrides, *rounds]) == 0
    runs = tmp_path / "runs"
    folder = runs / "base" / "distill"
    assert sorted(p.name for p in folder.iterdir()) == ["consistency-0001", "guidance"]
    with safe_open(str(runs / "distilled" / "base.safetensors"), "pt") as file:
        meta = file.metadata()
        student = {k: file.get_tensor(k) for k in file.keys()}
    assert meta["cascade.method"] == "consistency" and meta["cascade.steps"] == "1"
    assert meta["cascade.sampler"] == "consistency"  # one step: a consistency function, multistep sampling
    assert [r["kind"] for r in json.loads(meta["cascade.lineage"])] == ["teacher", "guidance"]
    state = torch.load(folder / "consistency-0001" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    target = {k.removeprefix("target_student."): v for k, v in state.items() if k.startswith("target_student.")}
    assert set(target) == set(student)  # the EMA target network is part of the round's checkpoint
    guidance = {}
    with safe_open(str(folder / "guidance" / "student.safetensors"), "pt") as file:
        guidance = {k: file.get_tensor(k) for k in file.keys()}
    moved = [k for k in student if not torch.equal(student[k], guidance[k])]
    assert moved and any(not torch.equal(target[k], guidance[k]) for k in moved)  # it followed the student
    assert any(not torch.equal(target[k], student[k]) for k in moved)  # at decay 0.5, behind it
    out = tmp_path / "one-step.mp4"
    assert main(["sample", str(TINY), *overrides, *rounds, "--checkpoints", str(runs / "distilled"), "--up-to",
                 "base", "--prompt", "a red circle moving left on a black background", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["per_stage"]["base"]["nfe_per_video"] == 1
    # multistep consistency sampling: the same student at 3 steps (fresh noise each), asked on the command line
    out3 = tmp_path / "three-steps.mp4"
    assert main(["sample", str(TINY), *overrides, *rounds, "stages.base.sampler.steps=3", "--checkpoints",
                 str(runs / "distilled"), "--up-to", "base", "--prompt", "a red circle moving left on a black "
                 "background", "--out", str(out3)]) == 0
    report = json.loads(out3.with_suffix(".json").read_text())
    assert report["per_stage"]["base"]["nfe_per_video"] == 3
