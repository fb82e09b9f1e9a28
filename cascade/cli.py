"""The `cascade` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cascade.errors import UserError, describe_os_error, one_line
from cascade.recipe import RecipeError, load_recipe


class HelpFormatter(argparse.HelpFormatter):
    """Help with every argument's default appended, "(default: X)", unless its text already names one or there is
    none worth showing (None, False, an empty list)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (default is argparse.SUPPRESS or default is None or default is False or default == []
                or "default" in text or isinstance(action, argparse._VersionAction)):
            return text
        shown = default.as_posix() if isinstance(default, Path) else default
        return f"{text} (default: {shown})".strip()


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose subcommands' parsers share its help formatter."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def version_text() -> str:
    """`cascade --version`: this package's version and torch's (read from the installed metadata: no import)."""
    from importlib.metadata import PackageNotFoundError, version

    from cascade import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"cascade {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def resolved_yaml(recipe, source, overrides) -> str:
    """The recipe after extends and overrides as YAML that `cascade validate` reads back (every field spelled out,
    no extends)."""
    import yaml

    resolved = recipe.model_dump(mode="json")
    parent = resolved.pop("extends")  # merged in already: the printed recipe stands alone
    head = (f"# {recipe.name}: resolved from {source}" + (f" (extends {parent})" if parent else "")
            + (f" with {' '.join(overrides)}" if overrides else ""))
    return one_line(head) + "\n" + yaml.safe_dump(resolved, sort_keys=False)


def cmd_validate(args) -> int:
    from cascade.recipe.summary import format_stages, stage_rows

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print:
        sys.stdout.write(resolved_yaml(recipe, args.recipe, args.overrides))
    elif args.json:
        print(json.dumps(dict(recipe=str(args.recipe), name=recipe.name, stages=stage_rows(recipe)), indent=2))
    else:
        print(format_stages(recipe, args.recipe))
    return 0


def cmd_plan(args) -> int:
    from cascade.plan import plan_command

    return plan_command(args)


RECIPE_HELP = "a recipe file, or a built-in recipe's name (`cascade recipes` lists them)"
OVERRIDES_HELP = "dotted overrides, e.g. stages.base.train.max_steps=100 (also accepted after the options)"


def add_plan_arguments(p) -> None:
    """The GPU the plan is made for (`cascade plan`, `cascade slurm submit`)."""
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: each stage's launch.gpus_per_node); "
                   "the world size is launch.nodes times this")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory per GPU (default 80)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the step time (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (default 989: H100)")


def cmd_schema(args) -> int:
    from cascade.recipe.schema import Recipe

    text = json.dumps(Recipe.model_json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_sample(args) -> int:
    from cascade.demo import sample_command

    return sample_command(args)


def cmd_demo(args) -> int:
    from cascade.demo import demo_command

    return demo_command(args)


def _stage_of(args):
    """The recipe with its overrides, and the stage named by --stage (a RecipeError names the stages there are)."""
    overrides = list(args.overrides)
    device = getattr(args, "train_device", None)
    if device is not None:  # --device of train and distill: the stage's launch.accelerator
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("error: --device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)",
                      file=sys.stderr)
                raise SystemExit(2)
        overrides.append(f"stages.{args.stage}.launch.accelerator={dict(cuda='gpu').get(device, device)}")
    recipe = load_recipe(args.recipe, overrides)
    try:
        return recipe, recipe.stage(args.stage)
    except KeyError as error:
        raise RecipeError(str(args.recipe), [("stages", str(error).strip("'\""))]) from None


def cmd_train(args) -> int:
    recipe, _ = _stage_of(args)
    from cascade.data.loader import DataBudgetExceeded
    from cascade.lit.module import NonFiniteLossError
    from cascade.lit.train import train

    try:
        folder = train(recipe, args.stage)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DataBudgetExceeded) as error:  # the run stops loudly, with its last checkpoint kept
        print(f"error: stage {args.stage} stopped: {error}", file=sys.stderr)
        return 1
    print(f"run folder: {folder}")
    return 0


def cmd_distill(args) -> int:
    recipe, _ = _stage_of(args)
    from cascade.lit.rounds import distill

    try:
        path = distill(recipe, args.stage, args.teacher)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, RecipeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"distilled student: {path}")
    return 0


