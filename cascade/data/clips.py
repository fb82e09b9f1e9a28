"""From one shard sample to one training example of a stage: decode with PyAV, choose a clip at the stage's frame
rate, resize and crop to its size, and make the super-resolution input from the same clip.

Everything stays uint8 (the float conversion happens on the device). Bad input raises `BadSample` with a short
reason; the loader counts it and moves on.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F

MAX_PIXELS = 4096 * 4096  # larger frames are refused before decoding (decompression bombs, corrupt headers)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short tag counted by the loader."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ClipSpec:
    """What one stage trains on. `cond_*` describe its input stage (super-resolution), None for a base stage."""

    frames: int
    width: int
    height: int
    fps: float
    cond_frames: int | None = None
    cond_width: int | None = None
    cond_height: int | None = None
    crop_width: int | None = None  # random crops of this size (fully convolutional SR stages)
    crop_height: int | None = None
    crop_frames: int | None = None  # random windows of this many frames (SR stages with temporal convolutions)
    clip_start: str = "random"  # where a clip starts in a longer video: "random" or "first" (its first frame)

    @property
    def has_cond(self) -> bool:
        return self.cond_frames is not None


def parse_sample(sample: dict) -> tuple[str, bytes, str, dict]:
    """-> (caption, media bytes, media kind "video"|"image", metadata). Raises BadSample."""
    if "txt" not in sample:
        raise BadSample("missing_caption")
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("caption_not_utf8") from None
    if not caption:
        raise BadSample("empty_caption")
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadSample("bad_metadata") from None
        if not isinstance(meta, dict):
            raise BadSample("bad_metadata")
    if "mp4" in sample:
        return caption, sample["mp4"], "video", meta
    if "png" in sample:
        return caption, sample["png"], "image", meta
    raise BadSample("missing_media", f"keys {sorted(k for k in sample if not k.startswith('__'))}")


def decode_frames(data: bytes, frames: int, fps: float, rng: np.random.Generator, size: tuple[int, int],
                  start: str = "random") -> np.ndarray:
    """Decode a clip of `frames` frames at `fps` from a video (frame skipping from the source rate), each frame
    resized to cover `size` = (width, height) with its aspect kept. -> (T, h, w, 3) uint8, h >= height, w >= width.
    The clip starts at a random frame of a longer video (`start="random"`) or at its first frame ("first").

    A still image (one frame) is returned as one frame; the caller repeats it.
    """
    if start not in ("random", "first"):
        raise ValueError(f"clip start must be 'random' or 'first', got {start!r}")
    if data[:8] == PNG_SIGNATURE and len(data) >= 24:  # a PNG's size is known before decoding: refuse bombs
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if width * height > MAX_PIXELS:
            raise BadSample("too_large", f"{width}x{height}")
    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadSample("undecodable", type(error).__name__) from None
    with container:
        if not container.streams.video:
            raise BadSample("no_video_stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx.width * ctx.height > MAX_PIXELS:
            raise BadSample("too_large", f"{ctx.width}x{ctx.height}")
        if ctx.width < 1 or ctx.height < 1:
            raise BadSample("undecodable", "no frame size")
        source_fps = float(stream.average_rate or stream.guessed_rate or 0) or fps
        scale = max(size[0] / ctx.width, size[1] / ctx.height)
        out_w, out_h = max(size[0], round(ctx.width * scale)), max(size[1], round(ctx.height * scale))
        # Source frame index of clip frame i: begin + round(i * source_fps / fps).
        offsets = [round(i * source_fps / fps) for i in range(frames)]
        available = stream.frames or 0
        if available and available <= offsets[-1]:
            raise BadSample("too_short", f"{available} frames at {source_fps:g} fps, need {offsets[-1] + 1}")
        if source_fps < fps * 0.99 and frames > 1:
            raise BadSample("fps_too_low", f"{source_fps:g} fps source for a {fps:g} fps clip")
        span = offsets[-1] + 1
        begin = int(rng.integers(0, available - span + 1)) if available and start == "random" else 0
        wanted = {begin + o for o in offsets}
        picked: dict[int, np.ndarray] = {}
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    picked[index] = frame.reformat(width=out_w, height=out_h, format="rgb24",
                                                   interpolation="AREA").to_ndarray()
                    if len(picked) == len(wanted):
                        break
        except (av.error.FFmpegError, OSError, ValueError, MemoryError) as error:
            raise BadSample("undecodable", type(error).__name__) from None
    if not picked:
        raise BadSample("undecodable", "no frames")
    if len(picked) < len(wanted):
        raise BadSample("too_short", f"decoded {max(picked) + 1} frames, need {begin + span}")
    return np.stack([picked[begin + o] for o in offsets])


def crop(video: np.ndarray, width: int, height: int, rng: np.random.Generator | None) -> np.ndarray:
    """Crop (T, h, w, 3) to (T, height, width, 3): centred, or at a random position when rng is given."""
    h, w = video.shape[1:3]
    top = (h - height) // 2 if rng is None else int(rng.integers(0, h - height + 1))
    left = (w - width) // 2 if rng is None else int(rng.integers(0, w - width + 1))
    return video[:, top:top + height, left:left + width]


def downsample(video: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """The previous stage's view of a clip: (3, T, H, W) uint8 -> (3, frames, height, width) uint8, keeping every
    (T / frames)-th frame (lower fps) and area-averaging space (lower resolution)."""
    step = video.shape[1] // frames
    video = video[:, ::step]
    if video.shape[-2:] != (height, width):
        exact = video.shape[-2] % height == 0 and video.shape[-1] % width == 0
        mode = dict(mode="area") if exact else dict(mode="bilinear", antialias=True, align_corners=False)
        resized = F.interpolate(video.transpose(0, 1).float(), size=(height, width), **mode)
        video = resized.round().clamp(0, 255).to(torch.uint8).transpose(0, 1)
    return video.contiguous()


def make_example(sample: dict, spec: ClipSpec, rng: np.random.Generator) -> dict:
    """One training example: video (3, T, H, W) uint8, optional cond (3, T', H', W') uint8, caption, is_image."""
    caption, data, kind, _ = parse_sample(sample)
    if kind == "image":
        frames = decode_frames(data, 1, spec.fps, rng, (spec.width, spec.height))
        frames = np.repeat(frames[:1], spec.frames, axis=0)  # a still occupies a video slot; time is bypassed
    else:
        frames = decode_frames(data, spec.frames, spec.fps, rng, (spec.width, spec.height), spec.clip_start)
    frames = crop(frames, spec.width, spec.height, None)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # (3, T, H, W)
    example = dict(caption=caption, is_image=kind == "image")
    fx, fy = (spec.width // spec.cond_width, spec.height // spec.cond_height) if spec.has_cond else (1, 1)
    if spec.crop_width is not None:  # aligned to the input stage's pixels, so cond covers the same region
        top = int(rng.integers(0, (spec.height - spec.crop_height) // fy + 1)) * fy
        left = int(rng.integers(0, (spec.width - spec.crop_width) // fx + 1)) * fx
        video = video[:, :, top:top + spec.crop_height, left:left + spec.crop_width]
    cond_frames = spec.cond_frames
    if spec.crop_frames is not None:  # a window that starts on an input frame, so cond is its every k-th frame
        ratio = spec.frames // spec.cond_frames if spec.has_cond else 1
        start = int(rng.integers(0, (spec.frames - spec.crop_frames) // ratio + 1)) * ratio
        video = video[:, start:start + spec.crop_frames]
        cond_frames = spec.crop_frames // ratio if spec.has_cond else None
    if spec.has_cond:
        example["cond"] = downsample(video, cond_frames, video.shape[2] // fy, video.shape[3] // fx)
    example["video"] = video.contiguous()
    return example


def crop_is_aligned(spec: ClipSpec) -> bool:
    """A crop must map onto whole pixels of the input stage's resolution."""
    if spec.crop_width is None or not spec.has_cond:
        return True
    fx, fy = spec.width / spec.cond_width, spec.height / spec.cond_height
    return (fx.is_integer() and fy.is_integer() and spec.crop_width % fx == 0 and spec.crop_height % fy == 0
            and math.isclose(spec.frames % spec.cond_frames, 0))
