"""Memory and time of a long video (`cascade.tools.story`) against its length: the super-resolution stages run over
the long video in windows of their clip length, so the networks' working memory stays that of one window and only
the videos themselves grow with the length.

    python benchmarks/story_memory.py                     # recipes/tiny.yaml, random networks, 1-16 segments

Each length runs in its own process (peak RSS is a process's high-water mark); the networks are randomly initialised
and sample with 2 steps per stage (the figures are about cost, not quality). Writes
benchmarks/results/story-memory-cpu.json: per length, base and final frames, peak RSS, the bytes of every stage's
output (float32), seconds, network calls per stage; and the slope of peak RSS per final frame against the output's
own bytes per final frame.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import write_results

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle moving right on a black background", "a red circle moving up on a black background",
           "a red circle moving left on a black background", "a red circle moving down on a black background"]

CHILD = r"""
import json, resource, sys, time
import torch
from cascade.inference import Cascade
from cascade.recipe import load_recipe
from cascade.tools import story
recipe_path, t5, segments = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = [s.name for s in load_recipe(recipe_path).stages]
recipe = load_recipe(recipe_path, [f"text_encoder.path={t5}", *[f"stages.{n}.sampler.steps=2" for n in names]])
cascade = Cascade.from_recipe(recipe, None, device="cpu")
prompts = [PROMPTS[i % len(PROMPTS)] for i in range(segments)]
start = time.perf_counter()
result = story(cascade, prompts, progress=False)
seconds = time.perf_counter() - start
stats = result.batches[0]["stages"]
print(json.dumps(dict(segments=segments, seconds=seconds,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      frames={n: int(v.shape[2]) for n, v in result.videos.items()},
                      output_mb=sum(v.numel() * 4 for v in result.videos.values()) / 2**20,
                      stages=stats)))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny.yaml")
    parser.add_argument("--segments", default="1,2,4,8,16", help="story lengths in segments, comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "story-memory-cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        from cascade.data.synthetic import all_captions
        from cascade.nn.text import build_tiny_t5

        t5 = Path(tmp) / "t5"
        build_tiny_t5(t5, all_captions(), dim=64)
        rows = []
        for n in [int(v) for v in args.segments.split(",")]:
            code = f"PROMPTS = {PROMPTS!r}\n" + CHILD
            done = subprocess.run([sys.executable, "-c", code, str(args.recipe), str(t5), str(n)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            final = list(row["frames"].values())[-1]
            print(f"{n:>3} segments: base {row['frames']['base']:>3} frames, final {final:>4} frames, "
                  f"peak RSS {row['peak_rss_mb']:7.1f} MB, outputs {row['output_mb']:6.1f} MB, "
                  f"{row['seconds']:6.1f} s", flush=True)
    first, last = rows[0], rows[-1]
    frames = [list(r["frames"].values())[-1] for r in (first, last)]
    growth = (last["peak_rss_mb"] - first["peak_rss_mb"]) / max(1, frames[1] - frames[0])
    output = (last["output_mb"] - first["output_mb"]) / max(1, frames[1] - frames[0])
    print(f"peak RSS grows {growth:.3f} MB per final frame; the outputs themselves {output:.3f} MB per final frame")
    write_results(args.out, dict(recipe=str(args.recipe.relative_to(ROOT)), steps_per_stage=2, rows=rows,
                                 rss_mb_per_final_frame=growth, output_mb_per_final_frame=output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
