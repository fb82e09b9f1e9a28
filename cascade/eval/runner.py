"""`cascade eval`: evaluate every stage of a trained (or distilled) cascade, swept over its sampling settings.

For each stage, two input modes:

- ``gt``: the stage's input is the ground-truth clip as its input stage sees it (lower frame rate / resolution),
  which is what the stage trained on: this isolates the stage;
- ``cascade``: its input is what the stages before it generated with the recipe's settings, as in real use.

The base stage has no input: its one mode is ``text``. Sweeps vary one axis at a time around the recipe's settings
(sampler steps, guidance weight, noise-augmentation level of the input), so a sweep costs the sum of the axes'
lengths, not their product; every setting of every stage samples from the same noise (paired comparisons).
A distilled student is valid only at the step count it was distilled to: its steps axis holds that count only.

Metrics (recipe ``eval.metrics``): ``probes`` (synthetic data: colour, shape, direction and background read from
pixels, `cascade.eval.probes`), ``fvd`` (I3D with the canonical weights against cached reference statistics of the
evaluation set, `cascade.eval.fvd`), ``clipsim`` (CLIP from ``eval.clip_path``, `cascade.eval.clipsim`),
``quality`` (PSNR and SSIM against each video's ground truth at the stage's shape, and the background's deviation
from the caption's colour, `cascade.eval.quality`). Ground truth is scored too, as the ceiling of each metric. Writes eval.json, eval.md and one PNG plot per swept axis.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cascade.errors import UserError
from cascade.recipe import Recipe, RecipeError, load_recipe
from cascade.recipe.schema import Stage

__all__ = ["EvalPlan", "evaluate", "eval_command", "settings_grid", "eval_folder", "load_examples", "check_metrics"]

AXES = ("steps", "guidance", "aug")
BETTER = {"fvd": "lower is better", "background": "lower is better"}  # every other metric: higher
METRICS = ("fvd", "clipsim", "probes", "quality")
MODES = ("gt", "cascade")


@dataclass
class EvalPlan:
    num_videos: int
    steps: list[int]
    guidance: list[float]
    aug: list[float]
    metrics: list[str]
    stages: list[str]
    modes: list[str]
    batch_size: int = 8
    seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: Recipe, **changes) -> EvalPlan:
        e = recipe.eval
        plan = cls(num_videos=e.num_videos, steps=list(e.steps), guidance=list(e.guidance), aug=list(e.aug_logsnr),
                   metrics=list(e.metrics), stages=[s.name for s in recipe.stages], modes=list(e.modes),
                   batch_size=e.batch_size)
        for key, value in changes.items():
            if value is not None:
                setattr(plan, key, value)
        names = [s.name for s in recipe.stages]
        unknown = [s for s in plan.stages if s not in names]
        if unknown:
            raise ValueError(f"--stages: no stage named {', '.join(unknown)}; stages are {', '.join(names)}")
        modes = [m for mode in plan.modes for m in (MODES if mode == "both" else [mode])]  # both = gt, cascade
        plan.modes = list(dict.fromkeys(modes))
        bad_modes = [m for m in plan.modes if m not in MODES]
        if bad_modes:
            raise ValueError(f"--modes: {', '.join(bad_modes)} unknown; modes are gt, cascade or both")
        unknown = [m for m in plan.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"--metrics: {', '.join(unknown)} unknown; metrics are {', '.join(METRICS)}")
        return plan


def check_metrics(recipe: Recipe, plan: EvalPlan) -> None:
    """Fail before any work (UserError naming the metric and what is missing) when a requested metric cannot be
    computed: no metric asked for, CLIPSIM without a CLIP folder, FVD without the I3D weights or without a stage
    long enough for the protocol, the probes on real data."""
    if not plan.metrics:
        raise UserError("no metric to compute: eval.metrics (or --metrics) is empty; ask for fvd, clipsim or probes")
    source = "--metrics or eval.metrics"
    if "clipsim" in plan.metrics:
        path = recipe.eval.clip_path
        if path is None:
            raise UserError(f"clipsim cannot be computed: eval.clip_path is not set (a local CLIP folder, e.g. "
                            f"eval.clip_path=models/clip-vit-base-patch32); set it or leave clipsim out of {source}")
        if not (Path(path) / "config.json").is_file():
            what = "does not exist" if not Path(path).exists() else "has no config.json (not a CLIP folder)"
            raise UserError(f"clipsim cannot be computed: eval.clip_path {path} {what}")
    if "fvd" in plan.metrics:
        from cascade.eval.i3d import find_i3d_weights

        if recipe.eval.frames < 9:
            raise UserError(f"fvd cannot be computed: eval.frames is {recipe.eval.frames}, the I3D protocol needs at "
                            f"least 9 frames (canonical: 16); set eval.frames or leave fvd out of {source}")
        if plan.num_videos < 2:
            raise UserError(f"fvd cannot be computed from {plan.num_videos} video: its covariance needs at least 2 "
                            f"(--num-videos or eval.num_videos)")
        frames = {name: recipe.stage(name).frames for name in plan.stages}
        if all(n < recipe.eval.frames for n in frames.values()):
            have = ", ".join(f"{name} {n}" for name, n in frames.items())
            raise UserError(f"fvd cannot be computed: the I3D protocol takes eval.frames = {recipe.eval.frames} "
                            f"frames and no evaluated stage has that many ({have}); evaluate a longer stage "
                            f"(--stages) or leave fvd out of {source}")
        chosen = recipe.eval.fvd_stages
        if chosen is not None and not set(chosen) & set(plan.stages):
            raise UserError(f"fvd cannot be computed: eval.fvd_stages ({', '.join(chosen)}) names none of the "
                            f"evaluated stages ({', '.join(plan.stages)}); evaluate one of them (--stages), change "
                            f"eval.fvd_stages or leave fvd out of {source}")
        try:
            find_i3d_weights()
        except FileNotFoundError as error:
            raise UserError(f"fvd cannot be computed: {error}") from None
    if "probes" in plan.metrics and recipe.data.kind != "synthetic" and recipe.eval.data is None:
        raise UserError(f"probes cannot be computed: they read the synthetic dataset's scenes and this recipe "
                        f"trains on real data (data.kind {recipe.data.kind}); leave probes out of {source}")


# --------------------------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------------------------
def default_setting(stage: Stage, fixed_steps: int | None = None) -> dict:
    g = stage.guidance
    return dict(steps=fixed_steps or stage.sampler.steps, guidance=g.weight,
                oscillate=None if g.oscillate is None else [g.oscillate.high, g.oscillate.low],
                aug=None if stage.augmentation is None else stage.augmentation.sample_logsnr)


def settings_grid(stage: Stage, plan: EvalPlan, fixed_steps: int | None = None,
                  guidance_range: tuple[float, float] | None = None, any_steps: bool | None = None) -> list[dict]:
    """The settings to sample a stage with: the recipe's, then one axis at a time. Each setting lists the axes
    whose plot it belongs to (the recipe's setting belongs to all of them). A distilled student samples with its
    step count (`fixed_steps`) and keeps it unless `any_steps` (a one-step consistency student); a
    guidance-distilled one is swept only over the weights it learned (`guidance_range`)."""
    base = default_setting(stage, fixed_steps)
    candidates = [(dict(base), list(AXES))]
    sweep = not fixed_steps if any_steps is None else any_steps
    for steps in (plan.steps if sweep else []):
        candidates.append((dict(base, steps=steps), ["steps"]))
    low, high = guidance_range or (-math.inf, math.inf)
    for weight in (w for w in plan.guidance if low <= w <= high):
        candidates.append((dict(base, guidance=float(weight), oscillate=None), ["guidance"]))
    if stage.augmentation is not None:
        for level in plan.aug:
            candidates.append((dict(base, aug=float(level)), ["aug"]))
    grid: dict[str, dict] = {}
    for setting, axes in candidates:
        key = json.dumps(setting, sort_keys=True)
        if key in grid:
            grid[key]["axes"] = sorted(set(grid[key]["axes"]) | set(axes), key=AXES.index)
        else:
            grid[key] = dict(setting, axes=axes)
    return list(grid.values())


# --------------------------------------------------------------------------------------------------------------
# The evaluation set
# --------------------------------------------------------------------------------------------------------------
def eval_folder(recipe: Recipe, num_videos: int) -> tuple[Path, str]:
    """(folder of shards, what it is). A synthetic recipe gets a generated split of held-out caption combinations
    next to its training data (regenerated when it holds too few videos)."""
    from cascade.data.shards import MANIFEST, Manifest
    from cascade.recipe.build import dataset_folder

    if recipe.eval.data is not None:
        return Path(recipe.eval.data), "eval.data"
    if recipe.data.kind != "synthetic":
        return Path(dataset_folder(recipe)), "the training shards (set eval.data for a held-out set)"
    folder = Path(f"{recipe.data.root}-heldout")
    last = recipe.stages[-1]
    wanted = dict(split="heldout", seed=recipe.data.seed + 1, width=last.width, height=last.height, fps=last.fps)
    if (folder / MANIFEST).is_file():
        manifest = Manifest.read(folder)
        if manifest.videos >= num_videos and all(manifest.info.get(k) == v for k, v in wanted.items()):
            return folder, "held-out caption combinations (synthetic)"
        shutil.rmtree(folder)  # ours, derived from the recipe: too small or stale
    from cascade.data.synthetic import write_synthetic

    write_synthetic(folder, count=num_videos, seed=wanted["seed"], split="heldout", width=last.width,
                    height=last.height, fps=last.fps, seconds=last.frames / last.fps)
    return folder, "held-out caption combinations (synthetic)"


def load_examples(folder: Path, spec, count: int) -> dict:
    """The first `count` videos of a dataset in shard order (stills are skipped), cut to a stage's clip at full
    size (no training crop). -> video (N, 3, T, H, W) uint8, cond (N, 3, T', H', W') uint8 or None, captions, keys,
    skipped (key -> reason of unusable samples)."""
    from cascade.data.clips import BadSample, make_example
    from cascade.data.loader import ShardStream, read_tar_index
    from cascade.data.shards import Manifest

    manifest = Manifest.read(folder)
    spec = replace(spec, crop_width=None, crop_height=None, crop_frames=None)
    stream = ShardStream(folder, [s["path"] for s in manifest.shards], seed=0, role=0, roles=1)
    videos, conds, captions, keys, skipped = [], [], [], [], {}
    for shard, entry in enumerate(manifest.shards):
        samples, problem = read_tar_index(folder / entry["path"])
        if problem:
            skipped[entry["path"]] = problem
        for index, (key, members) in enumerate(samples):
            if len(videos) == count:
                break
            if "mp4" not in members:
                continue
            try:
                example = make_example(stream.read(shard, members), spec, np.random.default_rng([shard, index]))
            except BadSample as error:
                skipped[key] = str(error)
                continue
            videos.append(example["video"])
            conds.append(example.get("cond"))
            captions.append(example["caption"])
            keys.append(key)
        if len(videos) == count:
            break
    if len(videos) < count:
        raise ValueError(f"{folder}: {len(videos)} usable videos, --num-videos asks for {count}"
                         + (f" ({len(skipped)} skipped)" if skipped else ""))
    return dict(video=torch.stack(videos), cond=None if conds[0] is None else torch.stack(conds),
                captions=captions, keys=keys, skipped=skipped)


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------
class Metrics:
    """The requested metrics on `ranks`' device (`check_metrics` has made sure each can run). Each rank scores its
    own videos and the scores merge across ranks: FVD statistics by all-reduce
    (`FeatureStats.all_reduce`), probe hits and CLIPSIM cosines as sums and counts; FVD itself is taken on rank 0,
    against reference statistics that rank 0 computes and caches."""

    def __init__(self, recipe: Recipe, plan: EvalPlan, folder: Path, cache: Path, ranks=None) -> None:
        from cascade.distributed import Ranks

        self.recipe, self.plan, self.folder, self.cache = recipe, plan, folder, cache
        self.ranks = ranks or Ranks()
        self._i3d = self._clip = None
        self._references: dict[str, object] = {}
        if "fvd" in plan.metrics:
            from cascade.eval.fvd import FVDProtocol, I3DFeatures

            self.protocol = FVDProtocol(frames=recipe.eval.frames)
            self._i3d = I3DFeatures(self.protocol, batch_size=plan.batch_size, device=self.ranks.device)
        if "clipsim" in plan.metrics:
            from cascade.eval.clipsim import CLIPSim

            self._clip = CLIPSim(recipe.eval.clip_path, device=self.ranks.device)

    def wants(self, name: str) -> bool:
        return name in self.plan.metrics

    def fvd_reason(self, stage: Stage) -> str | None:
        if not self.wants("fvd"):
            return None
        if stage.frames < self.protocol.frames:
            return f"{stage.frames} frames, the I3D protocol takes {self.protocol.frames} (eval.frames)"
        chosen = self.recipe.eval.fvd_stages
        if chosen is not None and stage.name not in chosen:
            return f"not among eval.fvd_stages ({', '.join(chosen)})"
        return None

    def reference(self, stage: Stage):
        if stage.name not in self._references:
            from cascade.eval.fvd import reference_stats

            self._references[stage.name] = reference_stats(
                self.folder, self.protocol, num_videos=self.plan.num_videos, size=(stage.width, stage.height),
                fps=stage.fps, frames=stage.frames, cache_dir=self.cache, extractor=self._i3d)
        return self._references[stage.name]

    def generated_stats(self, videos: np.ndarray):
        """FVD statistics of every rank's `videos` (N, T, H, W, 3) uint8 (N may be 0), the same on every rank."""
        from cascade.eval.fvd import FVDStats

        stats = self._i3d.stats([videos], num_videos=len(videos)) if len(videos) else FVDStats()
        if self.ranks.world > 1:
            stats.all_reduce()
        stats.protocol = self.protocol.as_dict(self._i3d.weights_sha256, stats.count)
        return stats

    def score(self, stage: Stage, videos: np.ndarray, captions: list[str], reference: bool = False,
              truth: np.ndarray | None = None) -> dict:
        """videos: (N, T, H, W, 3) uint8, this rank's share (N may be 0); truth: their ground truth, the same shape.
        `reference`: these are the ground truth (no FVD, PSNR or SSIM against themselves). Every rank must call it;
        the FVD is in rank 0's result only."""
        from cascade.distributed import all_reduce_sum

        out: dict = {}
        if self.wants("quality") and truth is not None:
            from cascade.eval.quality import quality_scores

            sums = quality_scores(list(videos), list(truth), captions, pixels=not reference)
            merged = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64), self.ranks).tolist()
            out["quality"] = {k: total / n if n else None for k, (total, n) in zip(sums, merged)}
        if self.wants("probes"):
            from cascade.eval.probes import FIELDS, probe_accuracy

            _, rows = probe_accuracy(list(videos), captions)
            counts = [[sum(r["correct"][f] for r in rows if f in r["correct"]),
                       sum(f in r["correct"] for r in rows)] for f in FIELDS]
            counts = all_reduce_sum(torch.tensor(counts, dtype=torch.float64), self.ranks)
            out["probes"] = {f: float(hits / n) if n else None for f, (hits, n) in zip(FIELDS, counts.tolist())}
        if self.wants("fvd") and not reference and self.fvd_reason(stage) is None:
            from cascade.eval.fvd import fvd

            generated = self.generated_stats(videos)
            if self.ranks.is_zero:
                out["fvd"] = float(fvd(generated, self.reference(stage)))
        if self.wants("clipsim"):
            size = self.plan.batch_size  # the run's batches: the same CLIP batches for any number of ranks
            cosines = [c for i in range(0, len(videos), size)
                       for c in self._clip.score(videos[i:i + size], captions[i:i + size])["per_video"]]
            total, count = all_reduce_sum(torch.tensor([sum(cosines), len(cosines)]), self.ranks).tolist()
            cosine = total / count
            out["clipsim"] = dict(cosine=cosine, score=100 * cosine)
        return out

    def describe(self) -> dict:
        info: dict = dict(requested=self.plan.metrics)
        if self._i3d is not None:
            info["fvd_protocol"] = asdict(self.protocol)
        if self._clip is not None:
            info["clip_model"] = self._clip.model_name
        return info


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------
def evaluate(recipe: Recipe, checkpoints: Path, out: Path, plan: EvalPlan, progress: bool = True,
             device: torch.device | str | None = None, dtype: torch.dtype | str = torch.float32,
             cache: Path | None = None, samples: bool = True) -> dict | None:
    """Run the evaluation on `device` (default: CUDA if available); write eval.json, eval.md and the plots to
    `out`. Returns the report. `cache`: where the FVD reference statistics are kept (default OUT/cache; `cascade
    run` shares one between its two evaluations, and the first to need them computes them). `samples`: write the
    recipe setting's first two videos per stage and mode as gifs (OUT/samples).

    Under torchrun or srun (`cascade.distributed`) each rank samples and scores its whole batches of the
    one-process run on its own device (cuda:LOCAL_RANK), the scores merge across ranks (`Metrics`) and rank 0
    writes everything and returns the report; the other ranks write nothing and return None. Every video keeps its
    index's random streams and its batch, so the report is the same for any number of ranks."""
    from tqdm.auto import tqdm

    from cascade import distributed
    from cascade.data.video import to_uint8, write_video
    from cascade.inference import Cascade
    from cascade.recipe.build import clip_spec

    check_metrics(recipe, plan)  # before any weights are loaded or videos sampled
    started = time.perf_counter()
    ranks = distributed.init(device)
    progress = progress and ranks.is_zero
    names = [s.name for s in recipe.stages]
    if "cascade" in plan.modes:  # cascade inputs need every earlier stage
        needed = names[: max(names.index(s) for s in plan.stages) + 1]
    else:  # ground-truth inputs: only the evaluated stages' weights
        needed = [n for n in names if n in plan.stages]
    cascade = Cascade.from_recipe(recipe, checkpoints, stages=needed, device=ranks.device, dtype=dtype)
    if ranks.is_zero:
        out.mkdir(parents=True, exist_ok=True)
        folder, what = eval_folder(recipe, plan.num_videos)  # may write the held-out split: rank 0 first
    distributed.barrier(ranks)
    if not ranks.is_zero:
        folder, what = eval_folder(recipe, plan.num_videos)
    metrics = Metrics(recipe, plan, folder, out / "cache" if cache is None else Path(cache), ranks)
    # This rank's whole batches of the one-process run: videos [first, end), in the batches they have in one process.
    batches = distributed.share([(a, min(a + plan.batch_size, plan.num_videos))
                                 for a in range(0, plan.num_videos, plan.batch_size)], ranks)
    first, end = (batches[0][0], batches[-1][1]) if batches else (0, 0)
    local = [(a - first, b - first) for a, b in batches]  # the same batches, in this rank's tensors
    if ranks.world > 1:
        print(f"rank {ranks.rank}/{ranks.world}: {end - first} of {plan.num_videos} videos"
              + (f" ({first}-{end - 1})" if end > first else ""), file=sys.stderr, flush=True)
    examples = {name: load_examples(folder, clip_spec(recipe.stage(name), recipe), plan.num_videos)
                for name in plan.stages}  # the same videos in the same order at every stage's clip shape
    captions = examples[plan.stages[0]]["captions"][first:end]
    texts = [cascade.encode(captions[a:b]) for a, b in local]
    cascade.release_text_encoder()  # every caption is encoded: T5's memory goes to the U-Nets

    def fixed_steps(name: str) -> int | None:
        return cascade.default_steps(name)[0] if cascade.stages[name].info.distilled else None

    def run(stage: Stage, setting: dict, inputs: list[torch.Tensor | None]) -> tuple[torch.Tensor, dict]:
        """Every batch of the stage at one setting; video i draws from its own streams (plan.seed, i, stage), so
        every setting samples from the same noise (paired comparisons). Seconds: the slowest rank's."""
        videos, nfe, start = [], 0, time.perf_counter()
        changes = {k: setting[k] for k in ("steps", "guidance", "oscillate", "aug")}
        for (a, b), (text, mask), low in zip(batches, texts, inputs):
            video, nfe = cascade.sample_stage(stage.name, text, mask, low, plan.seed, range(a, b), changes)
            videos.append(video.cpu())
        seconds = distributed.all_reduce_max(torch.tensor([time.perf_counter() - start]), ranks).item()
        if not videos:  # a rank without videos: the stage's shape, none of them
            videos.append(torch.zeros(0, 3, stage.frames, stage.height, stage.width))
        nfe = int(distributed.all_reduce_max(torch.tensor([nfe]), ranks).item())
        return torch.cat(videos), dict(nfe_per_video=nfe, seconds=seconds)

    # The recipe's cascade, once: the inputs of every stage's "cascade" mode.
    default_outputs: dict[str, torch.Tensor] = {}
    default_costs: dict[str, dict] = {}
    if "cascade" in plan.modes:
        previous: list[torch.Tensor | None] = [None] * len(batches)
        for stage in tqdm([recipe.stage(n) for n in needed], desc="eval: the recipe's cascade", disable=not progress):
            video, cost = run(stage, default_setting(stage, fixed_steps(stage.name)), previous)
            default_outputs[stage.name], default_costs[stage.name] = video, cost
            previous = [video[a:b] for a, b in local]

    jobs = []
    for name in plan.stages:
        stage = recipe.stage(name)
        modes = ["text"] if stage.kind == "base" else plan.modes
        for mode in modes:
            for setting in settings_grid(stage, plan, fixed_steps(name), cascade.guidance_range(name),
                                         any_steps=cascade.default_steps(name)[1]):
                jobs.append((stage, mode, setting))

    rows, ground_truth = [], {}
    for name in plan.stages:
        stage = recipe.stage(name)
        gt = examples[name]["video"][first:end].movedim(1, -1).numpy()  # (N, T, H, W, 3) uint8 as decoded
        ground_truth[name] = metrics.score(stage, gt, captions, reference=True, truth=gt)
    samples_dir = out / "samples"
    for stage, mode, setting in tqdm(jobs, desc="eval: stages x settings", disable=not progress):
        index = names.index(stage.name)
        if mode == "text":
            inputs = [None] * len(batches)
        elif mode == "gt":
            cond = examples[stage.name]["cond"][first:end].float() / 127.5 - 1.0
            inputs = [cond[a:b] for a, b in local]
        else:
            inputs = [default_outputs[names[index - 1]][a:b] for a, b in local]
        default = default_setting(stage, fixed_steps(stage.name))
        if mode == "cascade" and {k: v for k, v in setting.items() if k != "axes"} == default:
            video, cost = default_outputs[stage.name], default_costs[stage.name]  # same noise: the same samples
        else:
            video, cost = run(stage, setting, inputs)
        videos = to_uint8(video)
        truth = examples[stage.name]["video"][first:end].movedim(1, -1).numpy()
        row = dict(stage=stage.name, kind=stage.kind, mode=mode, **setting, **cost,
                   distilled=cascade.stages[stage.name].info.distilled,
                   **metrics.score(stage, videos, captions, truth=truth))
        if metrics.fvd_reason(stage):
            row["fvd_skipped"] = metrics.fvd_reason(stage)
        if samples and set(setting["axes"]) == set(AXES):  # keep the recipe setting's first samples for a look
            shown = distributed.gather({first + i: videos[i] for i in range(min(2 - first, len(videos)))}, ranks)
            for i, frames in sorted({i: v for part in shown or [] for i, v in part.items()}.items()):
                write_video(samples_dir / f"{stage.name}_{mode}_{i}.gif", frames, stage.fps)
        rows.append(row)

    if not ranks.is_zero:
        distributed.barrier(ranks)  # until rank 0 has written the report
        return None
    report = dict(
        recipe=recipe.name, checkpoints=str(checkpoints), data=dict(folder=str(folder), what=what,
                                                                   videos=plan.num_videos,
                                                                   skipped=examples[plan.stages[0]]["skipped"]),
        plan=asdict(plan), metrics=metrics.describe(),
        weights={n: cascade.stages[n].info.summary() for n in needed}, ground_truth=ground_truth, rows=rows,
        cascade_costs=default_costs, ranks=ranks.world, seconds=time.perf_counter() - started)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(markdown(report))
    report["plots"] = [str(p) for p in plot(report, out)]
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    _log_wandb(recipe, report, out)
    distributed.barrier(ranks)
    missing = [m for m in plan.metrics if not any(_has_metric(row, m) for row in rows)]
    if missing:  # check_metrics should have caught it: never report success without the metric asked for
        raise UserError(f"{', '.join(missing)} not computed for any stage or setting (see {out / 'eval.md'})", code=1)
    return report


