"""What a stage's weights file says about itself: safetensors metadata written by `cascade export` (EMA weights of a
trained stage) and by distillation (a student), read by every loader (`cascade.inference`, `cascade eval`).

A student records the method it was distilled with, the step count and the sampler it must be sampled with, whether
it takes the guidance weight as an input, and the range of w it learned: loaders sample it that way and refuse
settings it cannot honour.

Files are byte-reproducible: the header is canonical JSON (sorted keys, no spaces; JSON-valued entries re-serialized
the same way) and tensors are stored in name order, so two identical runs export identical bytes. The metadata holds
only what describes the weights (the resolved stage recipe, the text encoder's settings, the global step, a student's
lineage): no time, host or process. Paths in it (the text encoder's, a teacher's) are the recipe's, as the user wrote
them, so they are equal for identical runs.

Reading (`read_weights`, `read_info`) turns every unreadable file into one line naming it; `explain_mismatch` says
which recipe fields differ from the stage a file was trained as when its tensors do not fit.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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
    """The description of a safetensors weights file; only the header is read. UserError naming the file when it
    is not a readable safetensors file or its metadata does not parse."""
    from cascade.loading import safetensors_metadata

    return info_from(path, safetensors_metadata(path))


# --- writing: the same weights and description give the same bytes ------------------------------------------------

def canonical_metadata(info: WeightsInfo, described: Mapping[str, str]) -> dict[str, str]:
    """The metadata entries of a weights file in one canonical form: keys sorted, and a value holding a JSON object
    or array re-serialized with sorted keys and no spaces (the recipe, the text encoder, the lineage), so the bytes
    depend on the content only, never on the order a dict was built in."""
    meta = {**info.metadata(), **described}
    out = {}
    for key in sorted(meta):
        value = meta[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"weights metadata must map strings to strings; {key!r} holds a {type(value).__name__}")
        if value[:1] in ("{", "["):
            try:
                value = json.dumps(json.loads(value), sort_keys=True, separators=(",", ":"))
            except ValueError:
                pass  # not JSON after all: kept as given
        out[key] = value
    return out


def _dtype_codes() -> dict:
    import torch

    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                       ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, name):
            codes[getattr(torch, name)] = code
    return codes


def _header(index: Mapping[str, tuple[tuple[int, ...], torch.dtype]], order: Sequence[str],
            metadata: dict[str, str], path: Path) -> bytes:
    """The safetensors header (8-byte length, then JSON padded with spaces to 8 bytes) of tensors stored in
    `order`; the JSON has sorted keys and no spaces."""
    import torch

    codes = _dtype_codes()
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        shape, dtype = index[name]
        if dtype not in codes:
            raise ValueError(f"{path}: tensor {name} is {dtype}, which a safetensors weights file cannot hold")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = dict(dtype=codes[dtype], shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(t: torch.Tensor) -> bytes:
    import torch

    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _write_atomically(path: Path, write) -> Path:
    """`write(file)` into PATH.tmp, renamed to `path` once complete; a failure removes the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_weights(path: str | Path, tensors: Mapping[str, torch.Tensor], info: WeightsInfo,
                 described: Mapping[str, str]) -> Path:
    """`tensors` as safetensors with `info` and `described` (cascade.stage, cascade.recipe, ... as strings) in the
    metadata; written to a temporary file and renamed, so a kill never leaves half a file. Byte-reproducible: the
    header is canonical JSON (`canonical_metadata`, sorted keys) and the tensors are stored in name order, so the
    same weights and description give the same bytes whatever order the dicts were built in."""
    path = Path(path)
    order = sorted(tensors)
    index = {name: (tuple(tensors[name].shape), tensors[name].dtype) for name in order}
    head = _header(index, order, canonical_metadata(info, described), path)

    def write(file) -> None:
        file.write(head)
        for name in order:
            file.write(_tensor_bytes(tensors[name]))
    return _write_atomically(path, write)


