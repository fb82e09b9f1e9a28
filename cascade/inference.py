"""Videos from a trained cascade, from a notebook or a script: no Lightning, no command line.

    from cascade.inference import Cascade

    cascade = Cascade.from_recipe("recipes/tiny.yaml", "runs/tiny/distilled", device="cuda")
    result = cascade.generate(["a red circle moving right on a black background"], seed=0)
    result.final  # (N, 3, T, H, W) in [-1, 1]; result.videos[STAGE] for every stage

Weights are a folder of STAGE.safetensors (`cascade export` of trained stages, or distilled students); without one
the networks are randomly initialised. A student is sampled as it was distilled (its step count and sampler, one
pass per step when it takes the guidance weight as input); a setting it cannot honour is refused with an error that
names the stage. Video i of a call depends only on the seed, i and its prompt (one random stream per video and
stage, on the device the video is made on), not on the batch size or the other prompts.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from cascade.recipe import Recipe, RecipeError, load_recipe
from cascade.recipe.schema import Stage
from cascade.sampling.cascade import CascadeSampler, StageSpec
from cascade.errors import UserError
from cascade.weights import WeightsInfo, explain_mismatch, info_from, meaning_mismatch, read_weights, tensor_mismatch

__all__ = ["Cascade", "Generation", "LoadedStage", "check_device", "check_video_path", "default_device", "load_stage",
           "load_text_encoder", "write_samples"]


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    from cascade.distributed import resolve_device

    return resolve_device(None)


def check_device(requested: torch.device | str | None) -> None:
    """UserError (one line, exit 2) unless `requested` (a --device value; None: CUDA if present, else the CPU) names
    a device this machine has (`resolve_device`'s checks): called before any work."""
    from cascade.distributed import resolve_device

    if requested is not None:
        try:
            resolve_device(requested)
        except ValueError as error:
            raise UserError(str(error)) from None


class _Autocast(nn.Module):
    """The network in half precision: weights stored in `dtype` except the normalization layers' (float32, as
    autocast computes normalization), the forward pass under autocast; the sampler's state and log-SNRs stay
    float32."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        net = net.to(dtype)
        for module in net.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.float()
        self.net, self.dtype = net, dtype
        self.device_type = next(net.parameters()).device.type  # wrapped once on its device (load_stage)

    def forward(self, *args, **kwargs) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.net(*args, **kwargs).float()


@dataclass
class LoadedStage:
    stage: Stage  # the recipe's section
    net: nn.Module  # on the device, eval mode
    info: WeightsInfo  # what the weights are (random, EMA, a distilled student)
    path: Path | None = None  # the weights file, None for a random initialisation


def load_stage(recipe: Recipe, name: str, weights: str | Path | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedStage:
    """One stage's network with WEIGHTS/NAME.safetensors (or a random initialisation from the stage's seed, when
    `weights` is None), on `device` in `dtype`. A missing, unreadable or corrupt file, or one whose tensors do not
    fit the recipe's network, is a UserError naming the file and the stage (for a file that records the stage it
    was trained as, the recipe fields that differ)."""
    from cascade.recipe.build import build_unet

    stage = recipe.stage(name)
    info, path, tensors = WeightsInfo(), None, None
    if weights is not None:
        path = Path(weights) / f"{name}.safetensors"
        if Path(weights).is_file():
            raise UserError(f"{weights}: a file; the weights are a folder of STAGE.safetensors (this stage's: "
                            f"{name}.safetensors), from `cascade export` or `cascade distill`")
        if not Path(weights).is_dir():
            raise UserError(f"{path}: no weights for stage {name}: the folder {weights} does not exist")
        if not path.is_file():
            raise UserError(f"{path}: no weights for stage {name} (expected STAGE.safetensors from "
                            f"`cascade export` or `cascade distill`)")
        tensors, metadata = read_weights(path, f"weights file of stage {name}")  # nothing is unpickled
        info = info_from(path, metadata)
    with torch.random.fork_rng(devices=[]):  # a random initialisation draws from the stage's seed, not the caller's
        torch.manual_seed(stage.train.seed)
        net = build_unet(stage, recipe, guidance_conditioning=info.guidance_input)
    if tensors is not None:
        problem = tensor_mismatch(net.state_dict(), tensors)
        if problem is not None:
            raise UserError(explain_mismatch(path, name, metadata, stage.model_dump(mode="json"),
                                             recipe.text_encoder.model_dump(mode="json"), problem))
        problem = meaning_mismatch(path, name, metadata, stage.model_dump(mode="json"))
        if problem is not None:
            raise UserError(problem)
        net.load_state_dict(tensors)
    net = net.to(device).eval().requires_grad_(False)
    return LoadedStage(stage, net if dtype == torch.float32 else _Autocast(net, dtype), info, path)


@dataclass
class Generation:
    """Every stage's output for every prompt, in prompt order, and what each batch cost."""

    prompts: list[str]
    videos: dict[str, Tensor]  # stage -> (N, 3, T, H, W) in [-1, 1], on the CPU
    batches: list[dict] = field(default_factory=list)  # prompts, seconds, per-stage stats (NFE per video, ...)

    @property
    def final(self) -> Tensor:
        return next(reversed(self.videos.values()))


