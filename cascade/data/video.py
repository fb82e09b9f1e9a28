"""Video files through PyAV: write mp4 (H.264) and gif, read back frames."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor


def to_uint8(video: Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write (T, H, W, 3) uint8 frames to .mp4 (H.264, yuv420p, lossless-leaning crf 12) or .gif."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"{path}: only .mp4 and .gif are written, got {suffix or 'no suffix'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        if suffix == ".mp4":
            # yuv420p needs even sizes; pad by edge replication rather than fail on odd sizes.
            frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            stream = container.add_stream("libx264", rate=rate)
            stream.pix_fmt, stream.options = "yuv420p", {"crf": "12"}
        else:
            stream = container.add_stream("gif", rate=rate)
            stream.pix_fmt = "rgb8"
        stream.height, stream.width = frames.shape[1:3]
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame: -> ((T, H, W, 3) uint8, fps)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    return np.stack(frames), fps
