"""Seconds per network evaluation of every stage, float32 against bfloat16 autocast (`eval.dtype`, `--dtype`), on
this machine's CPU (or --device), with trained weights (--weights) or a random initialisation whose zero-initialised
output layer is given random weights (the timings are about cost; the differences then mean little).

    python benchmarks/inference_dtype.py --weights runs/tiny/distilled   # recipes/tiny.yaml, 4 full clips each

For each stage: one evaluation of `--batch` clips of the stage's full shape, best of `--repeat`, for each thread
count, and the largest difference of the bfloat16 prediction from the float32 one (in [-1, 1] units). Writes
benchmarks/results/inference-dtype-cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from results_io import write_results

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, help="folder of STAGE.safetensors (default: random initialisation)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference-dtype-cpu.json")
    args = parser.parse_args()

    from cascade.diffusion import stage_inputs
    from cascade.inference import _Autocast, load_stage
    from cascade.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    rows = []
    for stage in recipe.stages:
        g = torch.Generator().manual_seed(0)
        b = args.batch
        x = torch.randn(b, 3, stage.frames, stage.height, stage.width, generator=g).to(args.device)
        batch = dict(text=torch.randn(b, 8, recipe.text_encoder.dim, generator=g).to(args.device),
                     text_mask=torch.ones(b, 8, dtype=torch.bool, device=args.device), fps=stage.fps)
        if stage.kind != "base":
            low = recipe.stage(stage.input)
            batch["cond"] = torch.rand(b, 3, low.frames, low.height, low.width, generator=g).to(args.device) * 2 - 1
        cond = stage_inputs(batch, None)
        loaded = load_stage(recipe, stage.name, args.weights, args.device)
        if loaded.info.guidance_input:  # a guidance-distilled student takes the weight as input
            cond["guidance"] = torch.full((b,), float(stage.guidance.weight), device=args.device)
        logsnr = torch.zeros(b, device=args.device)
        net = loaded.net
        if args.weights is None:  # the output layer starts at zero: give it weights so the output sees the input
            torch.nn.init.normal_(net.out.weight, std=0.1, generator=torch.Generator().manual_seed(1))
        nets = dict(float32=net, bfloat16=_Autocast(copy.deepcopy(net), torch.bfloat16))
        with torch.inference_mode():
            outputs = {dtype: net(x, logsnr, **cond).float() for dtype, net in nets.items()}
            row = dict(stage=stage.name, shape=[b, 3, stage.frames, stage.height, stage.width],
                       max_abs_difference=float((outputs["bfloat16"] - outputs["float32"]).abs().max()))
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                for dtype, net in nets.items():
                    times = []
                    for _ in range(args.repeat):
                        start = time.perf_counter()
                        net(x, logsnr, **cond)
                        times.append(time.perf_counter() - start)
                    row[f"{dtype}_s_{threads}t"] = min(times)
                row[f"speedup_{threads}t"] = row[f"float32_s_{threads}t"] / row[f"bfloat16_s_{threads}t"]
        rows.append(row)
        print(stage.name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "stage"},
              flush=True)
    write_results(args.out, dict(recipe=str(args.recipe), weights=str(args.weights) if args.weights else "random",
                                 device=args.device, batch=args.batch, stages=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
