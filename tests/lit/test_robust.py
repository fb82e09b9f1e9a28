"""What a user meets around the training core: a broken or missing last.ckpt (resume from the newest checkpoint that
loads, say which and why), the run folder's lock, SIGTERM during start-up, the resume message of a changed recipe,
one-line errors for files that are not checkpoints, a full disk while a checkpoint is written, and the screen of a
training run (steps against max_steps, library warnings in the log file, the data line at the end).

Every run is a real `cascade train` (in this process through `cascade.cli.main`, or a subprocess where an exit code or
a signal must be observed) on the prepared tiny dataset, with a few steps."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cascade.cli import main
from cascade.lit.runfolder import LOCK, RunLock, locked

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_cli(overrides: list[str], *extra: str) -> int:
    return main(["train", str(TINY), "--stage", "base", *overrides, *extra])


def steps_trained(folder: Path) -> list[int]:
    path = folder / "train_steps.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def one_line_error(err: str, code_ok: bool = True) -> str:
    """The error line of a failed command; the stderr holds no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "weights_only" not in lines[0]
    return lines[0]


class Malicious:
    """A pickle that would run code when loaded (it asks for os.system)."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def write_malicious(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"global_step": 99, "state_dict": Malicious()}, protocol=2))
    return path


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """A base run of 2 steps with a checkpoint at step 2 (step-0000002.ckpt and last.ckpt), copied by each test."""
    run_dir = tmp_path_factory.mktemp("trained") / "runs"
    overrides = [f"data.root={prepared['data']}", f"text_encoder.path={prepared['t5']}", f"run_dir={run_dir}",
                 "data.num_workers=0", "logging.every_n_steps=1", "logging.sample_every=null",
                 "stages.base.train.max_steps=2", "stages.base.train.checkpoint_every=2"]
    assert train_cli(overrides) == 0
    assert sorted(p.name for p in (run_dir / "base" / "checkpoints").iterdir()) == ["last.ckpt", "step-0000002.ckpt"]
    return run_dir


def copy_run(trained: Path, overrides: list[str], tmp_path: Path) -> tuple[list[str], Path]:
    run_dir = tmp_path / "runs"
    shutil.copytree(trained, run_dir)
    return [*(o for o in overrides if not o.startswith("run_dir=")), f"run_dir={run_dir}"], run_dir / "base"


# --- checkpoint fallback ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "malicious", "missing"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(trained, overrides, tmp_path, capsys, damage):
    overrides, folder = copy_run(trained, overrides, tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        reason = "truncated or corrupt checkpoint"
    elif damage == "zero_bytes":
        last.write_bytes(b"")
        reason = "an empty file (0 bytes)"
    elif damage == "malicious":
        write_malicious(last)
        reason = "refused to load"
    else:
        last.unlink()
        reason = None
    capsys.readouterr()
    assert train_cli(overrides, "stages.base.train.max_steps=3") == 0
    out = capsys.readouterr().out
    step = folder / "checkpoints" / "step-0000002.ckpt"
    assert f"resuming base from {step} (step 2)" in out
    if reason is not None:
        assert f"warning: not resuming from {last}: " in out and reason in out
    assert "pwned" not in out
    assert steps_trained(folder) == [0, 1, 2]  # continued at step 2: no restart from 0
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_a_step_checkpoint_newer_than_last_ckpt_is_taken(trained, overrides, tmp_path, capsys):
    """A kill between writing step-N.ckpt and last.ckpt: last.ckpt is older; resume from the newer one."""
    from cascade.lit.runfolder import find_resume

    overrides, folder = copy_run(trained, overrides, tmp_path)
    checkpoints = folder / "checkpoints"
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    state["global_step"] = 1
    torch.save(state, checkpoints / "last.ckpt")
    resume = find_resume(folder)
    assert (resume.path, resume.step, resume.skipped) == (checkpoints / "step-0000002.ckpt", 2, [])


def test_no_checkpoint_that_loads_is_an_error_not_a_restart(trained, overrides, tmp_path, capsys):
    overrides, folder = copy_run(trained, overrides, tmp_path)
    checkpoints = folder / "checkpoints"
    (checkpoints / "last.ckpt").write_bytes(b"")
    step = checkpoints / "step-0000002.ckpt"
    step.write_bytes(step.read_bytes()[:1000])
    assert train_cli(overrides, "stages.base.train.max_steps=3") == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{checkpoints}: no checkpoint loads" in line and "last.ckpt: an empty file" in line
    assert "step-0000002.ckpt: truncated or corrupt checkpoint (1000 bytes)" in line
    assert steps_trained(folder) == [0, 1] and not (folder / LOCK).exists()


# --- the recipe changed -----------------------------------------------------------------------------------------

def test_resume_message_names_the_changed_fields_and_the_step(trained, overrides, tmp_path, capsys):
    overrides, folder = copy_run(trained, overrides, tmp_path)
    capsys.readouterr()
    assert train_cli(overrides, "stages.base.train.max_steps=3", "stages.base.train.lr=0.0003") == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "changed since" in line)
    assert "stages.base.train.max_steps: 2 -> 3" in warning and "stages.base.train.lr: 0.002 -> 0.0003" in warning
    assert f"resuming from step 2 ({folder / 'checkpoints' / 'last.ckpt'})" in warning
    assert (folder / "recipe.previous.yaml").is_file()


# --- the run folder's lock --------------------------------------------------------------------------------------

def _lock_of(pid: int) -> dict:
    from cascade.lit.runfolder import _process_start

    return dict(host=socket.gethostname(), pid=pid, start=_process_start(pid), since="2026-01-01 00:00:00 UTC",
                command="cascade train x --stage base")


def test_a_second_process_is_refused_with_the_holder_named(overrides, capsys):
    folder = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))) / "base"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK).write_text(json.dumps(_lock_of(holder.pid)))
        assert train_cli(overrides, "stages.base.train.max_steps=1") == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"{folder} is in use by pid {holder.pid} on host {socket.gethostname()} since 2026-01-01" in line
        assert f"if that process is gone (its machine died), delete {folder / LOCK}" in line
        assert not (folder / "checkpoints").exists() and json.loads((folder / LOCK).read_text())["pid"] == holder.pid
        # A distillation folder alike, before the teacher is even looked for.
        (folder / "distill").mkdir()
        (folder / "distill" / LOCK).write_text(json.dumps(_lock_of(holder.pid)))
        assert main(["distill", str(TINY), *overrides, "--stage", "base"]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"{folder / 'distill'} is in use by pid {holder.pid}" in line and "distillation folder" in line
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_reported_and_taken_over(overrides, capsys):
    folder = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))) / "base"
    folder.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (folder / LOCK).write_text(json.dumps(_lock_of(gone.pid)))
    assert train_cli(overrides, "stages.base.train.max_steps=1") == 0
    err = capsys.readouterr().err
    assert f"note: {folder / LOCK}: taking over a stale lock (pid {gone.pid} is no longer running" in err
    assert steps_trained(folder) == [0] and not (folder / LOCK).exists()  # released at the end


def test_lock_rules_slurm_restart_reentry_and_other_ranks(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    # An earlier start of this SLURM job on another node (requeued): taken over; another job's lock there is not.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (folder / LOCK).write_text(json.dumps(dict(host="node-7", pid=1, slurm_job="4242", since="x")))
    with RunLock(folder) as lock:
        assert lock.held and json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
        assert RunLock(folder).acquire() is False  # this process holds it already: reentrant, not refused
    assert not (folder / LOCK).exists()
    (folder / LOCK).write_text(json.dumps(dict(host="node-7", pid=1, slurm_job="999", since="x")))
    with pytest.raises(Exception, match="is in use by pid 1 on host node-7"):
        RunLock(folder).acquire()
    # A restart in a container that reuses this process's pid: the start time tells the earlier process apart.
    (folder / LOCK).write_text(json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), start="1", since="x")))
    with RunLock(folder) as lock:
        assert lock.held
    # A lock file that names no holder (cut off while written) and is older than a minute: stale.
    (folder / LOCK).write_text("{")
    os.utime(folder / LOCK, (time.time() - 120, time.time() - 120))
    with RunLock(folder) as lock:
        assert lock.held
    # Ranks other than the launching one (Lightning's LOCAL_RANK > 0, srun's SLURM_PROCID > 0) take no lock.
    (folder / LOCK).write_text(json.dumps(dict(host="node-7", pid=1, slurm_job="999", since="x")))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with locked(folder) as lock:
        assert lock is None


# --- SIGTERM during start-up ------------------------------------------------------------------------------------

def test_sigterm_during_startup_exits_cleanly_a_second_process_is_refused_and_a_rerun_starts(overrides, tmp_path, capsys):
    folder = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))) / "base"
    command = [sys.executable, "-m", "cascade.cli", "train", str(TINY), "--stage", "base", *overrides,
               "stages.base.train.max_steps=1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not (folder / LOCK).exists():  # the handlers are installed before the lock is taken
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        # A second process on the folder meanwhile is refused, naming the first.
        assert train_cli(overrides, "stages.base.train.max_steps=1") == 2
        refused = one_line_error(capsys.readouterr().err)
        assert f"{folder} is in use by pid {process.pid} on host {socket.gethostname()}" in refused
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    line = one_line_error(err)
    assert "error: stage base: received SIGTERM during start-up, before the first step" in line
    assert steps_trained(folder) == [] and not (folder / "checkpoints").exists() and not (folder / LOCK).exists()
    assert train_cli(overrides, "stages.base.train.max_steps=1") == 0
    assert steps_trained(folder) == [0]


# --- files that are not checkpoints -----------------------------------------------------------------------------

def test_files_that_are_not_checkpoints_are_one_line_errors(trained, overrides, tmp_path, capsys):
    bad = write_malicious(tmp_path / "bad.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    good = trained / "base" / "checkpoints" / "last.ckpt"
    cases = [
        (["export", str(bad), "--out", str(tmp_path / "a.safetensors")], f"{bad}: refused to load"),
        (["export", str(text), "--out", str(tmp_path / "a.safetensors")], f"{text}: not a PyTorch training checkpoint"),
        (["export", str(good), "--out", str(tmp_path / "base.pt")],
         f"--out {tmp_path / 'base.pt'}: export writes safetensors"),
        (["distill", str(TINY), *overrides, "--stage", "base", "--teacher", str(bad)], f"{bad}: refused to load"),
        (["distill", str(TINY), *overrides, "--stage", "base", "--teacher", str(broken)],
         f"{broken}: not a readable safetensors teacher weights file"),
    ]
    for argv, cause in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        line = one_line_error(captured.err)
        assert cause in line, (argv, line)
        assert "pwned" not in captured.out
    assert not (tmp_path / "base.pt").exists() and not (tmp_path / "a.safetensors").exists()
    # As train's resume: the only checkpoint is malicious.
    folder = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))) / "base"
    (folder / "checkpoints").mkdir(parents=True)
    write_malicious(folder / "checkpoints" / "last.ckpt")
    assert train_cli(overrides) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "no checkpoint loads" in line and "last.ckpt: refused to load" in line


# --- a full disk, the data budget, the screen -------------------------------------------------------------------

def test_disk_full_while_writing_a_checkpoint_is_one_line(overrides, monkeypatch, capsys):
    from lightning.fabric.plugins.io import torch_io

    def full(checkpoint, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch_io, "_atomic_save", full)
    folder = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))) / "base"
    assert train_cli(overrides, "stages.base.train.max_steps=1") == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: no space left on the device writing ") and "checkpoints" in line
    assert not list((folder / "checkpoints").glob("*.tmp")) and not (folder / LOCK).exists()


def test_bad_data_budget_in_a_worker_is_one_line(overrides, monkeypatch, capsys):
    import cascade.data.loader as loader
    from cascade.data.clips import BadSample

    def bad(*args, **kwargs):
        raise BadSample("decode_error", "the test's broken video")
    monkeypatch.setattr(loader, "make_example", bad)  # the worker is forked: it sees the patch
    assert train_cli(overrides, "data.num_workers=1", "stages.base.train.max_steps=2") == 1
    line = one_line_error(capsys.readouterr().err)
    assert "error: stage base stopped: " in line and "decode_error" in line and "budget" in line


def test_the_screen_shows_steps_against_max_steps_and_keeps_library_warnings_in_the_log(overrides, capfd):
    folder = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))) / "base"
    assert train_cli(overrides, "stages.base.train.max_steps=2", "stages.base.train.accumulate_grad_batches=2") == 0
    captured = capfd.readouterr()
    screen = captured.out + captured.err
    assert "2/2" in screen and "4/2" not in screen and "Epoch" not in screen
    for chatter in ("GPU available", "LOCAL_RANK", "PossibleUserWarning", "srun", "eval mode"):
        assert chatter not in screen, chatter
    assert re.search(r"data: \d+ samples read, none bad", screen), screen
    log = (folder / "train.log").read_text()
    assert "GPU available" in log


def test_empty_loss_buckets_are_not_logged(overrides, tmp_path, monkeypatch):
    """A log-SNR bucket no sample of a step fell in has no value that step: an empty CSV cell, nothing in wandb
    (whose summary would otherwise show NaN, which reads as divergence)."""
    import csv

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from wandb.sdk.wandb_run import Run

    logged, log = [], Run.log

    def spy(self, data, *args, **kwargs):  # what reaches the wandb run, on its way there
        logged.append(dict(data))
        return log(self, data, *args, **kwargs)
    monkeypatch.setattr(Run, "log", spy)
    folder = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir="))) / "base"
    assert train_cli(overrides, "logging.wandb={project: cascade-test, mode: offline}", "stages.base.train.max_steps=3",
                     "stages.base.train.batch_size=1") == 0
    with open(folder / "logs" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    buckets = [k for k in rows[0] if k.startswith("train/loss_t")]
    assert buckets and len(rows) == 3
    cells = [r[k] for r in rows for k in buckets]
    assert "nan" not in cells and sum(c != "" for c in cells) == 3  # one sample per step: one bucket per step
    values = [v for row in logged for k, v in row.items() if k.startswith("train/loss_t")]
    assert len(values) == 3 and all(v == v for v in values), logged  # no NaN


def test_the_bad_sample_counts_are_printed_at_the_end_of_a_run(overrides, monkeypatch, capsys):
    import cascade.data.loader as loader
    from cascade.data.clips import BadSample

    original, calls = loader.make_example, [0]

    def every_fourth_bad(*args, **kwargs):
        calls[0] += 1
        if calls[0] % 4 == 0:
            raise BadSample("decode_error", "the test's broken video")
        return original(*args, **kwargs)
    monkeypatch.setattr(loader, "make_example", every_fourth_bad)
    assert train_cli(overrides, "data.max_bad_fraction=0.5", "stages.base.train.max_steps=2") == 0
    out = capsys.readouterr().out
    assert re.search(r"^data: \d+ of \d+ samples read were bad \(\d+\.\d%\): decode_error \d+$", out, re.M), out


# --- a teacher, a text encoder or a cache that does not fit the recipe; wandb online without a key ---------------

def test_a_teacher_trained_with_other_settings_names_the_fields(overrides, tmp_path, capsys):
    """`cascade distill --teacher` with weights exported from channels 16 while the recipe says 32: one line naming
    the field and both values (from the file's cascade.stage metadata), not load_state_dict's size-mismatch
    traceback."""
    from cascade.recipe import load_recipe
    from cascade.recipe.build import build_unet
    from cascade.weights import WeightsInfo, save_weights

    other = load_recipe(TINY, [*overrides, "stages.base.unet.channels=16"])
    stage = other.stage("base")
    teacher = tmp_path / "base.safetensors"
    save_weights(teacher, build_unet(stage, other).state_dict(), WeightsInfo(kind="ema"), {
        "cascade.stage": json.dumps(stage.model_dump(mode="json")),
        "cascade.text_encoder": json.dumps(other.text_encoder.model_dump(mode="json"))})
    capsys.readouterr()
    assert main(["distill", str(TINY), *overrides, "--stage", "base", "--teacher", str(teacher)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{teacher}: trained with stages.base.unet.channels 16, the recipe says 32" in line, line


def test_a_text_encoder_or_cache_of_another_width_is_one_line(prepared, overrides, tmp_path, capsys):
    """text_encoder.dim must be the T5's d_model (config.json) and the embedding cache's width: named before any
    work, with the value to set or the command to rebuild."""
    d_model = json.loads((Path(prepared["t5"]) / "config.json").read_text())["d_model"]
    assert train_cli([*overrides, f"text_encoder.dim={d_model * 2}"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"text_encoder.dim is {d_model * 2}, but the T5 at {prepared['t5']} has d_model {d_model}" in line, line
    # a T5 of the recipe's width, but the cache was built with the other one
    wide = tmp_path / "t5-wide"
    shutil.copytree(prepared["t5"], wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "d_model": d_model * 2}))
    assert train_cli([*overrides, f"text_encoder.path={wide}", f"text_encoder.dim={d_model * 2}"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"embedding cache of width {d_model}, but text_encoder.dim is {d_model * 2}" in line, line
    assert "cascade data embed --shards" in line
    run_dir = Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir=")))
    assert not (run_dir / "base" / "checkpoints").exists()


def test_wandb_online_without_an_api_key_is_one_line(overrides, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(Path(next(o.partition("=")[2] for o in overrides if o.startswith("run_dir=")))))
    monkeypatch.setenv("WANDB_CONFIG_DIR", os.environ["HOME"])
    assert train_cli([*overrides, "logging.wandb.project=mine", "logging.wandb.mode=online",
                      "stages.base.train.max_steps=1"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "logging.wandb.mode is online but wandb has no API key here" in line, line
