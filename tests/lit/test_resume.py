"""Exact resume after SIGKILL, checkpoints that survive a kill mid-write, checkpoints that hold whole optimizer steps
under gradient accumulation, and DDP on CPU (two gloo processes): disjoint data, identical weights, resume.

Every run is a real `cascade train` process on the prepared tiny dataset (two loader workers, deterministic
algorithms). A resumed run is compared with an uninterrupted one bit for bit: the journal's losses and batch keys
per step (the last line per step and micro-batch counts, as re-run steps append again), and in the final
`last.ckpt` every tensor of the module (net, EMA, `ema.n_averaged`), the optimizer and schedule states, the
global RNG, the micro-batch count and the data position.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
_SCRIPT = Path(sys.executable).with_name("cascade")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-c", "import sys; from cascade.cli import main; "
                                                                       "sys.exit(main())"]
# One OpenMP thread per process: with the trainer and two loader workers on a small CPU, spinning thread pools make
# a step ~30x slower. Runs that are compared always run under the same setting.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# `cascade train` whose checkpoint bytes go to disk slowly and in place (not atomically, as on a file system
# without rename), so that a kill lands in the middle of a write.
SLOW_WRITE = '''
import io, sys, time
import torch
from lightning.fabric.plugins.io import torch_io

def slow_save(checkpoint, path):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    chunk = len(data) // 16 + 1
    with open(path, "wb") as file:
        for start in range(0, len(data), chunk):
            file.write(data[start:start + chunk])
            file.flush()
            time.sleep(0.02)

torch_io._atomic_save = slow_save
from cascade.cli import main
sys.exit(main(sys.argv[1:]))
'''

# Train one stage and have every rank save its final module state (Lightning's checkpoint holds rank 0's only).
# Lightning starts the second DDP rank by re-running sys.argv, so this must be a script file.
SAVE_WEIGHTS = '''
import sys
from pathlib import Path
import lightning as L
import torch
from cascade.lit.train import train
from cascade.recipe import load_recipe

class SaveWeights(L.Callback):
    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(trainer.default_root_dir) / f"weights.rank{trainer.global_rank}.pt")

if __name__ == "__main__":
    recipe, stage, *overrides = sys.argv[1:]
    train(load_recipe(recipe, overrides), stage, extra_callbacks=[SaveWeights()])
'''

DDP = ["stages.base.launch.accelerator=cpu", "stages.base.launch.gpus_per_node=2", "stages.base.launch.strategy=ddp"]


# --- runs ------------------------------------------------------------------------------------------------------
def _overrides(prepared: dict, run_dir: Path, stage: str, steps: int, every: int, extra=()) -> list[str]:
    t = f"stages.{stage}.train"
    return [f"data.root={prepared['data']}", f"text_encoder.path={prepared['t5']}", f"run_dir={run_dir}",
            "data.num_workers=2", "logging.every_n_steps=1", "logging.sample_every=null", f"{t}.deterministic=true",
            f"{t}.max_steps={steps}", f"{t}.checkpoint_every={every}", *extra]


def _train_command(stage: str, overrides: list[str], script: Path | None = None) -> list[str]:
    if script is not None:
        return [sys.executable, str(script), str(TINY), stage, *overrides]
    return [*CLI, "train", str(TINY), "--stage", stage, *overrides]


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # its own session: the loader workers and DDP's second rank can be ended with it
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _kill(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGKILL, as the OOM killer or a lost node would: the trainer itself (with `group`, every process of the run
    at once, as DDP's second rank would otherwise wait in a collective), then whatever of the run is left."""
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(command: list[str], log: Path, timeout: float = 300) -> None:
    proc = _start(command, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, group=True)
        raise AssertionError(f"{command} did not finish in {timeout} s:\n{_tail(log)}") from None
    with contextlib.suppress(ProcessLookupError):  # leftover loader workers or ranks, if any
        os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, f"{command} exited with {code}:\n{_tail(log)}"


