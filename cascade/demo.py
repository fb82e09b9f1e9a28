"""`cascade sample` and the built-in `cascade demo`."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from cascade.recipe import Recipe, RecipeError, load_recipe

DEMO_PROMPTS = ["a red circle moving right on a black background", "a cyan square moving up on a gray background"]


def load_networks(recipe: Recipe, checkpoints: Path | None, stages: list[str]) -> dict:
    """Every stage's network and what its weights are: (net, info). Weights from CHECKPOINTS/STAGE.safetensors
    (`cascade export` of a trained stage, or a distilled student from `cascade distill`), or a random
    initialisation. info: {"distilled": bool, "guidance_distilled": bool, "steps": int | None}."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cascade.recipe.build import build_unet

    nets = {}
    for stage in recipe.stages:
        if stage.name not in stages:
            continue
        info = dict(distilled=False, guidance_distilled=False, steps=None)
        path = None
        if checkpoints is not None:
            path = checkpoints / f"{stage.name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no weights for stage {stage.name} (expected STAGE.safetensors "
                                        f"from `cascade export` or `cascade distill`)")
            with safe_open(str(path), "pt") as file:
                meta = file.metadata() or {}
            if meta.get("cascade.weights") == "distilled":
                info = dict(distilled=True, guidance_distilled=meta.get("cascade.guidance_distilled") == "true",
                            steps=int(meta["cascade.steps"]))
        torch.manual_seed(stage.train.seed)
        net = build_unet(stage, recipe, guidance_conditioning=info["guidance_distilled"]).eval()
        if path is not None:
            net.load_state_dict(load_file(path))  # safetensors: tensors only, nothing is unpickled
        nets[stage.name] = (net, info)
    return nets


def run_sampling(recipe: Recipe, prompts: list[str], out: Path, checkpoints: Path | None = None,
                 up_to: str | None = None, seed: int = 0, batch_size: int = 4) -> dict:
    """Encode the prompts, sample every stage, write the final video, each stage's output and a JSON report."""
    from cascade.data.video import to_uint8, write_video
    from cascade.nn.text import FrozenT5
    from cascade.recipe.build import build_stage_spec
    from cascade.sampling.cascade import CascadeSampler

    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"--out {out}: the final video is written as .mp4 or .gif")
    names = [s.name for s in recipe.stages]
    if up_to is not None and up_to not in names:
        raise ValueError(f"--up-to {up_to}: no such stage; stages are {', '.join(names)}")
    used = names[: names.index(up_to) + 1] if up_to else names
    te = recipe.text_encoder
    encoder = FrozenT5.from_pretrained(te.path, te.max_tokens, te.dtype)
    if encoder.dim != te.dim:
        raise RecipeError(str(te.path), [("text_encoder.dim", f"the recipe says {te.dim} but the encoder at "
                                          f"{te.path} has width {encoder.dim}")])
    nets = load_networks(recipe, checkpoints, used)
    specs = []
    for name in used:
        net, info = nets[name]
        spec = build_stage_spec(recipe.stage(name), net, guidance_distilled=info["guidance_distilled"])
        if info["distilled"]:  # a distilled student is only valid at the step count it was distilled to
            spec = replace(spec, steps=info["steps"])
        specs.append(spec)
    sampler = CascadeSampler(specs)
    generator = torch.Generator().manual_seed(seed)
    stage_dir = out.with_name(out.stem + "_stages")
    report = dict(recipe=recipe.name, prompts=prompts, seed=seed, checkpoints=str(checkpoints) if checkpoints else None,
                  weights={n: nets[n][1] for n in used},
                  settings={n: recipe.stage(n).model_dump(include={"sampler", "guidance", "augmentation"}) for n in used},
                  batches=[], outputs=[])
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        text, mask = encoder.encode(batch)
        start = time.perf_counter()
        result = sampler.sample(text, mask, generator=generator, progress=True)
        report["batches"].append(dict(prompts=batch, seconds=time.perf_counter() - start, stages=result.stats))
        for offset, prompt in enumerate(batch):
            index = first + offset
            final = out if len(prompts) == 1 else out.with_name(f"{out.stem}_{index:03d}{out.suffix}")
            last = recipe.stage(used[-1])
            write_video(final, to_uint8(result.final[offset]), last.fps)
            stages = {}
            for name, video in result.videos.items():
                path = stage_dir / f"{index:03d}_{name}.mp4"
                write_video(path, to_uint8(video[offset]), recipe.stage(name).fps)
                stages[name] = str(path)
            report["outputs"].append(dict(prompt=prompt, video=str(final), stages=stages))
    totals = {}
    for batch in report["batches"]:
        for s in batch["stages"]:
            totals.setdefault(s["stage"], dict(nfe_per_video=s["nfe_per_video"], seconds=0.0))["seconds"] += s["seconds"]
    report["per_stage"] = totals
    report["nfe_per_video"] = sum(t["nfe_per_video"] for t in totals.values())
    report["environment"] = dict(python=platform.python_version(), torch=torch.__version__,
                                 threads=torch.get_num_threads())
    report_path = out.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=2))
    return report


def sample_command(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.prompts is not None:
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"error: {args.prompts} holds no prompts")
    else:
        prompts = args.prompt
    try:
        report = run_sampling(recipe, prompts, args.out, args.checkpoints, args.up_to, args.seed, args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, RecipeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_summary(report, args.out)
    return 0


def _print_summary(report: dict, out: Path) -> None:
    print(f"{'stage':<8} {'NFE/video':>9} {'seconds':>8}")
    for name, s in report["per_stage"].items():
        print(f"{name:<8} {s['nfe_per_video']:>9} {s['seconds']:>8.1f}")
    print(f"total NFE per video: {report['nfe_per_video']}")
    for o in report["outputs"]:
        print(f"wrote {o['video']}  ({o['prompt']})")
    print(f"report: {out.with_suffix('.json')}")


def demo_command(args) -> int:
    """Validate the shipped recipes, then sample from a randomly initialised tiny cascade (the networks are
    untrained: the video shows that every stage runs and chains, not what a trained cascade makes)."""
    from cascade.cli import cmd_validate
    from cascade.nn.text import build_tiny_t5

    folder = args.recipes or Path(__file__).resolve().parent.parent / "recipes"
    recipes = sorted(folder.glob("*.yaml"))
    if not recipes:
        print(f"error: no recipes found in {folder}", file=sys.stderr)
        return 2
    for path in recipes:
        print(f"== cascade validate {path}")
        cmd_validate(type("Args", (), dict(recipe=path, overrides=[], json=False))())
    out = args.out
    t5 = out / "t5"
    if not (t5 / "config.json").is_file():
        build_tiny_t5(t5)
    overrides = [f"text_encoder.path={t5}"] + [f"stages.{s}.sampler.steps=4" for s in
                                                 ("base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3")]
    recipe = load_recipe(folder / "tiny.yaml", overrides)
    print(f"== sampling {len(DEMO_PROMPTS)} videos from a randomly initialised tiny cascade (4 steps per stage)")
    report = run_sampling(recipe, DEMO_PROMPTS, out / "sample.mp4", seed=0, batch_size=2)
    _print_summary(report, out / "sample.mp4")
    return 0
