"""`cascade slurm submit` without a cluster: the rendered scripts of both shipped recipes (`--dry-run`), quoting of
overrides, dependencies, skipping complete and queued nodes (sbatch faked), requeue-loop detection, array parts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from cascade.cli import main
from cascade.launch import requeue, slurm
from cascade.launch.graph import job_graph
from cascade.recipe import load_recipe

from .conftest import IMAGEN, TINY

STAGES = ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"]


def _scripts(out: str) -> dict[str, tuple[str, str]]:
    """{node: (header line, script)} from --dry-run output."""
    found = {}
    for block in out.split("== ")[1:]:
        head, _, script = block.partition("\n")
        found[head.split(":")[0]] = (head, script.split("\ngraph:")[0])
    return found


def _sbatch(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))


def _srun(script: str) -> list[str]:
    line = next(l for l in script.splitlines() if l.startswith("srun "))
    return shlex.split(line.removesuffix(" &"))


def test_dry_run_of_imagen_video(tmp_path, capsys):
    """Paper-scale resources per stage, one task per GPU, USR1 before the limit, requeue, the afterok graph."""
    assert main(["slurm", "submit", str(IMAGEN), "--dry-run", "--embed-parts", "4", f"run_dir={tmp_path / 'run'}",
                 "cluster.partition=gpu", "cluster.account=video"]) == 0
    out = capsys.readouterr().out
    scripts = _scripts(out)
    assert list(scripts) == ["data", "embed", *[f"train/{s}" for s in STAGES], *[f"distill/{s}" for s in STAGES],
                             "eval/teachers", "eval/distilled", "report"]
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted
    recipe = load_recipe(IMAGEN)
    for stage in recipe.stages:
        launch = stage.launch
        for kind in ("train", "distill"):
            head, script = scripts[f"{kind}/{stage.name}"]
            flags = _sbatch(script)
            assert flags["nodes"] == str(launch.nodes) and flags["ntasks-per-node"] == str(launch.gpus_per_node)
            assert flags["gpus-per-node"] == str(launch.gpus_per_node)
            assert flags["cpus-per-task"] == str(launch.cpus_per_task) and flags["time"] == launch.time
            assert flags["signal"] == f"B:USR1@{recipe.cluster.signal_seconds}" and "requeue" in flags
            assert flags["partition"] == "gpu" and flags["account"] == "video" and "qos" not in flags
            argv = _srun(script)
            assert argv[argv.index("step") + 2] == f"{kind}/{stage.name}" and argv[argv.index("step") - 1].endswith("cascade")
    base = _sbatch(scripts["train/base"][1])
    assert (base["nodes"], base["ntasks-per-node"]) == ("16", "8")  # 128 GPUs for the base stage (FSDP)
    assert _sbatch(scripts["train/ssr3"][1])["nodes"] == "8"
    embed = scripts["embed"][1]
    assert _sbatch(embed)["array"] == "0-3" and _sbatch(embed)["ntasks-per-node"] == "1"
    assert _srun(embed)[-4:] == ["--part", "$SLURM_ARRAY_TASK_ID", "--parts", "4"]
    assert '"$SLURM_ARRAY_TASK_ID"' in embed  # expanded by the shell, not quoted away
    assert "gpus-per-node" not in _sbatch(scripts["data"][1])
    # The graph: dependencies as cascade.launch.graph defines them.
    graph = dict(re.findall(r"^  (\S+)\s+after: (.*)$", out, re.M))
    assert graph["embed"] == "data" and graph["train/tsr2"] == "embed" and graph["distill/tsr2"] == "train/tsr2"
    assert graph["eval/distilled"] == ", ".join(f"distill/{s}" for s in STAGES)
    assert graph["report"] == "eval/teachers, eval/distilled"
    assert "; after train/base" in scripts["distill/base"][0]


def test_dry_run_of_tiny_carries_overrides_quoted(tmp_path, capsys):
    odd = f"data.root={tmp_path / 'my data'}/it's"
    overrides = [f"run_dir={tmp_path / 'run'}", odd, "stages.base.launch.accelerator=cpu",
                 "stages.base.launch.gpus_per_node=2", "stages.base.train.max_steps=4"]
    assert main(["slurm", "submit", str(TINY), "--stages", "base", "--dry-run", *overrides]) == 0
    scripts = _scripts(capsys.readouterr().out)
    assert list(scripts) == ["data", "embed", "train/base", "distill/base"]
    argv = _srun(scripts["train/base"][1])
    assert argv[argv.index("step") + 1:] == [str(TINY.resolve()), "train/base", *overrides]
    flags = _sbatch(scripts["train/base"][1])
    assert flags["ntasks-per-node"] == "2" and "gpus-per-node" not in flags  # CPU ranks
    assert flags["signal"] == "B:USR1@60" and flags["chdir"] == str(Path.cwd())


def test_template_placeholders_are_checked(tmp_path):
    recipe = load_recipe(TINY, [f"run_dir={tmp_path}"])
    node = job_graph(recipe)[0]
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#SBATCH --nodes={{nodes}}\n{{nonsense}}\n")
    with pytest.raises(ValueError, match=r"bad.sbatch: unknown placeholders nonsense"):
        slurm.render(recipe, node, TINY, [], tmp_path, template=bad)


def test_submit_dependencies_skips_and_records(tmp_path, monkeypatch, capsys):
    """Complete nodes are skipped (and their dependents do not wait for them), queued ones are kept, failed ones are
    resubmitted; job ids go to RUN/slurm/jobs.json; status shows each node."""
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", f"data.root={tmp_path / 'data'}", f"text_encoder.path={tmp_path / 't5'}"]
    submitted, states, numbers = [], {}, iter(range(101, 200))

    def fake_sbatch(script, after):
        submitted.append((Path(script).stem, list(after)))
        return str(next(numbers))

    monkeypatch.setattr(slurm, "sbatch", fake_sbatch)
    monkeypatch.setattr(slurm, "job_state", lambda job_id: states.get(job_id))
    recipe = load_recipe(TINY, overrides)
    for path in job_graph(recipe)[0].outputs:  # data is complete
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    ids = slurm.submit(TINY, overrides, stages=["base", "tsr1"])
    assert ids["data"] == "complete"
    assert submitted == [("embed", []), ("train-base", ["101"]), ("train-tsr1", ["101"]),
                         ("distill-base", ["102"]), ("distill-tsr1", ["103"])]
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    assert jobs["train/base"]["job_id"] == "102" and jobs["train/base"]["dependency"] == ["101"]
    assert (run / "slurm" / "scripts" / "train-base.sbatch").is_file()

    # Again: train/base finished its output, embed is still running, distill/base failed.
    (run / "teachers").mkdir(parents=True)
    (run / "teachers" / "base.safetensors").write_text("x")
    states.update({"101": "RUNNING", "103": "PENDING", "104": "FAILED", "105": "PENDING"})
    submitted.clear()
    capsys.readouterr()
    slurm.submit(TINY, overrides, stages=["base", "tsr1"])
    out = capsys.readouterr().out
    assert "embed: job 101 is running, kept" in out and "train/base: complete, skipped" in out
    assert submitted == [("distill-base", [])]  # its teacher exists: nothing to wait for
    states["106"] = "PENDING"
    monkeypatch.setattr(slurm, "job_state", lambda job_id: states.get(job_id, "COMPLETED"))
    rows = {r["node"]: r for r in slurm.status(run)}
    assert rows["train/base"]["complete"] and not rows["embed"]["complete"]
    assert rows["distill/base"]["job_id"] == "106" and rows["embed"]["state"] == "RUNNING"
    assert main(["slurm", "status", str(tmp_path / "nothing")]) == 2
    assert "jobs.json does not exist" in capsys.readouterr().err


def test_requeue_loop_is_detected(tmp_path, monkeypatch):
    recipe = load_recipe(TINY, [f"run_dir={tmp_path / 'run'}"])
    node = next(n for n in job_graph(recipe) if n.name == "train/base")
    requeue.record_attempt(recipe, node)  # not under SLURM: nothing recorded
    assert not (tmp_path / "run" / "slurm").exists()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    for restart in range(3):  # the first start and two restarts at the same checkpoint: allowed
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        requeue.record_attempt(recipe, node, limit=3)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(requeue.RequeueLoop, match=r"train/base: job 7 was requeued 3 times in a row without progress"):
        requeue.record_attempt(recipe, node, limit=3)
    monkeypatch.setenv("SLURM_JOB_ID", "8")  # a new job (resubmitted) starts counting afresh
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    requeue.record_attempt(recipe, node, limit=3)
    lines = (tmp_path / "run" / "slurm" / "attempts" / "train-base.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["job"] == "8"


def test_a_part_of_an_array_checks_its_own_output(tmp_path, monkeypatch, capsys):
    from cascade.launch import graph

    args = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", f"text_encoder.path={tmp_path / 't5'}"]
    recipe = load_recipe(TINY, args)
    embed = job_graph(recipe, embed_parts=3)[1]
    embed.outputs[1].parent.mkdir(parents=True)
    embed.outputs[1].write_text("x")
    ran = []
    monkeypatch.setattr(graph, "run_node", lambda recipe, node, part=None: ran.append((node.name, part)))
    assert main(["step", str(TINY), "embed", "--part", "1", "--parts", "3", *args]) == 0
    assert "embed part 1: complete, skipped" in capsys.readouterr().out
    assert main(["step", str(TINY), "embed", "--part", "2", "--parts", "3", *args]) == 0
    assert ran == [("embed", 2)]
    assert main(["step", str(TINY), "embed", "--part", "3", "--parts", "3", *args]) == 2
