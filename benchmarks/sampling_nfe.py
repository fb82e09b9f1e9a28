"""Network evaluations and wall time per video: the teacher cascade with classifier-free guidance against the
distilled students (guidance-distilled, then halved), per stage and in total, through `cascade sample`.

    python benchmarks/sampling_nfe.py                     # recipes/tiny.yaml: train, distill, sample (CPU, minutes)

Every stage of the recipe is trained briefly and distilled through its recipe's schedule with few optimizer steps
per round (the figures here are about cost, not quality), then the same prompts are sampled through the whole
cascade once with the teachers (recipe sampler and guidance) and once with the students. Writes
benchmarks/results/sampling-nfe-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from results_io import write_results

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle moving left on a black background", "a green square moving up on a gray background"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny.yaml")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--round-steps", type=int, default=2, help="optimizer steps per distillation round")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampling-nfe-cpu.json")
    args = parser.parse_args()

    from cascade.cli import main as cli
    from cascade.recipe import load_recipe

    work = args.work or Path(tempfile.mkdtemp(prefix="cascade-nfe-"))
    data, t5, runs = work / "data", work / "t5", work / "runs"
    if not (data / "manifest.json").is_file():
        cli(["data", "synth", "--out", str(data), "--count", "64", "--images", "16"])
        cli(["data", "tiny-t5", "--shards", str(data), "--out", str(t5)])
        cli(["data", "embed", "--shards", str(data), "--encoder", str(t5), "--max-tokens", "16"])
    base = [f"data.root={data}", f"text_encoder.path={t5}", f"run_dir={runs}", "data.num_workers=0",
            "logging.sample_every=null"]
    recipe = load_recipe(args.recipe, base)
    overrides = list(base)
    for stage in recipe.stages:
        overrides += [f"stages.{stage.name}.train.max_steps={args.train_steps}",
                      f"stages.{stage.name}.distill.guidance.max_steps={args.round_steps}",
                      f"stages.{stage.name}.distill.progressive.steps_per_round={args.round_steps}"]
    teachers = runs / "teachers"
    for stage in recipe.stages:
        assert cli(["train", str(args.recipe), "--stage", stage.name, *overrides]) == 0
        assert cli(["export", str(runs / stage.name / "checkpoints" / "last.ckpt"), "--out",
                    str(teachers / f"{stage.name}.safetensors")]) == 0
        assert cli(["distill", str(args.recipe), "--stage", stage.name, *overrides]) == 0
    reports = {}
    for name, folder in (("teacher", teachers), ("distilled", runs / "distilled")):
        out = work / f"{name}.mp4"
        prompts = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
        assert cli(["sample", str(args.recipe), *overrides, "--checkpoints", str(folder), *prompts, "--out",
                    str(out), "--batch-size", "2"]) == 0
        reports[name] = json.loads(out.with_suffix(".json").read_text())
    rows = []
    for stage in recipe.stages:
        t, d = reports["teacher"]["per_stage"][stage.name], reports["distilled"]["per_stage"][stage.name]
        rows.append(dict(stage=stage.name, teacher_steps=stage.sampler.steps, teacher_guidance=stage.guidance.weight,
                         teacher_nfe_per_video=t["nfe_per_video"], teacher_seconds=t["seconds"],
                         student_steps=stage.distill.progressive.end_steps, student_nfe_per_video=d["nfe_per_video"],
                         student_seconds=d["seconds"]))
    total = {k: sum(r[k] for r in rows) for k in ("teacher_nfe_per_video", "teacher_seconds",
                                                  "student_nfe_per_video", "student_seconds")}
    print(f"\n{'stage':<6} {'teacher NFE':>11} {'s':>7} {'student NFE':>11} {'s':>7}")
    for r in rows:
        print(f"{r['stage']:<6} {r['teacher_nfe_per_video']:>11} {r['teacher_seconds']:>7.1f} "
              f"{r['student_nfe_per_video']:>11} {r['student_seconds']:>7.1f}")
    print(f"{'total':<6} {total['teacher_nfe_per_video']:>11} {total['teacher_seconds']:>7.1f} "
          f"{total['student_nfe_per_video']:>11} {total['student_seconds']:>7.1f}   (seconds for {len(PROMPTS)} videos)")
    write_results(args.out, dict(benchmark="sampling_nfe", recipe=str(args.recipe), videos=len(PROMPTS), rows=rows,
                                 total=total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
