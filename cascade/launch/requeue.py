"""Requeue bookkeeping: every start of a `cascade step` under SLURM is recorded in RUN/slurm/attempts/NODE.jsonl
with what it resumes from, and a job requeued again and again without progress stops with an error.

Who requeues (the batch script, only) and why a job may loop: slurm/README.md, "Preemption, time limits, requeue
loops". This module only counts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cascade.recipe import Recipe

if TYPE_CHECKING:  # annotations only: graph imports this module, not the other way round
    from cascade.launch.graph import Node

__all__ = ["RequeueLoop", "attempts_path", "file_name", "progress", "read_attempts", "record_attempt"]


class RequeueLoop(RuntimeError):
    """A job restarted `CASCADE_REQUEUE_LIMIT` times in a row at the same progress."""


def file_name(node: str) -> str:
    """A node's name as a file name: train/base -> train-base."""
    return node.replace("/", "-")


def attempts_path(run: Path, node: str, part: int | None = None) -> Path:
    """RUN/slurm/attempts/NODE.jsonl (NODE-partP.jsonl for one part of an array node)."""
    return run / "slurm" / "attempts" / (file_name(node) + ("" if part is None else f"-part{part}") + ".jsonl")


def read_attempts(path: Path) -> list[dict]:
    """The recorded starts, oldest first; none when the file does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _checkpoint_step(folder: Path) -> int | None:
    """The step a start in `folder` resumes from: that of its newest checkpoint that loads (read memory-mapped,
    cascade.lit.runfolder.find_resume); None without one, or when none loads (the trainer reports that)."""
    from cascade.errors import UserError
    from cascade.lit.runfolder import find_resume

    try:
        resume = find_resume(folder)
    except UserError:
        return None
    return None if resume.path is None else resume.step


def progress(recipe: Recipe, node: Node) -> object:
    """What a start of the node resumes from: its checkpoint step (training), the finished rounds and the current
    round's step (distillation), or which outputs exist (other nodes)."""
    kind, _, name = node.name.partition("/")
    if kind == "train":
        return _checkpoint_step(recipe.run_folder(name))
    if kind == "distill":
        rounds = sorted(p for p in (recipe.run_folder(name) / "distill").glob("*") if p.is_dir())
        return [[p.name, "done" if (p / "student.safetensors").is_file() else _checkpoint_step(p)] for p in rounds]
    return [p.exists() for p in node.outputs]


def record_attempt(recipe: Recipe, node: Node, part: int | None = None, limit: int | None = None) -> None:
    """Record this start of `node` under SLURM; raise RequeueLoop when this job has now started `limit` + 1 times in
    a row at the same progress (it keeps dying before it saves anything new)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job is None:
        return
    if limit is None:
        limit = int(os.environ.get("CASCADE_REQUEUE_LIMIT", "3"))
    run = recipe.run_folder()
    path = attempts_path(run, node.name, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = dict(job=job, task=os.environ.get("SLURM_ARRAY_TASK_ID"), restart=int(os.environ.get("SLURM_RESTART_COUNT",
                 "0")), progress=progress(recipe, node), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(path, "a") as file:
        file.write(json.dumps(entry) + "\n")
    same = 0
    for previous in reversed(read_attempts(path)):
        if previous["job"] != job or previous.get("task") != entry["task"] or previous["progress"] != entry["progress"]:
            break
        same += 1
    if entry["restart"] > 0 and same > limit:
        raise RequeueLoop(
            f"{node.name}{'' if part is None else f' part {part}'}: job {job} was requeued {same - 1} times in a row "
            f"without progress (resumes from {entry['progress']!r} every time; starts in {path}). The job dies before "
            f"it saves a checkpoint: read its log in {run / 'slurm' / 'logs'}, fix the cause (e.g. a time limit "
            f"shorter than loading plus one checkpoint interval, or cluster.signal_seconds too small), then resubmit "
            f"with `cascade slurm submit` (complete nodes are skipped); raise CASCADE_REQUEUE_LIMIT to allow more "
            f"restarts")
