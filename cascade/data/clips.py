"""From one shard sample to one training example of a stage: decode with PyAV, choose a clip at the stage's frame
rate, resize and crop to its size, and make the super-resolution input from the same clip.

Everything stays uint8 (the float conversion happens on the device). Bad input raises `BadSample` with a short
reason; the loader counts it and moves on.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
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


def _open(data: bytes):
    """An opened container and its first video stream, after the checks that need no decoding."""
    if data[:8] == PNG_SIGNATURE and len(data) >= 24:  # a PNG's size is known before decoding: refuse bombs
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if width * height > MAX_PIXELS:
            raise BadSample("too_large", f"{width}x{height}")
    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadSample("undecodable", type(error).__name__) from None
    if not container.streams.video:
        container.close()
        raise BadSample("no_video_stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    problem = (BadSample("too_large", f"{ctx.width}x{ctx.height}") if ctx.width * ctx.height > MAX_PIXELS else
               BadSample("undecodable", "no frame size") if ctx.width < 1 or ctx.height < 1 else None)
    if problem is not None:
        container.close()
        raise problem
    return container, stream


DECODE_ERRORS = (av.error.FFmpegError, OSError, ValueError, MemoryError)  # a decoder that stops mid-video


def _rgb(frame, width: int, height: int) -> np.ndarray:
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()


def _cover(stream, size: tuple[int, int]) -> tuple[int, int]:
    """The frame size that covers `size` = (width, height) with the source's aspect kept."""
    ctx = stream.codec_context
    scale = max(size[0] / ctx.width, size[1] / ctx.height)
    return max(size[0], round(ctx.width * scale)), max(size[1], round(ctx.height * scale))


def _clip_indices(listed: int, source_fps: float, frames: int, fps: float, rng: np.random.Generator,
                  start: str) -> list[int]:
    """Source frame indices of a clip: begin + round(i * source_fps / fps). `listed` is the frame count in the
    container's header (0 when unknown: the clip starts at the first frame)."""
    offsets = [round(i * source_fps / fps) for i in range(frames)]
    if listed and listed <= offsets[-1]:
        raise BadSample("too_short", f"{listed} frames at {source_fps:g} fps, need {offsets[-1] + 1}")
    if source_fps < fps * 0.99 and frames > 1:
        raise BadSample("fps_too_low", f"{source_fps:g} fps source for a {fps:g} fps clip")
    span = offsets[-1] + 1
    begin = int(rng.integers(0, listed - span + 1)) if listed and start == "random" else 0
    return [begin + o for o in offsets]


def _pick(decoded: dict[int, np.ndarray], wanted: list[int], error: str | None) -> np.ndarray:
    """The wanted frames out of those decoded; `error` is the decoder's, if it stopped early."""
    if all(i in decoded for i in wanted):
        return np.stack([decoded[i] for i in wanted])
    if error is not None:
        raise BadSample("undecodable", error)
    if not any(i in decoded for i in wanted):
        raise BadSample("undecodable", "no frames")
    raise BadSample("too_short", f"decoded {max(decoded) + 1} frames, need {wanted[-1] + 1}")


@dataclass
class DecodedVideo:
    """Every frame of one video at one stage's size, kept by `FrameCache` to cut later clips from."""

    frames: np.ndarray  # (N, h, w, 3) uint8
    source_fps: float
    listed: int  # frame count in the container's header (0: unknown)
    error: str | None  # why decoding stopped before the end, if it did


