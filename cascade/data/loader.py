"""The per-stage data loader: webdataset shards -> batches of uint8 clips, with an exactly resumable position.

Order. Epoch e permutes the shards (seed, e); the global workers (ranks x DataLoader workers) split them, one
shard list per worker (or, with fewer shards than workers, every worker reads every shard and keeps every G-th
sample); inside a shard the samples are visited in a permutation seeded by (seed, e, shard). A tar is read by
random access through its member index, so a position is three integers (epoch, shard in the list, sample in the
shard) and a resumed loader sees exactly what an uninterrupted one would (webdataset's streaming shuffle buffer
cannot be restored; its shard format and writer are kept). Every random choice of a sample (clip start, crop,
whether a still is used) is seeded by (seed, epoch, shard, sample), so it does not depend on which worker reads it.

Bad data never stops a run: a sample that fails is skipped, counted per reason and logged with its key; only an
error budget (more than `max_bad_fraction` bad samples among the last `window`) stops it, loudly, with the counts.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cascade.data.clips import BadSample, ClipSpec, FrameCache, make_example
from cascade.data.shards import Manifest

log = logging.getLogger("cascade.data")


class DataBudgetExceeded(RuntimeError):
    """Too many bad samples in a window: the data, not the model, needs attention."""


@dataclass
class Position:
    """Where a worker role stands: the next sample to read."""

    epoch: int = 0
    shard: int = 0  # index into the role's shard list of this epoch
    sample: int = 0  # index into the shard's visiting order


@dataclass
class LoaderConfig:
    batch_size: int
    seed: int = 0
    image_fraction: float = 0.0  # share of stills in batches (0: stills in the shards are not used)
    max_bad_fraction: float | None = 0.01
    window: int = 1000
    rank: int = 0
    world_size: int = 1
    epochs: int | None = None  # None: endless (training); 1: one pass, e.g. evaluation (last batch may be short)
    decode_cache_bytes: int = 0  # per worker: decoded videos kept for later epochs (0: decode every time)


def read_tar_index(path: str | Path) -> tuple[list[tuple[str, dict[str, tarfile.TarInfo]]], str | None]:
    """Samples of a webdataset tar in file order as (key, {extension: member}); and an error if the tar is cut."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    problem = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.ReadError, EOFError, OSError) as error:
                    problem = f"truncated or corrupt tar ({error})"
                    break
                if member is None:
                    break
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                prefix = member.name[: len(member.name) - len(name)]
                samples.setdefault(prefix + key, {})[ext] = member
    except (tarfile.ReadError, OSError) as error:
        problem = f"unreadable tar ({error})"
    return list(samples.items()), problem