def cmd_export(args) -> int:
    if args.out.suffix != ".safetensors":  # before any work: export writes safetensors only
        raise UserError(f"--out {args.out}: export writes safetensors weights; name the file "
                        f"{args.out.with_suffix('.safetensors').name} (a .safetensors suffix)")
    from cascade.lit.train import export

    try:
        path = export(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def add_device_arguments(p, dtype: bool = True, dtype_default: str | None = "float32") -> None:
    p.add_argument("--device", help="where the networks run, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    if dtype:
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=dtype_default,
                       help="the networks' precision (autocast; the sampler's state stays float32) (default: "
                       + (dtype_default or "the recipe's eval.dtype") + ")")


def add_tool_arguments(p) -> None:
    """What `cascade edit` and `cascade upscale` share with `cascade sample`: --out, the weights, the seed and the
    device."""
    p.add_argument("--out", type=Path, required=True, help="output video: .mp4 or .gif (also OUT_stages/ and "
                   "OUT.json, the report)")
    p.add_argument("--checkpoints", type=Path, help="folder of per-stage weights (STAGE.safetensors); without it "
                   "the networks are randomly initialised")
    p.add_argument("--seed", type=int, default=0, help="seed of the random streams")
    add_device_arguments(p)


def add_train_device_argument(p) -> None:
    p.add_argument("--device", dest="train_device", choices=["auto", "cpu", "cuda"],
                   help="where the stage trains: sets its launch.accelerator (default: the recipe's, auto = CUDA "
                        "when present); launch.gpus_per_node x nodes devices, sharded with launch.strategy fsdp")


def _lazy(module: str, function: str):
    """Run `module.function(args)`, importing the module only when the command runs (fast --help)."""
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)
    return run


