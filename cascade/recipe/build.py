"""Builders: turn recipe sections into keyword arguments and objects. Classes never see the recipe."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from cascade.recipe.schema import Recipe, Stage


def unet_kwargs(stage: Stage, text_dim: int) -> dict:
    """Keyword arguments of `cascade.nn.VideoUNet` for one stage."""
    u = stage.unet
    return dict(
        in_channels=3, out_channels=3, cond_channels=0 if stage.kind == "base" else 3,
        channels=u.channels, channel_mults=tuple(u.channel_mults), num_res_blocks=tuple(u.num_res_blocks),
        spatial_attention=tuple(u.spatial_attention), cross_attention=tuple(u.cross_attention),
        temporal=tuple(u.temporal), head_dim=u.head_dim, text_dim=text_dim, context_dim=u.context_dim,
        dropout=u.dropout, fps_conditioning=True, aug_conditioning=stage.kind != "base",
        max_temporal_distance=u.max_temporal_distance, checkpointing=u.checkpointing,
        frame_time_conditioning=u.frame_time, known_frames=stage.known_frames is not None,
        residual=stage.diffusion.residual,
    )


def build_unet(stage: Stage, recipe: Recipe, device: str | torch.device | None = None, **extra):
    """The stage's bare network. `device="meta"` builds it without memory (parameter counts)."""
    from cascade.nn import VideoUNet

    with torch.device(device or "cpu"):
        return VideoUNet(**unet_kwargs(stage, recipe.text_encoder.dim), **extra)


def count_parameters(stage: Stage, recipe: Recipe) -> int:
    """Parameters of the stage's U-Net without allocating them, at a cost that does not grow with num_res_blocks.

    The units of one level are identical (`VideoUNet` builds each as unit(width, width, level) on both paths), so a
    meta-device build with one unit per level, plus (num_res_blocks[i] - 1) times level i's first down and up unit,
    is the whole count (tests/recipe/test_fuzz.py checks it against full builds)."""
    levels = len(stage.unet.channel_mults)
    one = stage.model_copy(update=dict(unet=stage.unet.model_copy(update=dict(num_res_blocks=[1] * levels))))
    net = build_unet(one, recipe, device="meta")
    total = _numel(net)
    for level, blocks in enumerate(stage.unet.num_res_blocks):  # net.up runs innermost level first
        total += (blocks - 1) * (_numel(net.down[level][0]) + _numel(net.up[levels - 1 - level][0]))
    return total


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_schedule(stage: Stage):
    """The stage's log-SNR schedule; a resolution-shifted cosine when `shift_base_resolution` is set."""
    from cascade.diffusion import CosineSchedule, resolution_shift

    s = stage.diffusion.schedule
    shift = 0.0
    if s.shift_base_resolution is not None:  # a W x H frame counts as the square of the same pixel count
        shift = resolution_shift(math.sqrt(stage.width * stage.height), s.shift_base_resolution)
    return CosineSchedule(logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max, shift=shift)


def build_known_frames(stage: Stage):
    """The training draw of known frames (`cascade.diffusion.KnownFrameDraw`), None when the stage has none."""
    from cascade.diffusion.inputs import KnownFrameDraw

    k = stage.known_frames
    return None if k is None else KnownFrameDraw(k.first_prob, k.clip_prob, k.clip_frames)


def build_augmentation(stage: Stage):
    from cascade.diffusion import NoiseAugmentation

    a = stage.augmentation
    if a is None:
        return None
    return NoiseAugmentation(a.logsnr_min, a.logsnr_max, sample_logsnr=a.sample_logsnr)


_RECIPE = object()  # "the recipe's value" where None has a meaning of its own


