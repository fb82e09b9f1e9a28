"""Checks that span fields and stages: the shapes of a cascade must chain."""

from __future__ import annotations

import math

from cascade.recipe.schema import FVD_MIN_FRAMES, Recipe


def cascade_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Return (field path, problem) for every inconsistency between stages; empty when the cascade chains."""
    problems: list[tuple[str, str]] = []
    seen: dict[str, object] = {}
    for index, stage in enumerate(recipe.stages):
        at = f"stages.{stage.name}"
        if stage.name in seen:
            problems.append((f"{at}.name", f"stage name {stage.name!r} is used twice"))
        factor = stage.unet.downsample_factor
        for axis in ("width", "height"):
            if getattr(stage, axis) % factor:
                problems.append((f"{at}.{axis}", f"{axis} {getattr(stage, axis)} is not divisible by the U-Net's "
                                 f"downsampling factor {factor} ({len(stage.unet.channel_mults)} levels)"))
        crop = stage.train.crop
        if crop is not None:
            for axis in ("width", "height"):
                value = getattr(crop, axis)
                if value % factor:
                    problems.append((f"{at}.train.crop.{axis}", f"crop {axis} {value} is not divisible by the "
                                     f"U-Net's downsampling factor {factor}"))
                if value > getattr(stage, axis):
                    problems.append((f"{at}.train.crop.{axis}", f"crop {axis} {value} exceeds the stage's "
                                     f"{axis} {getattr(stage, axis)}"))
        known = stage.known_frames
        if known is not None and known.clip_frames >= stage.frames:
            problems.append((f"{at}.known_frames.clip_frames", f"{known.clip_frames} known frames leave none to "
                             f"generate in a {stage.frames}-frame clip"))
        if known is not None and stage.train.crop_frames is not None and known.clip_frames >= stage.train.crop_frames:
            problems.append((f"{at}.known_frames.clip_frames", f"{known.clip_frames} known frames leave none to "
                             f"generate in the {stage.train.crop_frames}-frame training crop"))
        if stage.kind == "base":
            if index != 0:
                problems.append((f"{at}.kind", "only the first stage can be a base stage"))
            if stage.input is not None:
                problems.append((f"{at}.input", "a base stage has no input stage"))
            if stage.augmentation is not None:
                problems.append((f"{at}.augmentation", "a base stage has no low-resolution input to augment"))
            if stage.diffusion.residual:
                problems.append((f"{at}.diffusion.residual", "a base stage has no input to diffuse a residual over"))
            problems.extend(_window_problems(at, stage, ratio=1))
        else:
            if index == 0:
                problems.append((f"{at}.kind", f"the first stage must be a base stage, not {stage.kind}"))
            if stage.input is None:
                problems.append((f"{at}.input", f"a {stage.kind} stage needs an input stage"))
            elif stage.input not in seen:
                later = any(s.name == stage.input for s in recipe.stages)
                problems.append((f"{at}.input", f"input {stage.input!r} is "
                                 + ("not an earlier stage" if later else "not a stage of this recipe")))
            else:
                problems.extend(_chain_problems(at, stage, seen[stage.input]))
        seen[stage.name] = stage
    for index, stage in enumerate(recipe.stages[1:], start=1):
        if stage.input is not None and stage.input in seen and stage.input != recipe.stages[index - 1].name:
            problems.append((f"stages.{stage.name}.input", f"input {stage.input!r} is not the previous stage "
                             f"{recipe.stages[index - 1].name!r}: the cascade is a chain"))
    problems.extend(_eval_problems(recipe))
    return problems


def _eval_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """FVD among eval.metrics needs eval.frames within the I3D protocol (cascade.eval.fvd.FVDProtocol), and a
    stage with that many frames: otherwise `cascade eval` would compute no FVD at all."""
    e = recipe.eval
    if "fvd" not in e.metrics:
        return []
    if e.frames < FVD_MIN_FRAMES:
        return [("eval.frames", f"{e.frames}, but FVD (in eval.metrics) needs at least {FVD_MIN_FRAMES} frames (its "
                 f"I3D protocol; canonical 16): raise eval.frames or drop fvd from eval.metrics")]
    longest = max(recipe.stages, key=lambda s: s.frames)
    if longest.frames < e.frames:
        return [("eval.frames", f"{e.frames} frames for FVD, but the longest stage ({longest.name}) has "
                 f"{longest.frames}, so no stage would get an FVD; lower eval.frames or drop fvd from eval.metrics")]
    if e.fvd_stages is not None:
        names = {s.name: s for s in recipe.stages}
        for name in e.fvd_stages:
            if name not in names:
                return [("eval.fvd_stages", f"{name!r} is not a stage of this recipe ({', '.join(names)})")]
            if names[name].frames < e.frames:
                return [("eval.fvd_stages", f"{name} has {names[name].frames} frames, FVD takes eval.frames = "
                         f"{e.frames}: name a longer stage or lower eval.frames")]
        if not e.fvd_stages:
            return [("eval.fvd_stages", "is empty, so no stage would get an FVD; name a stage, set null (every "
                     "long enough stage) or drop fvd from eval.metrics")]
    return []


def _chain_problems(at: str, stage, source) -> list[tuple[str, str]]:
    problems = []
    if stage.kind == "tsr":
        if stage.frames <= source.frames or stage.frames % source.frames:
            problems.append((f"{at}.frames", f"a tsr stage's frames ({stage.frames}) must be an integer multiple "
                             f"(>1) of its input's ({source.frames})"))
        for axis in ("width", "height"):
            if getattr(stage, axis) != getattr(source, axis):
                problems.append((f"{at}.{axis}", f"a tsr stage keeps its input's {axis} "
                                 f"({getattr(source, axis)}), got {getattr(stage, axis)}"))
    else:  # ssr
        if stage.frames != source.frames:
            problems.append((f"{at}.frames", f"an ssr stage keeps its input's frames ({source.frames}), "
                             f"got {stage.frames}"))
        if stage.width < source.width or stage.height < source.height or (
                stage.width == source.width and stage.height == source.height):
            problems.append((f"{at}.width", f"an ssr stage must grow its input's size {source.width}x"
                             f"{source.height}, got {stage.width}x{stage.height}"))
    crop = stage.train.crop
    if crop is not None:  # a crop starts on an input pixel and covers whole input pixels (cond covers the region)
        for axis in ("width", "height"):
            ratio, size = getattr(stage, axis) / getattr(source, axis), getattr(crop, axis)
            if not ratio.is_integer() or size % ratio:
                problems.append((f"{at}.train.crop.{axis}", f"crop {axis} {size} does not cover whole pixels of "
                                 f"the input stage (its {axis} {getattr(source, axis)} -> {getattr(stage, axis)}: "
                                 f"the crop must be a multiple of an integer ratio)"))
    # Duration = frames / fps is shared by the whole cascade: TSR raises fps with frames, SSR keeps both.
    if not math.isclose(stage.frames / stage.fps, source.frames / source.fps, rel_tol=1e-6):
        problems.append((f"{at}.fps", f"fps {stage.fps:g} with {stage.frames} frames gives a different duration "
                         f"than the input's {source.frames} frames at {source.fps:g} fps; expected fps "
                         f"{source.fps * stage.frames / source.frames:g}"))
    # A frame ratio that does not chain is reported above; windows are then checked as if it were 1.
    problems.extend(_window_problems(at, stage, ratio=stage.frames // source.frames
                                     if stage.frames % source.frames == 0 else 1))
    return problems


def _window_problems(at: str, stage, ratio: int) -> list[tuple[str, str]]:
    """train.crop_frames: only SR stages without temporal attention, within the clip, a multiple of `ratio`."""
    window = stage.train.crop_frames
    if window is None:
        return []
    if stage.kind == "base" or "attention" in stage.unet.temporal:
        return [(f"{at}.train.crop_frames", "frame windows need a super-resolution stage whose temporal layers are "
                 "all conv or none (attention would see a shorter clip)")]
    if window > stage.frames:
        return [(f"{at}.train.crop_frames", f"window {window} exceeds the stage's {stage.frames} frames")]
    if window % ratio:
        return [(f"{at}.train.crop_frames", f"window {window} is not a multiple of the stage's frame ratio {ratio} "
                 "to its input, so its input frames would not line up")]
    return []
