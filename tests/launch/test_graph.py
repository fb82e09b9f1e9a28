"""The job graph behind `cascade run` (and `cascade slurm`): its nodes, dependencies, and skip-if-complete."""

import json
from pathlib import Path

import pytest

from cascade.cli import main
from cascade.launch import graph
from cascade.launch.graph import job_graph, run_graph
from cascade.recipe import load_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
STAGES = ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"]


def _recipe(tmp_path, *extra):
    return load_recipe(TINY, [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                              f"text_encoder.path={tmp_path / 't5'}", *extra])


def test_graph_nodes_and_dependencies(tmp_path):
    recipe = _recipe(tmp_path)
    nodes = {n.name: n for n in job_graph(recipe, embed_parts=3)}
    assert list(nodes) == ["data", "embed", *[f"train/{s}" for s in STAGES], *[f"distill/{s}" for s in STAGES],
                           "eval/teachers", "eval/distilled", "tools", "report"]
    assert nodes["tools"].after == [f"distill/{s}" for s in STAGES]
    assert nodes["tools"].outputs == [tmp_path / "run" / "tools" / "tools.json"]
    assert nodes["report"].after == ["eval/teachers", "eval/distilled", "tools"]
    assert nodes["embed"].after == ["data"] and nodes["embed"].parts == 3 and len(nodes["embed"].outputs) == 3
    assert all(nodes[f"train/{s}"].after == ["embed"] for s in STAGES)  # stages train independently
    assert nodes["distill/tsr2"].after == ["train/tsr2"] and nodes["distill/tsr2"].stage == "tsr2"
    assert nodes["eval/distilled"].after == [f"distill/{s}" for s in STAGES]
    assert nodes["train/ssr1"].outputs == [tmp_path / "run" / "teachers" / "ssr1.safetensors"]
    assert nodes["data"].outputs == [tmp_path / "data" / "manifest.json", tmp_path / "t5" / "config.json"]
    # Some stages only: no evaluation or report (they need every stage).
    assert [n.name for n in job_graph(recipe, ["base"])] == ["data", "embed", "train/base", "distill/base"]
    with pytest.raises(ValueError, match="no stage named ssr9"):
        job_graph(recipe, ["ssr9"])


