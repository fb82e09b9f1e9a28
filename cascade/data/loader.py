"""The per-stage data loader: webdataset shards -> batches of uint8 clips, with an exactly resumable position.

Order. Epoch e permutes the shards (seed, e); the global workers (ranks x DataLoader workers) split them, one
shard list per worker (or, with fewer shards than workers, every worker reads every shard and keeps every G-th
sample); inside a shard the samples are visited in a permutation seeded by (seed, e, shard). A tar is read by
random access through its member index, so a position is three integers (epoch, shard in the list, sample in the
shard) and a resumed loader sees exactly what an uninterrupted one would (webdataset's streaming shuffle buffer
cannot be restored; its shard format and writer are kept). Every random choice of a sample (clip start, crop,
whether a still is used) is seeded by (seed, epoch, shard, sample), so it does not depend on which worker reads it.

Bad data never stops a run: a sample that fails is skipped, counted per reason and logged with its key; only an
error budget stops it, loudly, with the counts. The budget is judged from the first sample on: once `window` samples
were read, more than `max_bad_fraction` of the last `window` stops the run; before that, as soon as the bad count so
far is implausible for data within the budget (binomial upper tail below 1e-3), so a short run on mostly bad data
stops within a few samples while one bad video among a few good ones does not stop a run it would not stop later. Tar members whose names are absolute or climb out (`../x`) are never
read: they are skipped and counted as `unsafe_member_name`.

Errors a user can act on (`UserError`: the budget, a cache built for another max_tokens) cross from a DataLoader
worker to the main process as a message, and are raised there: one line, not a worker's traceback.
"""

from __future__ import annotations

import logging
import math
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cascade.data.clips import BadSample, ClipSpec, FrameCache, make_example
from cascade.data.shards import Manifest, TarIndex, scan_tar
from cascade.errors import UserError

log = logging.getLogger("cascade.data")


BUDGET_CERTAINTY = 1e-3  # stop before the window is full once data within the budget would be this unlikely