def _run_until(command: list[str], log: Path, stop, timeout: float = 300, group: bool = False) -> None:
    """Start `command` and SIGKILL it as soon as `stop()` is true (polled every few milliseconds)."""
    proc = _start(command, log)
    deadline = time.monotonic() + timeout
    try:
        while not stop():
            if proc.poll() is not None:
                raise AssertionError(f"{command} exited with {proc.returncode} before the kill point:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{command} did not reach the kill point in {timeout} s:\n{_tail(log)}")
            time.sleep(0.003)
    finally:
        _kill(proc, group=group)


def _journal_shows(journal: Path, wanted):
    """A stop condition: a line of the journal written from now on is `wanted(record)` (lines of earlier runs are
    not counted; the steps a resumed run repeats are, as they are written again)."""
    start = journal.stat().st_size if journal.is_file() else 0

    def shown() -> bool:
        if not journal.is_file():
            return False
        with open(journal, "rb") as file:
            file.seek(start)
            lines = [line for line in file.read().splitlines(keepends=True) if line.endswith(b"\n")]
        return any(wanted(json.loads(line)) for line in lines)
    return shown


def _journal_reaches(journal: Path, step: int):
    return _journal_shows(journal, lambda record: record["step"] >= step)


# --- what a run left ---------------------------------------------------------------------------------------------
def _journal(path: Path) -> dict[tuple[int, int], dict]:
    """The last line per (step, micro-batch): what a resumed run finally trained on."""
    last = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        last[record["step"], record["micro"]] = record
    return last


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal(a, b, where: str) -> None:
    """Bitwise equality of nested checkpoint contents."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}")
        assert torch.equal(a, b), f"{where}: tensors differ (max |a-b| {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_journal(reference: Path, resumed: Path, steps: int) -> None:
    ref, got = _journal(reference), _journal(resumed)
    assert sorted({s for s, _ in ref}) == list(range(steps)), f"the reference journal covers steps {sorted(ref)}"
    assert sorted(got) == sorted(ref), f"steps (step, micro) {sorted(got)} != reference {sorted(ref)}"
    for key in sorted(ref):
        assert got[key]["keys"] == ref[key]["keys"], f"step/micro {key}: batch {got[key]['keys']} != {ref[key]['keys']}"
        assert got[key]["loss_hex"] == ref[key]["loss_hex"], (
            f"step/micro {key}: loss {got[key]['loss']} != uninterrupted {ref[key]['loss']}")


def _assert_same_checkpoint(reference: Path, resumed: Path, steps: int) -> None:
    ref, got = _load(reference), _load(resumed)
    assert ref["global_step"] == got["global_step"] == steps
    assert "ema.n_averaged" in ref["state_dict"] and any(k.startswith("ema.module.") for k in ref["state_dict"])
    _assert_equal(ref["state_dict"], got["state_dict"], "state_dict")  # net, EMA and its n_averaged
    _assert_equal(ref["optimizer_states"], got["optimizer_states"], "optimizer_states")
    _assert_equal(ref["lr_schedulers"], got["lr_schedulers"], "lr_schedulers")
    # What the next resume would start from: the micro-batch count, the global RNG and the data position.
    _assert_equal(ref["cascade"]["micro_steps"], got["cascade"]["micro_steps"], "cascade.micro_steps")
    _assert_equal(ref["cascade"]["rng"], got["cascade"]["rng"], "cascade.rng")
    _assert_equal(ref["StageDataModule"], got["StageDataModule"], "StageDataModule")


def _assert_checkpoints_intact(folder: Path) -> int:
    """After a kill: every `*.ckpt` loads in full, no temporary file is taken for a checkpoint. Returns the step
    a rerun resumes from (0 without a checkpoint)."""
    from cascade.lit.train import resume_checkpoint

    steps = {}
    for path in sorted((folder / "checkpoints").glob("*.ckpt")):
        steps[path.name] = _load(path)["global_step"]
        assert isinstance(steps[path.name], int), path
    chosen = resume_checkpoint(folder)
    if chosen is None:
        return 0
    # last.ckpt, or a step-*.ckpt newer than it (a kill between writing the two): the newest checkpoint
    assert chosen.suffix == ".ckpt" and steps[chosen.name] == max(steps.values()), (chosen, steps)
    assert chosen.name == "last.ckpt" or steps[chosen.name] > steps.get("last.ckpt", -1), (chosen, steps)
    state = _load(chosen)
    tracked = [cb for cb in state["callbacks"].values() if "best_k_models" in cb]
    assert tracked, f"no checkpoint callback state in {chosen}: {list(state['callbacks'])}"
    for cb in tracked:  # the checkpoint callback's own list of checkpoints names no temporary file
        names = [*cb["best_k_models"], cb["last_model_path"], cb["best_model_path"]]
        assert not any(str(n).endswith(".tmp") for n in names), names
    return state["global_step"]


def _assert_csv_covers(folder: Path, steps: int) -> None:
    """The CSV log keeps the rows of the interrupted runs: after the resumes it has a loss for every step."""
    with open(folder / "logs" / "version_0" / "metrics.csv", newline="") as file:
        logged = {int(float(row["step"])) for row in csv.DictReader(file) if row.get("train/loss")}
    assert logged == set(range(steps)), f"metrics.csv has the loss of steps {sorted(logged)}"


def _kill_points(seed: int, steps: int, count: int, every: int) -> list[int]:
    """`count` different journal steps to kill at, in increasing order. A kill at step k with k % every != 0
    loses completed steps (they are re-run after the resume); with k % every == 0 only the step in progress."""
    points = sorted(random.Random(seed).sample(range(1, steps - 1), count))
    assert any(k % every for k in points) and len(set(points)) == count, f"seed {seed} gives {points}: pick another"
    return points


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """reference(stage, steps, every, extra) -> the run folder of an uninterrupted run (made once per module)."""
    made: dict = {}

    def get(stage: str, steps: int, every: int, extra: tuple = ()) -> Path:
        key = (stage, steps, every, extra)
        if key not in made:
            root = tmp_path_factory.mktemp(f"reference-{stage}")
            _run(_train_command(stage, _overrides(prepared, root / "runs", stage, steps, every, extra)),
                 root / "train.log")
            made[key] = root / "runs" / stage
        return made[key]
    return get


def _kill_and_resume(prepared, tmp_path, reference, stage: str, steps: int, every: int, kills: list[int],
                     extra: tuple = ()) -> list[tuple[int, int]]:
    """Kill one run folder at each journal step of `kills` in turn (rerunning the same command after each), then
    let it finish; assert it equals an uninterrupted run. Returns (kill step, resumed-from step) per kill."""
    ref = reference(stage, steps, every, extra)
    command = _train_command(stage, _overrides(prepared, tmp_path / "runs", stage, steps, every, extra))
    folder, log = tmp_path / "runs" / stage, tmp_path / "train.log"
    journal = folder / "train_steps.jsonl"
    history = []
    for k in kills:
        _run_until(command, log, _journal_reaches(journal, k))
        history.append((k, _assert_checkpoints_intact(folder)))
    _run(command, log)
    print(f"{stage}: (killed at journal step, resumed from checkpoint step): {history}")
    assert log.read_text().count(f"resuming {stage} from") == sum(1 for _, resumed in history if resumed)
    assert any(resumed < k for k, resumed in history), f"no kill lost a completed step: {history}"
    _assert_same_journal(ref / "train_steps.jsonl", journal, steps)
    _assert_same_checkpoint(ref / "checkpoints" / "last.ckpt", folder / "checkpoints" / "last.ckpt", steps)
    _assert_csv_covers(folder, steps)
    return history


# --- exact resume -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # 47 s: the default suite keeps the single-SIGKILL DDP resume (tests/lit/test_resume.py)
def test_resume_after_repeated_sigkill_is_exact(prepared, tmp_path, reference):
    """Three SIGKILLs of one run at random steps (one of them loses a completed step), each followed by the same
    command: the finished run is the uninterrupted one, bit for bit."""
    steps, every = 10, 2
    kills = _kill_points(0, steps, 3, every)  # [4, 7, 8]
    _kill_and_resume(prepared, tmp_path, reference, "base", steps, every, kills)


@pytest.mark.slow  # 32 s: the default suite measured 7:24-9:01 here, near its 10 minutes
def test_kill_during_checkpoint_write_leaves_a_usable_checkpoint(prepared, tmp_path, reference):
    """A SIGKILL while checkpoint bytes are being written leaves only a `*.tmp`; the previous `last.ckpt` is intact,
    the rerun resumes from it and ends as the uninterrupted run."""
    steps, every = 10, 2
    ref = reference("base", steps, every)
    overrides = _overrides(prepared, tmp_path / "runs", "base", steps, every)
    folder, log = tmp_path / "runs" / "base", tmp_path / "train.log"
    checkpoints = folder / "checkpoints"
    script = tmp_path / "slow_write.py"
    script.write_text(SLOW_WRITE)

    def writing_after_a_checkpoint() -> bool:  # a second checkpoint is being written
        return (checkpoints / "last.ckpt").is_file() and any(p.stat().st_size for p in checkpoints.glob("*.tmp"))

    _run_until([sys.executable, str(script), "train", str(TINY), "--stage", "base", *overrides], log,
               writing_after_a_checkpoint)
    left = sorted(p.name for p in checkpoints.glob("*.tmp"))
    assert left, "the kill should have left a partly written temporary file"
    assert _assert_checkpoints_intact(folder) == every  # last.ckpt is still the first checkpoint
    _run(_train_command("base", overrides), log)
    assert f"resuming base from {checkpoints / 'last.ckpt'}" in log.read_text()
    assert not list(checkpoints.glob("*.tmp")), f"{left} should have been rewritten and renamed"
    _assert_same_journal(ref / "train_steps.jsonl", folder / "train_steps.jsonl", steps)
    _assert_same_checkpoint(ref / "checkpoints" / "last.ckpt", checkpoints / "last.ckpt", steps)


@pytest.mark.slow  # 30 s
def test_checkpoints_with_gradient_accumulation_hold_whole_steps(prepared, tmp_path, reference):
    """Two micro-batches per step. A SIGTERM during the first one: the run completes the optimizer step before it
    saves and stops; after the resume no checkpoint is written between micro-batches either (either would lose the
    first micro-batch's gradient). The rerun ends as the uninterrupted run."""
    steps, every, extra = 6, 3, ("stages.base.train.accumulate_grad_batches=2",)
    ref = reference("base", steps, every, extra)
    command = _train_command("base", _overrides(prepared, tmp_path / "runs", "base", steps, every, extra))
    folder, log = tmp_path / "runs" / "base", tmp_path / "train.log"
    first_of_step_2 = _journal_shows(folder / "train_steps.jsonl", lambda record: record["micro"] == 4)
    proc = _start(command, log)
    try:
        deadline = time.monotonic() + 120
        while not first_of_step_2():
            assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
            time.sleep(0.003)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, _tail(log)
    finally:
        _kill(proc)
    assert "received SIGTERM" in log.read_text()
    saved = _load(folder / "checkpoints" / "last.ckpt")
    assert saved["global_step"] >= 3 and saved["cascade"]["micro_steps"] == 2 * saved["global_step"], (
        f"saved between micro-batches: step {saved['global_step']}, micro-batch {saved['cascade']['micro_steps']}")
    _run(command, log)
    for path in (folder / "checkpoints").glob("*.ckpt"):
        saved = _load(path)
        assert saved["cascade"]["micro_steps"] == 2 * saved["global_step"], (
            f"{path.name} saved between micro-batches: step {saved['global_step']}, micro-batch "
            f"{saved['cascade']['micro_steps']}")
    _assert_same_journal(ref / "train_steps.jsonl", folder / "train_steps.jsonl", steps)
    _assert_same_checkpoint(ref / "checkpoints" / "last.ckpt", folder / "checkpoints" / "last.ckpt", steps)


@pytest.mark.slow
@pytest.mark.parametrize("stage, every, extra", [
    ("base", 2, ()),
    # Super-resolution: the low-resolution input and its noise augmentation; dropout draws from the global RNG;
    # two micro-batches per optimizer step.
    ("ssr1", 3, ("stages.ssr1.unet.dropout=0.1", "stages.ssr1.train.accumulate_grad_batches=2")),
], ids=["base", "ssr1-dropout-accumulate"])
def test_resume_after_ten_sigkills_is_exact(prepared, tmp_path, reference, stage, every, extra):
    steps = 16
    kills = _kill_points(1, steps, 10, every)
    _kill_and_resume(prepared, tmp_path, reference, stage, steps, every, kills, extra)


# --- DDP on CPU ---------------------------------------------------------------------------------------------------
DDP_STEPS, DDP_EVERY = 8, 2


@pytest.fixture(scope="module")
def ddp_reference(prepared, tmp_path_factory):
    """An uninterrupted two-process run (gloo), per-rank batch 2, each rank saving its final module state."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "save_weights.py"
    script.write_text(SAVE_WEIGHTS)
    overrides = _overrides(prepared, root / "runs", "base", DDP_STEPS, DDP_EVERY,
                           (*DDP, "stages.base.train.batch_size=2"))
    started = time.perf_counter()
    _run(_train_command("base", overrides, script), root / "train.log")
    print(f"DDP run of {DDP_STEPS} steps: {time.perf_counter() - started:.1f} s")
    return root / "runs" / "base"


def test_ddp_on_cpu(prepared, tmp_path, ddp_reference):
    """Two CPU processes: disjoint data per rank, identical weights on both, and the loss of a one-process run at
    the same global batch."""
    folder = ddp_reference
    ranks = [_journal(folder / "train_steps.jsonl"), _journal(folder / "train_steps.rank1.jsonl")]
    for r, journal in enumerate(ranks):
        assert sorted(journal) == [(s, s) for s in range(DDP_STEPS)], f"rank {r}: {sorted(journal)}"
        assert {rec["rank"] for rec in journal.values()} == {r}
        assert all(len(rec["keys"]) == 2 for rec in journal.values())

    # (a) The ranks read disjoint samples. A rank's pass over the 60 samples is about 24 of them (1 shard, 4 worker
    # roles, every 4th sample; a quarter of the videos left out for image_fraction 0.25), so 8 steps of 2 lie in the
    # first pass: no sample may repeat on a rank, nor appear on both.
    keys = [[k for rec in journal.values() for k in rec["keys"]] for journal in ranks]
    for r in range(2):
        assert len(set(keys[r])) == len(keys[r]), f"rank {r} saw a sample twice: {keys[r]}"
    assert not set(keys[0]) & set(keys[1]), f"samples on both ranks: {sorted(set(keys[0]) & set(keys[1]))}"
    assert _load(folder / "checkpoints" / "last.ckpt")["StageDataModule"]["positions"], "no data position saved"
    assert all(p["epoch"] == 0 for p in _load(folder / "checkpoints" / "last.ckpt")["StageDataModule"]
               ["positions"].values())

    # (b) The same weights on both ranks, the ones in last.ckpt; trained (not the initial ones), finite.
    weights = [torch.load(folder / f"weights.rank{r}.pt", weights_only=True) for r in range(2)]
    _assert_equal(weights[0], weights[1], "rank 0 vs rank 1")
    _assert_equal(weights[0], _load(folder / "checkpoints" / "last.ckpt")["state_dict"], "rank 0 vs last.ckpt")
    assert all(torch.isfinite(v).all() for v in weights[0].values() if v.is_floating_point())
    from cascade.lit.train import build_module
    from cascade.recipe import load_recipe

    recipe = load_recipe(TINY, _overrides(prepared, tmp_path / "unused", "base", DDP_STEPS, DDP_EVERY))
    initial = build_module(recipe, recipe.stage("base")).state_dict()
    names = [k[len("net."):] for k in initial if k.startswith("net.") and initial[k].is_floating_point()]
    unchanged = [k for k in names if torch.equal(initial[f"net.{k}"], weights[0][f"net.{k}"])]
    assert not unchanged, f"net tensors training did not change: {unchanged}"
    # The EMA moves 1 % of the way per step; the biases of convolutions followed by a GroupNorm get gradients of
    # ~0 and move ~1e-9, which 1 % of is below float32 resolution: those may stay put in the EMA.
    moved = [k for k in names if (initial[f"net.{k}"] - weights[0][f"net.{k}"]).abs().max() > 1e-6]
    unchanged = [k for k in moved if torch.equal(initial[f"ema.module.{k}"], weights[0][f"ema.module.{k}"])]
    assert len(moved) > 0.9 * len(names) and not unchanged, f"EMA tensors that did not follow the net: {unchanged}"
    assert weights[0]["ema.n_averaged"].item() == DDP_STEPS

    # (c) One process at the same global batch (4): same number of steps, about the same loss.
    single = tmp_path / "runs"
    _run(_train_command("base", _overrides(prepared, single, "base", DDP_STEPS, DDP_EVERY)), tmp_path / "train.log")
    one = _journal(single / "base" / "train_steps.jsonl")
    assert sorted(one) == sorted(ranks[0])
    ddp_mean = sum(rec["loss"] for journal in ranks for rec in journal.values()) / (2 * DDP_STEPS)
    one_mean = sum(rec["loss"] for rec in one.values()) / DDP_STEPS
    difference = abs(ddp_mean - one_mean) / one_mean
    print(f"mean loss over {DDP_STEPS} steps: DDP 2x2 {ddp_mean:.4f}, one process x4 {one_mean:.4f}, "
          f"relative difference {difference:.3f}")
    assert difference < 0.20


def test_ddp_resume_after_sigkill_is_exact(prepared, tmp_path, ddp_reference):
    """SIGKILL of both ranks after a step that the last checkpoint does not hold, then the same command: each rank
    repeats the uninterrupted run's batches, losses and weights."""
    script = tmp_path / "save_weights.py"
    script.write_text(SAVE_WEIGHTS)
    command = _train_command("base", _overrides(prepared, tmp_path / "runs", "base", DDP_STEPS, DDP_EVERY,
                                                (*DDP, "stages.base.train.batch_size=2")), script)
    folder, log = tmp_path / "runs" / "base", tmp_path / "train.log"
    _run_until(command, log, _journal_reaches(folder / "train_steps.jsonl", 5), group=True)
    resumed = _assert_checkpoints_intact(folder)
    assert 0 < resumed < DDP_STEPS, resumed
    _run(command, log)
    for name in ("train_steps.jsonl", "train_steps.rank1.jsonl"):
        _assert_same_journal(ddp_reference / name, folder / name, DDP_STEPS)
    _assert_same_checkpoint(ddp_reference / "checkpoints" / "last.ckpt", folder / "checkpoints" / "last.ckpt",
                            DDP_STEPS)
    for r in range(2):
        _assert_equal(torch.load(ddp_reference / f"weights.rank{r}.pt", weights_only=True),
                      torch.load(folder / f"weights.rank{r}.pt", weights_only=True), f"rank {r}")