def test_run_graph_skips_complete_nodes_and_records_time(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    nodes = job_graph(recipe)
    ran = []

    def fake_run_node(recipe, node, part=None):
        ran.append(node.name)
        for path in node.outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")

    monkeypatch.setattr(graph, "run_node", fake_run_node)
    run_graph(recipe, nodes)
    assert ran == [n.name for n in nodes]
    record = json.loads((tmp_path / "run" / "graph.json").read_text())
    assert set(record) == set(ran) and all(e["seconds"] >= 0 for e in record.values())
    ran.clear()
    run_graph(recipe, nodes)  # everything complete: nothing runs
    assert ran == []
    (tmp_path / "run" / "distilled" / "tsr1.safetensors").unlink()  # one output lost: only its node reruns
    run_graph(recipe, nodes, force=["report"])
    assert ran == ["distill/tsr1", "report"]


def test_a_node_that_writes_nothing_is_an_error(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    monkeypatch.setattr(graph, "run_node", lambda recipe, node, part=None: None)
    with pytest.raises(RuntimeError, match="data finished without writing"):
        run_graph(recipe, job_graph(recipe))


def test_run_list_and_step_errors(tmp_path, capsys):
    args = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", f"text_encoder.path={tmp_path / 't5'}"]
    assert main(["run", str(TINY), "--list", *args]) == 0
    out = capsys.readouterr().out
    assert "train/ssr3" in out and "to do" in out and "after: train/ssr3" in out
    assert main(["step", str(TINY), "train/nope", *args]) == 2
    assert "no node 'train/nope'" in capsys.readouterr().err
    assert main(["run", str(TINY), "--stages", "base,ssr9", *args]) == 2


def _fake_step(tmp_path, nodes, before: str, after: str = ""):
    """A stand-in for `cascade step`: runs `before`, writes the node's outputs, runs `after` (Python source with
    `node` and `mapping` in scope). -> (step_argv, the outputs mapping file)."""
    import sys

    mapping = tmp_path / "outputs.json"
    mapping.write_text(json.dumps({n.name: [str(p) for p in n.outputs] for n in nodes}))
    script = tmp_path / "fake_step.py"
    script.write_text(
        "import json, sys, time, pathlib\n"
        "mapping, node = json.loads(pathlib.Path(sys.argv[1]).read_text()), sys.argv[2]\n"
        + before
        + "for p in mapping[node]:\n"
        "    pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True); pathlib.Path(p).write_text('x')\n"
        + after)
    return [sys.executable, str(script), str(mapping)], mapping


def test_parallel_run_respects_dependencies_and_overlaps_independent_nodes(tmp_path):
    """jobs=2: every node is its own process; a node starts only after its dependencies, and independent nodes
    (different stages' training) run at the same time."""
    recipe = _recipe(tmp_path)
    nodes = job_graph(recipe, ["base", "tsr1"])
    step_argv, mapping = _fake_step(
        tmp_path, nodes,
        "start = time.time(); time.sleep(0.6 if node.startswith('train') else 0.1)\n"
        "if node == 'distill/tsr1': sys.exit(0)\n",  # a node that 'succeeds' without its output
        "with open(pathlib.Path(sys.argv[1]).with_suffix('.times'), 'a') as f:\n"
        "    f.write(json.dumps([node, start, time.time()]) + '\\n')\n")
    with pytest.raises(RuntimeError, match="distill/tsr1 finished without writing"):
        run_graph(recipe, nodes, jobs=2, step_argv=step_argv)
    times = {n: (a, b) for n, a, b in map(json.loads, mapping.with_suffix(".times").read_text().splitlines())}
    assert times["embed"][0] >= times["data"][1] and times["train/base"][0] >= times["embed"][1]
    assert times["distill/base"][0] >= times["train/base"][1]
    (b0, b1), (t0, t1) = times["train/base"], times["train/tsr1"]
    assert t0 < b1 and b0 < t1  # the two trainings overlapped
    assert (tmp_path / "run" / "logs" / "train-base.log").is_file()


def test_parallel_run_gives_a_node_that_starts_alone_every_free_core(tmp_path, monkeypatch):
    """jobs=2 on 4 cores: the data and the embedding cache start alone (4 threads each), the two trainings start
    together (2 each); no node starts with fewer than 2 (the cores / jobs of before)."""
    import cascade.launch.graph as graph

    monkeypatch.setattr(graph.os, "cpu_count", lambda: 4)
    recipe = _recipe(tmp_path)
    nodes = job_graph(recipe, ["base", "tsr1"])
    step_argv, mapping = _fake_step(
        tmp_path, nodes, "time.sleep(0.6 if node.startswith('train') else 0.1)\n",
        "import os\nwith open(pathlib.Path(sys.argv[1]).with_suffix('.threads'), 'a') as f:\n"
        "    f.write(json.dumps([node, os.environ['OMP_NUM_THREADS']]) + '\\n')\n")
    run_graph(recipe, nodes, jobs=2, step_argv=step_argv)
    threads = dict(map(json.loads, mapping.with_suffix(".threads").read_text().splitlines()))
    assert threads["data"] == threads["embed"] == "4"
    assert threads["train/base"] == threads["train/tsr1"] == "2"
    assert all(int(n) >= 2 for n in threads.values()) and len(threads) == len(nodes)


def test_parallel_run_names_the_failed_node_and_what_it_kept_from_running(tmp_path):
    recipe = _recipe(tmp_path)
    nodes = job_graph(recipe, ["base", "tsr1"])
    step_argv, _ = _fake_step(tmp_path, nodes, "if node == 'train/tsr1': sys.exit(3)\n")
    with pytest.raises(RuntimeError, match=r"train/tsr1 \(exit 3.*not run: .*distill/tsr1"):
        run_graph(recipe, nodes, jobs=2, step_argv=step_argv)


def test_step_skips_a_complete_node_unless_forced(tmp_path, monkeypatch, capsys):
    args = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", f"text_encoder.path={tmp_path / 't5'}"]
    for path in job_graph(_recipe(tmp_path))[0].outputs:  # the data node's outputs exist
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    ran = []
    monkeypatch.setattr(graph, "run_node", lambda recipe, node, part=None: ran.append(node.name))
    assert main(["step", str(TINY), "data", *args]) == 0
    assert ran == [] and "complete, skipped" in capsys.readouterr().out
    assert main(["step", str(TINY), "data", "--force", *args]) == 0  # what `cascade run --force data --jobs 2` sends
    assert ran == ["data"]


def _journal(path: Path, steps, micro: int = 1, cut: bool = False) -> None:
    """Step-journal lines as the training module writes them: one per micro-batch, `step` = steps done before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        for step in steps:
            for m in range(micro):
                file.write(json.dumps(dict(step=step, micro=m, rank=0, loss=0.5, keys=[f"{step:06d}-{i}" for i in
                                                                                       range(8)])) + "\n")
        if cut:  # a line cut off mid-write
            file.write('{"step": 99999, "mic')


def test_status_line_reads_steps_elapsed_and_estimate_from_the_journals(tmp_path):
    from cascade.launch.progress import Progress, last_step
    from cascade.recipe.build import build_distillation_rounds

    recipe = _recipe(tmp_path, "stages.base.train.max_steps=400")
    now = [100.0]
    progress = Progress(recipe, clock=lambda: now[0])
    progress.start("train/base")
    progress.start("embed")
    assert progress.line() == "train/base 0/400 steps, 0s elapsed, estimating | embed 0s elapsed"
    journal = tmp_path / "run" / "base" / "train_steps.jsonl"
    _journal(journal, range(100), micro=2, cut=True)  # 100 steps in 50 s: 300 left at 2 steps/s
    now[0] += 50
    assert progress.describe("train/base") == "train/base 100/400 steps, 50s elapsed, ~2m30s left"
    progress.stop("embed")
    assert "embed" not in progress.line()
    _journal(journal, range(100, 3000))  # a long journal: only its tail is read
    assert journal.stat().st_size > 65536 and last_step(journal) == 3000
    assert progress.describe("train/base").startswith("train/base 400/400 steps")  # capped at max_steps

    # A resumed run: the steps done before it started do not count as its speed.
    resumed = Progress(recipe, clock=lambda: now[0])
    resumed.start("train/base")
    assert resumed.describe("train/base").endswith("0s elapsed, estimating")

    # Distillation: the rounds' steps add up; a round whose student exists is complete.
    rounds = build_distillation_rounds(recipe.stage("base"))  # guidance, then two halvings
    assert len(rounds) == 3
    first = tmp_path / "run" / "base" / "distill" / rounds[0].name
    first.mkdir(parents=True)
    (first / "student.safetensors").write_bytes(b"x")
    _journal(tmp_path / "run" / "base" / "distill" / rounds[1].name / "train_steps.jsonl", range(5))
    progress.start("distill/base")
    total = sum(r.max_steps for r in rounds)
    assert progress.steps("distill/base") == (rounds[0].max_steps + 5, total)


def test_status_line_in_place_on_a_terminal_and_every_n_seconds_in_a_log():
    import io

    from cascade.launch.progress import StatusLine, format_duration

    assert [format_duration(s) for s in (0, 42.4, 307, 7380)] == ["0s", "42s", "5m07s", "2h03m"]
    now = [0.0]
    log = io.StringIO()
    status = StatusLine(log, every=30, clock=lambda: now[0])
    status.update("train/base 1/10 steps")  # before the first 30 s: nothing
    now[0] = 31
    status.update("train/base 5/10 steps")
    now[0] = 40
    status.update("train/base 6/10 steps")  # 9 s after the last line: nothing
    assert log.getvalue() == "status: train/base 5/10 steps\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    status = StatusLine(term, clock=lambda: now[0])
    now[0] += 2
    status.update("train/base 7/10 steps")
    status.clear()
    assert term.getvalue() == "\rtrain/base 7/10 steps\x1b[K\r\x1b[K" and status.every == 1.0


def test_run_prints_the_status_line_while_a_node_trains(tmp_path, monkeypatch, capsys):
    """`cascade run`'s own loop (jobs = 1: a status thread beside the node; jobs = 2: between polls of the node
    processes) prints the status line built from the training node's journal."""
    import time

    recipe = _recipe(tmp_path, "stages.base.train.max_steps=40")
    journal = tmp_path / "run" / "base" / "train_steps.jsonl"

    def fake_run_node(recipe, node, part=None):
        if node.name == "train/base":
            for step in range(8):
                _journal(journal, [step])
                time.sleep(0.15)
        for path in node.outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")

    monkeypatch.setattr(graph, "run_node", fake_run_node)
    run_graph(recipe, job_graph(recipe, ["base"]), status_every=0.3)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("status: ")]
    assert lines and all(line.startswith("status: train/base ") and "/40 steps, " in line for line in lines)

    journal.unlink()
    (tmp_path / "run" / "teachers" / "base.safetensors").unlink()
    nodes = job_graph(recipe, ["base"])
    step_argv, _ = _fake_step(tmp_path, nodes, f"if node == 'train/base':\n"
                                                f"    for s in range(12):\n"
                                                f"        with open({str(journal)!r}, 'a') as f:\n"
                                                f"            f.write(json.dumps(dict(step=s)) + '\\n')\n"
                                                f"        time.sleep(0.15)\n")
    run_graph(recipe, nodes, jobs=2, step_argv=step_argv, status_every=0.3)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("status: ")]
    assert any(line.startswith("status: train/base ") and "/40 steps, " in line for line in lines)