class FrameCache:
    """Decoded videos kept in memory, least recently used dropped first beyond `max_bytes`: for a dataset that fits,
    later epochs cut their clips without decoding. A cached video gives exactly the clip decoding would. A video
    larger than the whole budget (None) is remembered as such and decoded clip by clip."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._videos: OrderedDict[tuple, DecodedVideo] = OrderedDict()
        self.too_large: set[tuple] = set()

    def __len__(self) -> int:
        return len(self._videos)

    def get(self, key: tuple) -> DecodedVideo | None:
        video = self._videos.get(key)
        if video is None:
            self.misses += 1
        else:
            self.hits += 1
            self._videos.move_to_end(key)
        return video

    def put(self, key: tuple, video: DecodedVideo | None) -> None:
        size = None if video is None else video.frames.nbytes
        if size is None or size > self.max_bytes:
            self.too_large.add(key)
            return
        while self.bytes + size > self.max_bytes:
            self.bytes -= self._videos.popitem(last=False)[1].frames.nbytes
        self._videos[key] = video
        self.bytes += size


def decode_video(data: bytes, size: tuple[int, int], max_bytes: int | None = None) -> DecodedVideo | None:
    """Every frame of a video (or still), each resized to cover `size` = (width, height) with its aspect kept;
    None when the frames would take more than `max_bytes`."""
    container, stream = _open(data)
    with container:
        source_fps = float(stream.average_rate or stream.guessed_rate or 0)
        out_w, out_h = _cover(stream, size)
        limit = None if max_bytes is None else max_bytes // (out_w * out_h * 3)  # frames that fit
        if limit is not None and (stream.frames or 0) > limit:
            return None
        frames, error = [], None
        try:
            for frame in container.decode(stream):
                frames.append(_rgb(frame, out_w, out_h))
                if limit is not None and len(frames) > limit:
                    return None
        except DECODE_ERRORS as problem:
            error = type(problem).__name__
    array = np.stack(frames) if frames else np.zeros((0, out_h, out_w, 3), np.uint8)
    return DecodedVideo(array, source_fps, stream.frames or 0, error)


def decode_frames(data: bytes, frames: int, fps: float, rng: np.random.Generator, size: tuple[int, int],
                  start: str = "random", cache: FrameCache | None = None, key: tuple | None = None) -> np.ndarray:
    """Decode a clip of `frames` frames at `fps` from a video (frame skipping from the source rate), each frame
    resized to cover `size` = (width, height) with its aspect kept. -> (T, h, w, 3) uint8, h >= height, w >= width.
    The clip starts at a random frame of a longer video (`start="random"`) or at its first frame ("first").
    With a `cache`, the whole video is decoded once under `key` and later clips are cut from memory.

    A still image (one frame) is returned as one frame; the caller repeats it.
    """
    if start not in ("random", "first"):
        raise ValueError(f"clip start must be 'random' or 'first', got {start!r}")
    cache_key = (key, size)
    if cache is not None and cache_key not in cache.too_large:
        video = cache.get(cache_key)
        if video is None:
            video = decode_video(data, size, cache.max_bytes)
            cache.put(cache_key, video)
        if video is not None:
            wanted = _clip_indices(video.listed, video.source_fps or fps, frames, fps, rng, start)
            return _pick({i: video.frames[i] for i in wanted if i < len(video.frames)}, wanted, video.error)
    container, stream = _open(data)
    with container:
        source_fps = float(stream.average_rate or stream.guessed_rate or 0) or fps
        out_w, out_h = _cover(stream, size)
        wanted = _clip_indices(stream.frames or 0, source_fps, frames, fps, rng, start)
        picked: dict[int, np.ndarray] = {}
        error = None
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    picked[index] = _rgb(frame, out_w, out_h)
                    if len(picked) == len(wanted):
                        break
        except DECODE_ERRORS as problem:
            error = type(problem).__name__
    return _pick(picked, wanted, error)


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


def make_example(sample: dict, spec: ClipSpec, rng: np.random.Generator, cache: FrameCache | None = None,
                 key: tuple | None = None) -> dict:
    """One training example: video (3, T, H, W) uint8, optional cond (3, T', H', W') uint8, caption, is_image.
    `cache` and `key` (the sample's identity) keep its decoded frames for the next epoch."""
    caption, data, kind, _ = parse_sample(sample)
    size = (spec.width, spec.height)
    if kind == "image":
        frames = decode_frames(data, 1, spec.fps, rng, size, cache=cache, key=key)
        frames = np.repeat(frames[:1], spec.frames, axis=0)  # a still occupies a video slot; time is bypassed
    else:
        frames = decode_frames(data, spec.frames, spec.fps, rng, size, spec.clip_start, cache=cache, key=key)
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
