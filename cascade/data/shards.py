"""The shard format shared by every dataset builder and the loader.

A dataset is a folder of webdataset tar shards plus `manifest.json`. Each sample is a group of files with one key:

- `KEY.mp4` (a video, H.264) or `KEY.png` (a still image, for joint image-video training);
- `KEY.txt`: the caption, UTF-8;
- `KEY.json`: metadata: kind ("video" | "image"), fps, frames, duration (s), width, height, source (where it came
  from) and, for synthetic samples, the scene description that renders it exactly at any size and frame rate.

`manifest.json` lists the shards with their sample counts (the loader needs them to split work and to resume),
totals, hours of video, and the samples the builder skipped with the reason.

Readers index a tar with `scan_tar`: members whose names are absolute or climb out of the tar (`../x`) are never
read, and a tar that ends early (cut, garbled, or not a tar) is reported with the samples it holds before that.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import webdataset as wds

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{index:06d}.tar"


def caption_key(caption: str) -> str:
    """Key of a caption in the embedding cache: the first 16 bytes of its SHA-256, hex."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


@dataclass
class Manifest:
    shards: list[dict] = field(default_factory=list)  # [{"path": "shard-000000.tar", "samples": 128}, ...]
    videos: int = 0
    images: int = 0
    video_seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)  # [{"key" or "source": ..., "reason": ...}, ...]
    info: dict = field(default_factory=dict)  # builder name, settings

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def to_dict(self) -> dict:
        return dict(shards=self.shards, samples=self.samples, videos=self.videos, images=self.images,
                    hours_of_video=self.video_seconds / 3600.0, video_seconds=self.video_seconds,
                    skipped=self.skipped, skipped_by_reason=dict(Counter(s["reason"] for s in self.skipped)),
                    info=self.info)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            where = "no such folder" if not Path(folder).is_dir() else "the folder holds no manifest.json"
            raise FileNotFoundError(f"{path}: not a dataset ({where}; the recipe's data.shards or data.root points "
                                    f"here): build one with `cascade data videos` (your videos), `cascade data images` "
                                    f"or `cascade data synth`")
        data = json.loads(path.read_text())
        return cls(shards=data["shards"], videos=data.get("videos", 0), images=data.get("images", 0),
                   video_seconds=data.get("video_seconds", 0.0), skipped=data.get("skipped", []),
                   info=data.get("info", {}))


# --- reading a shard's index


@dataclass
class TarIndex:
    """A webdataset tar's samples in file order as (key, {extension: member}); `problem`: why the tar ends early
    (truncated, corrupt or unreadable), None if it was read to the end; `unsafe`: names of the members skipped
    because they are absolute or climb out of the tar's folder (`../x`, `/etc/x`)."""

    samples: list[tuple[str, dict[str, tarfile.TarInfo]]]
    problem: str | None = None
    unsafe: list[str] = field(default_factory=list)

    @property
    def unsafe_samples(self) -> int:
        """Samples (distinct keys) among the unsafe members."""
        return len({split_member_name(name)[0] for name in self.unsafe})


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: (key, extension); the key runs to the first dot of the file name."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return name[: len(name) - len(base)] + key, ext


def unsafe_member_name(name: str) -> bool:
    """Whether a tar member's name is absolute (`/x`, `\\x`, `C:x`) or has a `..` component."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or (name[1:2] == ":" and name[:1].isalpha()) or ".." in parts


def scan_tar(path: str | Path) -> TarIndex:
    """Index a webdataset tar without reading its data: samples (unsafe member names left out), and problems."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    problem, unsafe = None, []
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.ReadError, EOFError, OSError) as error:
                    problem = f"truncated or corrupt tar ({error})"
                    break
                if member is None:  # tarfile also ends here, silently, at a cut or garbled header
                    tar.fileobj.seek(tar.offset)
                    if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                        problem = f"truncated or corrupt tar (no end-of-archive block at byte {tar.offset})"
                    break
                if not member.isfile():
                    continue
                if unsafe_member_name(member.name):
                    unsafe.append(member.name)
                    continue
                key, ext = split_member_name(member.name)
                samples.setdefault(key, {})[ext] = member
    except (tarfile.ReadError, OSError) as error:
        problem = f"unreadable tar ({error})"
    return TarIndex(list(samples.items()), problem, unsafe)


class ShardSink:
    """Writes samples into numbered shards of at most `samples_per_shard` samples and keeps the manifest."""

    def __init__(self, folder: str | Path, samples_per_shard: int = 256, info: dict | None = None) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.manifest = Manifest(info=info or {})
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def write(self, key: str, media: bytes, media_ext: str, caption: str, meta: dict) -> None:
        """media_ext: "mp4" or "png"; meta must hold kind, fps, frames, duration, width, height."""
        sample = {"__key__": key, media_ext: media, "txt": caption.encode("utf-8"),
                  "json": json.dumps(meta).encode("utf-8")}
        self.write_sample(sample, kind=meta.get("kind", "video"), seconds=float(meta.get("duration", 0.0)))

    def write_sample(self, sample: dict, kind: str = "video", seconds: float = 0.0) -> None:
        """Write a raw webdataset sample ({"__key__": ..., ext: bytes}) as it is (tests write broken ones)."""
        if self._writer is None or self._count == self.samples_per_shard:
            self._roll()
        self._writer.write(sample)
        self._count += 1
        self.manifest.shards[-1]["samples"] = self._count
        if kind == "image":
            self.manifest.images += 1
        else:
            self.manifest.videos += 1
            self.manifest.video_seconds += seconds

    def skip(self, source: str, reason: str) -> None:
        self.manifest.skipped.append(dict(source=source, reason=reason))

    def _roll(self) -> None:
        self._close_writer()
        name = SHARD_PATTERN.format(index=len(self.manifest.shards))
        self._writer = wds.TarWriter(str(self.folder / name))
        self.manifest.shards.append(dict(path=name, samples=0))
        self._count = 0

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> Manifest:
        self._close_writer()
        self.manifest.write(self.folder)
        return self.manifest

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
