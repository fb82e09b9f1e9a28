"""Data loading throughput: clips per second per CPU core, for every stage of a recipe, read from shards.

    python benchmarks/data.py                                  # tiny recipe, synthetic shards built on the fly
    python benchmarks/data.py --recipe recipes/tiny.yaml --shards DIR --seconds 10 --workers 0 2

For each stage it runs the real loader (decode with PyAV, clip at the stage's fps, resize, crop, super-resolution
input from the same clip, uint8 batches) for a fixed time and reports clips/s. With 0 workers the loader runs in
this process on one core (torch and PyAV threads pinned to 1), which is the per-core figure; with W workers the
figure is divided by W. Each is measured without the decode cache and with the recipe's `data.decode_cache_mb`
(after one warm-up epoch that fills it: the steady state of a long run). Writes benchmarks/results/data-cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from results_io import write_results

ROOT = Path(__file__).resolve().parent.parent


def measure(stage, recipe, folder: str, workers: int, seconds: float, cache_mb: int) -> dict:
    from cascade.data.loader import LoaderConfig, StageDataset, StageLoader
    from cascade.recipe.build import clip_spec

    spec = clip_spec(stage, recipe)
    config = LoaderConfig(batch_size=stage.train.batch_size, seed=0, image_fraction=stage.train.image_fraction,
                          max_bad_fraction=None, decode_cache_bytes=cache_mb * 2**20)
    loader = StageLoader(StageDataset(folder, spec, config), num_workers=workers, prefetch_factor=4 if workers else None)
    clips, start = 0, None
    for batch in loader:
        if cache_mb and batch["position"]["epoch"] == 0:  # the warm-up epoch that fills the cache
            continue
        if start is None:  # the first batch pays for worker start-up; time from there
            start = time.perf_counter()
            continue
        clips += len(batch["keys"])
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    per_second = clips / elapsed
    return dict(stage=stage.name, kind=stage.kind, workers=workers, decode_cache_mb=cache_mb, clips=clips, seconds=elapsed,
                clips_per_second=per_second, clips_per_second_per_core=per_second / max(workers, 1),
                clip=[stage.frames, stage.width, stage.height, stage.fps],
                cond=None if spec.cond_frames is None else [spec.cond_frames, spec.cond_width, spec.cond_height],
                crop=None if spec.crop_width is None else [spec.crop_width, spec.crop_height],
                batch_size=stage.train.batch_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny.yaml")
    parser.add_argument("--shards", type=Path, help="dataset folder; default: synthetic shards written to a temp dir")
    parser.add_argument("--count", type=int, default=128, help="synthetic videos when --shards is not given")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per stage and worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--stages", nargs="*", help="default: every stage")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data-cpu.json")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from cascade.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    folder = args.shards
    if folder is None:
        from cascade.data.synthetic import write_synthetic

        folder = Path(tempfile.mkdtemp(prefix="cascade-bench-")) / "synthetic"
        last = recipe.stages[-1]
        seconds = last.frames / last.fps
        print(f"writing {args.count} synthetic videos of {last.width}x{last.height} at {last.fps:g} fps, "
              f"{seconds:g} s, to {folder}", file=sys.stderr)
        write_synthetic(folder, count=args.count, seed=0, images=args.count // 4, width=last.width,
                        height=last.height, fps=last.fps, seconds=seconds)
    rows = []
    caches = sorted({0, recipe.data.decode_cache_mb})
    print(f"{'stage':<6} {'kind':<5} {'clip':<16} {'workers':>7} {'cache MiB':>9} {'clips/s':>8} {'clips/s/core':>12}")
    for stage in recipe.stages:
        if args.stages and stage.name not in args.stages:
            continue
        for workers in args.workers:
            for cache_mb in caches:
                row = measure(stage, recipe, str(folder), workers, args.seconds, cache_mb)
                rows.append(row)
                clip = "{}x{}x{}@{:g}".format(*row["clip"])
                print(f"{row['stage']:<6} {row['kind']:<5} {clip:<16} {workers:>7} {cache_mb:>9} "
                      f"{row['clips_per_second']:>8.1f} {row['clips_per_second_per_core']:>12.1f}", flush=True)
    write_results(args.out, dict(benchmark="data", recipe=str(args.recipe), dataset=str(folder), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