def _has_metric(row: dict, name: str) -> bool:
    value = row.get(name)
    if name == "probes":
        return isinstance(value, dict) and any(v is not None for v in value.values())
    return value is not None


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------
def metric_columns(report: dict) -> list[tuple[str, str]]:
    """(column title, dotted key) of every metric present in the report's rows."""
    columns = []
    probes = [k for k in ("color", "shape", "direction", "background")
              if any(r.get("probes", {}).get(k) is not None for r in report["rows"])]
    columns += [(f"probe {k}", f"probes.{k}") for k in probes]
    if any("fvd" in r for r in report["rows"]):
        columns.append(("FVD", "fvd"))
    if any("clipsim" in r for r in report["rows"]):
        columns += [("CLIPSIM cos", "clipsim.cosine"), ("CLIPSIM x100", "clipsim.score")]
    for key, title in (("psnr_db", "PSNR dB"), ("ssim", "SSIM"), ("background", "background dev.")):
        if any(_get(r, f"quality.{key}") is not None for r in report["rows"]):
            columns.append((title, f"quality.{key}"))
    return columns


def _get(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table whose every row has the header's cells (a short row is padded with "–", a long one is a
    bug). Without rows or columns: no table."""
    if not header or not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in rows:
        if len(cells) > len(header):
            raise ValueError(f"a table row has {len(cells)} cells, the header {len(header)}")
        lines.append("| " + " | ".join([*cells, *["–"] * (len(header) - len(cells))]) + " |")
    return lines


def invalid_ceilings(report: dict) -> list[str]:
    """Where the ground truth is no ceiling: a probe that scores some stage's samples above its ground truth is not
    reading that resolution validly (the tiny cascade's 8x8 stages: base color 0.93 against 0.75). One line per
    stage and probe."""
    notes = []
    for stage, scores in report["ground_truth"].items():
        for field, truth in (scores.get("probes") or {}).items():
            best = max((_get(r, f"probes.{field}") for r in report["rows"] if r["stage"] == stage
                        and _get(r, f"probes.{field}") is not None), default=None)
            if truth is not None and best is not None and best > truth + 1e-9:
                notes.append(f"{stage} probe {field}: samples score up to {_fmt(best)}, the ground truth "
                             f"{_fmt(truth)}; the probe does not read {stage}'s resolution validly")
    return notes


def markdown(report: dict) -> str:
    columns = metric_columns(report)
    lines = [f"# Evaluation of `{report['recipe']}`", "",
             f"Weights: `{report['checkpoints']}`. Data: {report['data']['what']} (`{report['data']['folder']}`), "
             f"{report['data']['videos']} videos. Sweeps vary one axis at a time around the recipe's settings.", ""]
    for name, reason in report["metrics"].get("skipped", {}).items():  # eval.json of earlier versions
        lines.append(f"- {name} not computed: {reason}")
    computed = {key.split(".")[0] for _, key in columns}
    for name in report["metrics"].get("requested", []):
        if name not in computed:
            lines.append(f"- {name}: not computed for any row")
    if "fvd_protocol" in report["metrics"]:
        p = report["metrics"]["fvd_protocol"]
        lines.append(f"- FVD: I3D Kinetics-400 (TF-Hub weights), {p['frames']} frames from frame {p['offset']}, "
                     f"{p['resize']} resize to {p['resolution']}; against the ground truth at each stage's size.")
        without = {r["stage"]: r["fvd_skipped"] for r in report["rows"] if r.get("fvd_skipped")}
        for stage, reason in without.items():
            lines.append(f"- FVD not computed for {stage}: {reason}.")
    if "clip_model" in report["metrics"]:
        lines.append(f"- CLIPSIM: `{report['metrics']['clip_model']}`, mean over frames of the caption-frame cosine.")
    lines += ["", "## Ground truth (the ceiling of each metric)", ""]
    gt_columns = [c for c in columns if c[1] != "fvd"]  # FVD compares samples with the ground truth
    gt_table = table(["stage", *(c[0] for c in gt_columns)] if gt_columns else [],
                     [[name, *(_fmt(_get(scores, c[1])) for c in gt_columns)]
                      for name, scores in report["ground_truth"].items()])
    lines += gt_table or ["No metric scores the ground truth alone (FVD compares the samples with it)."]
    lines += [f"- not a ceiling: {note}" for note in invalid_ceilings(report)]
    rows = []
    for row in report["rows"]:
        guidance = _fmt(row["guidance"]) if row["oscillate"] is None else "osc({}, {})".format(*row["oscillate"])
        rows.append([f"{row['stage']}{' (distilled)' if row['distilled'] else ''}", row["mode"], str(row["steps"]),
                     guidance, _fmt(row["aug"]), str(row["nfe_per_video"]), f"{row['seconds']:.1f}",
                     *(_fmt(_get(row, c[1])) for c in columns)])
    lines += ["", "## Samples", ""]
    lines += table(["stage", "input", "steps", "guidance", "aug log-SNR", "NFE/video", "s", *(c[0] for c in columns)],
                   rows) or ["No samples."]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[Path]:
    """One PNG per swept axis (quality against steps, guidance, augmentation): a panel per metric, a line per
    stage and input mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = metric_columns(report)
    paths = []
    if not columns:
        return paths
    for axis, label in (("steps", "sampler steps"), ("guidance", "guidance weight"), ("aug", "input aug log-SNR")):
        rows = [r for r in report["rows"] if axis in r["axes"] and r[axis] is not None]
        lines = {}
        for r in rows:
            lines.setdefault((r["stage"], r["mode"]), []).append(r)
        if not any(len({r[axis] for r in group}) > 1 for group in lines.values()):
            continue  # nothing varies along this axis
        cols = min(len(columns), 3)
        rows_n = math.ceil(len(columns) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
        for ax, (title, key) in zip(axes.flat, columns):
            for (stage, mode), group in lines.items():
                points = sorted((r[axis], _get(r, key)) for r in group if _get(r, key) is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", linestyle="--" if mode == "gt" else "-",
                            label=f"{stage} ({mode})")
            ax.set_xlabel(label)
            ax.set_title(f"{title} ({BETTER.get(key.split('.')[-1], 'higher is better')})", fontsize=9)
            if axis == "steps":
                ax.set_xscale("log", base=2)
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # no "+5.9e3" offset labels
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(columns):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=7)
        fig.suptitle(f"{report['recipe']}: quality against {label}, each point the mean over "
                     f"{report['data']['videos']} videos (dashed: ground-truth input)")
        fig.tight_layout(rect=(0, 0.12, 1, 0.95))
        path = out / f"{axis}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _log_wandb(recipe: Recipe, report: dict, out: Path) -> None:
    w = recipe.logging.wandb
    if w is None:
        return
    import wandb

    columns = ["stage", "mode", "steps", "guidance", "aug", "nfe_per_video"] + [c[0] for c in metric_columns(report)]
    table = wandb.Table(columns=columns)
    for row in report["rows"]:
        table.add_data(row["stage"], row["mode"], row["steps"], row["guidance"], row["aug"], row["nfe_per_video"],
                       *[_get(row, c[1]) for c in metric_columns(report)])
    run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(out), name=f"{recipe.name}-eval",
                     job_type="eval", config=report["plan"])
    try:
        run.log({"eval/rows": table, **{f"eval/{Path(p).stem}": wandb.Image(p) for p in report["plots"]}})
    finally:
        run.finish()


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option's names (None when not given: the recipe's)."""
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def eval_command(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        plan = EvalPlan.from_recipe(
            recipe, num_videos=args.num_videos,
            steps=[int(v) for v in _floats(args.steps)] if args.steps is not None else None,
            guidance=_floats(args.guidance) if args.guidance is not None else None,
            aug=_floats(args.aug) if args.aug is not None else None,
            metrics=_names(args.metrics), stages=_names(args.stages), modes=_names(args.modes),
            batch_size=args.batch_size, seed=args.seed)
        out = args.out or recipe.run_folder() / "eval" / args.checkpoints.name
        report = evaluate(recipe, args.checkpoints, out, plan, device=args.device,
                          dtype=args.dtype or recipe.eval.dtype)
        from cascade import distributed

        distributed.destroy()  # every rank together, after evaluate's final barrier (not at interpreter exit)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, RecipeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report is None:  # not rank 0: rank 0 writes and prints
        return 0
    print((out / "eval.md").read_text())
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {len(report['plots'])} plots "
          f"({report['seconds']:.0f} s)")
    return 0
