"""`cascade slurm submit|status`: a recipe's job graph (`cascade.launch.graph.job_graph`) as SLURM jobs.

Every node becomes one job rendered from the packaged `job.sbatch` (`cascade/launch/job.sbatch`, a link to
`slurm/job.sbatch`: allocation, environment, one `srun cascade step ...` line) into RUN/slurm/scripts/.
Dependencies are `afterok`: data -> embedding cache (an array job over its parts) -> training of every stage in
parallel -> each stage's distillation -> evaluation -> report. Job ids go to RUN/slurm/jobs.json; resubmitting skips
complete nodes and nodes whose recorded job is still queued or running.

Preemption and requeueing are the batch script's (see slurm/README.md, "Preemption, time limits, requeue loops");
`cascade.launch.requeue` counts the starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cascade
from cascade.launch.graph import Node, job_graph
from cascade.launch.requeue import attempts_path, file_name, read_attempts
from cascade.recipe import Recipe, load_recipe
from cascade.recipe.builtin import resolve_recipe_path

__all__ = ["Resources", "resources", "render", "sbatch", "job_state", "DoesNotFit", "check_memory", "submit", "status",
           "submit_command", "status_command"]

TEMPLATE = Path(cascade.__file__).parent / "launch" / "job.sbatch"  # package data (the repository's slurm/job.sbatch)
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "SIGNALING", "STAGE_OUT"}
# Variables that would change what Lightning detects in the job (a leaked torchrun or DDP launch).
LEAKY = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@dataclass(frozen=True)
class Resources:
    """What one node's job asks SLURM for."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int  # 0: no GPU requested
    time: str


def resources(recipe: Recipe, node: Node) -> Resources:
    """Training and distillation take their stage's launch section (one task per device). Evaluation takes one node
    of the last stage's GPUs, one task per GPU (each task one rank of `cascade eval`, `cascade.distributed`). The
    other nodes are one task: the base stage's CPUs and time limit, and one GPU for the embedding cache and the
    report unless the base stage trains on CPU."""
    if node.stage is not None:
        launch = recipe.stage(node.stage).launch
        gpus = 0 if launch.accelerator == "cpu" else launch.gpus_per_node
        return Resources(launch.nodes, launch.gpus_per_node, launch.cpus_per_task, gpus, launch.time)
    if node.name.startswith("eval/") and recipe.stages[-1].launch.accelerator != "cpu":
        last = recipe.stages[-1].launch
        return Resources(1, last.gpus_per_node, last.cpus_per_task, last.gpus_per_node, recipe.stages[0].launch.time)
    base = recipe.stages[0].launch
    gpu = node.name != "data" and base.accelerator != "cpu"
    return Resources(1, 1, base.cpus_per_task, 1 if gpu else 0, base.time)


def _cascade_command() -> list[str]:
    """The `cascade` of this environment (the jobs run the same installation)."""
    script = Path(sys.executable).with_name("cascade")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cascade.cli"]


def step_line(recipe_path: Path, node: Node, overrides: list[str]) -> str:
    """The node's `cascade step` command line, shell-quoted."""
    argv = [*_cascade_command(), "step", str(recipe_path), node.name, *overrides]
    if node.parts > 1:
        argv += ["--part", "$SLURM_ARRAY_TASK_ID", "--parts", str(node.parts)]
    elif node.name == "embed":
        argv += ["--parts", "1"]
    # Quote every word, except the array index, which the shell must expand.
    return " ".join('"$SLURM_ARRAY_TASK_ID"' if a == "$SLURM_ARRAY_TASK_ID" else shlex.quote(a) for a in argv)


def render(recipe: Recipe, node: Node, recipe_path: Path, overrides: list[str], run: Path,
           template: Path = TEMPLATE) -> str:
    """The sbatch script of one node."""
    res = resources(recipe, node)
    cluster = recipe.cluster
    optional = []
    if res.gpus_per_node:
        optional.append(f"#SBATCH --gpus-per-node={res.gpus_per_node}")
    for flag, value in (("partition", cluster.partition), ("account", cluster.account), ("qos", cluster.qos)):
        if value:
            optional.append(f"#SBATCH --{flag}={value}")
    if node.parts > 1:
        optional.append(f"#SBATCH --array=0-{node.parts - 1}")
    values = dict(
        job_name=f"{recipe.name}-{file_name(node.name)}", nodes=res.nodes, tasks_per_node=res.tasks_per_node,
        cpus_per_task=res.cpus_per_task, time=res.time, signal_seconds=cluster.signal_seconds,
        workdir=Path.cwd(), log_dir=run / "slurm" / "logs",
        log_name=file_name(node.name) + ("-%A_%a" if node.parts > 1 else "-%j"),
        optional="\n".join(optional), omp_threads=1, node=node.name, command=step_line(recipe_path, node, overrides),
    )
    text = template.read_text()
    missing = sorted(set(re.findall(r"{{(\w+)}}", text)) - set(values))
    if missing:
        raise ValueError(f"{template}: unknown placeholders {', '.join(missing)}; known: {', '.join(values)}")
    return re.sub(r"{{(\w+)}}", lambda m: str(values[m.group(1)]), text)


