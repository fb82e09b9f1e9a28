"""Command-line code of `cascade sample` and the built-in `cascade demo`; the sampling itself is
`cascade.inference`."""

from __future__ import annotations

import sys
from pathlib import Path

from cascade.errors import UserError
from cascade.recipe import RecipeError, load_recipe
from cascade.tools import print_report

DEMO_PROMPTS = ["a red circle moving right on a black background", "a cyan square moving up on a gray background"]


def sample_command(args) -> int:
    """`cascade sample`; under torchrun or srun every rank samples its share of --prompts and rank 0 writes. With
    --image or --story, `cascade.tools` makes the videos (in one process)."""
    from cascade import distributed
    from cascade.inference import Cascade, check_device, check_video_path, write_samples

    check_device(args.device)  # before any work
    recipe = load_recipe(args.recipe, args.overrides)
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise UserError(f"--prompts {args.prompts}: no such file (one prompt a line)")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            print(f"error: {args.prompts} holds no prompts", file=sys.stderr)
            return 2
    else:
        prompts = args.prompt
    if args.image is not None or args.story:  # image-to-video, or one long video from the prompts
        from cascade.tools import sample_tool_command

        return sample_tool_command(args, prompts)
    try:
        check_video_path(args.out)  # before any work
        names = [s.name for s in recipe.stages]
        if args.up_to is not None and args.up_to not in names:
            raise ValueError(f"--up-to {args.up_to}: no such stage; stages are {', '.join(names)}")
        used = names[: names.index(args.up_to) + 1] if args.up_to else names
        ranks = distributed.init(args.device)
        cascade = Cascade.from_recipe(recipe, args.checkpoints, stages=used, device=ranks.device, dtype=args.dtype)
        report = write_samples(cascade, prompts, args.out, seed=args.seed, batch_size=args.batch_size, ranks=ranks,
                               release_text_encoder=True)
        distributed.destroy()  # every rank together, after the final barrier (not at interpreter exit)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, RecipeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report is not None:  # rank 0
        print_report(report, args.out)
    return 0


def demo_command(args) -> int:
    """Validate the shipped recipes, then sample from a randomly initialised tiny cascade (the networks are
    untrained: the video shows that every stage runs and chains, not what a trained cascade makes)."""
    from cascade.data.synthetic import all_captions
    from cascade.inference import Cascade, check_device, write_samples
    from cascade.nn.text import build_tiny_t5
    from cascade.recipe.builtin import builtin_recipes
    from cascade.recipe.summary import format_stages

    check_device(args.device)  # before any work
    if args.recipes is not None:
        recipes = sorted(args.recipes.glob("*.yaml"))
    else:
        recipes = sorted(builtin_recipes().values())
    if not recipes:
        print(f"error: no recipes found in {args.recipes}", file=sys.stderr)
        return 2
    for path in recipes:
        print(f"== cascade validate {path}")
        print(format_stages(load_recipe(path), path))
    out = args.out
    t5 = out / "t5"
    if not (t5 / "config.json").is_file():
        build_tiny_t5(t5, all_captions())
    tiny = builtin_recipes()["tiny"]
    stages = [s.name for s in load_recipe(tiny).stages]
    recipe = load_recipe(tiny, [f"text_encoder.path={t5}"] + [f"stages.{s}.sampler.steps=4" for s in stages])
    print(f"== sampling {len(DEMO_PROMPTS)} videos from a randomly initialised tiny cascade (4 steps per stage)")
    cascade = Cascade.from_recipe(recipe, device=args.device)
    report = write_samples(cascade, DEMO_PROMPTS, out / "sample.mp4", seed=0, batch_size=2, release_text_encoder=True)
    print_report(report, out / "sample.mp4")
    return 0
