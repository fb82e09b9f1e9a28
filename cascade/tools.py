"""The cascade as a video tool: image-to-video, long videos from a sequence of prompts (stories), text-guided
editing (SDEdit) and upscaling a user's own video. Pure PyTorch on `cascade.inference.Cascade` (no Lightning):

    from cascade.tools import image_to_video, story, edit, upscale

    result = image_to_video(cascade, image, ["a red circle moving right"])  # image: (H, W, 3) uint8
    result.final  # (N, 3, T, H, W) in [-1, 1]; result.videos[STAGE] for every stage run

Each returns a `Generation` whose `batches` hold the per-stage seconds and network evaluations that
`write_tool_report` writes as `cascade sample` does. A user's image or video is fitted to a stage as the data loader
fits training clips (resized to cover the stage's size, aspect kept, then centre-cropped) and resampled in time by
picking the frame nearest each of the stage's frame times. `*_command` are the `cascade` commands built on them.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from cascade.errors import UserError
from cascade.inference import Cascade, Generation

REGION_DRAWS = 4  # noise draws of the edit region (DiffEdit's mask)
UPSCALE_STRENGTH = 0.02
"""`upscale`'s default: refine the classical interpolation at a low noise level. Tiny cascade, 8 held-out clips from
8x8 at 2 fps to 64x64 at 16 fps, final PSNR against the exact render: 22.80 dB at 0.01, 22.79 at 0.02, 22.72 at 0.05,
21.21 at 1 (from noise); bicubic + linear 22.47. The SSR stages gain 0.3-0.5 dB on their input's interpolation.
tsr1 (4 -> 8 frames at 8x8) lost 0.2-0.3 dB to linear interpolation until it trained on a less noisy input
(tiny.yaml); now its one-step student is level with it and no strength puts it ahead (8 clips, 4 -> 8 frames,
against 31.51 dB: 31.51 at 0, 31.50 at 0.02, 31.54 at 0.05, 31.33 at 0.1, 29.71 at 0.4; without the consistency
correction 31.05 at 0.02): at 8x8 the object moves less than a pixel per frame, where linear interpolation is about
the best a frame interpolator can do on PSNR."""

__all__ = ["edit", "fit_frames", "image_to_video", "interpolate_video", "resample_video", "story", "upscale",
           "write_tool_report"]


# --- fitting a user's frames to a stage ---------------------------------------------------------------------------
def fit_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8: resized to cover (width, height) with the aspect kept
    (area averaging for whole factors, antialiased bilinear otherwise), then centre-cropped, as the loader does."""
    from cascade.data.clips import _cover, crop, downsample

    source = SimpleNamespace(codec_context=SimpleNamespace(width=frames.shape[2], height=frames.shape[1]))
    cover_w, cover_h = _cover(source, (width, height))
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # (3, T, h, w)
    video = downsample(video, video.shape[1], cover_h, cover_w).permute(1, 2, 3, 0).numpy()
    return np.ascontiguousarray(crop(video, width, height, None))


