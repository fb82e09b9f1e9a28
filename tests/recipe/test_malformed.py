"""Malformed recipes: each fails `cascade validate` with exit 2 and one line naming the file, the field path and
the problem, never a traceback.

Every case starts from `recipes/tiny.yaml` and applies one small mutation: a function of the loaded dict, a
function of the raw text (syntax-level cases), command-line overrides, or a setup that writes several files
(`extends:`).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from cascade.cli import main
from cascade.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
TINY_TEXT = TINY.read_text()
TINY_DATA = yaml.safe_load(TINY_TEXT)


S = {s["name"]: s for s in TINY_DATA["stages"]}  # tiny's stages: size-dependent expectations derive from them


def factor(name: str) -> int:
    """The U-Net downsampling factor of one of tiny's stages."""
    return 2 ** (len(S[name]["unet"]["channel_mults"]) - 1)


def width_at(name: str, level: int) -> int:
    return S[name]["unet"]["channels"] * S[name]["unet"]["channel_mults"][level]


def dump(data: dict) -> str:
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def line_of(text: str) -> int:
    """1-based line number of the first line of tiny.yaml that is exactly `text`."""
    return TINY_TEXT.splitlines().index(text) + 1


# --- kinds of mutation ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Text:
    """Mutate the raw text (or bytes) of tiny.yaml."""
    edit: Callable[[str], str | bytes]


@dataclass(frozen=True)
class Override:
    """Command-line overrides on an unmodified tiny.yaml."""
    args: tuple[str, ...]


@dataclass(frozen=True)
class Files:
    """Write `files` ({name: text}) into the folder and validate `main`; `source` is the file the message names."""
    files: dict[str, str]
    main: str = "recipe.yaml"
    source: str | None = None


# --- helpers for dict mutations ------------------------------------------------------------------------------

def stage(data: dict, name: str) -> dict:
    return next(s for s in data["stages"] if s["name"] == name)


def _parent(data: dict, path: tuple) -> dict:
    """The mapping holding path[-1]; a path starting with a stage name ("base", "ssr1") goes through stages."""
    names = {s["name"] for s in data["stages"]}
    node, rest = (stage(data, path[0]), path[1:]) if path[0] in names else (data, path)
    for key in rest[:-1]:
        node = node[key]
    return node


def setin(*path, value):
    def mutate(data):
        _parent(data, path)[path[-1]] = value
    return mutate


def rename(*path, to):
    """A typo: the key at the end of `path` is renamed, its value kept."""
    def mutate(data):
        node = _parent(data, path)
        node[to] = node.pop(path[-1])
    return mutate


def delete(*path):
    def mutate(data):
        del _parent(data, path)[path[-1]]
    return mutate


def each(*mutations):
    def mutate(data):
        for m in mutations:
            m(data)
    return mutate


def top(key, value):
    return setin(key, value=value)


def levels(name, mults, **extra):
    """Give a stage's U-Net len(mults) levels, every per-level list sized to match."""
    def mutate(data):
        unet = stage(data, name)["unet"]
        n = len(mults)
        unet.update(channel_mults=list(mults), num_res_blocks=[1] * n, spatial_attention=[False] * n,
                    cross_attention=[False] * (n - 1) + [True], temporal=[unet["temporal"][0]] * n)
        stage(data, name).update(extra)
    return mutate


def drop_first_stage(data):
    del data["stages"][0]


def bad_indent(text: str) -> str:
    lines = text.splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith("    kind: base"))
    lines[index] = "   kind: base\n"  # one space short of its siblings
    return "".join(lines)


def duplicate_line(line: str):
    def edit(text: str) -> str:
        assert line in text
        return text.replace(line, line + line, 1)
    return edit


# --- the table: (id, mutation, field path substring, problem substring) -------------------------------------
# An empty path means the problem concerns the whole file (syntax, unreadable file, override syntax).

