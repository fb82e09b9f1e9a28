"""Fréchet Video Distance: I3D features of videos, their statistics, and the distance between two sets.

Follows the original FVD code (google-research/frechet_video_distance, Unterthiner et al. 2018) step by step:
frames are resized to 224 x 224 with TF1's ``tf.image.resize_bilinear`` (legacy pixel mapping, no half-pixel
centres, no antialiasing) applied to the uint8 values, then scaled to ``2 x / 255 - 1``, and fed to the TF-Hub I3D
(``deepmind/i3d-kinetics-400/1``, ported in `cascade.eval.i3d`), whose 400 time-averaged logits are the features.
The distance is the Fréchet distance between Gaussians fitted to the features of two sets (`cascade.eval.stats`).

Statistics carry their protocol (weights hash, frames, offset, resize, resolution, number of videos) and `fvd`
refuses to compare statistics taken under different protocols. Reference statistics of a dataset of shards are
computed once and cached as .npz under a key that hashes the dataset, the protocol and the clip settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade.eval.stats import FeatureStats, check_protocols, frechet_distance

__all__ = [
    "FVDProtocol",
    "FVDStats",
    "FeatureExtractor",
    "I3DFeatures",
    "fvd",
    "preprocess",
    "reference_stats",
    "select_frames",
    "tf1_resize_bilinear",
]

DETECTOR = "i3d-kinetics-400/1 logits (tfhub, pytorch port)"
# Bump when the way reference clips are decoded changes: old cache entries then stop matching.
_REFERENCE_FORMAT = 1


# --------------------------------------------------------------------------------------------------------------
# TF1 bilinear resize
# --------------------------------------------------------------------------------------------------------------
def _tf1_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower, upper, lerp) of TF1's legacy bilinear interpolation along one axis, as TF computes them.

    scale = in / out and src = dst * scale in float32; lower = floor(src), upper = min(ceil(src), in - 1),
    lerp = src - floor(src).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.clip(np.floor(src), 0, in_size - 1).astype(np.int64)
    upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)
    lerp = (src - np.floor(src)).astype(np.float32)
    return (torch.from_numpy(lower).to(device), torch.from_numpy(upper).to(device),
            torch.from_numpy(lerp).to(device))


def tf1_resize_bilinear(frames: torch.Tensor | np.ndarray, height: int, width: int) -> torch.Tensor:
    """Resize channels-last frames [..., H, W, C] to [..., height, width, C] like TF1 ``tf.image.resize_bilinear``.

    TF1's defaults: align_corners=False, half_pixel_centers=False, i.e. output pixel i samples input position
    i * in / out (not ``F.interpolate``'s (i + 0.5) * in / out - 0.5), and no antialiasing when shrinking. Any
    dtype in, float32 out, on the input's device. The arithmetic is TF's kernel: along W then H,
    ``a + (b - a) * lerp`` in float32, so a constant image stays exactly constant.
    """
    x = torch.as_tensor(frames)
    if x.ndim < 3:
        raise ValueError(f"tf1_resize_bilinear expects [..., H, W, C] frames, got shape {tuple(x.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"tf1_resize_bilinear: output size must be positive, got {height}x{width}")
    x = x.to(torch.float32)
    in_h, in_w = x.shape[-3], x.shape[-2]
    if in_h == 0 or in_w == 0:
        raise ValueError(f"tf1_resize_bilinear: empty input frames of shape {tuple(x.shape)}")
    if in_w != width:
        lower, upper, lerp = _tf1_taps(in_w, width, x.device)
        left, right = x.index_select(-2, lower), x.index_select(-2, upper)
        x = left + (right - left) * lerp[:, None]
    if in_h != height:
        lower, upper, lerp = _tf1_taps(in_h, height, x.device)
        top, bottom = x.index_select(-3, lower), x.index_select(-3, upper)
        x = top + (bottom - top) * lerp[:, None, None]
    return x


# --------------------------------------------------------------------------------------------------------------
# Protocol and preprocessing
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FVDProtocol:
    """Which frames of a video I3D sees and how they are resized: frames [offset, offset + frames)."""

    frames: int = 16
    offset: int = 0
    resolution: int = 224
    resize: str = "tf1-bilinear"

    def __post_init__(self) -> None:
        from cascade.recipe.schema import FVD_MIN_FRAMES

        if self.frames < FVD_MIN_FRAMES:
            raise ValueError(f"FVDProtocol.frames = {self.frames}: I3D needs at least {FVD_MIN_FRAMES} frames "
                             "(canonical: 16)")
        if self.offset < 0:
            raise ValueError(f"FVDProtocol.offset = {self.offset}: must be >= 0")
        if self.resolution < 193:
            raise ValueError(f"FVDProtocol.resolution = {self.resolution}: I3D needs at least 193 (canonical: 224)")
        if self.resize != "tf1-bilinear":
            raise ValueError(f"FVDProtocol.resize = {self.resize!r}: only 'tf1-bilinear' (the original FVD) exists")

    @property
    def length(self) -> int:
        """Frames a video needs: offset + frames."""
        return self.offset + self.frames

    def as_dict(self, weights_sha256: str, num_videos: int) -> dict[str, Any]:
        """The protocol stored with statistics (what `check_protocols` compares)."""
        return dict(detector=DETECTOR, weights_sha256=weights_sha256, frames=self.frames, offset=self.offset,
                    resolution=self.resolution, resize=self.resize, num_videos=int(num_videos))


def select_frames(video: torch.Tensor | np.ndarray, protocol: FVDProtocol) -> torch.Tensor | np.ndarray:
    """Frames [offset, offset + frames) of a video [T, ...] or of a batch [B, T, ...] (4-D: one video)."""
    if video.ndim not in (4, 5):
        raise ValueError(f"expected a video [T, H, W, 3] or a batch [B, T, H, W, 3], got shape {tuple(video.shape)}")
    axis = video.ndim - 4
    length = video.shape[axis]
    if length < protocol.length:
        raise ValueError(f"the video has {length} frames; the FVD protocol takes frames {protocol.offset} to "
                         f"{protocol.length - 1} ({protocol.frames} frames from frame {protocol.offset}), so it "
                         f"needs at least {protocol.length}")
    index = (slice(None),) * axis + (slice(protocol.offset, protocol.length),)
    return video[index]


def preprocess(videos: torch.Tensor | np.ndarray, protocol: FVDProtocol | None = None) -> torch.Tensor:
    """uint8 videos [B, T, H, W, 3] -> I3D input [B, 3, frames, 224, 224] float32 in [-1, 1].

    As the original: select the protocol's frames, resize the uint8 values with TF1 bilinear, then 2 x / 255 - 1.
    """
    protocol = protocol or FVDProtocol()
    if isinstance(videos, np.ndarray):
        if videos.dtype != np.uint8:
            raise ValueError(f"FVD expects uint8 videos (values 0..255), got numpy {videos.dtype}; convert with "
                             f"((x + 1) * 127.5).round() for [-1, 1] floats")
        videos = torch.from_numpy(np.ascontiguousarray(videos))
    elif not isinstance(videos, torch.Tensor):
        raise TypeError(f"FVD expects a numpy array or torch tensor of uint8 videos, got {type(videos).__name__}")
    if videos.dtype != torch.uint8:
        raise ValueError(f"FVD expects uint8 videos (values 0..255), got torch {videos.dtype}; convert with "
                         f"((x + 1) * 127.5).round() for [-1, 1] floats")
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"FVD expects videos [B, T, H, W, 3] (RGB, channels last), got shape {tuple(videos.shape)}")
    x = tf1_resize_bilinear(select_frames(videos, protocol), protocol.resolution, protocol.resolution)
    x = 2.0 * x / 255.0 - 1.0
    return x.permute(0, 4, 1, 2, 3).contiguous()  # [B, T, H, W, C] -> [B, C, T, H, W]


# --------------------------------------------------------------------------------------------------------------
# Statistics with their protocol
# --------------------------------------------------------------------------------------------------------------
class FVDStats(FeatureStats):
    """`FeatureStats` of video features together with the protocol they were taken under (`protocol` dict)."""

    def __init__(self, num_features: int | None = None, protocol: dict[str, Any] | None = None) -> None:
        super().__init__(num_features)
        self.protocol: dict[str, Any] = dict(protocol or {})

    def save(self, path: str | os.PathLike, protocol: dict[str, Any] | None = None) -> None:
        """Write to .npz with `protocol` (default: this one's)."""
        super().save(path, self.protocol if protocol is None else protocol)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[FVDStats, dict[str, Any]]:
        """Read statistics written by `save`; -> (stats with .protocol set, protocol)."""
        stats, protocol = super().load(path)
        stats.protocol = dict(protocol)
        return stats, protocol


class FeatureExtractor:
    """Videos -> feature vectors, and their statistics under an `FVDProtocol`. Subclasses implement `features`."""

    weights_sha256: str = ""
    protocol: FVDProtocol = FVDProtocol()

    def features(self, videos: torch.Tensor | np.ndarray, protocol: FVDProtocol | None = None) -> np.ndarray:
        """uint8 videos [B, T, H, W, 3] -> [B, D] float64."""
        raise NotImplementedError

    def stats(self, batches: Iterable[torch.Tensor | np.ndarray], *, protocol: FVDProtocol | None = None,
              num_videos: int | None = None, progress: bool = False) -> FVDStats:
        """Statistics of the features of every video in `batches` (each uint8 [B, T, H, W, 3]).

        num_videos: take exactly this many videos (the rest of the iterable is not read); fewer is an error.
        """
        protocol = protocol or self.protocol
        if num_videos is not None and num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        stats = FVDStats()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_videos, desc="i3d", unit="video")
        try:
            for batch in batches:
                if num_videos is not None:
                    batch = batch[: num_videos - stats.count]
                if len(batch) == 0:
                    continue
                stats.update(self.features(batch, protocol))
                if bar is not None:
                    bar.update(len(batch))
                if num_videos is not None and stats.count >= num_videos:
                    break
        finally:
            if bar is not None:
                bar.close()
        if num_videos is not None and stats.count < num_videos:
            raise ValueError(f"got {stats.count} videos, num_videos asks for {num_videos}")
        if stats.count == 0:
            raise ValueError("no videos: FVD statistics need at least 2")
        stats.protocol = protocol.as_dict(self.weights_sha256, stats.count)
        return stats


class I3DFeatures(FeatureExtractor):
    """The pretrained I3D (built once, eval mode, no gradients): features and statistics of uint8 videos.

    Raises FileNotFoundError (with the install command) when the canonical weights are not installed.
    """

    def __init__(self, protocol: FVDProtocol | None = None, *, batch_size: int = 8,
                 device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> None:
        from cascade.eval.i3d import I3D_WEIGHTS_SHA256, build_i3d

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.protocol = protocol or FVDProtocol()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model = build_i3d(weights, device=self.device)  # checks the weights' SHA-256
        self.weights_sha256 = I3D_WEIGHTS_SHA256

    @torch.no_grad()
    def features(self, videos: torch.Tensor | np.ndarray, protocol: FVDProtocol | None = None) -> np.ndarray:
        """uint8 videos [B, T, H, W, 3] -> I3D logits [B, 400] float64, in chunks of `batch_size` videos."""
        protocol = protocol or self.protocol
        out = []
        for first in range(0, len(videos), self.batch_size):
            chunk = videos[first:first + self.batch_size]
            if isinstance(chunk, np.ndarray) and chunk.dtype == np.uint8:
                chunk = torch.from_numpy(np.ascontiguousarray(chunk))
            if isinstance(chunk, torch.Tensor):
                chunk = chunk.to(self.device)  # resize on the device (uint8 is the smallest thing to move)
            x = preprocess(chunk, protocol)
            out.append(self.model(x).to("cpu", torch.float64).numpy())
        if not out:
            return np.zeros((0, self.model.num_classes), np.float64)
        return np.concatenate(out)


# --------------------------------------------------------------------------------------------------------------
# Reference statistics of a dataset
# --------------------------------------------------------------------------------------------------------------
def _dataset_identity(folder: Path) -> dict[str, Any]:
    """What identifies a dataset of shards: the manifest's bytes and every shard's name and size."""
    from cascade.data.shards import MANIFEST, Manifest

    manifest = Manifest.read(folder)  # raises with a hint when there is no manifest
    shards = []
    for entry in manifest.shards:
        path = folder / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {folder / MANIFEST} but missing; rebuild the dataset")
        shards.append([entry["path"], path.stat().st_size])
    manifest_sha = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    return dict(manifest_sha256=manifest_sha, shards=shards)


def _probe(data: bytes) -> tuple[float, int, int] | None:
    """(fps, width, height) of a video's first stream, or None when unreadable."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            return (float(stream.average_rate or stream.guessed_rate or 0), stream.codec_context.width,
                    stream.codec_context.height)
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        return None


def _reference_videos(folder: Path, frames: int, size: tuple[int, int] | None, fps: float | None,
                      ) -> Iterator[np.ndarray]:
    """The videos of a dataset in shard order (stills skipped), each a clip [1, frames, H, W, 3] uint8.

    Each clip is decoded as `cascade.eval.runner.load_examples` decodes a stage's ground truth: `decode_frames` at
    `fps` covering `size` = (width, height), centre crop, clip start drawn from rng (shard, index in the shard).
    size / fps None: the video's own. Unusable samples are skipped with a warning.
    """
    from cascade.data.clips import BadSample, crop, decode_frames
    from cascade.data.loader import ShardStream, read_tar_index
    from cascade.data.shards import Manifest

    manifest = Manifest.read(folder)
    stream = ShardStream(folder, [s["path"] for s in manifest.shards], seed=0, role=0, roles=1)
    for shard, entry in enumerate(manifest.shards):
        samples, problem = read_tar_index(folder / entry["path"])
        if problem:
            warnings.warn(f"{folder / entry['path']}: {problem}; reading its complete samples", stacklevel=3)
        for index, (key, members) in enumerate(samples):
            if "mp4" not in members:
                continue
            try:
                data = stream.read(shard, members)["mp4"]
                clip_fps, clip_size = fps, size
                if fps is None or size is None:
                    probed = _probe(data)
                    if probed is None:
                        raise BadSample("undecodable")
                    clip_fps = fps if fps is not None else (probed[0] or 1.0)
                    clip_size = size if size is not None else (probed[1], probed[2])
                video = decode_frames(data, frames, clip_fps, np.random.default_rng([shard, index]), clip_size)
                video = crop(video, clip_size[0], clip_size[1], None)
            except BadSample as error:
                warnings.warn(f"FVD reference: skipped {key} in {entry['path']}: {error}", stacklevel=3)
                continue
            yield np.ascontiguousarray(video)[None]


def reference_cache_key(folder: str | os.PathLike, protocol: FVDProtocol, *, num_videos: int, weights_sha256: str,
                        size: tuple[int, int] | None = None, fps: float | None = None, frames: int | None = None,
                        ) -> str:
    """SHA-256 (hex) of the dataset identity, the protocol and the clip settings of reference statistics."""
    payload = dict(format=_REFERENCE_FORMAT, dataset=_dataset_identity(Path(folder)),
                   protocol=protocol.as_dict(weights_sha256, num_videos),
                   clip=dict(size=None if size is None else [int(s) for s in size],
                             fps=None if fps is None else float(fps),
                             frames=protocol.length if frames is None else int(frames)))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def reference_stats(folder: str | os.PathLike, protocol: FVDProtocol, *, num_videos: int,
                    size: tuple[int, int] | None = None, fps: float | None = None, frames: int | None = None,
                    cache_dir: str | os.PathLike, extractor: FeatureExtractor, progress: bool = False) -> FVDStats:
    """Statistics of the first `num_videos` videos of a dataset of shards (shard order), cached in `cache_dir`.

    Clips of `frames` frames (default: protocol.offset + protocol.frames) are decoded at `fps` and `size` =
    (width, height) (None: the video's own), the same clips `cascade eval` takes as a stage's ground truth, and the
    protocol's frames of each clip go to the extractor. The cache file ``fvd-reference-KEY.npz`` is keyed by
    `reference_cache_key`; an unreadable or mismatching cache file is recomputed with a warning.
    """
    folder = Path(folder)
    if num_videos < 2:
        raise ValueError(f"num_videos = {num_videos}: a covariance needs at least 2 videos")
    frames = protocol.length if frames is None else int(frames)
    if frames < protocol.length:
        raise ValueError(f"frames = {frames}: the FVD protocol needs clips of at least {protocol.length} frames "
                         f"({protocol.frames} from frame {protocol.offset})")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (width, height) with positive entries, got {size}")
    key = reference_cache_key(folder, protocol, num_videos=num_videos, weights_sha256=extractor.weights_sha256,
                              size=size, fps=fps, frames=frames)
    expected = protocol.as_dict(extractor.weights_sha256, num_videos)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"fvd-reference-{key[:24]}.npz"
    with _exclusive(cache_dir / f"{path.name}.lock"):  # a second process waits and reads the first one's result
        return _reference_stats(path, folder, protocol, expected, extractor, num_videos, size, fps, frames, progress)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (created) where the file system supports it; otherwise go on unlocked
    (the statistics are then computed twice, each write atomic)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _reference_stats(path: Path, folder, protocol, expected, extractor, num_videos, size, fps, frames, progress):
    cache_dir = path.parent
    if path.is_file():
        try:
            stats, stored = FVDStats.load(path)
            check_protocols(stored, expected)
            if stats.count != num_videos:
                raise ValueError(f"holds {stats.count} videos, expected {num_videos}")
            return stats
        except Exception as error:  # noqa: BLE001 - any unreadable cache is recomputed, never fatal
            warnings.warn(f"FVD reference cache {path} is unusable ({type(error).__name__}: {error}); recomputing",
                          stacklevel=2)
    decoded = 0

    def videos() -> Iterator[np.ndarray]:
        nonlocal decoded
        for video in _reference_videos(folder, frames, None if size is None else (int(size[0]), int(size[1])), fps):
            decoded += 1
            yield video

    try:
        stats = extractor.stats(videos(), protocol=protocol, num_videos=num_videos, progress=progress)
    except ValueError:
        if decoded < num_videos:
            raise ValueError(f"{folder}: {decoded} usable videos, FVD reference statistics ask for num_videos = "
                             f"{num_videos}") from None
        raise
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    stats.save(tmp)
    os.replace(tmp, path)
    return stats


# --------------------------------------------------------------------------------------------------------------
# The distance
# --------------------------------------------------------------------------------------------------------------
def fvd(stats_a: FVDStats, stats_b: FVDStats) -> float:
    """FVD between two sets' statistics; their protocols must agree except for the number of videos."""
    protocols = []
    for name, stats in (("stats_a", stats_a), ("stats_b", stats_b)):
        protocol = getattr(stats, "protocol", None)
        if not protocol:
            raise ValueError(f"fvd: {name} carries no protocol; take statistics with I3DFeatures.stats or "
                             f"reference_stats (or FVDStats.load)")
        protocols.append({k: v for k, v in protocol.items() if k != "num_videos"})
    check_protocols(*protocols)
    return frechet_distance(stats_a.mean, stats_a.covariance, stats_b.mean, stats_b.covariance)