def bad_tail(bad: int, seen: int, fraction: float) -> float:
    """P(at least `bad` bad samples among `seen`) when each is bad with probability `fraction` (binomial upper tail,
    summed in log space; exact for the window's sizes)."""
    if bad <= 0:
        return 1.0
    if fraction <= 0:
        return 0.0
    if fraction >= 1:
        return 1.0
    log_p, log_q = math.log(fraction), math.log1p(-fraction)
    terms = [math.lgamma(seen + 1) - math.lgamma(k + 1) - math.lgamma(seen - k + 1) + k * log_p + (seen - k) * log_q
             for k in range(bad, seen + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


class DataBudgetExceeded(UserError):
    """Too many bad samples: the data, not the model, needs attention (the run stopped: exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=1)


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
    """Samples of a webdataset tar in file order as (key, {extension: member}); and an error if the tar is cut.
    Members with unsafe names are left out (`scan_tar` lists them)."""
    index = scan_tar(path)
    return index.samples, index.problem


def read_members(path: str | Path, members: dict[str, tarfile.TarInfo]) -> dict[str, bytes]:
    """{extension: bytes} of one sample's members, read by offset. Raises BadSample for a member cut short."""
    sample = {}
    with open(path, "rb") as file:
        for ext, member in members.items():
            file.seek(member.offset_data)
            data = file.read(member.size)
            if len(data) != member.size:
                raise BadSample("truncated_member", f"{member.name}: {len(data)} of {member.size} bytes")
            sample[ext] = data
    return sample


class ShardStream:
    """The order in which one worker role visits samples, and the reading of them."""

    def __init__(self, folder: Path, shards: list[str], seed: int, role: int, roles: int) -> None:
        self.folder, self.shards, self.seed, self.role, self.roles = folder, shards, seed, role, roles
        self._index: dict[int, TarIndex] = {}

    def plan(self, epoch: int) -> tuple[list[int], int, int]:
        """(shard indices of this role, sample offset, sample stride) for an epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        if len(self.shards) >= self.roles:
            return order[self.role::self.roles], 0, 1
        return order, self.role, self.roles

    def index(self, shard: int) -> TarIndex:
        if shard not in self._index:
            if len(self._index) >= 4:
                self._index.pop(next(iter(self._index)))
            self._index[shard] = scan_tar(self.folder / self.shards[shard])
        return self._index[shard]

    def visiting_order(self, epoch: int, shard: int, count: int, offset: int, stride: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(count)[offset::stride].tolist()

    def read(self, shard: int, members: dict[str, tarfile.TarInfo]) -> dict:
        return read_members(self.folder / self.shards[shard], members)


@dataclass
class _RoleState:
    """What one worker role has done: its position, and the samples it read (good and bad) with the bad ones by
    reason, for this process's lifetime."""

    role: int
    position: Position
    counts: Counter = field(default_factory=Counter)
    seen: int = 0


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
        state = _RoleState(role, Position(**asdict(self.start.get(role, Position()))))
        try:
            yield from self._batches(state, workers)
        except UserError as error:  # raised again by StageLoader in the main process: one line, no worker traceback
            yield self._stats(state, error=error)

    def _batches(self, state: _RoleState, workers: int) -> Iterator[dict]:
        roles = workers * self.config.world_size
        stream = ShardStream(self.folder, [s["path"] for s in self.manifest.shards], self.config.seed,
                             self.config.rank * workers + state.role, roles)
        encode = self.text_source() if self.text_source is not None else None
        if hasattr(encode, "open"):
            encode.open()  # a cache unusable as a whole (another max_tokens, encoder) stops the run before any work
        cache = FrameCache(self.config.decode_cache_bytes) if self.config.decode_cache_bytes > 0 else None
        recent: deque = deque(maxlen=self.config.window)
        batch: list[dict] = []
        reported: set = set()
        while True:
            position = state.position
            if self.config.epochs is not None and position.epoch >= self.config.epochs:
                # The end of a finite pass: the short last batch, or the counts alone when it is empty.
                yield self._collate(batch, state) if batch else self._stats(state)
                return
            shards, offset, stride = stream.plan(position.epoch)
            if position.shard >= len(shards):
                if cache is not None:
                    log.info("worker role %d, epoch %d: decode cache holds %d videos (%.0f MiB), %d hits, %d misses",
                             state.role, position.epoch, len(cache), cache.bytes / 2**20, cache.hits, cache.misses)
                state.position = Position(position.epoch + 1, 0, 0)
                if not shards:
                    raise ValueError(f"{self.folder}: no shard for worker role {state.role}")
                continue
            shard = shards[position.shard]
            index = stream.index(shard)
            if (position.epoch, shard) not in reported:  # a shard's own problems, counted once per epoch
                reported.add((position.epoch, shard))
                self._shard_problems(stream.shards[shard], index, state, recent, offset, stride)
            order = stream.visiting_order(position.epoch, shard, len(index.samples), offset, stride)
            if position.sample >= len(order):
                state.position = Position(position.epoch, position.shard + 1, 0)
                continue
            sample = order[position.sample]
            state.position = Position(position.epoch, position.shard, position.sample + 1)
            key, members = index.samples[sample]
            rng = np.random.default_rng([self.config.seed, position.epoch, shard, sample])
            try:
                example = self._example(stream, shard, key, members, rng, cache)
                if example is None:
                    continue  # a still or a video left out to reach image_fraction; not bad data
                if encode is not None:
                    example["text"], example["text_mask"] = self._encode(encode, example["caption"])
            except BadSample as bad:
                log.warning("skipped sample %s in %s: %s", key, stream.shards[shard], bad)
                self._count_bad(state, recent, bad.reason)
                continue
            state.seen += 1
            recent.append(False)
            example["key"] = key
            batch.append(example)
            if len(batch) == self.config.batch_size:
                yield self._collate(batch, state)
                batch = []

    def _shard_problems(self, name: str, index: TarIndex, state: _RoleState, recent: deque, offset: int,
                        stride: int) -> None:
        """Count a cut tar once, and this role's share (every stride-th) of the samples with unsafe member names."""
        if index.problem:
            log.warning("shard %s: %s; reading the %d complete samples", name, index.problem, len(index.samples))
            self._count_bad(state, recent, "truncated_shard")
        if index.unsafe:
            shown = ", ".join(repr(n) for n in index.unsafe[:3]) + (", ..." if len(index.unsafe) > 3 else "")
            log.warning("shard %s: skipped %d samples whose member names are absolute or climb out of the tar (%s)",
                        name, index.unsafe_samples, shown)
            for _ in range(offset, index.unsafe_samples, stride):
                self._count_bad(state, recent, "unsafe_member_name")

    def _count_bad(self, state: _RoleState, recent: deque, reason: str) -> None:
        state.counts[reason] += 1
        state.seen += 1
        recent.append(True)
        self._check_budget(recent, state.counts)

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
        """Raise DataBudgetExceeded when the bad samples are more than max_bad_fraction allows: over the last `window`
        samples once that many were read; before that, as soon as the count read so far is implausible for data
        within the budget (a binomial upper tail below BUDGET_CERTAINTY: 11 bad in the first 17 at 1 %), so a short
        run on mostly bad data stops early while a single bad sample among a few good ones does not."""
        limit = self.config.max_bad_fraction
        if limit is None:
            return
        bad, seen = sum(recent), len(recent)
        if seen < self.config.window:
            if bad_tail(bad, seen, limit) >= BUDGET_CERTAINTY:
                return
            where = (f"bad sample{'s' * (bad != 1)} in the first {seen} read, more than the budget allows (data within "
                     f"it would show that many less than once in {round(1 / BUDGET_CERTAINTY):,} runs)")
        elif bad > limit * seen:
            where = f"of the last {seen} samples were bad"
        else:
            return
        reasons = ", ".join(f"{reason} {count}" for reason, count in counts.most_common())
        raise DataBudgetExceeded(f"{self.folder}: {bad} {where} (data.max_bad_fraction {limit:.1%}); counts by "
                                 f"reason: {reasons}; each skipped sample is logged (logger cascade.data, in the run "
                                 f"folder's train.log) with its shard and key")

    def _stats(self, state: _RoleState, error: UserError | None = None) -> dict:
        """A batch-less item: the role's counts (the end of a finite pass) or an error for the main process."""
        return dict(stats_only=True, role=state.role, position=asdict(state.position), bad_counts=dict(state.counts),
                    seen=state.seen, error=error, error_code=getattr(error, "code", None))

    def _collate(self, batch: list[dict], state: _RoleState) -> dict:
        out = dict(
            video=torch.stack([b["video"] for b in batch]),  # (B, 3, T, H, W) uint8
            is_image=torch.tensor([b["is_image"] for b in batch]),
            fps=torch.full((len(batch),), float(self.spec.fps)),
            captions=[b["caption"] for b in batch],
            keys=[b["key"] for b in batch],
            role=state.role, position=asdict(state.position), bad_counts=dict(state.counts), seen=state.seen,
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
        self.bad_counts: dict[int, dict] = {}  # role -> bad samples by reason
        self.seen: dict[int, int] = {}  # role -> samples read, good and bad

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
        """Bad samples by reason, over every worker role, since this loader was made (not saved in checkpoints)."""
        total: Counter = Counter()
        for counts in self.bad_counts.values():
            total.update(counts)
        return dict(total)

    @property
    def total_seen(self) -> int:
        """Samples read (good and bad) over every worker role, as far as the batches received tell."""
        return sum(self.seen.values())

    def report(self) -> str:
        """One line for the end of a run: bad samples of those read, by reason."""
        bad = self.total_bad
        total = sum(bad.values())
        if not total:
            return f"data: {self.total_seen} samples read, none bad"
        reasons = ", ".join(f"{reason} {count}" for reason, count in Counter(bad).most_common())
        return (f"data: {total} of {self.total_seen} samples read were bad "
                f"({total / max(self.total_seen, 1):.1%}): {reasons}")

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
            self.seen[batch["role"]] = batch["seen"]
            if batch.get("error") is not None:  # a worker's UserError, raised here without its traceback
                error = batch["error"]
                error.code = batch["error_code"]
                raise error
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