def test_run_refuses_an_evaluation_it_cannot_compute_before_any_node(tmp_path, capsys):
    args = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", f"text_encoder.path={tmp_path / 't5'}"]
    assert main(["run", str(TINY), "eval.metrics=[clipsim]", *args]) == 2
    err = capsys.readouterr().err
    assert "clipsim cannot be computed: eval.clip_path is not set" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "graph.json").exists()


def test_report_tables_stay_aligned_when_the_probes_scored_nothing(tmp_path):
    """A run on real data (FVD only): the report's table has no probe columns of dashes and no empty
    'Distilled / teacher' sentence."""
    from cascade.eval.runner import AXES
    from cascade.report import write_report

    recipe = _recipe(tmp_path, "data.kind=shards", f"data.shards={tmp_path / 'shards'}")
    run = tmp_path / "run"
    for which, steps in (("teachers", 8), ("distilled", 4)):
        rows = [dict(stage=s.name, mode="text" if s.kind == "base" else "cascade", axes=list(AXES), steps=steps,
                     nfe_per_video=steps, seconds=1.0, **({"fvd": 100.0 + steps} if s is recipe.stages[-1] else {}))
                for s in recipe.stages]
        (run / "eval" / which).mkdir(parents=True)
        (run / "eval" / which / "eval.json").write_text(json.dumps(dict(
            rows=rows, ground_truth={}, data=dict(videos=2, what="the training shards"), plots=[])))
    text = write_report(recipe, run).read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| cascade | steps per stage | NFE per video | sampling s per video |"
    assert {line.count("|") for line in table} == {5} and len(table) == 4
    assert "Distilled / teacher" not in text and "FVD of the final stage: teachers 108, distilled 104" in text


