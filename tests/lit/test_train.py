"""`cascade train` and `cascade export` on the tiny recipe: every stage trains a few real steps; the run folder,
checkpoint cadence and retention; export of the EMA weights and sampling from them; non-finite steps; preemption by
signal; periodic sample videos; offline wandb. Kill/resume exactness and DDP live in test_resume.py."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors import safe_open

from cascade.cli import main
from cascade.data.video import read_video
from cascade.recipe import load_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
STAGES = [stage.name for stage in load_recipe(TINY).stages]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (subprocesses get OMP_NUM_THREADS=1): the networks are tiny, and on a small shared CPU a
    second, spinning thread makes this file about twice as slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_cli(stage: str, overrides: list[str], *extra: str) -> int:
    return main(["train", str(TINY), "--stage", stage, *overrides, *extra])


def run_folder(overrides: list[str], stage: str) -> Path:
    run_dir = next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))
    return Path(run_dir) / stage


def journal(folder: Path) -> list[dict]:
    path = folder / "train_steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def metrics(folder: Path) -> list[dict]:
    with open(folder / "logs" / "version_0" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, strings: no code unpickled


# --- every stage ------------------------------------------------------------------------------------------------

def test_tiny_recipe_has_the_seven_stages():
    assert STAGES == ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_tiny_stage_trains(stage, overrides, capsys, record_property):
    assert train_cli(stage, overrides, f"stages.{stage}.train.max_steps=2") == 0
    folder = run_folder(overrides, stage)
    assert f"run folder: {folder}" in capsys.readouterr().out
    lines = journal(folder)
    batch = load_recipe(TINY).stage(stage).train.batch_size
    assert [(r["step"], r["micro"], r["rank"]) for r in lines] == [(0, 0, 0), (1, 1, 0)]
    for r in lines:
        assert math.isfinite(r["loss"]) and float.fromhex(r["loss_hex"]) == r["loss"]
        assert len(r["keys"]) == batch and r["videos_per_second"] > 0
    assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == 2
    speeds = [round(r["videos_per_second"], 2) for r in lines]
    record_property("videos_per_second", speeds)
    with capsys.disabled():
        print(f"\n{stage}: videos/s {speeds} (batch {batch}; step 0 from the start of training, step 1 a whole "
              f"iteration; {torch.get_num_threads()} threads)")


class SlowFirstOptimizerStep(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            time.sleep(1.0)


def test_videos_per_second_covers_the_whole_step(overrides):
    """The time of a step's backward and optimizer step counts (the journal line of step 1 covers step 0's
    optimizer step), not only the forward pass."""
    from cascade.lit.train import train

    recipe = load_recipe(TINY, [*overrides, "stages.base.train.max_steps=2"])
    folder = train(recipe, "base", extra_callbacks=[SlowFirstOptimizerStep()])
    second = journal(folder)[1]
    assert 0 < second["videos_per_second"] <= len(second["keys"]) / 1.0


# --- run folder, checkpoints, metrics ---------------------------------------------------------------------------

def test_run_folder_checkpoint_cadence_retention_and_metrics(overrides):
    extra = ["stages.base.train.max_steps=4", "stages.base.train.checkpoint_every=1",
             "stages.base.train.keep_checkpoints=2", "stages.base.train.batch_size=4", "stages.base.train.lr=2e-4"]
    assert train_cli("base", overrides, *extra) == 0
    folder = run_folder(overrides, "base")

    written = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert written == load_recipe(TINY, [*overrides, *extra]).model_dump(mode="json")
    run = json.loads((folder / "run.json").read_text())
    assert run["stage"] == "base" and "git_commit" in run
    assert run["git_commit"] is None or len(run["git_commit"].removesuffix("-dirty")) == 40
    assert {"python", "torch", "lightning", "platform", "argv"} <= set(run["environment"])

    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "last.ckpt", "step-0000003.ckpt", "step-0000004.ckpt"]
    assert not list(folder.rglob("*.tmp"))
    assert load_checkpoint(folder / "checkpoints" / "step-0000003.ckpt")["global_step"] == 3
    assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == 4

    rows = [r for r in metrics(folder) if r.get("train/loss")]
    assert len(rows) == 4
    columns = set(rows[0])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/videos_per_second"} <= columns
    buckets = sorted(c for c in columns if c.startswith("train/loss_t"))
    assert len(buckets) == 4
    assert all(r[c] != "nan" for r in rows for c in buckets)  # nothing is logged for an empty bucket
    values = [[float(r[c]) if r[c] else math.nan for c in buckets] for r in rows]
    for row, bucket_losses in zip(rows, values):  # the step's loss is a weighted mean of its buckets' losses
        present = [v for v in bucket_losses if not math.isnan(v)]
        assert min(present) - 1e-6 <= float(row["train/loss"]) <= max(present) + 1e-6
    # A bucket no sample of a step fell in is an empty cell in that row, not the value of an earlier step (with this
    # seed, some bucket has samples in one step and none in the next).
    assert any(math.isnan(now) and not math.isnan(before)
               for previous, current in zip(values, values[1:]) for before, now in zip(previous, current))
    # Linear warm-up over 10 steps from lr 2e-4: the logged lr is that of the step being taken.
    assert [float(r["train/lr"]) for r in rows] == pytest.approx([2e-5, 4e-5, 6e-5, 8e-5])
    assert all(float(r["train/grad_norm"]) > 0 for r in rows)


# --- export and sampling from the export ------------------------------------------------------------------------

def test_export_writes_the_ema_weights_and_sample_loads_them(overrides, tmp_path):
    assert train_cli("base", overrides, "stages.base.train.max_steps=3") == 0
    last = run_folder(overrides, "base") / "checkpoints" / "last.ckpt"
    state = load_checkpoint(last)["state_dict"]
    weights = tmp_path / "weights"
    assert main(["export", str(last), "--out", str(weights / "base.safetensors")]) == 0

    with safe_open(str(weights / "base.safetensors"), framework="pt") as file:
        exported = {k: file.get_tensor(k) for k in file.keys()}
        meta = file.metadata()
    assert set(exported) == {k.removeprefix("ema.module.") for k in state if k.startswith("ema.module.")}
    assert all(torch.equal(v, state[f"ema.module.{k}"]) for k, v in exported.items())
    # After 3 steps with decay 0.99, the EMA is not the raw network.
    assert any(not torch.equal(v, state[f"net.{k}"]) for k, v in exported.items())
    stage = load_recipe(TINY, [*overrides, "stages.base.train.max_steps=3"]).stage("base")
    assert json.loads(meta["cascade.stage"]) == stage.model_dump(mode="json")
    assert meta["cascade.recipe"] == "tiny" and meta["cascade.global_step"] == "3" and meta["cascade.weights"] == "ema"

    out = tmp_path / "sample.mp4"
    assert main(["sample", str(TINY), *overrides, "--checkpoints", str(weights), "--up-to", "base", "--prompt",
                 "a red circle moving left on a black background", "--out", str(out),
                 "stages.base.sampler.steps=2"]) == 0
    assert read_video(out)[0].shape == (stage.frames, stage.height, stage.width, 3)


@pytest.mark.parametrize("case", ["no_ema", "missing"])
def test_export_errors_exit_2(overrides, tmp_path, capsys, case):
    if case == "no_ema":
        assert train_cli("base", overrides, "stages.base.train.max_steps=1") == 0
        state = load_checkpoint(run_folder(overrides, "base") / "checkpoints" / "last.ckpt")
        state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("ema.")}
        checkpoint, message = tmp_path / "no-ema.ckpt", "no EMA weights"
        torch.save(state, checkpoint)
    else:
        checkpoint, message = tmp_path / "none.ckpt", "none.ckpt"
    out = tmp_path / "out" / "base.safetensors"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


# --- non-finite losses ------------------------------------------------------------------------------------------

class WeightProbe(L.Callback):
    """Whether the network and its EMA changed across each batch."""

    def __init__(self) -> None:
        self.changes: list[tuple[bool, bool]] = []

    @staticmethod
    def _copy(module) -> tuple[dict, dict]:
        return ({k: v.clone() for k, v in module.net.state_dict().items()},
                {k: v.clone() for k, v in module.ema.module.state_dict().items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self._copy(pl_module)
        self.changes.append(tuple(any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(self.before, after)))


def inject_nan(monkeypatch, bad: set[int] | None) -> None:
    """NaN videos for the micro-batches numbered in `bad` (every one when None)."""
    import cascade.lit.module as module

    original, count = module.to_model_input, [0]

    def poisoned(batch, device, *args, **kwargs):
        out = original(batch, device, *args, **kwargs)
        if bad is None or count[0] in bad:
            out["video"] = torch.full_like(out["video"], float("nan"))
        count[0] += 1
        return out
    monkeypatch.setattr(module, "to_model_input", poisoned)


def test_nonfinite_steps_are_skipped_and_counted(overrides, monkeypatch, capsys):
    from cascade.lit.train import train

    inject_nan(monkeypatch, {1, 3})
    # keep_checkpoints=1: the checkpoint of a skipped (last) step must still be written.
    recipe = load_recipe(TINY, [*overrides, "stages.base.train.lr=2e-4", "stages.base.train.max_steps=4", "stages.base.train.checkpoint_every=1",
                                "stages.base.train.keep_checkpoints=1"])
    probe, modules = WeightProbe(), []
    folder = train(recipe, "base", extra_callbacks=[probe], module_hook=modules.append)

    assert modules[0].nonfinite_total == 2
    # (net changed, EMA changed) per batch: nothing moves on a skipped step.
    assert probe.changes == [(True, True), (False, False), (True, True), (False, False)]
    assert [r["step"] for r in journal(folder)] == [0, 2]
    assert all(math.isfinite(r["loss"]) for r in journal(folder))
    # One row per step, nothing carried over from an earlier step: NaN where a skipped step has no value.
    rows = metrics(folder)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["train/nonfinite_steps"]) for r in rows] == [0.0, 1.0, 1.0, 2.0]
    for name in ("train/loss", "train/grad_norm"):
        assert [math.isnan(float(r[name])) for r in rows] == [False, True, False, True], name
    assert [float(r["train/lr"]) for r in rows] == pytest.approx([2e-5, 4e-5, 6e-5, 8e-5])
    last = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["cascade"]["nonfinite_total"] == 2
    assert last["state_dict"]["ema.n_averaged"].item() == 2  # EMA updates on the finite steps only
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt", "step-0000004.ckpt"]
    out = capsys.readouterr().out
    assert "non-finite loss at step 1" in out and "non-finite loss at step 3" in out


def test_too_many_nonfinite_steps_in_a_row_stop_training(overrides, monkeypatch):
    from cascade.lit.module import NonFiniteLossError
    from cascade.lit.train import train

    inject_nan(monkeypatch, None)
    recipe = load_recipe(TINY, [*overrides, "stages.base.train.max_steps=10", "stages.base.train.max_nonfinite=3"])
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row had a non-finite loss .*max_nonfinite=3"):
        train(recipe, "base")
    assert journal(run_folder(overrides, "base")) == []


# --- preemption -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_saves_last_checkpoint_stops_and_resumes(overrides, tmp_path, capsys, signum):
    folder = run_folder(overrides, "base")
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "cascade.cli", "train", str(TINY), "--stage", "base", *overrides,
               "stages.base.train.max_steps=10000", "stages.base.train.checkpoint_every=10000"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 60
            while len(journal(folder)) < 3:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no 3 training steps within 60 s"
                time.sleep(0.1)
            process.send_signal(signum)
            assert process.wait(timeout=20) == 0, log.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert f"received {signal.Signals(signum).name}" in text
    steps = len(journal(folder))
    assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == steps >= 3
    assert not list(folder.rglob("*.tmp"))

    assert train_cli("base", overrides, f"stages.base.train.max_steps={steps + 2}",
                     "stages.base.train.checkpoint_every=10000") == 0
    assert "resuming base from" in capsys.readouterr().out
    assert [r["step"] for r in journal(folder)] == list(range(steps + 2))
    assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == steps + 2


# --- sample videos ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["base", "ssr3"])
def test_sample_videos_every_n_steps(overrides, stage):
    assert train_cli(stage, overrides, "logging.sample_every=2", "logging.sample_steps=2",
                     f"stages.{stage}.train.max_steps=2", f"stages.{stage}.train.batch_size=2") == 0
    samples = run_folder(overrides, stage) / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-0000002.mp4"]
    frames, fps = read_video(samples / "step-0000002.mp4")
    recipe = load_recipe(TINY)
    spec = recipe.stage(stage)
    size = spec.train.crop or spec  # a crop stage trains and samples at the crop size
    length = spec.train.crop_frames or spec.frames  # and a frame-window stage at the window's length
    assert frames.shape == (length, size.height, recipe.logging.sample_count * size.width, 3)
    assert fps == pytest.approx(spec.fps, rel=0.05)


# --- wandb ------------------------------------------------------------------------------------------------------

def test_wandb_offline_runs_one_per_stage(overrides, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logging = ["logging.wandb={project: cascade-test, mode: offline}", "logging.sample_every=2",
               "logging.sample_steps=2"]
    runs = []
    for stage in ("base", "tsr1"):  # two stages in one process: two wandb runs, not one
        assert train_cli(stage, [*overrides, *logging], f"stages.{stage}.train.max_steps=2") == 0
        found = list((run_folder(overrides, stage) / "wandb").glob("offline-run-*"))
        assert len(found) == 1 and any(found[0].glob("*.wandb")), found
        assert list(found[0].glob("files/media/videos/samples_*.mp4")), "the sample video is not in the wandb run"
        runs.append(found[0].name)
    assert runs[0].endswith("-tiny-base") and runs[1].endswith("-tiny-tsr1")
    assert wandb.run is None  # train() finished its run