def add_data_parsers(sub) -> None:
    data = sub.add_parser("data", help="build datasets, the tiny T5 and the T5 embedding cache").add_subparsers(
        dest="data_command", required=True)

    p = data.add_parser("synth", help="write shards of the built-in synthetic dataset")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (shards and manifest.json)")
    p.add_argument("--count", type=int, required=True, help="videos to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes (the same seed writes the same videos)")
    p.add_argument("--images", type=int, default=0, help="still images to write as well (joint training)")
    p.add_argument("--split", choices=["train", "heldout"], default="train",
                   help="train excludes the held-out caption combinations; heldout has only those")
    p.add_argument("--width", type=int, default=64, help="frame width in pixels")
    p.add_argument("--height", type=int, default=64, help="frame height in pixels")
    p.add_argument("--fps", type=float, default=16.0, help="frames per second")
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each video")
    p.add_argument("--samples-per-shard", type=int, default=256, help="samples in each tar shard")
    p.set_defaults(func=_lazy("cascade.data.synthetic", "synth_command"))

    p = data.add_parser("videos", help="shards from a folder of videos and a captions CSV/JSONL (WebVid layout)")
    p.add_argument("--videos", type=Path, required=True, help="folder of video files")
    p.add_argument("--captions", type=Path, required=True, help="CSV or JSONL: id (or videoid), caption (or name), "
                   "optional path (relative to --videos)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (shards and manifest.json)")
    p.add_argument("--max-size", type=int, default=512, help="longest side after re-encoding")
    p.add_argument("--samples-per-shard", type=int, default=256, help="samples in each tar shard")
    p.add_argument("--workers", type=int, default=4, help="conversion processes")
    p.set_defaults(func=_lazy("cascade.data.build", "videos_command"))

    p = data.add_parser("images", help="shards from a folder of images and a captions CSV/JSONL")
    p.add_argument("--images", type=Path, required=True, help="folder of image files")
    p.add_argument("--captions", type=Path, required=True, help="CSV or JSONL: id, caption, optional path "
                   "(relative to --images)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (shards and manifest.json)")
    p.add_argument("--max-size", type=int, default=512, help="longest side after re-encoding")
    p.add_argument("--samples-per-shard", type=int, default=1024, help="samples in each tar shard")
    p.add_argument("--workers", type=int, default=4, help="conversion processes")
    p.set_defaults(func=_lazy("cascade.data.build", "images_command"))

    p = data.add_parser("tiny-t5", help="a tiny randomly initialised T5 whose sentencepiece tokenizer is trained on "
                        "a dataset's captions, or is an existing tokenizer (--tokenizer)")
    p.add_argument("--shards", type=Path, help="dataset folder whose captions train the tokenizer (with --tokenizer: "
                   "whose captions are checked for characters the tokenizer does not know)")
    p.add_argument("--tokenizer", type=Path, help="use this tokenizer instead of training one: a sentencepiece "
                   ".model file, or a folder T5TokenizerFast or T5Tokenizer loads")
    p.add_argument("--out", type=Path, required=True, help="folder to write the encoder to (config.json, "
                   "model.safetensors, the tokenizer's files)")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="encoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads (must divide --dim)")
    p.add_argument("--vocab-size", type=int, help="pieces of the tokenizer trained on --shards (default: 256; not "
                   "with --tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer training and the random weights")
    p.set_defaults(func=_lazy("cascade.data.embed", "tiny_t5_command"))

    p = data.add_parser("embed", help="encode every caption of a dataset once into the T5 embedding cache; warns "
                        "about damaged shards, captions cut to --max-tokens and characters the tokenizer lacks")
    p.add_argument("--shards", type=Path, required=True, help="dataset folder (with manifest.json)")
    p.add_argument("--encoder", required=True, help="T5 folder or hub id")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per caption, end of sequence included "
                   "(must equal the recipe's text_encoder.max_tokens)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the encoder runs in (the cache stores float16)")
    p.add_argument("--out", type=Path, help="cache folder (default: SHARDS/embeddings)")
    p.add_argument("--part", type=int, default=0, help="this job's slice of the shards (array jobs)")
    p.add_argument("--parts", type=int, default=1, help="number of slices")
    p.add_argument("--batch-size", type=int, default=64, help="captions encoded together")
    p.set_defaults(func=_lazy("cascade.data.embed", "embed_command"))


def add_slurm_parsers(sub) -> None:
    slurm = sub.add_parser("slurm", help="the recipe's job graph as SLURM jobs: submit, status").add_subparsers(
        dest="slurm_command", required=True)

    p = slurm.add_parser("submit", help="render the sbatch scripts into RUN/slurm and submit the incomplete nodes "
                         "with afterok dependencies (rerun to continue: complete or queued nodes are skipped)")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, carried into every job, e.g. "
                   "stages.base.launch.nodes=2 cluster.partition=gpu")
    p.add_argument("--stages", help="comma-separated stages to train and distill (default: all, then eval + report)")
    p.add_argument("--embed-parts", type=int, default=1, help="slices of the embedding cache (an array job)")
    p.add_argument("--dry-run", action="store_true", help="print the scripts and the graph, submit nothing (no "
                   "memory plan: `cascade plan` prints it)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory per GPU that every stage "
                   "to train must fit, by `cascade plan` (default 80)")
    p.add_argument("--force", action="store_true", help="submit stages that do not fit --gpu-memory anyway")
    p.set_defaults(func=_lazy("cascade.launch.slurm", "submit_command"))

    p = slurm.add_parser("status", help="each node of a submitted graph: job id, state, outputs, starts")
    p.add_argument("run", type=Path, help="the run folder (runs/NAME unless the recipe sets run_dir)")
    p.add_argument("--json", action="store_true", help="print the nodes as JSON")
    p.set_defaults(func=_lazy("cascade.launch.slurm", "status_command"))


