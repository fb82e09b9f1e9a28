"""Video files through PyAV: write mp4 (H.264) and gif, read back frames."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor


def to_uint8(video: Tensor) -> np.ndarray:
    """(..., C, T, H, W) in [-1, 1] -> (..., T, H, W, C) uint8 (one video or a batch)."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.movedim(-4, -1).cpu().numpy()


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 12) -> Path:
    """Write (T, H, W, 3) uint8 frames to .mp4 (H.264, yuv420p, lossless-leaning crf 12) or .gif."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"{path}: only .mp4 and .gif are written, got {suffix or 'no suffix'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        _write_gif(path, frames, fps)
        return path
    with open(path, "wb") as file:
        _encode(file, frames, fps, suffix[1:], crf)
    return path


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    """A gif with one palette of up to 256 colours chosen for the whole clip (Pillow's maximum coverage refined by 3
    k-means passes, over all its frames) and no dithering, encoded by ffmpeg from those palette indices. A clip of at
    most 256 colours comes back exact; any other shows its nearest palette colours, without the speckle of a fixed
    dithered palette (ffmpeg's rgb8, a 3-3-2 cube: about 120 colours used in a demo clip)."""
    from PIL import Image

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    count, height, width = frames.shape[:3]
    strip = Image.fromarray(np.ascontiguousarray(frames.reshape(-1, width, 3)))  # every frame, one image
    quantized = strip.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE, kmeans=3)
    indices = np.asarray(quantized).reshape(count, height, width)  # the strip's own indices: no second lookup
    rgb = np.array(quantized.getpalette(), dtype=np.uint8).reshape(-1, 3)[:256]
    argb = np.zeros((256, 4), np.uint8)  # PyAV's pal8 palette: (256, 4) ARGB
    argb[:, 0], argb[:len(rgb), 1:] = 255, rgb
    with av.open(str(path), mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1001))
        stream.pix_fmt, stream.height, stream.width = "pal8", height, width
        for frame in indices:
            container.mux(stream.encode(av.VideoFrame.from_ndarray((np.ascontiguousarray(frame), argb),
                                                                   format="pal8")))
        container.mux(stream.encode())


def encode_video(frames: np.ndarray, fps: float, crf: int = 12) -> bytes:
    """(T, H, W, 3) uint8 -> the bytes of an H.264 mp4 (what shards store)."""
    buffer = io.BytesIO()
    _encode(buffer, frames, fps, "mp4", crf)
    return buffer.getvalue()


def encode_image(frame: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless)."""
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {frame.shape} {frame.dtype}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.pix_fmt, stream.height, stream.width = "rgb24", frame.shape[0], frame.shape[1]
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _encode(file, frames: np.ndarray, fps: float, kind: str, crf: int) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(file, mode="w", format=kind) as container:
        if kind == "mp4":
            # yuv420p needs even sizes; pad by edge replication rather than fail on odd sizes.
            frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            stream = container.add_stream("libx264", rate=rate)
            stream.pix_fmt, stream.options = "yuv420p", {"crf": str(crf)}
        else:
            stream = container.add_stream("gif", rate=rate)
            stream.pix_fmt = "rgb8"
        stream.height, stream.width = frames.shape[1:3]
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def read_video(path: str | Path | bytes) -> tuple[np.ndarray, float]:
    """Decode every frame of a file or of in-memory bytes: -> ((T, H, W, 3) uint8, fps)."""
    source = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else str(path)
    with av.open(source) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    return np.stack(frames), fps


def has_audio(path: str | Path) -> bool:
    """Whether a video file has an audio stream (the tools read only the frames)."""
    with av.open(str(path)) as container:
        return bool(container.streams.audio)
