"""Helpers of the SLURM tests: the cluster (`.ci/slurm-up`), waiting for jobs, the tiny recipe's short schedule."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
IMAGEN = ROOT / "recipes" / "imagen-video.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def short_schedule(stages: list[str], ranks: int = 2, steps: int = 4, every: int = 2) -> list[str]:
    """Overrides: each stage trains `steps` steps on `ranks` CPU processes (gloo), one guidance and one progressive
    distillation round of 2 steps each."""
    out = []
    for s in stages:
        out += [f"stages.{s}.launch.accelerator=cpu", f"stages.{s}.launch.gpus_per_node={ranks}",
                f"stages.{s}.launch.cpus_per_task=1", f"stages.{s}.launch.strategy=ddp",
                f"stages.{s}.launch.time=00:10:00",
                f"stages.{s}.train.max_steps={steps}", f"stages.{s}.train.checkpoint_every={every}",
                f"stages.{s}.distill.guidance.max_steps=2", f"stages.{s}.distill.progressive.steps_per_round=2",
                f"stages.{s}.distill.progressive.start_steps=16", f"stages.{s}.distill.progressive.end_steps=8"]
    return out


def folders(root: Path) -> list[str]:
    """A small dataset and the tiny T5 under `root`, fast logging, one CPU per job for the non-training nodes."""
    return [f"data.root={root / 'data'}", f"text_encoder.path={root / 't5'}", "data.count=48", "data.images=12",
            "data.num_workers=0", "logging.every_n_steps=1", "logging.sample_every=null",
            "stages.base.launch.accelerator=cpu", "stages.base.launch.cpus_per_task=1"]


def slurm(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def job_state(job_id: str) -> str | None:
    from cascade.launch.slurm import job_state as state

    return state(job_id)


def wait_for(job_ids: list[str], timeout: float, logs: Path | None = None) -> dict[str, str]:
    """Poll every 0.25 s until every job is in a terminal state; returns {id: state}."""
    deadline = time.monotonic() + timeout
    while True:
        states = {j: job_state(j) or "GONE" for j in job_ids}
        if all(s in TERMINAL or s == "GONE" for s in states.values()):
            return states
        if time.monotonic() > deadline:
            for j in job_ids:
                slurm("scancel", j)
            raise AssertionError(f"jobs did not finish in {timeout} s: {states}\n{tail_logs(logs)}")
        time.sleep(0.25)


def exit_code(job_id: str) -> str:
    out = slurm("scontrol", "show", "job", job_id).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("ExitCode=")), "?")


def tail_logs(logs: Path | None, lines: int = 30) -> str:
    if logs is None or not logs.is_dir():
        return "(no logs)"
    parts = []
    for path in sorted(logs.glob("*.out")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"== {path.name}\n" + "\n".join(text))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def cluster() -> dict:
    """The running cluster of `.ci/slurm-up` (SLURM_CONF must point at it). Returns {"nodes": [names]}."""
    if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").is_file():
        pytest.fail("no SLURM cluster: run `eval \"$(.ci/slurm-up)\"` first (it exports SLURM_CONF)")
    try:
        done = slurm("sinfo", "-h", "-N", "-o", "%N %t")
    except FileNotFoundError:
        pytest.fail("sinfo is not installed: run .ci/slurm-up (it installs SLURM from Debian's packages)")
    assert done.returncode == 0, f"sinfo failed: {done.stderr}; is the cluster up (.ci/slurm-up)?"
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()]
    nodes = sorted({name for name, _ in rows})
    assert nodes, f"the cluster has no nodes: {done.stdout}"
    return dict(nodes=nodes)