def test_parallel_run_starts_a_distillation_before_more_training(tmp_path):
    """jobs=2: when the base's training ends and other stages' trainings wait, the base's distillation (a later
    phase, heading the chain to the distilled cascade's evaluation) starts first."""
    recipe = _recipe(tmp_path)
    nodes = job_graph(recipe, ["base", "tsr1", "ssr1", "ssr2"])
    step_argv, mapping = _fake_step(
        tmp_path, nodes,
        "start = time.time(); time.sleep({'train/tsr1': 1.5}.get(node, 0.3 if node.startswith('train') else 0.1))\n",
        "with open(pathlib.Path(sys.argv[1]).with_suffix('.times'), 'a') as f:\n"
        "    f.write(json.dumps([node, start, time.time()]) + '\\n')\n")
    run_graph(recipe, nodes, jobs=2, step_argv=step_argv)
    times = {n: (a, b) for n, a, b in map(json.loads, mapping.with_suffix(".times").read_text().splitlines())}
    # base and tsr1 train together; base ends first: its distillation goes before the waiting ssr1 and ssr2
    assert times["distill/base"][0] < times["train/ssr1"][0] < times["train/ssr2"][0]


def test_parallel_run_passes_the_overrides_after_the_node(tmp_path, monkeypatch):
    """`cascade run --jobs 2 RECIPE KEY=VALUE`: every node's `cascade step` command line parses to that node with
    the overrides (they once came before the node, which `cascade step` then read as the node)."""
    import subprocess

    from cascade.cli import build_parser

    overrides = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                 f"text_encoder.path={tmp_path / 't5'}", "stages.base.train.max_steps=3"]
    nodes = {n.name: n for n in job_graph(_recipe(tmp_path, "stages.base.train.max_steps=3"), ["base"])}
    seen = []

    class Done:  # a `cascade step` that writes its node's outputs and exits 0
        def __init__(self, argv, **kwargs):
            args = build_parser().parse_args(argv[3:])
            seen.append((args.node, args.overrides))
            for path in nodes[args.node].outputs:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x")

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Done)
    assert main(["run", str(TINY), "--jobs", "2", "--stages", "base", *overrides]) == 0
    assert [node for node, _ in seen] == list(nodes) and all(o == overrides for _, o in seen)