def save_weights_streaming(path: str | Path, index: Mapping[str, tuple[tuple[int, ...], torch.dtype]], groups,
                           info: WeightsInfo, described: Mapping[str, str]) -> Path:
    """Like `save_weights`, for weights too large to hold at once: `index` names every tensor's shape and dtype,
    `groups` yields (names, load) pairs, `load()` giving those tensors (each name in one group); only one group is
    held at a time. The header is written first from `index`; the data in a canonical order (groups ordered by
    their first name, names sorted within a group), so the same tensors and groups give the same bytes whatever
    order they came in; atomic like `save_weights`."""
    path = Path(path)
    groups = sorted(((sorted(names), load) for names, load in groups), key=lambda group: group[0][:1])
    order = [name for names, _ in groups for name in names]
    if sorted(order) != sorted(index):
        raise ValueError(f"{path}: the groups name {len(order)} tensors, the index {len(index)}")
    head = _header(index, order, canonical_metadata(info, described), path)

    def write(file) -> None:
        file.write(head)
        for names, load in groups:
            tensors = load()
            for name in names:
                t = tensors[name]
                if tuple(t.shape) != tuple(index[name][0]) or t.dtype != index[name][1]:
                    raise ValueError(f"{path}: tensor {name} is {t.dtype}{list(t.shape)}, the index says "
                                     f"{index[name][1]}{list(index[name][0])}")
                file.write(_tensor_bytes(t))
            del tensors
    return _write_atomically(path, write)


# --- reading: every failure a line naming the file ------------------------------------------------------------------

def read_weights(path: str | Path, what: str = "weights file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors weights file, or UserError naming the file and what is wrong: missing,
    empty, a PyTorch checkpoint or pickle (never unpickled), a truncated or corrupt safetensors file."""
    from cascade.loading import read_safetensors

    return read_safetensors(path, what)


def info_from(path: str | Path, metadata: Mapping[str, str]) -> WeightsInfo:
    """`WeightsInfo.from_metadata`, or UserError naming the file when its cascade.* entries do not parse."""
    from cascade.errors import UserError, short_repr

    try:
        return WeightsInfo.from_metadata(dict(metadata))
    except KeyError as error:
        raise UserError(f"{path}: the metadata of a distilled student lacks {error.args[0]}") from None
    except (ValueError, TypeError, IndexError) as error:
        fields = {k: short_repr(v, 60) for k, v in metadata.items() if k.startswith("cascade.") and k not in
                  ("cascade.stage", "cascade.text_encoder", "cascade.lineage")}
        raise UserError(f"{path}: unreadable cascade metadata ({type(error).__name__}: "
                        f"{short_repr(str(error), 100)}; entries {fields})") from None


def tensor_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """The first way a file's tensors do not fit a network's state dict, in words: tensors missing or unexpected
    (the first few named), else the first tensor whose shape differs, else one whose dtype is of another kind
    (integer or bool where the network holds floats); None when they fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the network's {len(expected)} tensors "
                     f"{'is' if len(missing) == 1 else 'are'} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} {'tensor is' if len(unexpected) == 1 else 'tensors are'} not in the "
                     f"network ({_names(unexpected)})")
    if parts:
        return "; ".join(parts)
    for name, want in expected.items():
        got = found[name]
        if tuple(got.shape) != tuple(want.shape):
            return f"tensor {name} has shape {list(got.shape)}, the recipe's network has {list(want.shape)}"
        if got.dtype.is_floating_point != want.dtype.is_floating_point or got.dtype.is_complex != want.dtype.is_complex:
            return f"tensor {name} is {got.dtype}, the recipe's network holds {want.dtype}"
    return None