# --------------------------------------------------------------------------------------------------------------
# SLURM commands
# --------------------------------------------------------------------------------------------------------------
def _clean_env() -> dict:
    """This environment without what would confuse the jobs: DDP variables, and the SLURM_* of an allocation that
    `cascade slurm submit` may run inside (SLURM_CONF stays)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LEAKY and not k.startswith("TORCHELASTIC_")
           and not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    return env


def _slurm(argv: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(f"{argv[0]} is not on PATH: run on a SLURM login node (or use --dry-run)")
    return subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), timeout=120)


def sbatch(script: Path, after: list[str]) -> str:
    """Submit `script` after the jobs `after` (afterok); returns the job id."""
    argv = ["sbatch", "--parsable"]
    if after:
        argv += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    done = _slurm([*argv, str(script)])
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]  # "ID" or "ID;CLUSTER"


def job_state(job_id: str) -> str | None:
    """The job's state (for an array, the first that is still active, else the last one's); None when SLURM no
    longer knows the job."""
    done = _slurm(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        raise RuntimeError(f"squeue -j {job_id} failed ({done.returncode}): {done.stderr.strip()[-400:]}; is SLURM "
                           f"reachable from here (SLURM_CONF)?")
    states = done.stdout.split() if done.returncode == 0 else []
    if states:
        return next((s for s in states if s in ACTIVE), states[-1])
    done = _slurm(["scontrol", "show", "job", job_id])
    found = re.findall(r"JobState=(\S+)", done.stdout) if done.returncode == 0 else []
    if not found:
        return None
    return next((s for s in found if s in ACTIVE), found[-1])


# --------------------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------------------
def _jobs_path(run: Path) -> Path:
    return run / "slurm" / "jobs.json"


def _read_jobs(run: Path) -> dict:
    path = _jobs_path(run)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); move it away to submit afresh") from None


def _write_jobs(run: Path, jobs: dict) -> None:
    path = _jobs_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jobs, indent=2))
    os.replace(tmp, path)


class DoesNotFit(ValueError):
    """A stage's training does not fit its GPUs' memory (`cascade plan`)."""


def check_memory(recipe: Recipe, nodes: list[Node], gpu_memory_gib: float, force: bool = False, out=None) -> None:
    """Plan the stages whose training or distillation is still to run on GPUs (`cascade.plan`); raise DoesNotFit
    naming every stage that does not fit and its shortfall, or with `force` only print it."""
    from cascade.plan import plan

    names = list(dict.fromkeys(n.stage for n in nodes if n.stage is not None and not n.complete()
                               and recipe.stage(n.stage).launch.accelerator != "cpu"))
    if not names:
        return
    short = [r for r in plan(recipe, names, gpu_memory_gib=gpu_memory_gib) if not r.fits]
    if not short:
        print(f"plan: {', '.join(names)} fit {gpu_memory_gib:g} GiB per GPU", file=out)
        return
    message = "; ".join(f"stage {r.stage} does not fit: {r.total_gib:.1f} GiB per GPU of {r.gpu_memory_gib:g} "
                        f"({r.shortfall_gib:.1f} GiB short)" for r in short)
    if not force:
        raise DoesNotFit(f"{message}; lower its train.batch_size, set unet.checkpointing or launch.strategy=fsdp "
                         f"(`cascade plan` shows the figures), or pass --force")
    print(f"warning: {message}; submitting anyway (--force)", file=out)


def submit(recipe_path: Path, overrides: list[str], stages: list[str] | None = None, embed_parts: int = 1,
           dry_run: bool = False, out=None, gpu_memory_gib: float = 80.0, force: bool = False) -> dict:
    """Render every node's script into RUN/slurm/scripts and submit the incomplete ones with their dependencies,
    after checking that each stage to train fits its GPUs (`check_memory`; not for a dry run).
    Returns {node: job id, "complete" or "dry-run"}."""
    out = out or sys.stdout
    recipe = load_recipe(recipe_path, overrides)
    nodes = job_graph(recipe, stages, embed_parts=embed_parts)
    if not dry_run:
        check_memory(recipe, nodes, gpu_memory_gib, force=force, out=out)
    run = recipe.run_folder().resolve()
    recipe_path = resolve_recipe_path(recipe_path).resolve()  # a built-in name: the packaged file
    jobs = {} if dry_run else _read_jobs(run)
    scripts = run / "slurm" / "scripts"
    if not dry_run:
        scripts.mkdir(parents=True, exist_ok=True)
        (run / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    for node in nodes:
        text = render(recipe, node, recipe_path, overrides, run)
        res = resources(recipe, node)
        after = [ids[a] for a in node.after if ids.get(a) not in (None, "complete")]
        head = (f"{node.name}: {res.nodes} node(s) x {res.tasks_per_node} task(s), {res.cpus_per_task} CPUs/task, "
                f"{res.gpus_per_node} GPU(s)/node, {res.time}" + (f", array of {node.parts}" if node.parts > 1 else "")
                + f"; after {', '.join(node.after) or '-'}")
        if dry_run:
            ids[node.name] = "dry-run"
            print(f"== {head}\n{text}", file=out)
            continue
        recorded = jobs.get(node.name, {})
        if node.complete():
            ids[node.name] = "complete"
            print(f"{node.name}: complete, skipped", file=out)
            continue
        state = job_state(recorded["job_id"]) if recorded.get("job_id") else None
        if state in ACTIVE:
            ids[node.name] = recorded["job_id"]
            print(f"{node.name}: job {recorded['job_id']} is {state.lower()}, kept", file=out)
            continue
        script = scripts / f"{file_name(node.name)}.sbatch"
        script.write_text(text)
        job_id = sbatch(script, after)
        ids[node.name] = job_id
        jobs[node.name] = dict(job_id=job_id, script=str(script), after=node.after, dependency=after,
                               outputs=[str(Path(p).resolve()) for p in node.outputs], parts=node.parts,
                               resources=res.__dict__, submitted=time.strftime("%Y-%m-%dT%H:%M:%S"),
                               overrides=overrides, recipe=str(recipe_path))
        _write_jobs(run, jobs)
        print(f"{node.name}: submitted job {job_id}" + (f" (after {', '.join(after)})" if after else ""), file=out)
    if dry_run:
        print("graph:", file=out)
        for node in nodes:
            print(f"  {node.name:24s} after: {', '.join(node.after) or '-'}", file=out)
    else:
        print(f"jobs recorded in {_jobs_path(run)}; follow them with `cascade slurm status {run}`", file=out)
    return ids


# --------------------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------------------
def status(run: Path) -> list[dict]:
    """One row per recorded node: job id, SLURM state, whether its outputs exist, starts recorded."""
    jobs = _read_jobs(Path(run))
    if not jobs:
        raise FileNotFoundError(f"{_jobs_path(Path(run))} does not exist: submit the recipe first "
                                f"(`cascade slurm submit RECIPE`)")
    rows = []
    for name, job in jobs.items():
        complete = all(Path(p).exists() for p in job.get("outputs", []))
        attempts = read_attempts(attempts_path(Path(run), name))
        rows.append(dict(node=name, job_id=job.get("job_id"), state=job_state(job["job_id"]) or "gone",
                         complete=complete, starts=len(attempts), after=job.get("after", [])))
    return rows


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def submit_command(args) -> int:
    """`cascade slurm submit RECIPE [OVERRIDES]`."""
    try:
        submit(args.recipe, args.overrides, args.stages.split(",") if args.stages else None,
               embed_parts=args.embed_parts, dry_run=args.dry_run, gpu_memory_gib=args.gpu_memory, force=args.force)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def status_command(args) -> int:
    """`cascade slurm status RUN`."""
    try:
        rows = status(args.run)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'node':24s} {'job':>10s} {'state':12s} {'outputs':9s} {'starts':>6s}  after")
    for row in rows:
        print(f"{row['node']:24s} {row['job_id']:>10s} {row['state'].lower():12s} "
              f"{'complete' if row['complete'] else '-':9s} {row['starts']:>6d}  {', '.join(row['after']) or '-'}")
    return 0
