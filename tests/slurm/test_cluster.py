"""On a real SLURM cluster (`.ci/slurm-up --nodes 2`, then `pytest -m slurm`): the tiny recipe's job graph end to end
with two CPU ranks (gloo) per training job against `cascade run`, a preempted training job that is requeued and
ends with the weights of an uninterrupted one, training across two nodes, and a requeue loop that stops."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade.cli import main
from cascade.launch.graph import job_graph
from cascade.launch.slurm import render, sbatch
from cascade.recipe import load_recipe

from .conftest import TINY, exit_code, folders, short_schedule, slurm, tail_logs, wait_for

pytestmark = pytest.mark.slurm
_SCRIPT = Path(sys.executable).with_name("cascade")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "cascade.cli"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The dataset, the tiny T5 and the embedding cache, made here with `cascade step` (what the graph's data and
    embed jobs run)."""
    root = tmp_path_factory.mktemp("prepared")
    for node in ("data", "embed"):
        done = subprocess.run([*CLI, "step", str(TINY), node, *folders(root), f"run_dir={root / 'run'}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return root


def _submit_train(overrides: list[str], stage: str = "base") -> tuple[str, Path]:
    """Render the graph's train/STAGE job and submit it alone; returns (job id, run folder)."""
    recipe = load_recipe(TINY, overrides)
    node = next(n for n in job_graph(recipe) if n.name == f"train/{stage}")
    run = Path(recipe.run_dir)
    script = run / "slurm" / "scripts" / f"train-{stage}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    (run / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    script.write_text(render(recipe, node, TINY, overrides, run))
    return sbatch(script, []), run


def _steps(folder: Path) -> dict:
    """What a training (or distillation round) folder shows: checkpoint names, last.ckpt's step, logged steps."""
    last = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    with open(folder / "logs" / "version_0" / "metrics.csv", newline="") as file:
        logged = sorted({int(float(r["step"])) for r in csv.DictReader(file)
                         if r.get("train/loss") or r.get("distill/loss")})
    return dict(checkpoints=sorted(p.name for p in (folder / "checkpoints").glob("*.ckpt")),
                step=last["global_step"], logged=logged)


def _assert_same_tensors(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), f"{where}: keys differ"
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), f"{where}.{key}: tensors differ"
        elif isinstance(a[key], dict):
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
        else:
            assert a[key] == b[key], f"{where}.{key}: {a[key]!r} != {b[key]!r}"


def test_graph_runs_to_the_end_like_cascade_run(cluster, tmp_path, capsys):
    """data -> embed -> train base, tsr1 (two gloo ranks each, in parallel) -> distill: every job completes, the
    outputs have the step counts of `cascade run`, a resubmission skips everything."""
    stages = ["base", "tsr1"]
    common = [*folders(tmp_path), *short_schedule(stages)]
    run = tmp_path / "slurm-run"
    started = time.perf_counter()
    assert main(["slurm", "submit", str(TINY), "--stages", ",".join(stages), *common, f"run_dir={run}"]) == 0
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    assert list(jobs) == ["data", "embed", "train/base", "train/tsr1", "distill/base", "distill/tsr1"]
    assert jobs["train/base"]["dependency"] == [jobs["embed"]["job_id"]]
    assert jobs["distill/tsr1"]["dependency"] == [jobs["train/tsr1"]["job_id"]]
    states = wait_for([j["job_id"] for j in jobs.values()], timeout=420, logs=run / "slurm" / "logs")
    print(f"graph on the cluster: {time.perf_counter() - started:.0f} s")
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{tail_logs(run / 'slurm' / 'logs')}"
    assert all(exit_code(j["job_id"]) == "0:0" for j in jobs.values())
    assert next((run / "slurm" / "logs").glob("train-base-*.out")).read_text().count("train/base exited with 0")
    train_log = (run / "base" / "train.log").read_text()  # Lightning's messages: the run folder's log, not the screen
    assert "Starting with 2 processes" in train_log and "distributed_backend=gloo" in train_log
    assert (run / "base" / "train_steps.rank1.jsonl").is_file()  # the second rank trained

    capsys.readouterr()
    assert main(["slurm", "status", str(run)]) == 0
    table = capsys.readouterr().out
    assert table.count("completed") == 6 and table.count("complete ") >= 6, table
    assert main(["slurm", "submit", str(TINY), "--stages", ",".join(stages), *common, f"run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 6 and "submitted" not in out, out

    # The same graph here, one process per stage: the same steps everywhere.
    local = tmp_path / "local-run"
    one_rank = [f"stages.{s}.launch.gpus_per_node=1" for s in stages]
    started = time.perf_counter()
    done = subprocess.run([*CLI, "run", str(TINY), "--stages", ",".join(stages), *common, *one_rank,
                           f"run_dir={local}"], capture_output=True, text=True, timeout=420,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    print(f"cascade run: {time.perf_counter() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in stages:
        assert _steps(run / stage) == _steps(local / stage) == dict(
            checkpoints=["last.ckpt", "step-0000002.ckpt", "step-0000004.ckpt"], step=4, logged=[0, 1, 2, 3])
        for which in ("teachers", "distilled"):
            a, b = load_file(str(run / which / f"{stage}.safetensors")), load_file(str(local / which / f"{stage}.safetensors"))
            assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), f"{which}/{stage}"
        rounds = sorted(p.name for p in (run / stage / "distill").iterdir())
        assert rounds == sorted(p.name for p in (local / stage / "distill").iterdir()) == ["guidance", "steps-0008"]
        for name in rounds:
            assert _steps(run / stage / "distill" / name)["step"] == _steps(local / stage / "distill" / name)["step"] == 2


def test_preempted_job_is_requeued_and_resumes_exactly(cluster, prepared, tmp_path):
    """SIGUSR1 to a training job mid-run (what --signal=B:USR1@N sends before the time limit): the ranks save at a
    step boundary, the job is requeued under the same id, resumes from that checkpoint and ends with the weights,
    optimizer state and data position of an uninterrupted job."""
    steps = 16
    common = [*folders(prepared), *short_schedule(["base"], steps=steps, every=4)]
    reference, ref_run = _submit_train([*common, f"run_dir={tmp_path / 'reference'}"])
    preempted, run = _submit_train([*common, f"run_dir={tmp_path / 'preempted'}"])
    journal, logs = run / "base" / "train_steps.jsonl", run / "slurm" / "logs"
    deadline = time.monotonic() + 240
    while not (journal.is_file() and sum(1 for _ in open(journal)) >= 6):
        assert time.monotonic() < deadline, f"the job did not start training\n{tail_logs(logs)}"
        time.sleep(0.05)
    signal = slurm("scancel", "--batch", "--signal=USR1", preempted)
    assert signal.returncode == 0, signal.stderr
    states = wait_for([reference, preempted], timeout=300, logs=logs)
    assert states == {reference: "COMPLETED", preempted: "COMPLETED"}, f"{states}\n{tail_logs(logs)}"
    info = slurm("scontrol", "show", "job", preempted).stdout
    assert "Restarts=1" in info, info
    log = next(logs.glob("train-base-*.out")).read_text()
    assert "SIGUSR1" in log and "received SIGTERM" in log and "resuming base from" in log, log[-3000:]
    starts = [json.loads(line) for line in (run / "slurm" / "attempts" / "train-base.jsonl").read_text().splitlines()]
    assert [s["restart"] for s in starts] == [0, 1] and starts[0]["progress"] is None
    assert 0 < starts[1]["progress"] < steps, starts  # resumed mid-run
    print(f"preempted, requeued, resumed from step {starts[1]['progress']}")

    a = load_file(str(ref_run / "teachers" / "base.safetensors"))
    b = load_file(str(run / "teachers" / "base.safetensors"))
    _assert_same_tensors(a, b, "teachers/base")
    ref = torch.load(ref_run / "base" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(run / "base" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ref["global_step"] == got["global_step"] == steps
    _assert_same_tensors(ref["state_dict"], got["state_dict"], "state_dict")
    _assert_same_tensors(ref["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"], "optimizer")
    _assert_same_tensors(ref["StageDataModule"], got["StageDataModule"], "StageDataModule")


def test_training_across_two_nodes(cluster, prepared, tmp_path):
    """One rank on each of two slurmd nodes trains like two ranks on one node (the same weights)."""
    if len(cluster["nodes"]) < 2:
        pytest.skip(f"the cluster has one node ({cluster['nodes']}): start it with `.ci/slurm-up --nodes 2`")
    common = [*folders(prepared), *short_schedule(["base"])]
    two, two_run = _submit_train([*common, "stages.base.launch.nodes=2", "stages.base.launch.gpus_per_node=1",
                                  f"run_dir={tmp_path / 'two-nodes'}"])
    one, one_run = _submit_train([*common, f"run_dir={tmp_path / 'one-node'}"])
    logs = two_run / "slurm" / "logs"
    states = wait_for([two, one], timeout=300, logs=logs)
    assert states == {two: "COMPLETED", one: "COMPLETED"}, f"{states}\n{tail_logs(logs)}\n{tail_logs(one_run / 'slurm' / 'logs')}"
    info = slurm("scontrol", "show", "job", two).stdout
    assert "NumNodes=2" in info, info
    log = next(logs.glob("train-base-*.out")).read_text()
    assert f"on {','.join(cluster['nodes'][:2])}" in log or "on n[1-2]" in log, log[:500]
    assert "Starting with 2 processes" in (two_run / "base" / "train.log").read_text()  # Lightning's, in the log
    _assert_same_tensors(load_file(str(two_run / "teachers" / "base.safetensors")),
                         load_file(str(one_run / "teachers" / "base.safetensors")), "teachers/base")


def test_requeue_loop_stops_with_a_clear_message(cluster, prepared, tmp_path, monkeypatch):
    """A job preempted every time before it saves anything (SIGUSR1 as soon as the step starts): the second start
    in a row at the same point (CASCADE_REQUEUE_LIMIT=1) fails the job (exit 3 on rank 0) and says why."""
    monkeypatch.setenv("CASCADE_REQUEUE_LIMIT", "1")  # sbatch passes the environment on to the job
    job, run = _submit_train([*folders(prepared), *short_schedule(["base"], steps=1000, every=1000),
                              f"run_dir={tmp_path / 'run'}"])
    logs, attempts = run / "slurm" / "logs", run / "slurm" / "attempts" / "train-base.jsonl"
    deadline = time.monotonic() + 120
    while not attempts.is_file():  # the step has started (it records that first, then imports and trains)
        assert time.monotonic() < deadline, f"the job did not start\n{tail_logs(logs)}"
        time.sleep(0.05)
    assert slurm("scancel", "--batch", "--signal=USR1", job).returncode == 0
    states = wait_for([job], timeout=180, logs=logs)
    assert states == {job: "FAILED"}, f"{states}\n{tail_logs(logs)}"
    assert exit_code(job) != "0:0"  # rank 0 exits 3; srun then ends the other rank (143)
    log = next(logs.glob("train-base-*.out")).read_text()
    assert "requeued 1 times in a row without progress" in log, log[-3000:]
    starts = [json.loads(line) for line in attempts.read_text().splitlines()]
    assert [(s["restart"], s["progress"]) for s in starts] == [(0, None), (1, None)]