def build_stage_spec(stage: Stage, net, *, guidance_distilled: bool = False, steps: int | None = None,
                     sampler: str | None = None, guidance: float | None = None, oscillate=_RECIPE,
                     aug_logsnr: float | None = None, frames: int | None = None, width: int | None = None,
                     height: int | None = None):
    """A `StageSpec` for the cascade sampler from a stage recipe and its network, with the recipe's sampling
    settings unless given: steps, sampler, guidance weight, oscillate ((high, low) or None for constant guidance),
    the input's augmentation log-SNR, and the sampled size (e.g. the training crop)."""
    from cascade.diffusion import Denoiser
    from cascade.sampling.cascade import StageSpec

    g = stage.guidance
    if oscillate is _RECIPE:
        oscillate = None if g.oscillate is None else (g.oscillate.high, g.oscillate.low)
        constant_steps = 0 if g.oscillate is None else g.oscillate.constant_steps
    else:
        constant_steps = 0 if oscillate is None or g.oscillate is None else g.oscillate.constant_steps
    augmentation = build_augmentation(stage)
    if aug_logsnr is not None and augmentation is not None:
        augmentation = replace(augmentation, sample_logsnr=aug_logsnr)
    return StageSpec(
        name=stage.name, kind=stage.kind, frames=frames or stage.frames, height=height or stage.height,
        width=width or stage.width, fps=stage.fps, denoiser=Denoiser(net, stage.diffusion.parameterization),
        schedule=build_schedule(stage), sampler=sampler or stage.sampler.kind, steps=steps or stage.sampler.steps,
        gamma=stage.sampler.gamma, guidance=g.weight if guidance is None else guidance, oscillate=oscillate,
        constant_steps=constant_steps, dynamic_threshold=g.dynamic_threshold, augmentation=augmentation,
        guidance_distilled=guidance_distilled, known_frames=stage.known_frames is not None,
    )


def build_distillation_rounds(stage: Stage):
    """The stage's distillation rounds (`cascade.distill.Round`): guidance distillation when `distill.guidance` is
    set, then the progressive halvings or (`distill.method: consistency`) one consistency-distillation round."""
    from cascade.distill import distillation_rounds

    d = stage.distill
    g, p, c = d.guidance, d.progressive, d.consistency
    consistency = None if d.method != "consistency" else dict(
        steps=c.steps, substeps=c.substeps, max_steps=c.max_steps, lr=c.lr, target_ema=c.target_ema,
        weighting=c.loss_weighting)
    return distillation_rounds(build_schedule(stage), start_steps=p.start_steps, end_steps=p.end_steps,
                               steps_per_round=p.steps_per_round, lr=p.lr, weighting=p.loss_weighting,
                               guidance=None if g is None else (g.w_min, g.w_max),
                               guidance_steps=None if g is None else g.max_steps,
                               guidance_lr=None if g is None else g.lr, consistency=consistency)


def dataset_folder(recipe: Recipe) -> str:
    """The folder of shards (with manifest.json) every stage reads."""
    return recipe.data.shards if recipe.data.kind == "shards" else recipe.data.root


def clip_spec(stage: Stage, recipe: Recipe):
    """What the loader cuts for a stage: its clip, and for super-resolution its input stage's view of the clip."""
    from cascade.data.clips import ClipSpec

    source = recipe.stage(stage.input) if stage.input else None
    crop = stage.train.crop
    return ClipSpec(frames=stage.frames, width=stage.width, height=stage.height, fps=stage.fps,
                    cond_frames=source.frames if source else None, cond_width=source.width if source else None,
                    cond_height=source.height if source else None,
                    crop_width=crop.width if crop else None, crop_height=crop.height if crop else None,
                    crop_frames=stage.train.crop_frames, clip_start=stage.train.clip_start)


def embeddings_folder(recipe: Recipe) -> str:
    """The dataset's T5 embedding cache: data.embeddings, default DATASET/embeddings."""
    from pathlib import Path

    return recipe.data.embeddings or str(Path(dataset_folder(recipe)) / "embeddings")


def build_text_source(recipe: Recipe):
    """Caption embeddings: the dataset's T5 cache (data.embeddings, default DATASET/embeddings) when built,
    otherwise the recipe's encoder on the fly. A picklable factory, called once per DataLoader worker."""
    import functools

    from cascade.data.embed import TextSource, encoder_factory

    te = recipe.text_encoder
    return functools.partial(TextSource, embeddings_folder(recipe), encoder_factory(te.path, te.max_tokens, te.dtype),
                             te.max_tokens)


def build_stage_loader(stage: Stage, recipe: Recipe, rank: int = 0, world_size: int = 1, text_source=None,
                       epochs: int | None = None):
    """The stage's resumable loader over the recipe's dataset. `text_source=None` leaves captions as text;
    pass `build_text_source(recipe)` for T5 embeddings in every batch."""
    from cascade.data.loader import LoaderConfig, StageDataset, StageLoader

    config = LoaderConfig(batch_size=stage.train.batch_size, seed=stage.train.seed,
                          image_fraction=stage.train.image_fraction, max_bad_fraction=recipe.data.max_bad_fraction,
                          window=recipe.data.bad_window, rank=rank, world_size=world_size, epochs=epochs,
                          decode_cache_bytes=recipe.data.decode_cache_mb * 2**20)
    dataset = StageDataset(dataset_folder(recipe), clip_spec(stage, recipe), config, text_source=text_source)
    return StageLoader(dataset, num_workers=recipe.data.num_workers)