class Cascade:
    """A cascade ready to sample: the recipe, each stage's network and what its weights are, the text encoder."""

    def __init__(self, recipe: Recipe, stages: Mapping[str, LoadedStage], encoder=None,
                 device: torch.device | str = "cpu") -> None:
        self.recipe, self.stages, self.encoder, self.device = recipe, dict(stages), encoder, torch.device(device)
        for name in self.stages:
            self._check_student(name)

    @classmethod
    def from_recipe(cls, recipe: Recipe | str | Path, weights: str | Path | None = None, *,
                    stages: Sequence[str] | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | str = torch.float32, text_encoder: bool = True) -> Cascade:
        """Load `stages` (default: all) of a recipe (a Recipe or a file) with the weights in the folder `weights`
        (None: random initialisation), on `device` (default: CUDA if available) in `dtype`; the text encoder on the
        same device in the recipe's dtype unless `text_encoder` is False."""
        from cascade.distributed import resolve_device

        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        check_device(device)  # a UserError naming the device when it cannot be had
        device = resolve_device(device)
        if isinstance(dtype, str):
            from cascade.nn.text import DTYPES

            dtype = DTYPES[dtype]
        names = [s.name for s in recipe.stages] if stages is None else list(stages)
        loaded = {name: load_stage(recipe, name, weights, device, dtype) for name in names}
        encoder = load_text_encoder(recipe, device) if text_encoder else None
        return cls(recipe, loaded, encoder, device)

    # --- settings ------------------------------------------------------------------------------------------------
    def _check_student(self, name: str) -> None:
        """A student samples with its own step count and sampler: an explicit override of either that differs, or a
        recipe guidance weight outside what a guidance-distilled student learned, is an error naming the stage."""
        loaded = self.stages[name]
        info, stage = loaded.info, loaded.stage
        if not info.distilled:
            return
        for key, value, own in (("steps", stage.sampler.steps, info.steps), ("kind", stage.sampler.kind, info.sampler)):
            if key == "steps" and info.sampler == "consistency":
                continue  # a one-step consistency student samples at any step count
            if self.recipe.overridden(f"stages.{name}.sampler.{key}") and value != own:
                raise RecipeError("command line", [(f"stages.{name}.sampler.{key}", f"the distilled student "
                                   f"{loaded.path} samples with {info.steps} {info.sampler} steps and cannot honour "
                                   f"{key}={value}; drop the override, or sample the teacher's weights")])
        g = stage.guidance
        problem = self._outside_range(name, [g.weight] if g.oscillate is None else [g.oscillate.high, g.oscillate.low])
        if problem:
            where = f"stages.{name}.guidance"
            raise RecipeError("command line" if self.recipe.overridden(where) else f"recipe {self.recipe.name}",
                              [(where, problem)])

    def _outside_range(self, name: str, weights: Sequence[float]) -> str | None:
        w_range = self.guidance_range(name)
        outside = [w for w in weights if w_range is not None and not w_range[0] <= w <= w_range[1]]
        if not outside:
            return None
        return (f"guidance weight {outside[0]:g} is outside [{w_range[0]:g}, {w_range[1]:g}], the range the "
                f"guidance-distilled student {self.stages[name].path} learned")

    def guidance_range(self, name: str) -> tuple[float, float] | None:
        """The guidance weights a stage can be sampled with: a guidance-distilled student's [w_min, w_max], None
        (any) otherwise."""
        info = self.stages[name].info
        return info.w_range if info.guidance_input else None

    def default_steps(self, name: str) -> tuple[int, bool]:
        """(the steps a stage samples with by default, whether other step counts are valid): a teacher's recipe
        steps (any count); a student's own count (that count only), except a one-step consistency student, which
        samples at any count (multistep consistency sampling): its own unless stages.NAME.sampler.steps is set on
        the command line."""
        info, stage = self.stages[name].info, self.stages[name].stage
        if not info.distilled:
            return stage.sampler.steps, True
        if info.sampler == "consistency":
            overridden = self.recipe.overridden(f"stages.{name}.sampler.steps")
            return (stage.sampler.steps if overridden else info.steps), True
        return info.steps, False

    def spec(self, name: str, setting: Mapping | None = None) -> StageSpec:
        """The stage's sampling settings: the recipe's, with `setting`'s changes (any of steps, guidance, oscillate
        ((high, low) or None), aug (the input's augmentation log-SNR)). A student keeps its sampler, and its steps
        unless it is a one-step consistency student (`default_steps`)."""
        from cascade.recipe.build import build_stage_spec

        loaded, setting = self.stages[name], dict(setting or {})
        unknown = set(setting) - {"steps", "guidance", "oscillate", "aug", "reconstruction"}
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}; known: steps, guidance, oscillate, aug, "
                             f"reconstruction")
        info, kw = loaded.info, {}
        if info.distilled and info.sampler == "consistency":  # any step count; its own by default
            kw.update(steps=setting.get("steps") or self.default_steps(name)[0], sampler=info.sampler)
        elif info.distilled:
            if setting.get("steps") not in (None, info.steps):
                raise ValueError(f"stage {name}: the distilled student samples with {info.steps} steps, not "
                                 f"{setting['steps']}")
            kw.update(steps=info.steps, sampler=info.sampler)
        elif setting.get("steps") is not None:
            kw["steps"] = setting["steps"]
        if "guidance" in setting:
            kw["guidance"] = setting["guidance"]
        if "oscillate" in setting:
            kw["oscillate"] = None if setting["oscillate"] is None else tuple(setting["oscillate"])
        if setting.get("aug") is not None:
            kw["aug_logsnr"] = setting["aug"]
        spec = build_stage_spec(loaded.stage, loaded.net, guidance_distilled=info.guidance_input, **kw)
        if setting.get("reconstruction") is not None:
            spec.reconstruction_weight = float(setting["reconstruction"])
        problem = self._outside_range(name, [spec.guidance] if spec.oscillate is None else list(spec.oscillate))
        if problem:
            raise ValueError(f"stage {name}: {problem}")
        return spec

    # --- sampling ------------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """T5 embeddings (B, L, D) float32 and mask (B, L) bool, on the cascade's device."""
        if self.encoder is None:
            raise ValueError("this cascade has no text encoder (loaded with text_encoder=False, or released)")
        text, mask = self.encoder.encode(list(prompts))
        return text.to(self.device), mask.to(self.device)

    def release_text_encoder(self) -> None:
        """Free the text encoder's memory (T5-XXL: ~10 GB) once every prompt is encoded; `encode` fails after."""
        self.encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sample_stage(self, name: str, text: Tensor, text_mask: Tensor, previous: Tensor | None, seed: int,
                     indices: Sequence[int], setting: Mapping | None = None, progress: bool = False, *,
                     spec: StageSpec | None = None, stream: int | None = None, **extra) -> tuple[Tensor, int]:
        """One stage for a batch of videos with the given `indices` (their random streams): (video (B, 3, T, H, W)
        in [-1, 1], network evaluations per video). The same as this stage's part of `generate`. `extra`: known,
        known_mask, init, strength (`CascadeSampler.sample_stage`); `spec` replaces the stage's settings (e.g. a
        windowed denoiser over a long video); `stream` the random stream (default: the stage's number)."""
        from cascade.diffusion import VideoGenerators

        number = [s.name for s in self.recipe.stages].index(name) if stream is None else stream
        generator = VideoGenerators(seed, indices, stream=number, device=self.device)
        extra = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in extra.items()}
        return CascadeSampler.sample_stage(spec or self.spec(name, setting), text, text_mask,
                                           None if previous is None else previous.to(self.device), generator, progress,
                                           **extra)

    def edit_region(self, name: str, text: Tensor, text_mask: Tensor, source_text: Tensor, source_mask: Tensor,
                    video: Tensor, previous: Tensor | None, seed: int, indices: Sequence[int], **kw) -> Tensor:
        """`CascadeSampler.edit_region` for this stage (its own random stream, apart from the sampler's):
        (B, 1, T, H, W) 0/1, where the edit from the source caption to `text` changes `video`."""
        from cascade.diffusion import VideoGenerators

        number = [s.name for s in self.recipe.stages].index(name)
        generator = VideoGenerators(seed, indices, stream=1000 + number, device=self.device)
        move = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return CascadeSampler.edit_region(self.spec(name), text, text_mask, move(source_text), move(source_mask),
                                          move(video), move(previous), generator, **kw)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 4, up_to: str | None = None,
                 progress: bool = True, indices: Sequence[int] | None = None,
                 release_text_encoder: bool = False) -> Generation:
        """Sample every loaded stage (up to and including `up_to`) for every prompt, `batch_size` at a time. Prompt
        k is video `indices[k]` (default: k) of the seed's random streams, so a share of a larger run (a rank's)
        gives the same videos as the whole run. Every prompt is encoded first; `release_text_encoder` then frees the
        encoder before the U-Nets sample."""
        chain = [s.name for s in self.recipe.stages]
        if up_to is not None and up_to not in chain:
            raise ValueError(f"no stage named {up_to!r}; stages are {', '.join(chain)}")
        names = [n for n in (chain if up_to is None else chain[: chain.index(up_to) + 1]) if n in self.stages]
        if names != chain[: len(names)] or not names:
            raise ValueError(f"sampling needs the cascade's stages from the first on; loaded: {', '.join(self.stages)}")
        prompts = list(prompts)
        indices = list(range(len(prompts)) if indices is None else indices)
        if len(indices) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(indices)} indices")
        sampler = CascadeSampler([self.spec(name) for name in names])
        out = Generation(prompts, videos={})
        firsts = range(0, len(prompts), batch_size)
        texts = [self.encode(prompts[first:first + batch_size]) for first in firsts]
        if release_text_encoder:
            self.release_text_encoder()
        pieces: dict[str, list[Tensor]] = {name: [] for name in names}
        for first, (text, mask) in zip(firsts, texts):
            batch = prompts[first:first + batch_size]
            start = time.perf_counter()
            result = sampler.sample(text, mask, seed=seed, indices=indices[first:first + len(batch)],
                                    progress=progress)
            out.batches.append(dict(prompts=batch, seconds=time.perf_counter() - start, stages=result.stats))
            for name, video in result.videos.items():
                pieces[name].append(video.cpu())
        out.videos = {name: torch.cat(parts) for name, parts in pieces.items() if parts}  # none for no prompts
        return out