def _names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def config_differences(recorded: Mapping, wanted: Mapping, prefix: str) -> list[tuple[str, object, object]]:
    """(dotted field, recorded value, wanted value) for every leaf where two nested configs differ (lists compared
    whole), in `wanted`'s order; a field one side lacks counts as None there."""
    out: list[tuple[str, object, object]] = []

    def walk(a, b, where: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in [*b, *(k for k in a if k not in b)]:
                walk(a.get(key), b.get(key), f"{where}.{key}")
        elif a != b:
            out.append((where, a, b))
    walk(recorded, wanted, prefix)
    return out


ARCHITECTURE = ("kind", "unet.")  # the stage fields that decide the network's tensors (`unet_kwargs`)


def explain_mismatch(path: str | Path, stage_name: str, metadata: Mapping[str, str], stage: Mapping,
                     text_encoder: Mapping, tensors_problem: str, limit: int = 6) -> str:
    """One line on why a weights file does not fit the recipe's stage: the fields that shape the network (the
    stage's kind, unet.*, text_encoder.dim) where the stage it was trained as (its cascade.stage and
    cascade.text_encoder metadata) differs from the recipe's, at most `limit` listed, and the first tensor problem;
    the tensor problem alone when the file records no stage or none of those fields differs."""
    recorded_stage = _json_entry(metadata, "cascade.stage")
    recorded_encoder = _json_entry(metadata, "cascade.text_encoder")
    diffs: list[tuple[str, object, object]] = []
    if isinstance(recorded_stage, dict) and recorded_stage:
        diffs = config_differences(recorded_stage, stage, f"stages.{stage_name}")
    if isinstance(recorded_encoder, dict) and "dim" in recorded_encoder and recorded_encoder["dim"] != \
            text_encoder.get("dim"):
        diffs.insert(0, ("text_encoder.dim", recorded_encoder["dim"], text_encoder.get("dim")))
    diffs = [d for d in diffs if d[0] == "text_encoder.dim" or any(  # training or sampling settings cannot be
        d[0].startswith(f"stages.{stage_name}.{a}") for a in ARCHITECTURE)]  # the cause: left out
    if not diffs:
        return f"{path}: does not fit stage {stage_name}: {tensors_problem}"
    from cascade.errors import short_repr

    def said(value) -> str:
        return short_repr(value, 60)
    if len(diffs) == 1:
        field, was, now = diffs[0]
        listed = f"trained with {field} {said(was)}, the recipe says {said(now)}"
    else:
        listed = "trained with " + ", ".join(f"{f} {said(a)} (the recipe says {said(b)})" for f, a, b in diffs[:limit])
        if len(diffs) > limit:
            listed += f" and {len(diffs) - limit} more differing fields"
    return (f"{path}: {listed}; these weights do not fit stage {stage_name} ({tensors_problem}): use the recipe "
            f"they were trained with, or override those fields")


MEANING = (("diffusion", "parameterization", None), ("diffusion", "residual", False))
"""Stage fields that leave the tensors' shapes alone but change what the network computes: (section, field, the
value a file that predates the field was trained with; None: unknown, not checked)."""


def meaning_mismatch(path: str | Path, stage_name: str, metadata: Mapping[str, str], stage: Mapping) -> str | None:
    """One line when the stage a weights file was trained as (its cascade.stage metadata) differs from the
    recipe's stage in a field of `MEANING` (the tensors fit, the network would not mean the same); None when they
    agree or the file records no stage."""
    recorded = _json_entry(metadata, "cascade.stage")
    if not isinstance(recorded, dict) or not recorded:
        return None
    for section, field, default in MEANING:
        was = (recorded.get(section) or {}).get(field, default)
        now = (stage.get(section) or {}).get(field)
        if was is not None and was != now:
            return (f"{path}: trained with stages.{stage_name}.{section}.{field} {was}, the recipe says {now}; the "
                    f"tensors fit but would compute something else: use the recipe they were trained with, or "
                    f"override stages.{stage_name}.{section}.{field}={str(was).lower()}")
    return None


def _json_entry(metadata: Mapping[str, str], key: str):
    try:
        return json.loads(metadata.get(key, "null"))
    except ValueError:
        return None
