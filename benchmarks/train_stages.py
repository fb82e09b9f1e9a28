"""Training throughput of every stage of a recipe: videos per second through `cascade train`, end to end (data
loading, forward, backward, optimizer, EMA), from synthetic shards.

    python benchmarks/train_stages.py                       # recipes/tiny.yaml, 30 steps per stage
    python benchmarks/train_stages.py --steps 50 --stages base ssr3

Each stage trains `--steps` steps in a fresh run folder; the figure is the median of the per-step videos/s in the
run's journal after `--warmup` steps. Writes benchmarks/results/train-stages-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from results_io import write_results

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers")
    parser.add_argument("--stages", nargs="*")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train-stages-cpu.json")
    args = parser.parse_args()

    from cascade.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="cascade-train-bench-"))
    data, t5 = work / "data", work / "t5"
    cli(["data", "synth", "--out", str(data), "--count", "128", "--images", "32", "--width", "64", "--height", "64",
         "--fps", "16", "--seconds", "2"])
    cli(["data", "tiny-t5", "--shards", str(data), "--out", str(t5)])
    cli(["data", "embed", "--shards", str(data), "--encoder", str(t5), "--max-tokens", "16"])
    from cascade.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    rows = []
    for stage in recipe.stages:
        if args.stages and stage.name not in args.stages:
            continue
        overrides = [f"data.root={data}", f"text_encoder.path={t5}", f"run_dir={work / 'runs'}",
                     f"data.num_workers={args.workers}", "logging.sample_every=null",
                     f"stages.{stage.name}.train.max_steps={args.steps}",
                     f"stages.{stage.name}.train.checkpoint_every={args.steps}"]
        assert cli(["train", str(args.recipe), "--stage", stage.name, *overrides]) == 0
        journal = work / "runs" / stage.name / "train_steps.jsonl"
        speeds = [json.loads(line)["videos_per_second"] for line in journal.read_text().splitlines()][args.warmup:]
        crop = stage.train.crop
        rows.append(dict(stage=stage.name, kind=stage.kind, clip=[stage.frames, stage.width, stage.height, stage.fps],
                         crop=None if crop is None else [crop.width, crop.height],
                         batch_size=stage.train.batch_size, precision=stage.train.precision,
                         videos_per_second=statistics.median(speeds), steps=len(speeds)))
    print(f"\n{'stage':<6} {'clip':<16} {'crop':<7} {'batch':>5} {'videos/s':>9}")
    for row in rows:
        clip = "{}x{}x{}@{:g}".format(*row["clip"])
        crop = "x".join(map(str, row["crop"])) if row["crop"] else "-"
        print(f"{row['stage']:<6} {clip:<16} {crop:<7} {row['batch_size']:>5} {row['videos_per_second']:>9.1f}")
    write_results(args.out, dict(benchmark="train_stages", recipe=str(args.recipe), steps=args.steps,
                                 warmup=args.warmup, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
