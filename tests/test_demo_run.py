"""A shortened built-in demo: `cascade run recipes/tiny.yaml` end to end (slow; its own CI step).

The full demo trains for its whole budget (see recipes/tiny.yaml); this one trains every stage briefly, so it asserts
what such a run can reach: every node of the graph completes, the base stage's loss falls, the distilled cascade
samples with the promised fraction of the network evaluations, the report carries every figure, and a rerun
skips everything.
"""

import json
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from cascade.cli import main
from cascade.recipe import load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
STAGES = ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_shortened_demo_runs_the_whole_graph(tmp_path):
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", f"text_encoder.path={tmp_path / 't5'}",
                 "data.count=96", "data.images=16", "logging.sample_every=null", "eval.num_videos=4",
                 "eval.batch_size=4", "eval.steps=[]", "eval.guidance=[]", "eval.aug_logsnr=[]"]
    for stage in STAGES:
        steps = 300 if stage == "base" else 4
        overrides += [f"stages.{stage}.train.max_steps={steps}", f"stages.{stage}.train.checkpoint_every={steps}",
                      f"stages.{stage}.distill.progressive.steps_per_round=4",
                      f"stages.{stage}.distill.consistency.max_steps=4"]
    overrides.append("stages.base.distill.guidance.max_steps=4")  # the SR stages are unguided (w = 0): no round
    assert main(["run", str(TINY), *overrides]) == 0
    run = tmp_path / "run"

    graph = json.loads((run / "graph.json").read_text())
    expected = ["data", "embed", *[f"train/{s}" for s in STAGES], *[f"distill/{s}" for s in STAGES],
                "eval/teachers", "eval/distilled", "tools", "report"]
    assert list(graph) == expected and all(entry["seconds"] > 0 for entry in graph.values())

    # Teachers are the EMA weights at the last step; students are distilled to the recipe's steps: the base to 4,
    # the SR stages to 1 (10 evaluations per video in all).
    recipe = load_recipe(TINY, overrides)
    wanted = {s.name: s.distill.consistency.steps if s.distill.method == "consistency"
              else s.distill.progressive.end_steps for s in recipe.stages}
    assert wanted == dict(base=4, **{s: 1 for s in STAGES[1:]})
    for stage in STAGES:
        with safe_open(str(run / "teachers" / f"{stage}.safetensors"), "pt") as f:
            assert f.metadata()["cascade.global_step"] == str(300 if stage == "base" else 4)
        with safe_open(str(run / "distilled" / f"{stage}.safetensors"), "pt") as f:
            meta = f.metadata()
            assert meta["cascade.weights"] == "distilled" and meta["cascade.steps"] == str(wanted[stage])
            assert meta["cascade.guidance_distilled"] == ("true" if stage == "base" else "false")

    # The base stage learned something in 300 steps: its loss fell by more than a third.
    losses = [json.loads(line)["loss"] for line in (run / "base" / "train_steps.jsonl").read_text().splitlines()]
    assert len(losses) == 300
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.67 * first, (first, last)

    # The report: teacher against distilled at the final stage, network evaluations, samples, wall times.
    report = json.loads((run / "report.json").read_text())
    teacher, distilled = report["teachers"], report["distilled"]
    assert set(teacher["probes"]) == {"color", "shape", "direction", "background"}
    # Teacher: the recipe's steps, two passes per step where guided (w != 0); guidance-distilled students: one.
    assert teacher["steps"] == {s.name: s.sampler.steps for s in recipe.stages}
    assert distilled["steps"] == wanted
    assert teacher["nfe_per_video"] == sum(s.sampler.steps * (1 if s.guidance.weight == 0 else 2)
                                           for s in recipe.stages)
    assert distilled["nfe_per_video"] == 4 + 6 * 1
    assert set(report["distilled_keeps"]) <= {"color", "shape", "direction", "background"}
    assert teacher["fvd"] > 0 and distilled["fvd"] > 0  # tiny.yaml asks for the final stage's FVD (I3D weights)
    assert len(report["samples"]["teachers"]) == 4 and all(Path(p).stat().st_size > 0
                                                           for p in report["samples"]["distilled"])
    text = (run / "report.md").read_text()
    assert "| teachers |" in text and "| distilled |" in text and "Wall time per node" in text
    assert "FVD of the final stage: teachers " in text
    assert "## Video tools" in text and set(report["tools"]["examples"]) == {"image_to_video", "story", "edit",
                                                                            "upscale"}

    # A rerun finds everything complete.
    start = time.perf_counter()
    assert main(["run", str(TINY), *overrides]) == 0
    assert time.perf_counter() - start < 30
    assert json.loads((run / "graph.json").read_text()) == graph