def load_text_encoder(recipe: Recipe, device: torch.device | str = "cpu"):
    """The recipe's frozen T5 on `device` in the recipe's dtype; its width must be the recipe's text_encoder.dim."""
    from cascade.nn.text import FrozenT5

    te = recipe.text_encoder
    encoder = FrozenT5.from_pretrained(te.path, te.max_tokens, te.dtype, device=device)
    if encoder.dim != te.dim:
        raise RecipeError(str(te.path), [("text_encoder.dim", f"the recipe says {te.dim} but the encoder at "
                                          f"{te.path} has width {encoder.dim}")])
    return encoder


def check_video_path(out: str | Path) -> Path:
    """`out` as a Path; a ValueError unless it names an .mp4 or .gif file."""
    out = Path(out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"--out {out}: the final video is written as .mp4 or .gif")
    return out


def write_samples(cascade: Cascade, prompts: Sequence[str], out: str | Path, seed: int = 0, batch_size: int = 4,
                  up_to: str | None = None, progress: bool = True, ranks=None,
                  release_text_encoder: bool = False) -> dict | None:
    """Sample the prompts and write the final video (`out`, .mp4 or .gif; OUT_NNN.ext for several prompts), every
    stage's output (OUT_stages/NNN_STAGE.mp4) and a JSON report (OUT.json: settings, seed, weights, network
    evaluations and seconds per stage). Returns the report.

    With `ranks` (`cascade.distributed.init`), each rank samples its whole batches of the one-process run (the same
    videos, `generate`'s indices) and rank 0 gathers the uint8 videos and writes everything; the other ranks write
    nothing and return None."""
    from cascade.data.video import to_uint8, write_video
    from cascade.distributed import Ranks, barrier, gather, share

    ranks = ranks or Ranks(device=cascade.device)
    out = check_video_path(out)
    prompts = list(prompts)
    batches = [list(range(first, min(first + batch_size, len(prompts)))) for first in range(0, len(prompts), batch_size)]
    mine = [i for batch in share(batches, ranks) for i in batch]
    if ranks.world > 1:
        print(f"rank {ranks.rank}/{ranks.world}: {len(mine)} of {len(prompts)} videos"
              + (f" ({mine[0]}-{mine[-1]})" if mine else ""), flush=True)
    generation = cascade.generate([prompts[i] for i in mine], seed=seed, batch_size=batch_size, up_to=up_to,
                                  progress=progress and ranks.is_zero, indices=mine,
                                  release_text_encoder=release_text_encoder)
    local = dict(indices=mine, batches=generation.batches,
                 videos={name: to_uint8(video) for name, video in generation.videos.items()})  # (N, T, H, W, 3)
    parts = gather(local, ranks)
    if parts is None:
        barrier(ranks)  # until rank 0 has written every file: no rank leaves the group while another still works
        return None
    videos: dict[str, dict[int, object]] = {}
    for part in parts:
        for name, stage_videos in part["videos"].items():
            videos.setdefault(name, {}).update(zip(part["indices"], stage_videos))
    recipe, used = cascade.recipe, list(videos)
    stage_dir = out.with_name(out.stem + "_stages")
    report = dict(recipe=recipe.name, prompts=prompts, seed=seed,
                  checkpoints=None if cascade.stages[used[0]].path is None else str(cascade.stages[used[0]].path.parent),
                  weights={n: cascade.stages[n].info.summary() for n in used},
                  settings={n: recipe.stage(n).model_dump(include={"sampler", "guidance", "augmentation"}) for n in used},
                  batches=[b for part in parts for b in part["batches"]], outputs=[])
    last = recipe.stage(used[-1])
    for index, prompt in enumerate(prompts):
        final = out if len(prompts) == 1 else out.with_name(f"{out.stem}_{index:03d}{out.suffix}")
        write_video(final, videos[last.name][index], last.fps)
        stages = {}
        for name in used:
            path = stage_dir / f"{index:03d}_{name}.mp4"
            write_video(path, videos[name][index], recipe.stage(name).fps)
            stages[name] = str(path)
        report["outputs"].append(dict(prompt=prompt, video=str(final), stages=stages))
    totals: dict[str, dict] = {}
    for batch in report["batches"]:
        for s in batch["stages"]:
            totals.setdefault(s["stage"], dict(nfe_per_video=s["nfe_per_video"], seconds=0.0))["seconds"] += s["seconds"]
    report["per_stage"] = totals
    report["nfe_per_video"] = sum(t["nfe_per_video"] for t in totals.values())
    report["environment"] = dict(python=platform.python_version(), torch=torch.__version__,
                                 threads=torch.get_num_threads(), device=str(cascade.device), ranks=ranks.world,
                                 videos_per_rank=[len(part["indices"]) for part in parts])
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    barrier(ranks)
    return report