CASES = [
    # typos at every level, each with a did-you-mean hint
    ("typo-top-level", rename("eval", to="evl"), "evl", "unknown key 'evl'; did you mean 'eval'?"),
    ("typo-text-encoder", rename("text_encoder", "max_tokens", to="max_token"), "text_encoder.max_token",
     "did you mean 'max_tokens'?"),
    ("typo-stage", rename("base", "frames", to="frmes"), "stages.base.frmes", "did you mean 'frames'?"),
    ("typo-unet", rename("ssr1", "unet", "channels", to="chanels"), "stages.ssr1.unet.chanels",
     "did you mean 'channels'?"),
    ("typo-diffusion", rename("base", "diffusion", "parameterization", to="parametrization"),
     "stages.base.diffusion.parametrization", "did you mean 'parameterization'?"),
    ("typo-schedule", rename("tsr1", "diffusion", "schedule", "logsnr_max", to="logsnrmax"),
     "stages.tsr1.diffusion.schedule.logsnrmax", "did you mean 'logsnr_max'?"),
    ("typo-augmentation", rename("ssr2", "augmentation", "sample_logsnr", to="sample_lognsr"),
     "stages.ssr2.augmentation.sample_lognsr", "did you mean 'sample_logsnr'?"),
    ("typo-guidance", rename("base", "guidance", "text_drop_prob", to="text_dropprob"),
     "stages.base.guidance.text_dropprob", "did you mean 'text_drop_prob'?"),
    ("typo-oscillate", setin("base", "guidance", "oscillate", value={"high": 15.0, "lo": 1.0}),
     "stages.base.guidance.oscillate.lo", "did you mean 'low'?"),
    ("typo-sampler", rename("tsr2", "sampler", "steps", to="step"), "stages.tsr2.sampler.step",
     "did you mean 'steps'?"),
    ("typo-train", rename("base", "train", "batch_size", to="batchsize"), "stages.base.train.batchsize",
     "did you mean 'batch_size'?"),
    ("typo-optimizer", rename("base", "train", "optimizer", "weight_decay", to="weight_decy"),
     "stages.base.train.optimizer.weight_decy", "did you mean 'weight_decay'?"),
    ("typo-lr-schedule", rename("ssr3", "train", "lr_schedule", "warmup_steps", to="warmup_step"),
     "stages.ssr3.train.lr_schedule.warmup_step", "did you mean 'warmup_steps'?"),
    ("typo-crop", setin("ssr3", "train", "crop", value={"width": 32, "heigth": 32}), "stages.ssr3.train.crop.heigth",
     "did you mean 'height'?"),
    ("typo-distill", rename("base", "distill", "guidance", to="guidence"), "stages.base.distill.guidence",
     "did you mean 'guidance'?"),
    ("typo-distill-guidance", rename("base", "distill", "guidance", "w_max", to="wmax"),
     "stages.base.distill.guidance.wmax", "did you mean 'w_max'?"),
    ("typo-progressive", rename("tsr3", "distill", "progressive", "end_steps", to="end_step"),
     "stages.tsr3.distill.progressive.end_step", "did you mean 'end_steps'?"),
    ("typo-launch", rename("base", "launch", "gpus_per_node", to="gpus_per_nodes"),
     "stages.base.launch.gpus_per_nodes", "did you mean 'gpus_per_node'?"),
    ("typo-data", rename("data", "num_workers", to="num_worker"), "data.num_worker",
     "did you mean 'num_workers'?"),
    ("typo-eval", rename("eval", "metrics", to="metric"), "eval.metric", "did you mean 'metrics'?"),
    ("typo-cluster", rename("cluster", "account", to="acount"), "cluster.acount", "did you mean 'account'?"),
    ("unknown-key-lists-allowed", top("frobnicate", 1), "frobnicate", "allowed: name, extends, run_dir"),

    # wrong types (nothing is coerced)
    ("string-for-int", setin("base", "frames", value="four"), "stages.base.frames", "valid integer (got 'four')"),
    ("quoted-int", setin("ssr1", "unet", "channels", value="16"), "stages.ssr1.unet.channels",
     "valid integer (got '16')"),
    ("float-for-int", setin("base", "train", "batch_size", value=4.0), "stages.base.train.batch_size",
     "valid integer"),
    ("bool-for-int", setin("base", "frames", value=True), "stages.base.frames", "valid integer"),
    ("int-for-bool", setin("base", "unet", "checkpointing", value=1), "stages.base.unet.checkpointing",
     "valid boolean (got 1)"),
    ("int-for-bool-in-list", setin("base", "unet", "spatial_attention", value=[0, 1]),
     "stages.base.unet.spatial_attention[0]", "valid boolean"),
    ("quoted-float", setin("base", "fps", value="2"), "stages.base.fps", "valid number"),
    ("list-for-scalar", setin("base", "train", "lr", value=[1e-4]), "stages.base.train.lr", "valid number"),
    ("scalar-for-list", setin("base", "unet", "channel_mults", value=2), "stages.base.unet.channel_mults",
     "valid list"),
    ("string-for-list", setin("eval", "steps", value="4,16"), "eval.steps", "valid list"),
    ("scalar-for-section", setin("base", "diffusion", value="v"), "stages.base.diffusion", "valid dictionary"),
    ("null-for-required", setin("base", "train", "batch_size", value=None), "stages.base.train.batch_size",
     "valid integer (got None)"),
    ("null-for-required-section", setin("tsr1", "unet", value=None), "stages.tsr1.unet", "valid dictionary"),
    ("int-for-name", top("name", 7), "name", "valid string (got 7)"),
    ("stages-as-mapping", top("stages", {"base": {"kind": "base"}}), "stages", "valid list"),
    ("nan-float", setin("base", "diffusion", "schedule", "logsnr_min", value=float("nan")),
     "stages.base.diffusion.schedule.logsnr_min", "finite number"),
    # YAML 1.1 would read an unquoted 48:00 as the base-60 int 2880 ("got 2880"); the loader keeps the string.
    ("launch-time-unquoted", Text(lambda t: t.replace('time: "00:30:00"', "time: 48:00", 1)),
     "stages.base.launch", "time '48:00' is not [D-]HH:MM:SS"),

    # out-of-range values
    ("negative-lr", setin("base", "train", "lr", value=-1e-4), "stages.base.train.lr", "greater than 0"),
    ("ema-decay-one", setin("base", "train", "ema_decay", value=1.0), "stages.base.train.ema_decay", "less than 1"),
    ("text-drop-prob", setin("base", "guidance", "text_drop_prob", value=1.5), "stages.base.guidance.text_drop_prob",
     "less than or equal to 1"),
    ("dynamic-threshold-fraction", setin("base", "guidance", "dynamic_threshold", value=0.995),
     "stages.base.guidance.dynamic_threshold", "greater than 50"),
    ("gamma-two", setin("tsr1", "sampler", "gamma", value=2), "stages.tsr1.sampler.gamma", "less than or equal to 1"),
    ("dropout-one", setin("ssr1", "unet", "dropout", value=1), "stages.ssr1.unet.dropout", "less than 1"),
    ("zero-batch", setin("base", "train", "batch_size", value=0), "stages.base.train.batch_size", "greater than 0"),
    ("negative-fps", setin("base", "fps", value=-2), "stages.base.fps", "greater than 0"),
    ("beta-one", setin("base", "train", "optimizer", "betas", value=[0.9, 1.0]),
     "stages.base.train.optimizer.betas[1]", "less than 1"),
    ("one-beta", setin("base", "train", "optimizer", "betas", value=[0.9]), "stages.base.train.optimizer.betas",
     "at least 2 items"),
    ("negative-guidance", setin("base", "guidance", "weight", value=-1.0), "stages.base.guidance.weight",
     "greater than or equal to 0"),
    ("negative-workers", setin("data", "num_workers", value=-1), "data.num_workers", "greater than or equal to 0"),
    ("zero-eval-steps", setin("eval", "steps", value=[0, 16]), "eval.steps[0]", "greater than 0"),
    ("guidance-distill-range", setin("base", "distill", "guidance", "w_min", value=5.0),
     "stages.base.distill.guidance", "w_min (5.0) must not exceed w_max (4.0)"),

    # invalid literals
    ("parameterization-epsilon", setin("base", "diffusion", "parameterization", value="epsilon"),
     "stages.base.diffusion.parameterization", "got 'epsilon'"),
    ("temporal-attn", setin("base", "unet", "temporal", value=["attn", "attention"]), "stages.base.unet.temporal[0]",
     "'attention', 'conv' or 'none' (got 'attn')"),
    ("sampler-dpm", setin("base", "sampler", "kind", value="dpm"), "stages.base.sampler.kind", "got 'dpm'"),
    ("precision-bf16", setin("base", "train", "precision", value="bf16"), "stages.base.train.precision",
     "got 'bf16'"),
    ("strategy-deepspeed", setin("base", "launch", "strategy", value="deepspeed"), "stages.base.launch.strategy",
     "'ddp' or 'fsdp' (got 'deepspeed')"),
    ("stage-kind-sr", setin("ssr1", "kind", value="sr"), "stages.ssr1.kind", "got 'sr'"),
    ("metric-fid", setin("eval", "metrics", value=["fid"]), "eval.metrics[0]", "got 'fid'"),

    # per-level lists, attention heads, schedules
    ("res-blocks-length", setin("base", "unet", "num_res_blocks", value=[1]), "stages.base.unet",
     "num_res_blocks has 1 entries but channel_mults has 2 levels"),
    ("temporal-length", setin("ssr2", "unet", "temporal", value=["conv", "conv", "conv"]), "stages.ssr2.unet",
     "temporal has 3 entries but channel_mults has 2 levels"),
    ("no-levels", setin("base", "unet", "channel_mults", value=[]), "stages.base.unet.channel_mults",
     "at least 1 item"),
    # base level 0 has temporal attention; ssr1 level 0 has none, so its first complaint is about level 1
    ("head-dim-level-0", setin("base", "unet", "head_dim", value=width_at("base", 0) + 8), "stages.base.unet",
     f"level 0 has {width_at('base', 0)} channels, not divisible by head_dim {width_at('base', 0) + 8}"),
    ("head-dim-level-1", setin("ssr1", "unet", "head_dim", value=width_at("ssr1", 1) - 4), "stages.ssr1.unet",
     f"level 1 has {width_at('ssr1', 1)} channels, not divisible by head_dim {width_at('ssr1', 1) - 4}"),
    ("schedule-equal", setin("base", "diffusion", "schedule", "logsnr_min", value=20.0),
     "stages.base.diffusion.schedule", "logsnr_min (20.0) must be below logsnr_max (20.0)"),
    ("schedule-reversed", setin("tsr1", "diffusion", "schedule", value={"logsnr_min": 5.0, "logsnr_max": -5.0}),
     "stages.tsr1.diffusion.schedule", "must be below logsnr_max"),
    ("aug-sample-outside", setin("ssr1", "augmentation", "sample_logsnr", value=25.0), "stages.ssr1.augmentation",
     f"sample_logsnr 25.0 is outside the training range [{S['ssr1']['augmentation']['logsnr_min']}, "
     f"{S['ssr1']['augmentation']['logsnr_max']}]"),
    ("aug-reversed", setin("ssr1", "augmentation", "logsnr_min", value=30.0), "stages.ssr1.augmentation",
     "logsnr_min (30.0) must be below logsnr_max (20.0)"),
    ("distill-not-power-of-two", each(setin("base", "distill", "progressive", "start_steps", value=24),
                                      setin("base", "distill", "progressive", "end_steps", value=4)),
     "stages.base.distill.progressive", "start_steps (24) must be end_steps (4) times a power of two"),
    ("distill-no-rounds", setin("base", "distill", "progressive", "end_steps", value=16),
     "stages.base.distill.progressive", "times a power of two greater than one"),
    ("window-on-base", setin("base", "train", "crop_frames", value=2), "stages.base.train.crop_frames",
     "frame windows need a super-resolution stage whose temporal layers are all conv or none"),
    ("window-misaligned", setin("tsr1", "train", "crop_frames", value=3), "stages.tsr1.train.crop_frames",
     "window 3 is not a multiple of the stage's frame ratio 2"),
    ("window-too-long", setin("ssr1", "train", "crop_frames", value=64), "stages.ssr1.train.crop_frames",
     "window 64 exceeds the stage's 8 frames"),
    ("launch-time-format", setin("base", "launch", "time", value="48h"), "stages.base.launch",
     "time '48h' is not [D-]HH:MM:SS"),

    # names
    ("stage-name-capitals", setin("ssr3", "name", value="SSR3"), "stages.SSR3.name", "should match pattern"),
    ("stage-name-space", setin("ssr3", "name", value="ssr 3"), "stages.ssr 3.name", "should match pattern"),
    ("recipe-name-space", top("name", "my run"), "name", "should match pattern"),
    ("duplicate-stage-name", setin("ssr3", "name", value="ssr1"), "stages.ssr1.name",
     "stage name 'ssr1' is used twice"),

    # the cascade must chain
    ("first-stage-not-base", drop_first_stage, "stages.tsr1.kind", "the first stage must be a base stage, not tsr"),
    ("second-base", setin("ssr3", "kind", value="base"), "stages.ssr3.kind", "only the first stage can be a base"),
    ("base-with-input", setin("base", "input", value="tsr1"), "stages.base.input", "a base stage has no input"),
    ("base-with-augmentation", setin("base", "augmentation", value={"sample_logsnr": 1.1}),
     "stages.base.augmentation", "no low-resolution input to augment"),
    ("base-residual", setin("base", "diffusion", "residual", value=True), "stages.base.diffusion.residual",
     "a base stage has no input to diffuse a residual over"),
    ("residual-eps", each(setin("ssr1", "diffusion", "residual", value=True),
                          setin("ssr1", "diffusion", "parameterization", value="eps")),
     "stages.ssr1.diffusion", "residual: true needs parameterization v"),
    ("sr-without-input", delete("ssr1", "input"), "stages.ssr1.input", "a ssr stage needs an input stage"),
    ("input-unknown", setin("ssr1", "input", value="tsr9"), "stages.ssr1.input",
     "input 'tsr9' is not a stage of this recipe"),
    ("input-later", setin("ssr1", "input", value="ssr2"), "stages.ssr1.input", "input 'ssr2' is not an earlier stage"),
    ("input-not-previous", setin("ssr2", "input", value="tsr1"), "stages.ssr2.input",
     "input 'tsr1' is not the previous stage 'ssr1'"),
    ("tsr-frames-not-multiple", each(setin("tsr1", "frames", value=S["base"]["frames"] * 3 // 2),
                                     setin("tsr1", "fps", value=S["base"]["fps"] * 3 / 2)),
     "stages.tsr1.frames", f"frames ({S['base']['frames'] * 3 // 2}) must be an integer multiple (>1) of its "
     f"input's ({S['base']['frames']})"),
    ("tsr-frames-unchanged", each(setin("tsr1", "frames", value=S["base"]["frames"]),
                                  setin("tsr1", "fps", value=S["base"]["fps"])),
     "stages.tsr1.frames", "integer multiple (>1)"),
    ("tsr-changes-size", setin("tsr1", "width", value=2 * S["base"]["width"]), "stages.tsr1.width",
     f"a tsr stage keeps its input's width ({S['base']['width']}), got {2 * S['base']['width']}"),
    ("ssr-changes-frames", each(setin("ssr1", "frames", value=2 * S["tsr1"]["frames"]),
                                setin("ssr1", "fps", value=2 * S["tsr1"]["fps"])),
     "stages.ssr1.frames", f"an ssr stage keeps its input's frames ({S['tsr1']['frames']}), "
     f"got {2 * S['tsr1']['frames']}"),
    ("ssr-not-growing", each(setin("ssr1", "width", value=S["tsr1"]["width"]),
                             setin("ssr1", "height", value=S["tsr1"]["height"])),
     "stages.ssr1.width", f"must grow its input's size {S['tsr1']['width']}x{S['tsr1']['height']}, "
     f"got {S['tsr1']['width']}x{S['tsr1']['height']}"),
    ("ssr-shrinks-one-axis", setin("ssr2", "height", value=S["ssr1"]["height"] // 2), "stages.ssr2.width",
     f"got {S['ssr2']['width']}x{S['ssr1']['height'] // 2}"),
    ("fps-inconsistent-tsr", setin("tsr1", "fps", value=S["tsr1"]["fps"] + 1), "stages.tsr1.fps",
     f"expected fps {S['tsr1']['fps']:g}"),
    ("fps-inconsistent-ssr", setin("ssr1", "fps", value=2 * S["ssr1"]["fps"]), "stages.ssr1.fps",
     f"expected fps {S['ssr1']['fps']:g}"),
    # 3 levels downsample 2x twice (factor 4), so a width of 20 would divide; 4 levels (factor 8) do not divide
    # 8k + 4, nor 3 levels 4k + 2.
    ("width-not-divisible-4-levels", levels("ssr3", [1, 2, 2, 2], width=S["ssr3"]["width"] + 4),
     "stages.ssr3.width",
     f"width {S['ssr3']['width'] + 4} is not divisible by the U-Net's downsampling factor 8 (4 levels)"),
    ("height-not-divisible-3-levels", levels("base", [1, 2, 2], height=S["base"]["height"] + 2),
     "stages.base.height",
     f"height {S['base']['height'] + 2} is not divisible by the U-Net's downsampling factor 4 (3 levels)"),
    ("crop-too-large", setin("ssr3", "train", "crop", value={"width": 2 * S["ssr3"]["width"],
                                                             "height": S["ssr3"]["height"]}),
     "stages.ssr3.train.crop.width", f"crop width {2 * S['ssr3']['width']} exceeds the stage's width "
     f"{S['ssr3']['width']}"),
    ("crop-not-divisible", setin("ssr3", "train", "crop", value={"width": factor("ssr3"),
                                                                 "height": factor("ssr3") + 1}),
     "stages.ssr3.train.crop.height", f"crop height {factor('ssr3') + 1} is not divisible by the U-Net's "
     f"downsampling factor {factor('ssr3')}"),

    # data and missing sections
    ("shards-without-path", setin("data", "kind", value="shards"), "data", "kind is 'shards' but no shards path"),
    ("stages-empty", top("stages", []), "stages", "at least 1 item"),
    ("stages-missing", delete("stages"), "stages", "required field is missing"),
    ("max-steps-missing", delete("base", "train", "max_steps"), "stages.base.train.max_steps",
     "required field is missing"),
    ("unet-missing", delete("tsr2", "unet"), "stages.tsr2.unet", "required field is missing"),
    ("name-missing", delete("name"), "name", "required field is missing"),
    ("stage-not-a-mapping", top("stages", ["base"]), "stages[0]", "valid dictionary"),

    # files and YAML syntax
    ("yaml-syntax", Text(bad_indent), "", f"line {line_of('    kind: base')}, column 4: invalid YAML"),
    ("yaml-tab", Text(lambda t: "name: tiny\nstages:\n\t- name: base\n"), "", "line 3"),
    ("yaml-unclosed-flow", Text(lambda t: t.replace("channel_mults: [1, 2]", "channel_mults: [1, 2", 1)), "",
     "invalid YAML"),
    ("yaml-duplicate-key", Text(duplicate_line("    frames: 4\n")), "",
     f"line {line_of('    frames: 4') + 1}, column 5: invalid YAML: duplicate key 'frames' "
     f"(first at line {line_of('    frames: 4')})"),
    ("yaml-duplicate-top-key", Text(lambda t: t + "name: again\n"), "", "duplicate key 'name'"),
    ("yaml-unhashable-key", Text(lambda t: "name: tiny\n? [a, b]\n: 1\n"), "", "found unhashable key"),
    ("yaml-python-tag", Text(lambda t: "name: !!python/object/apply:os.system [ls]\n"), "",
     "could not determine a constructor"),
    ("top-level-list", Text(lambda t: "- name: tiny\n- stages: []\n"), "",
     "a recipe is a mapping of sections, got list"),
    ("top-level-scalar", Text(lambda t: "tiny\n"), "", "a recipe is a mapping of sections, got str"),
    ("empty-file", Text(lambda t: ""), "", "a recipe is a mapping of sections"),
    ("yaml-control-character", Text(lambda t: t.replace("name: tiny", "name: ti\x07ny", 1)), "",
     "invalid YAML: unacceptable character #x0007"),
    ("not-utf8", Text(lambda t: t.encode("utf-16")), "", "not UTF-8 text"),
    ("nonexistent-file", Files({}, main="missing.yaml"), "", "cannot read the recipe"),
    ("directory", Files({"sub/tiny.yaml": TINY_TEXT}, main="sub"), "", "cannot read the recipe"),

    # extends
    ("extends-two-levels", Files({"grand.yaml": TINY_TEXT, "mid.yaml": "extends: grand.yaml\nname: mid\n",
                                  "recipe.yaml": "extends: mid.yaml\nname: child\n"}),
     "extends", "mid.yaml itself extends grand.yaml: at most one level"),
    ("extends-missing", Files({"recipe.yaml": "extends: nowhere.yaml\nname: child\n"}), "extends",
     "'nowhere.yaml' is not a file"),
    ("extends-not-a-path", Files({"recipe.yaml": "extends: [a.yaml, b.yaml]\nname: child\n"}), "extends",
     "must be a path to a recipe file"),
    ("extends-base-syntax", Files({"base.yaml": "name: [\n", "recipe.yaml": "extends: base.yaml\n"},
                                  source="base.yaml"), "", "invalid YAML"),
    ("extends-child-typo", Files({"base.yaml": TINY_TEXT, "recipe.yaml":
                                  "extends: base.yaml\nstages:\n  - name: ssr1\n    unet: {chanels: 32}\n"}),
     "stages.ssr1.unet.chanels", "did you mean 'channels'?"),

    # command-line overrides
    ("override-unknown-stage", Override(("stages.bsae.train.lr=1e-4",)), "stages.bsae",
     "no stage named 'bsae'; did you mean 'base'?"),
    ("override-unknown-key", Override(("stages.base.train.lrr=1e-4",)), "stages.base.train.lrr",
     "unknown key 'lrr'; did you mean 'lr'?"),
    ("override-new-section-key", Override(("stages.base.train.crop.widht=8",)), "stages.base.train.crop.widht",
     "did you mean 'width'?"),
    ("override-without-equals", Override(("stages.base.train.lr",)), "", "is not KEY.PATH=VALUE"),
    ("override-empty-segment", Override(("stages.base..lr=1",)), "", "has an empty key segment"),
    ("override-wrong-type", Override(("stages.base.frames=four",)), "stages.base.frames",
     "valid integer (got 'four')"),
    ("override-quoted-int", Override(("stages.ssr1.unet.channels='16'",)), "stages.ssr1.unet.channels",
     "valid integer (got '16')"),
    ("override-bad-yaml", Override(("stages.base.unet.temporal=[conv",)), "stages.base.unet.temporal",
     "is not valid YAML"),
    ("override-stage-itself", Override(("stages.base=3",)), "stages.base", "name a field of the stage"),
    ("override-into-scalar", Override(("name.first=x",)), "name.first", "cannot set a key inside a str"),
    ("override-into-list", Override(("stages.base.unet.channel_mults.0=3",)), "stages.base.unet.channel_mults.0",
     "stages.base.unet.channel_mults is a list: set it whole"),
    ("override-into-eval-list", Override(("eval.steps.x=1",)), "eval.steps.x", "eval.steps is a list: set it whole"),
    ("override-index-out-of-range", Override(("stages.9.frames=4",)), "stages.9", "no stage named '9'"),
    ("override-breaks-chain", Override((f"stages.tsr1.fps={S['tsr1']['fps'] + 1}",)), "stages.tsr1.fps",
     f"expected fps {S['tsr1']['fps']:g}"),
]


def _write(mutation, tmp_path: Path) -> tuple[list[str], str]:
    """Write the malformed recipe; return the argv of `cascade validate` and the source its message names."""
    path = tmp_path / "recipe.yaml"
    if isinstance(mutation, Files):
        for name, text in mutation.files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        return ["validate", str(tmp_path / mutation.main)], str(tmp_path / (mutation.source or mutation.main))
    if isinstance(mutation, Override):
        return ["validate", str(TINY), *mutation.args], "command line"
    if isinstance(mutation, Text):
        content = mutation.edit(TINY_TEXT)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    else:
        data = copy.deepcopy(TINY_DATA)
        mutation(data)
        path.write_text(dump(data))
    return ["validate", str(path)], str(path)


@pytest.mark.parametrize("field, problem, mutation", [pytest.param(f, p, m, id=i) for i, m, f, p in CASES])
def test_malformed_recipe_exits_2_with_one_line_naming_file_field_and_problem(field, problem, mutation, tmp_path,
                                                                              capsys):
    argv, source = _write(mutation, tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"expected exit 2, got {code}; stdout:\n{out}"
    assert "Traceback" not in out + err
    assert out == ""
    assert err.startswith("error: ")
    lines = err.removeprefix("error: ").splitlines()
    # Override errors name either the command line (syntax, unknown stage) or the file "(with command-line
    # overrides)" (a value the schema rejects).
    sources = (source, str(TINY)) if isinstance(mutation, Override) else (source,)
    assert all(line.startswith(sources) for line in lines), f"not one line per problem:\n{err}"
    matching = [line for line in lines
                if line.startswith(sources) and f"{field}: " in line and problem in line]
    assert matching, f"no line names {sources[0]!r}, {field!r} and {problem!r}:\n{err}"


def test_table_has_at_least_60_distinct_cases():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 60
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
    assert all(len(case) == 4 and case[3] for case in CASES)


def test_unmutated_tiny_is_valid(tmp_path):
    """The cases fail because of their mutation, not because the dump of tiny.yaml is itself invalid."""
    path = tmp_path / "recipe.yaml"
    path.write_text(dump(copy.deepcopy(TINY_DATA)))
    assert load_recipe(path).model_dump() == load_recipe(TINY).model_dump()


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    data = copy.deepcopy(TINY_DATA)
    setin("base", "train", "lr", value=-1.0)(data)
    rename("ssr1", "unet", "channels", to="chanels")(data)
    setin("eval", "metrics", value=["fid"])(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for field in ("stages.base.train.lr: ", "stages.ssr1.unet.chanels: ", "stages.ssr1.unet.channels: ",
                  "eval.metrics[0]: "):
        assert field in err
    assert all(line.removeprefix("error: ").startswith(str(path)) for line in err.splitlines())


def test_console_script_reports_malformed_recipe_without_traceback(tmp_path):
    data = copy.deepcopy(TINY_DATA)
    setin("ssr1", "unet", "channels", value="16")(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(dump(data))
    script = Path(sys.executable).parent / "cascade"
    result = subprocess.run([str(script), "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {path}: stages.ssr1.unet.channels: Input should be a valid integer "
                                     f"(got '16')")