def add_recipes_parsers(sub) -> None:
    p = sub.add_parser("recipes", help="list the built-in recipes (name, stages, description); `cascade recipes cp "
                       "NAME FILE` copies one to edit", description="Without a subcommand: one line per built-in "
                       "recipe. A built-in recipe's name (tiny, or recipes/tiny.yaml where that file does not "
                       "exist) works wherever a recipe file does.")
    p.set_defaults(func=_lazy("cascade.recipe.commands", "list_command"))
    actions = p.add_subparsers(dest="recipes_command")

    p = actions.add_parser("cp", help="copy a built-in recipe to FILE to edit it")
    p.add_argument("name", help="a built-in recipe, e.g. tiny (`cascade recipes` lists them)")
    p.add_argument("file", type=Path, help="the copy (a folder: FOLDER/NAME.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=_lazy("cascade.recipe.commands", "cp_command"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cascade", description="Train, distill, sample and evaluate cascaded text-to-video "
                    "diffusion models from one recipe file.")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print cascade's version and torch's, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a recipe and print its stages with parameter counts")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.base.train.lr=3e-4")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the stages as JSON")
    output.add_argument("--print", action="store_true", help="print the fully resolved recipe (after extends and "
                        "overrides) as YAML, which `cascade validate` accepts back")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="per-stage GPU memory per rank, FLOPs, step time and GPU-hours of training, "
                       "from one fake-tensor training step (nothing is allocated); exits 1 if a stage does not fit")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.base.train.batch_size=1")
    add_plan_arguments(p)
    p.add_argument("--stages", help="comma-separated stages to plan (default: all)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("schema", help="print (or write) the recipe JSON schema for editors")
    p.add_argument("--out", type=Path, help="write the schema to this file (default: print it)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("sample", help="sample videos through every stage of the cascade")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.base.sampler.steps=32")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a caption (repeatable)")
    prompts.add_argument("--prompts", type=Path, help="a text file, one caption per line")
    p.add_argument("--out", type=Path, required=True, help="output video: .mp4 or .gif")
    p.add_argument("--checkpoints", type=Path, help="folder of per-stage weights (STAGE.safetensors); "
                   "without it the networks are randomly initialised")
    p.add_argument("--up-to", metavar="STAGE", help="stop after this stage (default: the last)")
    p.add_argument("--seed", type=int, default=0, help="seed of every video's random streams (video i: seed, i)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts sampled together (a video does not depend on "
                   "its batch: each has its own random stream, from --seed and its index)")
    p.add_argument("--image", type=Path, help="image-to-video: every video starts with this image (resized to cover "
                   "each stage's size and centre-cropped), one video per prompt")
    p.add_argument("--story", action="store_true", help="the prompts (--prompt repeated or --prompts) are the "
                   "segments of ONE long video, each base segment continuing the last --context-frames frames")
    p.add_argument("--context-frames", type=int, default=1, help="with --story: frames of the video so far that "
                   "each next base segment starts from")
    p.add_argument("--reconstruction-weight", type=float, help="with --image or --story: the reconstruction "
                   "guidance weight of stages without known-frame input (default: the recipe's, 4)")
    add_device_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="text-guided editing of a video (SDEdit through the cascade)")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("video", type=Path, help="the video to edit (any size and fps; at least the base's clip long)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.base.sampler.steps=32")
    add_tool_arguments(p)
    p.add_argument("--prompt", required=True, help="what the edited video shows")
    p.add_argument("--source-prompt", metavar="Q", help="what the input video shows: the video is brought to the "
                   "--strength noise level by DDIM inversion under Q (keeps its layout and motion better than random "
                   "noise; '' inverts unconditionally); without it, SDEdit's random noise")
    p.add_argument("--no-region", dest="region", action="store_false", help="with --source-prompt: let the edit "
                   "change the whole video (default: only where the new prompt changes the prediction, DiffEdit's "
                   "mask)")
    p.add_argument("--strength", type=float, default=0.5, help="how far from the video: 0 keeps it, 1 ignores it")
    p.add_argument("--structure", choices=("input", "edit"), default="input", help="whose edges and positions the "
                   "result has: input (default) carries every stage's edit onto the input's structure as local "
                   "colour maps (guided filter), exact positions, for appearance edits (color, light, texture); edit "
                   "keeps what the sampler drew, for edits that change shape")
    p.add_argument("--up-to", metavar="STAGE", help="stop after this stage (default: the last)")
    p.set_defaults(func=_lazy("cascade.tools", "edit_command"))

    p = sub.add_parser("upscale", help="bring your own video through the super-resolution stages, from --from on")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("video", type=Path, help="the video to upscale (any length; fitted to --from's input size and fps)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.ssr1.sampler.steps=8")
    add_tool_arguments(p)
    p.add_argument("--from", dest="from_stage", required=True, metavar="STAGE", help="the first super-resolution "
                   "stage to run (the video stands in for the output of the stage before it)")
    p.add_argument("--to", dest="to_stage", metavar="STAGE", help="the last stage to run (default: the last)")
    p.add_argument("--prompt", default="", help="a caption of the video (default: none)")
    p.add_argument("--overlap", type=int, help="frames shared by neighbouring windows of a video longer than a "
                   "stage's clip (default: half a clip)")
    p.add_argument("--consistency", type=float, default=1.0, help="share of the residual between each step's "
                   "prediction, seen at the stage's input size and fps, and that input that is corrected (default 1: "
                   "the video's own frames and colours are kept; 0: off)")
    p.add_argument("--strength", type=float, default=None, help="noise level the sampler starts from, as in edit: "
                   "below 1 each stage refines the classical interpolation (linear in time, bicubic in space) of its "
                   "input; 1 samples from pure noise (default 0.02, the best measured on the tiny cascade)")
    p.set_defaults(func=_lazy("cascade.tools", "upscale_command"), up_to=None)

    add_data_parsers(sub)

    p = sub.add_parser("train", help="train one stage (rerun the same command to resume)")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.base.train.max_steps=100")
    p.add_argument("--stage", required=True, help="the stage to train (a name from the recipe's stages)")
    add_train_device_argument(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="guidance and progressive distillation of one trained stage (rerun to resume)")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--stage", required=True, help="the stage to distill (a name from the recipe's stages)")
    p.add_argument("--teacher", type=Path, help="teacher weights (.safetensors or a training checkpoint); default: "
                   "the stage's last training checkpoint (EMA weights)")
    add_train_device_argument(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="EMA weights of a training checkpoint as safetensors (for cascade sample)")
    p.add_argument("checkpoint", type=Path, help="a training checkpoint: RUN/STAGE/checkpoints/last.ckpt or "
                   "step-*.ckpt (a folder for a sharded run)")
    p.add_argument("--out", type=Path, required=True, help="the weights file to write, STAGE.safetensors (the "
                   "suffix must be .safetensors)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="the recipe's whole job graph here: data, embeddings, training and distillation "
                       "of every stage, evaluation, report (rerun to continue; complete steps are skipped); a status "
                       "line shows the running nodes' steps, elapsed time and time left")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--stages", help="comma-separated stages to train and distill (default: all, then eval + report)")
    p.add_argument("--force", action="append", metavar="NODE", help="rerun this node even if complete (repeatable)")
    p.add_argument("--list", action="store_true", help="print the graph and what is complete, run nothing")
    p.add_argument("--jobs", type=int, default=1, help="independent nodes run at the same time, each its own "
                   "process with the CPU threads shared out (default 1: in this process)")
    p.set_defaults(func=_lazy("cascade.launch.graph", "run_command"))

    p = sub.add_parser("step", help="one node of the job graph, e.g. train/base (what a cluster job runs)")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("node", help="the node, e.g. data, embed, train/base, distill/base, eval/teachers, report "
                   "(`cascade run RECIPE --list` lists them)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--part", type=int, help="the slice of an array node (embed)")
    p.add_argument("--parts", type=int, default=1, help="slices of the embed node")
    p.add_argument("--force", action="store_true", help="run it even if its outputs exist")
    p.set_defaults(func=_lazy("cascade.launch.graph", "step_command"))

    add_slurm_parsers(sub)
    add_recipes_parsers(sub)

    p = sub.add_parser("eval", help="evaluate every stage (ground-truth and generated inputs), swept over steps, "
                       "guidance and augmentation: JSON, markdown table, plots")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--checkpoints", type=Path, required=True, help="folder of per-stage weights (STAGE.safetensors: "
                   "exported teachers or distilled students)")
    p.add_argument("--num-videos", type=int, help="videos per setting (default: eval.num_videos)")
    p.add_argument("--steps", help="comma-separated sampler steps, e.g. 8,16,64,256 (default: eval.steps)")
    p.add_argument("--guidance", help="comma-separated guidance weights (default: eval.guidance)")
    p.add_argument("--aug", help="comma-separated input noise-augmentation log-SNRs (default: eval.aug_logsnr)")
    p.add_argument("--metrics", help="comma-separated: fvd, clipsim, probes, quality (default: eval.metrics)")
    p.add_argument("--stages", help="comma-separated stages to evaluate (default: all)")
    p.add_argument("--modes", help="the super-resolution stages' inputs: gt (ground truth at the input stage's "
                   "size), cascade (the earlier stages' samples), or both (= gt,cascade); comma-separated "
                   "(default: eval.modes)")
    p.add_argument("--batch-size", type=int, help="videos sampled together (default: eval.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="seed of every video's random streams (video i: seed, i)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/NAME/eval/CHECKPOINTS-NAME)")
    add_device_arguments(p, dtype_default=None)
    p.set_defaults(func=_lazy("cascade.eval.runner", "eval_command"))

    p = sub.add_parser("eval-nfe", help="quality against network evaluations per video: the teacher and every "
                       "distilled student of the run, per stage (ground-truth input) and for the whole cascade, with "
                       "the best student cascade within a budget checked against the teachers: JSON, markdown, plot")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--num-videos", type=int, help="held-out videos per row (default: eval.num_videos)")
    p.add_argument("--budget", type=int, default=10, help="network evaluations per video the best student cascade "
                   "may spend (default 10)")
    p.add_argument("--teacher-steps", help="comma-separated extra step counts for the teacher (default: the "
                   "students' step counts)")
    p.add_argument("--stages", help="comma-separated stages to measure alone (default: all, then the cascade)")
    p.add_argument("--no-cascade", action="store_true", help="measure the stages alone only")
    p.add_argument("--batch-size", type=int, help="videos sampled together (default: eval.batch_size)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/NAME/eval/nfe)")
    add_device_arguments(p, dtype_default=None)
    p.set_defaults(func=_lazy("cascade.eval.nfe", "eval_nfe_command"))

    p = sub.add_parser("eval-tools", help="measure the video tools (image-to-video, stories, editing, upscaling) on "
                       "held-out synthetic videos against their targets: tools.json, tools.md, a plot, example gifs")
    p.add_argument("recipe", type=Path, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--checkpoints", type=Path, required=True, help="folder of per-stage weights (STAGE.safetensors)")
    p.add_argument("--out", type=Path, help="output folder (default: CHECKPOINTS/../tools)")
    p.add_argument("--videos", type=int, default=8, help="held-out videos per tool but the stories (default 8)")
    p.add_argument("--stories", type=int, default=28, help="3-segment stories (default 28: every held-out caption "
                   "combination with two direction sequences)")
    p.add_argument("--seed", type=int, default=0, help="seed of every video's random streams")
    add_device_arguments(p, dtype_default=None)
    p.set_defaults(func=_lazy("cascade.eval.tools", "eval_tools_command"))

    p = sub.add_parser("demo", help="the built-in demo: validate the shipped recipes, then sample a video "
                       "from a randomly initialised tiny cascade")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the sampled video")
    p.add_argument("--recipes", type=Path, default=None, help="folder of recipes to validate (default: the built-in "
                   "ones)")
    add_device_arguments(p, dtype=False)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (cascade train R --stage base stages.base.train.lr=1e-4).
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except OSError as error:
        message = describe_os_error(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
