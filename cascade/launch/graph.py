"""A recipe's job graph: data -> embedding cache -> training of every stage -> distillation -> evaluation -> report.

One definition serves `cascade run` (every node in order on this machine) and `cascade slurm` (a job per node,
dependencies between them: `cascade.launch.slurm`). A node is complete when its outputs exist; outputs are written
last and atomically, so a node interrupted halfway is rerun (and itself resumes from its checkpoints) while a
complete one is skipped.

Nodes (RUN = `recipe.run_folder()`, runs/NAME unless the recipe sets run_dir):

- ``data``: the synthetic dataset (when the recipe says so) and the tiny text encoder (``text_encoder.build_tiny``);
- ``embed``: the T5 embedding cache of the dataset's captions, in ``parts`` slices (an array job on a cluster);
- ``train/STAGE``: train the stage, then export its EMA weights to RUN/teachers/STAGE.safetensors;
- ``distill/STAGE``: guidance + progressive distillation of that teacher to RUN/distilled/STAGE.safetensors;
- ``eval/teachers``, ``eval/distilled``: `cascade eval` of both cascades (RUN/eval/...);
- ``tools``: the video tools of the distilled cascade on held-out synthetic videos (`cascade.eval.tools`,
  RUN/tools/...; synthetic data only);
- ``report``: samples for held-out captions and RUN/report.md with every figure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cascade.launch.requeue import RequeueLoop, file_name, record_attempt
from cascade.recipe import Recipe, load_recipe
from cascade.recipe.builtin import resolve_recipe_path

__all__ = ["Node", "job_graph", "run_node", "run_graph", "run_command", "step_command"]


@dataclass
class Node:
    """One node of the graph: what it waits for, the files that make it complete, how it is sliced."""

    name: str
    after: list[str]
    outputs: list[Path]
    stage: str | None = None  # resources come from this stage's launch section (training, distillation)
    parts: int = 1  # independent slices (an array job on a cluster)
    description: str = ""

    def complete(self) -> bool:
        return all(p.exists() for p in self.outputs)


def embedding_folder(recipe: Recipe) -> Path:
    from cascade.recipe.build import embeddings_folder

    return Path(embeddings_folder(recipe))


PHASES = {"data": 0, "embed": 1, "train": 2, "distill": 3, "eval": 4, "tools": 4, "report": 5}


def job_graph(recipe: Recipe, stages: list[str] | None = None, embed_parts: int = 1) -> list[Node]:
    """The recipe's nodes in an order that respects their dependencies. `stages` restricts training and
    distillation (evaluation and the report need every stage, so they are left out then)."""
    from cascade.data.shards import MANIFEST
    from cascade.recipe.build import dataset_folder

    run = recipe.run_folder()
    names = [s.name for s in recipe.stages]
    chosen = names if stages is None else stages
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise ValueError(f"--stages: no stage named {', '.join(unknown)}; stages are {', '.join(names)}")
    data_outputs = [Path(dataset_folder(recipe)) / MANIFEST]
    if recipe.text_encoder.build_tiny:
        data_outputs.append(Path(recipe.text_encoder.path) / "config.json")
    cache = embedding_folder(recipe)
    nodes = [
        Node("data", [], data_outputs, description="dataset and text encoder"),
        Node("embed", ["data"], [cache / f"part-{p:05d}-of-{embed_parts:05d}.safetensors" for p in range(embed_parts)],
             parts=embed_parts, description="T5 embedding cache"),
    ]
    for name in chosen:
        nodes.append(Node(f"train/{name}", ["embed"], [run / "teachers" / f"{name}.safetensors"], stage=name,
                          description=f"train {name}, export its EMA weights"))
    for name in chosen:
        nodes.append(Node(f"distill/{name}", [f"train/{name}"], [run / "distilled" / f"{name}.safetensors"],
                          stage=name, description=f"distill {name}"))
    if stages is None or set(stages) == set(names):
        nodes.append(Node("eval/teachers", [f"train/{n}" for n in names], [run / "eval" / "teachers" / "eval.json"],
                          description="evaluate the trained cascade"))
        nodes.append(Node("eval/distilled", [f"distill/{n}" for n in names],
                          [run / "eval" / "distilled" / "eval.json"], description="evaluate the distilled cascade"))
        report_after = ["eval/teachers", "eval/distilled"]
        if recipe.data.kind == "synthetic":  # exact ground truth and probes: the tools can be measured
            nodes.append(Node("tools", [f"distill/{n}" for n in names], [run / "tools" / "tools.json"],
                              description="measure image-to-video, stories, editing and upscaling"))
            report_after.append("tools")
        nodes.append(Node("report", report_after, [run / "report.md"],
                          description="samples for held-out captions, report"))
    return nodes


# --------------------------------------------------------------------------------------------------------------
# The nodes
# --------------------------------------------------------------------------------------------------------------
def _data(recipe: Recipe) -> None:
    from cascade.lit.train import ensure_dataset
    from cascade.recipe.build import dataset_folder

    ensure_dataset(recipe)
    te = recipe.text_encoder
    if te.build_tiny and not (Path(te.path) / "config.json").is_file():
        from cascade.data.embed import iter_captions
        from cascade.nn.text import build_tiny_t5

        captions = list(iter_captions(dataset_folder(recipe)))
        build_tiny_t5(te.path, captions, dim=te.dim)
        print(f"built a tiny random T5 (dim {te.dim}) at {te.path}, tokenizer trained on {len(captions)} captions",
              flush=True)


def _embed(recipe: Recipe, part: int, parts: int) -> None:
    from cascade.data.embed import describe_part, embed_shards
    from cascade.recipe.build import dataset_folder

    te = recipe.text_encoder
    path = embed_shards(dataset_folder(recipe), te.path, max_tokens=te.max_tokens, dtype=te.dtype,
                        out=embedding_folder(recipe), part=part, parts=parts)
    summary, warns = describe_part(path)  # what `cascade data embed` prints: cut captions, unknown pieces, bad shards
    print(summary, *(f"warning: {w}" for w in warns), sep="\n", flush=True)


def _train(recipe: Recipe, name: str, out: Path) -> None:
    from cascade.lit.train import export, resume_checkpoint, train

    captured = {}
    folder = train(recipe, name, module_hook=lambda module: captured.setdefault("module", module))
    steps, wanted = captured["module"].global_step, recipe.stage(name).train.max_steps
    if steps < wanted:  # stopped by a signal: the checkpoint is saved, the node is not complete
        raise SystemExit(f"train/{name} stopped at step {steps} of {wanted}; rerun to resume")
    if captured["module"].trainer.is_global_zero:  # rank 0 exports (atomically); the other ranks are done
        export(resume_checkpoint(folder), out)


def _distill(recipe: Recipe, name: str) -> None:
    from cascade.lit.rounds import distill

    distill(recipe, name, teacher=recipe.run_folder() / "teachers" / f"{name}.safetensors")


def _eval(recipe: Recipe, which: str) -> None:
    from cascade.eval.runner import EvalPlan, evaluate

    run = recipe.run_folder()
    out = run / "eval" / which
    evaluate(recipe, run / which, out, EvalPlan.from_recipe(recipe), dtype=recipe.eval.dtype,
             cache=run / "eval" / "cache")  # one FVD reference for both evaluations


def run_node(recipe: Recipe, node: Node, part: int | None = None) -> None:
    """Run one node (one part of it when `part` is given)."""
    kind, _, name = node.name.partition("/")
    if kind == "data":
        _data(recipe)
    elif kind == "embed":
        for p in range(node.parts) if part is None else [part]:
            _embed(recipe, p, node.parts)
    elif kind == "train":
        _train(recipe, name, node.outputs[0])
    elif kind == "distill":
        _distill(recipe, name)
    elif kind == "eval":
        _eval(recipe, name)
    elif kind == "tools":
        from cascade.eval.tools import STORIES, evaluate_tools

        run = recipe.run_folder()  # videos per tool: 8 (stories: STORIES), fewer when the recipe's evaluation uses fewer
        evaluate_tools(recipe, run / "distilled", run / "tools", videos=min(8, recipe.eval.num_videos),
                       stories=min(STORIES, recipe.eval.num_videos), dtype=recipe.eval.dtype)
    elif kind == "report":
        from cascade.report import write_report

        write_report(recipe, recipe.run_folder(), dtype=recipe.eval.dtype)
    else:
        raise ValueError(f"no node named {node.name!r}")


# --------------------------------------------------------------------------------------------------------------
# Running the graph here
# --------------------------------------------------------------------------------------------------------------
def _record(path: Path, name: str, entry: dict) -> None:
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[name] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def run_graph(recipe: Recipe, nodes: list[Node], force: list[str] = (), jobs: int = 1,
              step_argv: list[str] | None = None, status_every: float | None = None,
              step_overrides: list[str] = ()) -> dict:
    """Run the incomplete nodes in dependency order; complete ones are skipped. Wall time per node goes to
    RUN/graph.json (a skipped node keeps the time it took when it ran).

    jobs > 1 runs independent nodes (e.g. different stages' training) at the same time, each as its own process
    `step_argv + [NODE] + step_overrides` (a `cascade step RECIPE` command line, the recipe's overrides after the
    node) with the free cores shared out among the nodes starting
    together (OMP_NUM_THREADS: cores / jobs while every slot is busy, all of them for a node that starts alone),
    its output in RUN/logs/NODE.log. jobs = 1 runs every node in this process, with its progress bars.

    A status line shows the running nodes' steps, elapsed time and an estimate of the rest (`cascade.launch.progress`):
    rewritten in place on a terminal, printed every `status_every` seconds (default 30) into a log."""
    from cascade.launch.progress import Progress, StatusLine, StatusThread

    progress, status = Progress(recipe), StatusLine(every=status_every)
    run = recipe.run_folder()
    run.mkdir(parents=True, exist_ok=True)
    record_path = run / "graph.json"
    total = time.perf_counter()
    todo = [n for n in nodes if not n.complete() or n.name in force]
    for node in nodes:
        if node not in todo:
            print(f"{node.name}: complete, skipped", flush=True)
    finished = {n.name for n in nodes if n not in todo}

    def check(node: Node, seconds: float) -> None:
        missing = [str(p) for p in node.outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"{node.name} finished without writing {', '.join(missing)}")
        _record(record_path, node.name, dict(seconds=round(seconds, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S")))
        finished.add(node.name)

    if jobs <= 1 or step_argv is None:
        for index, node in enumerate(todo, 1):
            head = f"[{index}/{len(todo)}] {node.name}"
            print(f"{head}: {node.description}", flush=True)
            start = time.perf_counter()
            progress.start(node.name)
            try:
                with StatusThread(progress, status):
                    run_node(recipe, node)
            finally:
                progress.stop(node.name)
            check(node, time.perf_counter() - start)
            print(f"{head}: done in {time.perf_counter() - start:.0f} s", flush=True)
    else:
        _run_parallel(todo, finished, check, jobs, step_argv, list(step_overrides), run / "logs", set(force),
                      progress, status)
    print(f"graph done in {time.perf_counter() - total:.0f} s; run folder {run}", flush=True)
    return json.loads(record_path.read_text()) if record_path.is_file() else {}


def _run_parallel(todo: list[Node], finished: set[str], check, jobs: int, step_argv: list[str],
                  overrides: list[str], logs: Path, forced: set[str], progress, status) -> None:
    import subprocess

    def say(text: str) -> None:  # a message of its own line: the terminal's status line is cleared first
        status.clear()
        print(text, flush=True)

    logs.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    names = {n.name for n in todo}
    pending, running = list(todo), {}
    failed: list[str] = []
    count = 0
    while pending or running:
        ready = [n for n in pending if all(a in finished or a not in names for a in n.after)]
        # Later phases first (report, then tools and evaluations, distillation, training, in the graph's order
        # within a phase): a stage's distillation starts as soon as its training ends instead of after every other
        # stage's training, so the chain behind it (the distilled cascade's evaluation, the tools) is not left to
        # the end. In the tiny demo the base's distillation waited 209 s for tsr3's training.
        ready.sort(key=lambda n: -PHASES.get(n.name.partition("/")[0], 0))
        # The cores not taken by running nodes, shared by the nodes starting now: a node that starts alone (the
        # data at the start, the tools and the report at the end) gets every free core, not cores / jobs.
        starting = min(len(ready), jobs - len(running))
        free = cores - sum(entry[4] for entry in running.values())
        while ready and len(running) < jobs and not failed:
            threads = max(1, free // max(1, starting))
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            node = ready.pop(0)
            pending.remove(node)
            count += 1
            log = logs / f"{file_name(node.name)}.log"
            with open(log, "ab") as out:
                argv = [*step_argv, node.name, *overrides, *(["--force"] if node.name in forced else [])]
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            running[node.name] = (node, process, time.perf_counter(), log, threads)
            progress.start(node.name)
            say(f"[{count}/{len(todo)}] {node.name}: {node.description} (started; log {log})")
        if not running:  # nothing left that can start: a failure stopped the graph
            break
        time.sleep(0.5)
        for name, (node, process, start, log, _) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[name]
            progress.stop(name)
            seconds = time.perf_counter() - start
            if code != 0:
                failed.append(f"{name} (exit {code}; see {log})")
                say(f"{name}: FAILED after {seconds:.0f} s; the last lines of {log}:")
                say("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
                continue
            try:
                check(node, seconds)
            except RuntimeError as error:  # exit 0 without its outputs: a failure too, once the others end
                failed.append(str(error))
                continue
            say(f"{name}: done in {seconds:.0f} s")
        status.update(progress.line())
    status.clear()
    if failed or pending:
        not_run = f"; not run: {', '.join(n.name for n in pending)}" if pending else ""
        raise RuntimeError("nodes failed: " + "; ".join(failed) + not_run
                           + " (rerun to continue: complete nodes are kept)")


def run_command(args) -> int:
    """`cascade run RECIPE`: every incomplete node here, in order (--jobs N: independent ones at once)."""
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        nodes = job_graph(recipe, args.stages.split(",") if args.stages else None)
        if args.list:
            for node in nodes:
                state = "complete" if node.complete() else "to do"
                print(f"{node.name:24s} {state:9s} after: {', '.join(node.after) or '-'}")
            return 0
        forced = args.force or []
        if any(n.name.startswith("eval/") and (n.name in forced or not n.complete()) for n in nodes):
            from cascade.eval.runner import EvalPlan, check_metrics

            check_metrics(recipe, EvalPlan.from_recipe(recipe))  # before hours of training, not after them
        step_argv = [sys.executable, "-m", "cascade.cli", "step", str(resolve_recipe_path(args.recipe))]
        run_graph(recipe, nodes, force=args.force or [], jobs=args.jobs, step_argv=step_argv,
                  step_overrides=args.overrides)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = recipe.run_folder() / "report.md"
    if report.is_file():
        print(f"report: {report}")
    return 0


def step_command(args) -> int:
    """`cascade step RECIPE NODE`: one node of the graph (what a cluster job runs). With --part, one slice of an array
    node, complete when its own output exists. Under SLURM, every start is recorded (RUN/slurm/attempts) and a job
    requeued again and again without progress stops with an error (exit 3)."""
    recipe = load_recipe(args.recipe, args.overrides)
    nodes = {n.name: n for n in job_graph(recipe, embed_parts=args.parts)}
    if args.node not in nodes:
        print(f"error: no node {args.node!r}; nodes are {', '.join(nodes)}", file=sys.stderr)
        return 2
    node = nodes[args.node]
    if args.part is not None and not 0 <= args.part < node.parts:
        print(f"error: --part {args.part} is not one of the {node.parts} part(s) of {node.name} (--parts)",
              file=sys.stderr)
        return 2
    outputs = node.outputs if args.part is None or node.parts == 1 else [node.outputs[args.part]]
    if all(p.exists() for p in outputs) and not args.force:
        print(f"{node.name}{'' if args.part is None else f' part {args.part}'}: complete, skipped")
        return 0
    if os.environ.get("SLURM_PROCID", "0") == "0":  # one record per start, by the first rank
        try:
            record_attempt(recipe, node, args.part)
        except RequeueLoop as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
    run_node(recipe, node, part=args.part)
    return 0
