"""What a stage's weights file says about itself: safetensors metadata written by `cascade export` (EMA weights of a
trained stage) and by distillation (a student), read by every loader (`cascade.inference`, `cascade eval`).

A student records the method it was distilled with, the step count and the sampler it must be sampled with, whether
it takes the guidance weight as an input, and the range of w it learned: loaders sample it that way and refuse
settings it cannot honour.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightsInfo:
    kind: str = "random"
    """random (no file), ema (a trained stage) or distilled (a student)."""
    method: str | None = None
    """A student's last distillation method (`cascade.distill`: guidance, progressive)."""
    steps: int | None = None
    """The step count a student was distilled for: it is valid at that count only."""
    sampler: str | None = None
    """The sampler a student must run with."""
    guidance_input: bool = False
    """The student takes the guidance weight w as an input (one network pass per step)."""
    w_range: tuple[float, float] | None = None
    """The guidance weights [w_min, w_max] a guidance-distilled student learned."""

    @property
    def distilled(self) -> bool:
        return self.kind == "distilled"

    def summary(self) -> dict:
        """The short form reports carry: distilled, guidance_distilled, steps."""
        return dict(distilled=self.distilled, guidance_distilled=self.guidance_input, steps=self.steps)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata entries (strings) of this description."""
        meta = {"cascade.weights": self.kind}
        if self.distilled:
            meta.update({"cascade.method": str(self.method), "cascade.steps": str(self.steps),
                         "cascade.sampler": str(self.sampler),
                         "cascade.guidance_distilled": "true" if self.guidance_input else "false",
                         "cascade.w_range": json.dumps(None if self.w_range is None else list(self.w_range))})
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> WeightsInfo:
        kind = meta.get("cascade.weights", "ema")
        if kind != "distilled":
            return cls(kind="ema")
        w_range = json.loads(meta.get("cascade.w_range", "null"))
        lineage = json.loads(meta.get("cascade.lineage", "[]"))
        method = meta.get("cascade.method") or (lineage[-1]["kind"] if lineage else "progressive")
        return cls(kind="distilled", method=method, steps=int(meta["cascade.steps"]),
                   sampler=meta.get("cascade.sampler", "ddim"),
                   guidance_input=meta.get("cascade.guidance_distilled") == "true",
                   w_range=None if w_range is None else (float(w_range[0]), float(w_range[1])))


def read_info(path: str | Path) -> WeightsInfo:
    """The description of a safetensors weights file; only the header is read."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return WeightsInfo.from_metadata(file.metadata() or {})


def save_weights(path: str | Path, tensors: dict, info: WeightsInfo, described: dict[str, str]) -> Path:
    """`tensors` as safetensors with `info` and `described` (cascade.stage, cascade.recipe, ... as strings) in the
    metadata; written to a temporary file and renamed, so a kill never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={**info.metadata(), **described})
    tmp.replace(path)
    return path


def save_weights_streaming(path: str | Path, index: dict[str, tuple[tuple[int, ...], torch.dtype]], groups,
                           info: WeightsInfo, described: dict[str, str]) -> Path:
    """Like `save_weights`, for weights too large to hold at once: `index` names every tensor's shape and dtype,
    `groups` yields (names, load) pairs, `load()` giving those tensors (each name in one group); only one group is
    held at a time. The header is written first from `index` (keys sorted: the same tensors give the same bytes), the
    data in the order the groups come; atomic like `save_weights`."""
    import torch

    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = list(groups)  # the groups' order (names only; tensors are produced lazily by calling each)
    order = [name for names, _ in groups for name in names]
    if sorted(order) != sorted(index):
        raise ValueError(f"{path}: the groups name {len(order)} tensors, the index {len(index)}")
    header: dict = {"__metadata__": {**info.metadata(), **described}}
    offset = 0
    for name in order:
        shape, dtype = index[name]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = dict(dtype=codes[dtype], shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(struct.pack("<Q", len(text)))
        file.write(text)
        for names, load in groups:
            tensors = load()
            for name in names:
                t = tensors[name]
                if tuple(t.shape) != tuple(index[name][0]) or t.dtype != index[name][1]:
                    raise ValueError(f"{path}: tensor {name} is {t.dtype}{list(t.shape)}, the index says "
                                     f"{index[name][1]}{list(index[name][0])}")
                file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del tensors
    tmp.replace(path)
    return path