class ShardStream:
    """The order in which one worker role visits samples, and the reading of them."""

    def __init__(self, folder: Path, shards: list[str], seed: int, role: int, roles: int) -> None:
        self.folder, self.shards, self.seed, self.role, self.roles = folder, shards, seed, role, roles
        self._index: dict[int, tuple[list, str | None]] = {}

    def plan(self, epoch: int) -> tuple[list[int], int, int]:
        """(shard indices of this role, sample offset, sample stride) for an epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        if len(self.shards) >= self.roles:
            return order[self.role::self.roles], 0, 1
        return order, self.role, self.roles

    def index(self, shard: int) -> tuple[list, str | None]:
        if shard not in self._index:
            if len(self._index) >= 4:
                self._index.pop(next(iter(self._index)))
            self._index[shard] = read_tar_index(self.folder / self.shards[shard])
        return self._index[shard]

    def visiting_order(self, epoch: int, shard: int, count: int, offset: int, stride: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(count)[offset::stride].tolist()

    def read(self, shard: int, members: dict[str, tarfile.TarInfo]) -> dict:
        sample = {}
        with open(self.folder / self.shards[shard], "rb") as file:
            for ext, member in members.items():
                file.seek(member.offset_data)
                data = file.read(member.size)
                if len(data) != member.size:
                    raise BadSample("truncated_member", f"{member.name}: {len(data)} of {member.size} bytes")
                sample[ext] = data
        return sample


class StageDataset(IterableDataset):
    """Yields whole batches (each worker batches its own samples) with the position after the batch."""

    def __init__(self, folder: str | Path, spec: ClipSpec, config: LoaderConfig,
                 text_source: Callable[[], Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        if not self.manifest.shards:
            raise ValueError(f"{self.folder}: the manifest lists no shards")
        self.spec, self.config, self.text_source = spec, config, text_source
        self.start: dict[int, Position] = {}  # role -> position to start from (resume)
        self.role_shift = 0  # worker w plays role (w + role_shift) mod workers (resume)
        self._keep_image, self._keep_video = self._still_rates()

    def _still_rates(self) -> tuple[float, float]:
        """Keep-probabilities for stills and videos that give `image_fraction` stills in expectation."""
        f = self.config.image_fraction
        total = self.manifest.images + self.manifest.videos
        s = self.manifest.images / total if total else 0.0
        if f <= 0 or s == 0:
            return 0.0, 1.0
        if f >= 1:
            return 1.0, 0.0
        if f <= s:  # too many stills in the data: keep a share of them
            return f * (1 - s) / (s * (1 - f)), 1.0
        return 1.0, s * (1 - f) / (f * (1 - s))  # too few: keep a share of the videos

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        role = (worker + self.role_shift) % workers
        roles = workers * self.config.world_size
        stream = ShardStream(self.folder, [s["path"] for s in self.manifest.shards], self.config.seed,
                             self.config.rank * workers + role, roles)
        encode = self.text_source() if self.text_source is not None else None
        cache = FrameCache(self.config.decode_cache_bytes) if self.config.decode_cache_bytes > 0 else None
        position = Position(**asdict(self.start.get(role, Position())))
        counts: Counter = Counter()
        recent: deque = deque(maxlen=self.config.window)
        batch: list[dict] = []
        reported_cut: set = set()
        while True:
            if self.config.epochs is not None and position.epoch >= self.config.epochs:
                # The end of a finite pass: the short last batch, or the counts alone when it is empty.
                yield self._collate(batch, role, position, counts) if batch else dict(
                    stats_only=True, role=role, position=asdict(position), bad_counts=dict(counts))
                return
            shards, offset, stride = stream.plan(position.epoch)
            if position.shard >= len(shards):
                if cache is not None:
                    log.info("worker role %d, epoch %d: decode cache holds %d videos (%.0f MiB), %d hits, %d misses",
                             role, position.epoch, len(cache), cache.bytes / 2**20, cache.hits, cache.misses)
                position = Position(position.epoch + 1, 0, 0)
                if not shards:
                    raise ValueError(f"{self.folder}: no shard for worker role {role}")
                continue
            shard = shards[position.shard]
            samples, problem = stream.index(shard)
            if problem and (position.epoch, shard) not in reported_cut:
                reported_cut.add((position.epoch, shard))
                counts["truncated_shard"] += 1
                recent.append(True)
                log.warning("shard %s: %s; reading the %d complete samples", stream.shards[shard], problem,
                            len(samples))
            order = stream.visiting_order(position.epoch, shard, len(samples), offset, stride)
            if position.sample >= len(order):
                position = Position(position.epoch, position.shard + 1, 0)
                continue
            index = order[position.sample]
            position = Position(position.epoch, position.shard, position.sample + 1)
            key, members = samples[index]
            rng = np.random.default_rng([self.config.seed, position.epoch, shard, index])
            try:
                example = self._example(stream, shard, key, members, rng, cache)
                if example is None:
                    continue  # a still or a video left out to reach image_fraction; not bad data
                if encode is not None:
                    example["text"], example["text_mask"] = self._encode(encode, example["caption"])
            except BadSample as bad:
                counts[bad.reason] += 1
                recent.append(True)
                log.warning("skipped sample %s in %s: %s", key, stream.shards[shard], bad)
                self._check_budget(recent, counts)
                continue
            recent.append(False)
            example["key"] = key
            batch.append(example)
            if len(batch) == self.config.batch_size:
                yield self._collate(batch, role, position, counts)
                batch = []

    def _example(self, stream: ShardStream, shard: int, key: str, members: dict, rng: np.random.Generator,
                 cache: FrameCache | None) -> dict | None:
        is_image = "png" in members and "mp4" not in members
        if rng.random() >= (self._keep_image if is_image else self._keep_video):
            return None
        return make_example(stream.read(shard, members), self.spec, rng, cache, (stream.shards[shard], key))

    @staticmethod
    def _encode(encode, caption: str):
        from cascade.data.embed import CacheEntryError

        try:
            return encode([caption])
        except CacheEntryError as error:  # a wrong-size cached embedding is one bad sample, not a dead run
            raise BadSample("bad_embedding", str(error)) from None

    def _check_budget(self, recent: deque, counts: Counter) -> None:
        limit = self.config.max_bad_fraction
        if limit is None or len(recent) < recent.maxlen:
            return
        bad = sum(recent)
        if bad > limit * len(recent):
            raise DataBudgetExceeded(f"{self.folder}: {bad} of the last {len(recent)} samples were bad (budget "
                                     f"{limit:.1%}); counts by reason: {dict(counts)}")

    def _collate(self, batch: list[dict], role: int, position: Position, counts: Counter) -> dict:
        out = dict(
            video=torch.stack([b["video"] for b in batch]),  # (B, 3, T, H, W) uint8
            is_image=torch.tensor([b["is_image"] for b in batch]),
            fps=torch.full((len(batch),), float(self.spec.fps)),
            captions=[b["caption"] for b in batch],
            keys=[b["key"] for b in batch],
            role=role, position=asdict(position), bad_counts=dict(counts),
        )
        if self.spec.has_cond:
            out["cond"] = torch.stack([b["cond"] for b in batch])  # (B, 3, T', H', W') uint8
        if "text" in batch[0]:
            out["text"] = torch.cat([b["text"] for b in batch])  # (B, L, D)
            out["text_mask"] = torch.cat([b["text_mask"] for b in batch])  # (B, L)
        return out


class StageLoader:
    """A DataLoader over a `StageDataset` whose position can be saved and restored exactly.

    DataLoader workers deliver batches in turn (batch n comes from worker n mod W). The loader records, for each
    worker role, the position after the last batch the consumer received; after k batches the next one comes
    from role k mod W, so on restore worker w plays role (w + k) mod W from that role's recorded position.
    """

    def __init__(self, dataset: StageDataset, num_workers: int = 0, prefetch_factor: int | None = None) -> None:
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor
        self.batches = 0
        self.positions: dict[int, dict] = {}
        self.bad_counts: dict[int, dict] = {}

    def state_dict(self) -> dict:
        return dict(batches=self.batches, positions={str(k): v for k, v in self.positions.items()},
                    num_workers=self.num_workers, seed=self.dataset.config.seed,
                    rank=self.dataset.config.rank, world_size=self.dataset.config.world_size)

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers or state["world_size"] != self.dataset.config.world_size:
            raise ValueError(f"the saved data position is for {state['num_workers']} workers x "
                             f"{state['world_size']} ranks; this run has {self.num_workers} x "
                             f"{self.dataset.config.world_size}: the order would differ")
        self.batches = state["batches"]
        self.positions = {int(k): v for k, v in state["positions"].items()}

    @property
    def total_bad(self) -> dict:
        total: Counter = Counter()
        for counts in self.bad_counts.values():
            total.update(counts)
        return dict(total)

    def __iter__(self) -> Iterator[dict]:
        roles = max(self.num_workers, 1)
        shift = self.batches % roles
        self.dataset.start = {role: Position(**pos) for role, pos in self.positions.items()}
        self.dataset.role_shift = shift
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            persistent_workers=False)
        for batch in loader:
            self.bad_counts[batch["role"]] = batch["bad_counts"]
            if batch.get("stats_only"):
                continue
            self.batches += 1
            self.positions[batch["role"]] = batch["position"]
            yield batch


def to_model_input(batch: dict, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """uint8 clips -> floats in [-1, 1] on the device (the conversion happens there, not in the loader)."""
    out = dict(batch)
    for name in ("video", "cond"):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True).to(dtype) / 127.5 - 1.0
    for name in ("text", "text_mask", "is_image", "fps"):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True)
    if "text" in out:
        out["text"] = out["text"].to(dtype)
    return out