def _to_tensor(frames: np.ndarray) -> Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) float32 in [-1, 1]."""
    return (torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0).permute(3, 0, 1, 2)[None]


def frame_times(count: int, source_fps: float, fps: float, available: int) -> list[int]:
    """Source frame indices nearest the times i / fps, i < count, of a video at `source_fps` with `available`
    frames (the last frame where a time falls past it)."""
    return [min(round(i * source_fps / fps), available - 1) for i in range(count)]


def resample_video(video: np.ndarray, fps: float, frames: int, width: int, height: int, stage_fps: float) -> Tensor:
    """The first `frames` frames at `stage_fps` of `video` ((T, H, W, 3) uint8 at `fps`), fitted to width x height:
    (1, 3, frames, height, width) in [-1, 1]."""
    picked = video[frame_times(frames, fps, stage_fps, len(video))]
    return _to_tensor(fit_frames(picked, width, height))


def _check_video(video: np.ndarray, fps: float, what: str = "the video") -> None:
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
        raise UserError(f"{what}: expected (T, H, W, 3) uint8 frames with T >= 1, got {video.shape} {video.dtype}")
    if not fps > 0:
        raise UserError(f"{what}: its frame rate is {fps:g} fps; the tools need a positive one")


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise UserError(f"the image: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")


def interpolate_video(video: Tensor, frames: int, height: int, width: int) -> Tensor:
    """The classical upscaler on (B, C, T, h, w) in [-1, 1]: frames = r T by linear interpolation in time (input
    frame i at output frame r i, held past the last), then bicubic in space; clamped to [-1, 1]."""
    from cascade.sampling.cascade import spread_in_time

    x = spread_in_time(video, frames)
    if x.shape[-2:] != (height, width):
        batch = x.shape[0]
        flat = torch.nn.functional.interpolate(x.transpose(1, 2).flatten(0, 1), size=(height, width), mode="bicubic",
                                               align_corners=False)
        x = flat.unflatten(0, (batch, frames)).transpose(1, 2)
    return x.clamp(-1.0, 1.0)


# --- running stages ------------------------------------------------------------------------------------------------
def _chain(cascade: Cascade, up_to: str | None, start: str | None = None) -> list[str]:
    """The stages from `start` (default: the first) to `up_to` (default: the last), all loaded."""
    chain = [s.name for s in cascade.recipe.stages]
    for what, name in (("up_to", up_to), ("from", start)):
        if name is not None and name not in chain:
            raise UserError(f"{what} {name}: no such stage; stages are {', '.join(chain)}")
    first = 0 if start is None else chain.index(start)
    last = len(chain) - 1 if up_to is None else chain.index(up_to)
    if last < first:
        raise UserError(f"stage {up_to} comes before {start}; stages are {', '.join(chain)}")
    names = chain[first:last + 1]
    missing = [n for n in names if n not in cascade.stages]
    if missing:
        raise UserError(f"stages {', '.join(missing)} are not loaded (loaded: {', '.join(cascade.stages)})")
    return names


def _setting(reconstruction: float | None) -> dict:
    return {} if reconstruction is None else {"reconstruction": reconstruction}


def _stat(cascade: Cascade, name: str, nfe: int, seconds: float, frames: int, windows: int = 1) -> dict:
    stage = cascade.recipe.stage(name)
    return dict(stage=name, kind=stage.kind, steps=stage.sampler.steps, nfe_per_video=nfe * windows,
                windows=windows, frames=frames, seconds=seconds, shape=[frames, stage.width, stage.height, stage.fps])


class _WindowText:
    """A denoiser that gives the window it is called for its own text: `WindowedDenoiser` calls it once per window,
    in window order, every time it is called, so the n-th call is window n mod len(texts). The caption-dropped
    (unconditional) half of a guided batch keeps an empty text mask."""

    def __init__(self, denoiser, texts: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.denoiser, self.texts, self.calls = denoiser, list(texts), 0

    def __call__(self, z: Tensor, logsnr: Tensor, *, text: Tensor, text_mask: Tensor, **cond) -> Tensor:
        window_text, window_mask = self.texts[self.calls % len(self.texts)]
        self.calls += 1
        reps = text.shape[0] // window_text.shape[0]
        keep = text_mask.any(dim=1, keepdim=True)  # False on the unconditional rows
        return self.denoiser(z, logsnr, text=window_text.repeat(reps, 1, 1),
                             text_mask=window_mask.repeat(reps, 1) & keep, **cond)


def _run_long(cascade: Cascade, name: str, text: Tensor, mask: Tensor, previous: Tensor, seed: int,
              overlap: int | None, progress: bool, setting: Mapping | None = None,
              window_text=None, strength: float = 1.0, **extra) -> tuple[Tensor, dict]:
    """An SR stage over a lower-stage video `previous` (1, 3, T_in, h, w) of any length: windows of the stage's clip
    length when longer (overlap: default half a clip), the input padded by repeating its last frame when shorter
    (output trimmed back). `window_text(starts, total, window)` -> per-window (text, mask); None: `text` in all.
    strength < 1: the sampler starts from the input's classical interpolation (`interpolate_video`) noised to that
    level, as SDEdit does. Returns (video (1, 3, T_in * r, H, W), the stage's stats)."""
    from cascade.sampling.windows import WindowedDenoiser

    stage = cascade.recipe.stage(name)
    ratio = stage.frames // cascade.recipe.stage(stage.input).frames if stage.kind == "tsr" else 1
    total = previous.shape[2] * ratio
    spec = cascade.spec(name, setting)
    start, windows = time.perf_counter(), 1
    if total < stage.frames:  # shorter than a clip: pad the input with its last frame, trim the output
        pad = stage.frames // ratio - previous.shape[2]
        previous = torch.cat([previous, previous[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
    if strength < 1.0:  # SDEdit from the input's classical interpolation, at the length the sampler makes
        frames = previous.shape[2] * ratio
        extra = dict(extra, strength=strength, init=interpolate_video(previous, frames, stage.height, stage.width))
    if total < stage.frames:
        video, nfe = cascade.sample_stage(name, text, mask, previous, seed, [0], spec=spec, progress=progress, **extra)
        video = video[:, :, :total]
    else:
        denoiser = spec.denoiser
        overlap = stage.frames // 2 if overlap is None else overlap
        windowed = WindowedDenoiser(denoiser, window=stage.frames, overlap=overlap, ratio=ratio)
        starts = windowed.windows(total) if total > stage.frames else [0]
        if window_text is not None and total > stage.frames:
            windowed.denoiser = _WindowText(denoiser, window_text(starts, total, stage.frames))
        windows = len(starts)
        spec = dataclasses.replace(spec, frames=total, denoiser=windowed)
        video, nfe = cascade.sample_stage(name, text, mask, previous, seed, [0], spec=spec, progress=progress, **extra)
    return video.cpu(), _stat(cascade, name, nfe, time.perf_counter() - start, total, windows)


# --- the four tools ------------------------------------------------------------------------------------------------
@torch.no_grad()
def image_to_video(cascade: Cascade, image: np.ndarray, prompts: Sequence[str], *, seed: int = 0,
                   batch_size: int = 4, up_to: str | None = None, reconstruction: float | None = None,
                   keep_known: bool = True, progress: bool = True) -> Generation:
    """A video per prompt that starts with `image` ((H, W, 3) uint8, any size): at every stage the image, fitted to
    the stage's size, is the known first frame (known_mask = first_frames(B, T, 1)): the network's known-frame input
    where it was trained with one, else reconstruction guidance of weight `reconstruction` (default: the recipe's).
    With `keep_known` (default) a network that takes the image as input also has its prediction of the first frame
    replaced by it at every step (the replacement method), so the video starts with exactly the image; False shows
    what the network alone makes of it. Prompt k is video k of the seed's random streams, as in `Cascade.generate`."""
    from cascade.diffusion.inputs import first_frames

    _check_image(image)
    names, prompts = _chain(cascade, up_to), list(prompts)
    out, pieces = Generation(prompts, videos={}), {name: [] for name in names}
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        text, mask = cascade.encode(batch)
        indices, previous, stats, begin = list(range(first, first + len(batch))), None, [], time.perf_counter()
        for name in names:
            stage = cascade.recipe.stage(name)
            known = torch.zeros(len(batch), 3, stage.frames, stage.height, stage.width)
            known[:, :, :1] = _to_tensor(fit_frames(image[None], stage.width, stage.height))
            start = time.perf_counter()
            previous, nfe = cascade.sample_stage(name, text, mask, previous, seed, indices, _setting(reconstruction),
                                                 progress, known=known, keep_known=keep_known,
                                                 known_mask=first_frames(len(batch), stage.frames, 1))
            stats.append(_stat(cascade, name, nfe, time.perf_counter() - start, stage.frames))
            pieces[name].append(previous.cpu())
        out.batches.append(dict(prompts=batch, seconds=time.perf_counter() - begin, stages=stats))
    out.videos = {name: torch.cat(parts) for name, parts in pieces.items() if parts}
    return out


def story_segments(frames: int, context_frames: int, count: int) -> list[int]:
    """The first frame of each of `count` base segments of `frames` frames in the long video, each after the first
    starting with the last `context_frames` frames of the one before: F + (n - 1)(F - k) frames in all."""
    return [0] + [frames + i * (frames - context_frames) - context_frames for i in range(count - 1)]


@torch.no_grad()
def story(cascade: Cascade, prompts: Sequence[str], *, context_frames: int = 1, seed: int = 0,
          overlap: int | None = None, up_to: str | None = None, reconstruction: float | None = None,
          image: np.ndarray | None = None, progress: bool = True) -> Generation:
    """One long video from a sequence of prompts, one base segment each. Segment 1 is the base sample of prompt 1;
    segment i is sampled with prompt i and the last `context_frames` (k) frames of the video so far as its known
    first frames, and only its new frames are appended: the long base video has F + (n - 1)(F - k) frames (segment
    i draws from random stream i). Every SR stage then runs over the whole long video with a `WindowedDenoiser`
    (windows of the stage's clip length, `overlap` frames shared: default half a clip, aligned to a TSR's ratio;
    memory bounded by one window) and, when there are several windows, each window gets the text of the prompt
    whose new frames hold the window's centre frame, so the detail added at
    higher resolutions follows the story. `image` ((H, W, 3) uint8, any size), when given, is the known first
    frame of segment 1 at the base (fitted to its size), as in `image_to_video`; the SR stages upsample the base's
    video as for any story. `Generation.prompts` is the one story, joined with " | "."""
    from cascade.diffusion.inputs import first_frames

    prompts = list(prompts)
    if not prompts:
        raise UserError("a story needs at least one prompt")
    names = _chain(cascade, up_to)
    base = cascade.recipe.stage(names[0])
    if not 1 <= context_frames < base.frames:
        raise UserError(f"--context-frames {context_frames}: must be at least 1 and less than the base's "
                        f"{base.frames} frames")
    if image is not None:
        _check_image(image)
    texts, masks = cascade.encode(prompts)
    setting, stats, begin = _setting(reconstruction), [], time.perf_counter()
    video, nfe_total, start = None, 0, time.perf_counter()
    for i in range(len(prompts)):
        extra = {}
        if video is None and image is not None:
            known = torch.zeros(1, 3, base.frames, base.height, base.width)
            known[:, :, :1] = _to_tensor(fit_frames(image[None], base.width, base.height))
            extra = dict(known=known, known_mask=first_frames(1, base.frames, 1))
        if video is not None:
            known = torch.zeros(1, 3, base.frames, base.height, base.width)
            known[:, :, :context_frames] = video[:, :, -context_frames:]
            extra = dict(known=known, known_mask=first_frames(1, base.frames, context_frames))
        segment, nfe = cascade.sample_stage(base.name, texts[i:i + 1], masks[i:i + 1], None, seed, [i], setting,
                                            progress, **extra)
        segment, nfe_total = segment.cpu(), nfe_total + nfe
        video = segment if video is None else torch.cat([video, segment[:, :, context_frames:]], dim=2)
    stats.append(_stat(cascade, base.name, nfe_total, time.perf_counter() - start, video.shape[2]))
    videos = {base.name: video}
    firsts = story_segments(base.frames, context_frames, len(prompts))

    def window_text(starts: list[int], total: int, window: int) -> list[tuple[Tensor, Tensor]]:
        scale = total / videos[base.name].shape[2]  # output frames per base frame
        out = []
        for a in starts:
            centre = (a + (window - 1) / 2) / scale  # in base frames
            segment = max(i for i, f in enumerate(firsts) if f + (i > 0) * context_frames <= centre)
            out.append((texts[segment:segment + 1], masks[segment:segment + 1]))
        return out

    previous = video
    for name in names[1:]:
        previous, stat = _run_long(cascade, name, texts[:1], masks[:1], previous, seed, overlap, progress,
                                   setting, window_text=window_text)
        videos[name] = previous
        stats.append(stat)
    joined = " | ".join(prompts)
    out = Generation([joined], videos=videos)
    out.batches.append(dict(prompts=[joined], seconds=time.perf_counter() - begin, stages=stats))
    return out


def check_edit(base, video: np.ndarray, fps: float, strength: float, what: str = "the video") -> None:
    """A UserError unless `strength` is in [0, 1] and `video` lasts at least the `base` stage's clip."""
    _check_video(video, fps, what)
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"--strength {strength:g}: must be in [0, 1] (0 keeps the video, 1 ignores it)")
    if round((base.frames - 1) * fps / base.fps) >= len(video):  # the base's last frame time is past the end
        raise UserError(f"{what} is {len(video)} frames at {fps:g} fps ({len(video) / fps:.2f} s), shorter than "
                        f"the base stage's clip ({base.frames} frames at {base.fps:g} fps = "
                        f"{base.frames / base.fps:g} s)")


STRUCTURES = ("input", "edit")  # edit(structure=): whose edges and positions the edited video has


@torch.no_grad()
def edit(cascade: Cascade, video: np.ndarray, fps: float, prompt: str, *, strength: float = 0.5, seed: int = 0,
         up_to: str | None = None, source_prompt: str | None = None, region: bool = True,
         structure: str = "input", progress: bool = True) -> Generation:
    """SDEdit (Meng et al. 2022) through the cascade: `video` ((T, H, W, 3) uint8 at `fps`) is resampled to every
    stage (the stage's frames at its fps from the start, fitted to its size); the base is denoised from the input
    noised to the level t = `strength`, and every SR stage is conditioned on the edited lower stage and starts at
    the same strength from the input at its own resolution carried onto the edit (below). Strength 0 returns the
    resampled input; the input must last at least the base's clip (frames / fps).

    `structure`: whose edges and positions the result has.
    - "input" (default): after each stage the edit is carried onto the input at that stage as local affine colour
      maps (the colour guided filter, `cascade.sampling.transfer`), and the next stage starts from the input with
      those maps applied (upsampled). Appearance edits (color, light, texture on the input's edges) keep the input's
      trajectory exactly; an edit that draws a new shape loses it. Strength 1 then takes all colours from a fresh
      sample, on the input's structure.
    - "edit": what the sampler drew; the next stage starts from x_in + U(edited lower - x_in at the lower stage), U
      the network's upsampling of its input (its time is repeated frames, so a moving object's colour lags within
      each group of frames). Strength 1 ignores the input.

    `source_prompt` (what the input shows; "" for none): each stage brings its start to the strength's noise level by
    DDIM inversion under that caption (`cascade.sampling.cascade.ddim_invert`) and samples back with DDIM, instead
    of adding random noise; with `region` (default) the first stage also finds where the new caption changes the
    video (DiffEdit's mask, `CascadeSampler.edit_region`) and every stage keeps the input outside it (the mask
    carried up by interpolation). The inversion costs as many network evaluations again, the mask 8 more.

    Tiny cascade (two demo runs' distilled stages), 8 held-out videos with the color word changed, inverted under
    their caption, strength 0.5: the new color in all 8; every frame's centroid within 2 px at 64x64 of the input's
    in 8 of 8 with structure "input" in both runs (mean 0.04-0.06 px; on 16 videos 15 of 16, new color 14 of 16),
    0 of 8 with "edit" (mean 3.2 px). Maps fitted per frame instead of over neighbouring frames: 7 of 8 in one run
    (the sampler drew one frame's object dim)."""
    from cascade.nn.unet import upsample_condition
    from cascade.sampling.transfer import apply_maps, fit_maps, transfer_radius, upsample_maps

    names = _chain(cascade, up_to)
    check_edit(cascade.recipe.stage(names[0]), video, fps, strength)
    if structure not in STRUCTURES:  # the CLI offers only these
        raise UserError(f"--structure {structure}: must be one of {', '.join(STRUCTURES)}")
    text, mask = cascade.encode([prompt])
    invert, changed = {}, None
    if source_prompt is not None:  # DDIM inversion under the source's caption ("": unconditional)
        source_text, source_mask = cascade.encode([source_prompt])
        source_mask = source_mask & bool(source_prompt.strip())
        invert = dict(invert_text=(source_text, source_mask))
    out, previous, stats, begin = Generation([prompt], videos={}), None, [], time.perf_counter()
    lower, maps = None, None  # the input at the previous stage's size and fps; its colour maps to the edit
    for name in names:
        stage = cascade.recipe.stage(name)
        source = resample_video(video, fps, stage.frames, stage.width, stage.height, stage.fps)
        init = source
        if maps is not None:  # the lower stage's colour maps applied to the input at this stage
            init = apply_maps(upsample_maps(maps, stage.frames, stage.height, stage.width), source).clamp(-1.0, 1.0)
        elif previous is not None:  # the input's detail on the edited lower stage: x_in + U(edited - x_in at low res)
            shift = upsample_condition(previous - lower, stage.frames, stage.height, stage.width)
            init = (source + shift).clamp(-1.0, 1.0)
        lower = source
        start = time.perf_counter()
        where, nfe_region = {}, 0
        if invert and region and strength > 0:  # DiffEdit: found at the first stage, carried up to the others
            if changed is None:
                changed = cascade.edit_region(name, text, mask, source_text, source_mask, source, None, seed, [0],
                                              draws=REGION_DRAWS)
                nfe_region = 2 * REGION_DRAWS
            up = interpolate_video(changed.cpu(), stage.frames, stage.height, stage.width)
            where = dict(edit_region=(up > 0.5).float())
        previous, nfe = cascade.sample_stage(name, text, mask, previous, seed, [0], None, progress, init=init,
                                             strength=strength, **invert, **where)
        nfe += nfe_region
        previous = previous.cpu()
        if structure == "input" and strength > 0:  # the edit's colours on the input's structure
            maps = fit_maps(source, previous, transfer_radius(stage.height, stage.width))
            kept = apply_maps(maps, source).clamp(-1.0, 1.0)
            inside = where["edit_region"].cpu() if where else 1.0
            previous = inside * kept + (1 - inside) * previous
        out.videos[name] = previous
        stats.append(_stat(cascade, name, nfe, time.perf_counter() - start, stage.frames))
    out.batches.append(dict(prompts=[prompt], seconds=time.perf_counter() - begin, stages=stats))
    return out


@torch.no_grad()
def upscale(cascade: Cascade, video: np.ndarray, fps: float, *, from_stage: str, to_stage: str | None = None,
            prompt: str = "", seed: int = 0, progress: bool = True, overlap: int | None = None,
            consistency: float = 1.0, strength: float = UPSCALE_STRENGTH) -> Generation:
    """The user's video ((T, H, W, 3) uint8 at `fps`, any length) through the SR stages `from_stage`..`to_stage`
    (default: the last): brought to `from_stage`'s input (its input stage's size and fps, keeping the duration),
    then every stage runs over it with windows of its clip length (`overlap`: default half a clip), or, shorter
    than a clip, on the input padded with its last frame and trimmed back. `consistency` (default 1, 0: off) corrects
    each sampling step toward agreeing with the stage's input at the input's size and fps
    (`cascade.sampling.cascade.input_consistency_guided`), so the video's own frames and colours are kept rather
    than re-imagined from the noise-augmented input. `strength` < 1 (default `UPSCALE_STRENGTH`): each stage starts
    from its input's classical interpolation (`interpolate_video`) noised to that level, as SDEdit does, and refines
    it; 1 samples from pure noise. `videos` holds the resampled input under the input stage's name, then each
    stage's output."""
    _check_video(video, fps)
    chain = [s.name for s in cascade.recipe.stages]
    if from_stage in chain and cascade.recipe.stage(from_stage).kind == "base":
        raise UserError(f"--from {from_stage}: the base stage makes videos from text; upscale starts at a "
                        f"super-resolution stage ({', '.join(chain[1:])})")
    names = _chain(cascade, to_stage, from_stage)
    source = cascade.recipe.stage(cascade.recipe.stage(from_stage).input)
    count = max(1, round(len(video) * source.fps / fps))  # the input's duration at the input stage's fps
    previous = resample_video(video, fps, count, source.width, source.height, source.fps)
    text, mask = cascade.encode([prompt])
    out = Generation([prompt], videos={source.name: previous})
    stats, begin = [], time.perf_counter()
    for name in names:
        previous, stat = _run_long(cascade, name, text, mask, previous, seed, overlap, progress,
                                   consistency=consistency, strength=strength)
        out.videos[name] = previous
        stats.append(stat)
    out.batches.append(dict(prompts=[prompt], seconds=time.perf_counter() - begin, stages=stats))
    return out


# --- reports and commands ------------------------------------------------------------------------------------------
def write_tool_report(cascade: Cascade, generation: Generation, out: str | Path, *, tool: str, settings: Mapping,
                      seed: int) -> dict:
    """Write a tool's videos and report as `write_samples` does: the final video (`out`, .mp4 or .gif; OUT_NNN.ext
    for several), every stage's output (OUT_stages/NNN_STAGE.mp4) and OUT.json (the tool and its settings, seed,
    weights, stage settings, per-stage seconds and network evaluations per video). Returns the report."""
    from cascade.data.video import to_uint8, write_video
    from cascade.inference import check_video_path

    out = check_video_path(out)
    recipe, videos = cascade.recipe, {name: to_uint8(v) for name, v in generation.videos.items()}
    sampled = [s["stage"] for s in generation.batches[0]["stages"]] if generation.batches else list(videos)
    stage_dir = out.with_name(out.stem + "_stages")
    loaded = cascade.stages[sampled[0]]
    report = dict(recipe=recipe.name, tool=tool, tool_settings=dict(settings), prompts=generation.prompts, seed=seed,
                  checkpoints=None if loaded.path is None else str(loaded.path.parent),
                  weights={n: cascade.stages[n].info.summary() for n in sampled},
                  settings={n: recipe.stage(n).model_dump(include={"sampler", "guidance", "augmentation"})
                            for n in sampled},
                  batches=generation.batches, outputs=[])
    last = recipe.stage(list(videos)[-1])
    for index, prompt in enumerate(generation.prompts):
        final = out if len(generation.prompts) == 1 else out.with_name(f"{out.stem}_{index:03d}{out.suffix}")
        write_video(final, videos[last.name][index], last.fps)
        stages = {}
        for name, video in videos.items():
            stages[name] = str(write_video(stage_dir / f"{index:03d}_{name}.mp4", video[index], recipe.stage(name).fps))
        report["outputs"].append(dict(prompt=prompt, video=str(final), stages=stages,
                                      frames=int(videos[last.name].shape[1]), fps=last.fps))
    totals: dict[str, dict] = {}
    for batch in generation.batches:
        for s in batch["stages"]:
            total = totals.setdefault(s["stage"], dict(nfe_per_video=s["nfe_per_video"], seconds=0.0,
                                                       windows=s.get("windows", 1)))
            total["seconds"] += s["seconds"]
    report["per_stage"] = totals
    report["nfe_per_video"] = sum(t["nfe_per_video"] for t in totals.values())
    report["environment"] = dict(python=platform.python_version(), torch=torch.__version__,
                                 threads=torch.get_num_threads(), device=str(cascade.device), ranks=1)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict, out: Path) -> None:
    """The summary of a sample or tool report: per stage the network evaluations per video (and, for a tool, the
    windows) and seconds; the files written."""
    windows = all("windows" in s for s in report["per_stage"].values())
    print(f"{'stage':<8} {'NFE/video':>9}" + (f" {'windows':>7}" if windows else "") + f" {'seconds':>8}")
    for name, s in report["per_stage"].items():
        print(f"{name:<8} {s['nfe_per_video']:>9}" + (f" {s['windows']:>7}" if windows else "")
              + f" {s['seconds']:>8.1f}")
    print(f"total NFE per video: {report['nfe_per_video']}")
    for o in report["outputs"]:
        shape = f"{o['frames']} frames at {o['fps']:g} fps; " if "frames" in o else ""
        print(f"wrote {o['video']}  ({shape}{o['prompt']})")
    print(f"report: {Path(out).with_suffix('.json')}")


def read_user_video(path: Path, what: str = "video") -> tuple[np.ndarray, float]:
    """Frames (T, H, W, 3) uint8 and fps of a user's file; a UserError naming it when it is missing, unreadable or
    empty. An audio stream is dropped with a warning."""
    import av

    from cascade.data.video import has_audio, read_video

    if not Path(path).is_file():
        raise UserError(f"{path}: no such {what} file")
    try:
        frames, fps = read_video(path)
        audio = has_audio(path)
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as error:
        raise UserError(f"{path}: not a readable {what} ({type(error).__name__}: {error})") from None
    if len(frames) == 0:
        raise UserError(f"{path}: the {what} has no frames")
    if audio:
        print(f"warning: {path} has an audio stream; audio dropped (the output is video only)", file=sys.stderr)
    return frames, fps


def _stage_names(recipe, start: str | None, end: str | None, options: tuple[str, str]) -> list[str]:
    """The stages start..end of the recipe; a UserError naming the option for an unknown stage or a wrong order."""
    chain = [s.name for s in recipe.stages]
    for option, name in zip(options, (start, end)):
        if name is not None and name not in chain:
            raise UserError(f"{option} {name}: no such stage; stages are {', '.join(chain)}")
    first, last = chain.index(start) if start else 0, chain.index(end) if end else len(chain) - 1
    if last < first:
        raise UserError(f"{options[1]} {end} comes before {options[0]} {start}; stages are {', '.join(chain)}")
    return chain[first:last + 1]


def run_tool_command(args, tool: str, prepare) -> int:
    """A tool's command: check the device and --out, load the recipe, `prepare(recipe)` -> (stage names, run) checks
    and reads the user's inputs before any work, then the stages are loaded, `run(cascade)` -> (Generation, tool
    settings) samples, and the videos and report are written and summarised."""
    from cascade.distributed import launched
    from cascade.inference import check_device, check_video_path
    from cascade.recipe import RecipeError, load_recipe

    rank, world, _ = launched()
    if world > 1:  # every rank would do the same work and write the same files
        if rank == 0:
            print(f"error: cascade {tool.replace('_', '-')}: runs in one process, but the launcher started {world} "
                  f"(torchrun / srun tasks); launch it once (cascade sample --prompts and cascade eval split work "
                  f"across ranks)", file=sys.stderr)
        return 2
    check_device(args.device)  # before any work
    try:
        check_video_path(args.out)
        recipe = load_recipe(args.recipe, args.overrides)
        names, run = prepare(recipe)
        cascade = Cascade.from_recipe(recipe, args.checkpoints, stages=names, device=args.device, dtype=args.dtype)
        generation, settings = run(cascade)
        report = write_tool_report(cascade, generation, args.out, tool=tool, settings=settings, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, RecipeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report, args.out)
    return 0


def sample_tool_command(args, prompts: list[str]) -> int:
    """`cascade sample --image IMG` (a video per prompt, starting with the image) or `cascade sample --story` (the
    prompts are the segments of one long video; with --image, its first segment starts from the image)."""
    def prepare(recipe):
        names = _stage_names(recipe, None, args.up_to, ("", "--up-to"))
        image = None if args.image is None else read_user_video(args.image, "image")[0][0]
        shown = {} if image is None else dict(image=str(args.image), image_size=[image.shape[1], image.shape[0]])
        if not args.story:
            def run(cascade):
                return (image_to_video(cascade, image, prompts, seed=args.seed, batch_size=args.batch_size,
                                       up_to=args.up_to, reconstruction=args.reconstruction_weight),
                        dict(**shown, reconstruction_weight=args.reconstruction_weight))
        else:  # with --image: the story's first segment starts from it
            def run(cascade):
                return (story(cascade, prompts, context_frames=args.context_frames, seed=args.seed, up_to=args.up_to,
                              reconstruction=args.reconstruction_weight, image=image),
                        dict(segments=prompts, context_frames=args.context_frames, **shown,
                             reconstruction_weight=args.reconstruction_weight))
        return names, run

    return run_tool_command(args, "story" if args.story else "image_to_video", prepare)


def _video_settings(path: Path, video: np.ndarray, fps: float) -> dict:
    return dict(input=str(path), input_fps=fps, input_size=[video.shape[2], video.shape[1]], input_frames=len(video))


def edit_command(args) -> int:
    """`cascade edit VIDEO --prompt P [--source-prompt Q] --strength S --out OUT.mp4`."""
    def prepare(recipe):
        names = _stage_names(recipe, None, args.up_to, ("", "--up-to"))
        video, fps = read_user_video(args.video)
        check_edit(recipe.stage(names[0]), video, fps, args.strength, str(args.video))

        def run(cascade):
            return (edit(cascade, video, fps, args.prompt, strength=args.strength, seed=args.seed, up_to=args.up_to,
                         source_prompt=args.source_prompt, region=args.region, structure=args.structure),
                    dict(strength=args.strength, source_prompt=args.source_prompt, structure=args.structure,
                         region=args.region and args.source_prompt is not None,
                         **_video_settings(args.video, video, fps)))
        return names, run

    return run_tool_command(args, "edit", prepare)


def upscale_command(args) -> int:
    """`cascade upscale VIDEO --from STAGE [--to STAGE] --out OUT.mp4`."""
    def prepare(recipe):
        names = _stage_names(recipe, args.from_stage, args.to_stage, ("--from", "--to"))
        if recipe.stage(names[0]).kind == "base":
            raise UserError(f"--from {names[0]}: the base stage makes videos from text; upscale starts at a "
                            f"super-resolution stage ({', '.join(s.name for s in recipe.stages[1:])})")
        video, fps = read_user_video(args.video)
        strength = UPSCALE_STRENGTH if args.strength is None else args.strength
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"--strength {strength:g}: must be in [0, 1] (0 keeps the interpolated video, 1 ignores "
                            f"it)")

        def run(cascade):
            return (upscale(cascade, video, fps, from_stage=args.from_stage, to_stage=args.to_stage,
                            prompt=args.prompt, seed=args.seed, overlap=args.overlap, consistency=args.consistency,
                            strength=strength),
                    dict(from_stage=args.from_stage, to_stage=names[-1], overlap=args.overlap,
                         consistency=args.consistency, strength=strength,
                         **_video_settings(args.video, video, fps)))
        return names, run

    return run_tool_command(args, "upscale", prepare)
