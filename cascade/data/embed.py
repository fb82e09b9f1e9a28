"""The T5 embedding cache: every caption of a dataset encoded once by the frozen text encoder, stored in float16.

Layout: `OUT/part-{part:05d}-of-{parts:05d}.safetensors` (OUT defaults to DATASET/embeddings), one file per slice of
the shards (shard index i belongs to part i % parts), each with

- `keys`    (N, 16) uint8: `caption_key(caption)` as bytes, each caption once;
- `lengths` (N,) int32: real tokens (end of sequence included; <= max_tokens);
- `offsets` (N,) int64: first row of each caption in `tokens`;
- `tokens`  (sum of lengths, dim) float16: the encoder's last hidden state on real tokens only, no padding;
- metadata (str -> str): format, encoder, fingerprint, max_tokens, dim, dtype, captions, tokens, part, parts, ...,
  and what was lost: skipped_by_reason and problems (JSON: damaged shards, samples left out), truncated (captions cut
  to max_tokens), longest_tokens, unknown_captions and unknown_pieces (characters the tokenizer does not know).

`EmbeddingCache` reads all parts of one split (tokens stay memory-mapped) and returns what `FrozenT5.encode` returns,
rounded to float16; `TextSource` is what the loader calls: the cache when it exists, else the encoder on the fly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cascade.data.captions import describe_errors, iter_captions, load_t5_tokenizer, token_report
from cascade.data.shards import Manifest, caption_key
from cascade.errors import UserError

FORMAT = "cascade-t5-embeddings/1"
PART_PATTERN = "part-{part:05d}-of-{parts:05d}.safetensors"
_PART_NAME = re.compile(r"^part-(\d{5,})-of-(\d{5,})\.safetensors$")
_CONSISTENT = ("format", "fingerprint", "max_tokens", "dim", "dtype")  # every part of a cache must agree on these
ENCODER_DTYPES = ("float32", "bfloat16", "float16")
BUILD_HINT = "build it with `cascade data embed --shards DATASET --encoder T5_FOLDER`"


class CacheError(UserError, ValueError):
    """The cache folder as a whole is unusable: missing or mixed parts, a file that is not a cache part, a cache
    built for another max_tokens or encoder. One line at the command line (exit status 2)."""


class CacheEntryError(CacheError):
    """One stored entry is inconsistent (length, width, offsets): the loader counts the sample as bad."""


class EmbeddingCacheWarning(UserWarning):
    """Captions are being encoded on the fly because the cache (or an entry of it) is missing."""


# --- the encoder


def encoder_folder(encoder: str | Path) -> Path:
    """The folder holding the encoder's files: `encoder` itself, or a hub id's snapshot in the local hub cache."""
    if Path(encoder).is_dir():
        return Path(encoder)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(str(encoder), "config.json")
    if not isinstance(config, str):
        raise FileNotFoundError(f"text encoder {encoder}: no such folder, and not in the local hub cache")
    return Path(config).parent


def encoder_fingerprint(encoder: str | Path) -> str:
    """SHA-256 (first 32 hex digits) of the encoder's config.json and tokenizer files in full and of each weight
    file's size and first MiB (its safetensors header and first weights): cheap, and changes with the encoder."""
    folder = encoder_folder(encoder)
    digest = hashlib.sha256()
    for name in ("config.json", "spiece.model", "tokenizer.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for path in weights:
        with open(path, "rb") as f:
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode() + f.read(1 << 20))
    return digest.hexdigest()[:32]


# --- writing


def _write_part(path: Path, keys: np.ndarray, lengths: np.ndarray, dim: int, chunks: Iterator[Tensor],
                metadata: dict[str, str]) -> None:
    """Stream a part in the safetensors format: the header (shapes are known from `lengths`), offsets, lengths,
    then `tokens` chunk by chunk (each (rows, dim) float16), then keys; written to a temporary file, then renamed."""
    count, total = len(lengths), int(lengths.sum())
    offsets = np.zeros(count, dtype="<i8")
    offsets[1:] = np.cumsum(lengths[:-1], dtype=np.int64)
    sizes = [("offsets", "I64", [count], 8 * count), ("lengths", "I32", [count], 4 * count),
             ("tokens", "F16", [total, dim], 2 * total * dim), ("keys", "U8", [count, 16], 16 * count)]
    header, start = {"__metadata__": metadata}, 0  # in this order every tensor starts aligned to its item size
    for name, dtype, shape, size in sizes:
        header[name] = dict(dtype=dtype, shape=shape, data_offsets=[start, start + size])
        start += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.write(offsets.tobytes() + lengths.astype("<i4").tobytes())
            written = 0
            for chunk in chunks:
                f.write(chunk.contiguous().numpy().astype("<f2", copy=False).tobytes())
                written += chunk.shape[0]
            if written != total:
                raise RuntimeError(f"{path}: wrote {written} token rows, expected {total}")
            f.write(np.ascontiguousarray(keys, dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def embed_shards(shards: str | Path, encoder: str | Path, max_tokens: int = 128, dtype: str = "float32",
                 out: str | Path | None = None, part: int = 0, parts: int = 1, batch_size: int = 64,
                 progress: bool = True, device: str | None = None) -> Path:
    """Encode the captions of the shards with index i % parts == part, each distinct caption once, into
    OUT/part-{part:05d}-of-{parts:05d}.safetensors (OUT default: SHARDS/embeddings). -> the part file."""
    from tqdm import tqdm

    shards = Path(shards)
    manifest = Manifest.read(shards)
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"--part {part} --parts {parts}: need parts >= 1 and 0 <= part < parts")
    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"--max-tokens {max_tokens} --batch-size {batch_size}: both must be >= 1")
    if dtype not in ENCODER_DTYPES:
        raise ValueError(f"--dtype {dtype}: one of {', '.join(ENCODER_DTYPES)}")

    from cascade.nn.text import FrozenT5  # the data layer touches model code only here, to run the encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        t5 = FrozenT5.from_pretrained(encoder, max_tokens, dtype, device)
    except OSError as error:  # FileNotFoundError for a missing folder; transformers' OSError for an incomplete one
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not isinstance(error, FileNotFoundError):
            as_id = "" if Path(encoder).exists() else "no such folder, and as a hub id: "
            message = f"cannot load the text encoder {encoder}: {as_id}{message}"
        raise FileNotFoundError(message) from error
    fingerprint = encoder_fingerprint(encoder)

    errors: list[dict] = []
    captions: dict[str, str] = {}  # key -> caption, first occurrence order
    samples = 0
    for caption in iter_captions(shards, part, parts, manifest, errors):
        samples += 1
        captions.setdefault(caption_key(caption), caption)
    if not captions and errors:
        raise UserError(f"{shards}: no caption could be read from part {part} of {parts}; "
                        f"{describe_errors(errors)[0]}")
    keys = np.array([np.frombuffer(bytes.fromhex(k), dtype=np.uint8) for k in captions], dtype=np.uint8)
    keys, texts = keys.reshape(-1, 16), list(captions.values())
    full, stats = token_report(t5.tokenizer, texts, max_tokens)
    lengths = np.minimum(full, max_tokens).astype(np.int32)  # T5 truncation keeps the end of sequence

    def chunks() -> Iterator[Tensor]:
        bar = tqdm(total=len(texts), desc=f"embed part {part + 1}/{parts}", unit="caption", disable=not progress)
        for first in range(0, len(texts), batch_size):
            emb, mask = t5.encode(texts[first:first + batch_size])  # (B, max_tokens, dim), (B, max_tokens)
            counts = mask.sum(1).cpu().numpy()
            if not np.array_equal(counts, lengths[first:first + len(counts)]):
                raise RuntimeError("token counts of the encoder's mask differ from the tokenizer's")
            rows = torch.cat([e[:n] for e, n in zip(emb, counts.tolist())]).half()
            if not torch.isfinite(rows).all():
                raise ValueError(f"{encoder}: embeddings overflow float16 (captions {first}..{first + len(counts)})")
            yield rows.cpu()
            bar.update(len(counts))
        bar.close()

    out = Path(out) if out is not None else shards / "embeddings"
    out.mkdir(parents=True, exist_ok=True)
    path = out / PART_PATTERN.format(part=part, parts=parts)
    metadata = dict(format=FORMAT, encoder=str(encoder), fingerprint=fingerprint, max_tokens=str(max_tokens),
                    dim=str(t5.dim), dtype=dtype, captions=str(len(texts)), tokens=str(int(lengths.sum())),
                    part=str(part), parts=str(parts), samples=str(samples), duplicates=str(samples - len(texts)),
                    skipped=str(len(errors)), dataset=str(shards),
                    skipped_by_reason=json.dumps(dict(Counter(e["reason"] for e in errors))),
                    problems=json.dumps(describe_errors(errors)), truncated=str(stats["truncated"]),
                    longest_tokens=str(stats["longest_tokens"]), unknown_captions=str(stats["unknown_captions"]),
                    unknown_pieces=json.dumps(stats["unknown_pieces"], ensure_ascii=False))
    _write_part(path, keys, lengths, t5.dim, chunks(), metadata)
    return path


def describe_part(path: str | Path) -> tuple[str, list[str]]:
    """What `embed_shards` wrote, from the part's metadata: (a summary line, warnings: damaged shards and samples
    left out, captions cut to max_tokens, captions holding pieces the tokenizer does not know)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    skipped = json.loads(meta.get("skipped_by_reason", "{}"))
    left_out = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
    summary = (f"wrote {path}: {meta['captions']} captions ({meta['duplicates']} duplicates) from {meta['samples']} "
               f"samples" + (f" (skipped: {left_out})" if skipped else "")
               + f", {meta['tokens']} tokens x {meta['dim']}, {path.stat().st_size / 2**20:.1f} MiB")
    warns = list(json.loads(meta.get("problems", "[]")))
    captions, max_tokens = int(meta["captions"]), meta["max_tokens"]
    if int(meta.get("truncated", 0)):
        warns.append(f"{meta['truncated']} of {captions} captions are longer than --max-tokens {max_tokens} and were "
                     f"cut (the longest has {meta['longest_tokens']} tokens); a larger text_encoder.max_tokens (and "
                     f"--max-tokens) keeps them whole")
    if int(meta.get("unknown_captions", 0)):
        pieces = json.loads(meta.get("unknown_pieces", "[]"))
        listing = ", ".join(f"{piece!r} in {n}" for piece, n in pieces)
        warns.append(f"{meta['unknown_captions']} of {captions} captions hold characters the tokenizer does not know "
                     f"(encoded as its unknown token)" + (f": {listing}" if listing else "")
                     + "; a tokenizer trained on these captions (`cascade data tiny-t5`) would know them")
    return summary, warns


# --- the cache


def pad_embeddings(entries: list[Tensor], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Entries (L_i, dim) -> embeddings (B, max_tokens, dim) float32 with zeros after each entry, mask (B,
    max_tokens) bool: the same layout as `FrozenT5.encode`."""
    if not entries:
        raise ValueError("no entries to pad")
    emb = torch.zeros(len(entries), max_tokens, entries[0].shape[-1])
    mask = torch.zeros(len(entries), max_tokens, dtype=torch.bool)
    for i, entry in enumerate(entries):
        if entry.shape[0] > max_tokens:
            raise ValueError(f"entry {i} has {entry.shape[0]} tokens, more than max_tokens {max_tokens}")
        emb[i, :entry.shape[0]] = entry.float()
        mask[i, :entry.shape[0]] = True
    return emb, mask


def _key_words(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 16) uint8 keys -> two (N,) uint64 halves, for a sorted index that forks cheaply (no Python objects)."""
    words = np.ascontiguousarray(keys, dtype=np.uint8).view(np.uint64).reshape(-1, 2)
    return words[:, 0].copy(), words[:, 1].copy()


class EmbeddingCache:
    """Every part of one split in `folder`; keys, lengths and offsets in memory, tokens memory-mapped.

    `get(caption)` -> (length, dim) float16 or None; `batch(captions)` -> (emb, mask) like `FrozenT5.encode`.
    Pickles without its open files (DataLoader workers reopen them)."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        files = {}
        for path in sorted(self.folder.glob("part-*-of-*.safetensors")) if self.folder.is_dir() else []:
            match = _PART_NAME.match(path.name)
            if match:
                files[path] = (int(match.group(1)), int(match.group(2)))
        if not files:
            raise FileNotFoundError(f"{self.folder}: no T5 embedding cache (part-*-of-*.safetensors); {BUILD_HINT}")
        splits = sorted({n for _, n in files.values()})
        if len(splits) > 1:
            raise CacheError(f"{self.folder}: parts of {len(splits)} different splits ("
                             f"{', '.join(f'of {n}' for n in splits)}); remove the stale ones")
        parts = splits[0]
        present = {p for p, _ in files.values()}
        missing = [PART_PATTERN.format(part=p, parts=parts) for p in range(parts) if p not in present]
        if missing:
            raise CacheError(f"{self.folder}: missing {len(missing)} of {parts} parts: {', '.join(missing)}; run "
                             f"`cascade data embed ... --part P --parts {parts}` for each")
        self.paths = [self.folder / PART_PATTERN.format(part=p, parts=parts) for p in range(parts)]

        metas, keys, lengths, offsets, part_of, self._shapes = [], [], [], [], [], []
        for index, path in enumerate(self.paths):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") != FORMAT or not {"keys", "lengths", "offsets", "tokens"} <= set(f.keys()):
                        raise CacheError(f"{path}: not a T5 embedding cache part (format {meta.get('format')!r})")
                    k, n, o = f.get_tensor("keys"), f.get_tensor("lengths"), f.get_tensor("offsets")
                    tokens = f.get_slice("tokens")
                    self._shapes.append((tokens.get_shape(), tokens.get_dtype()))
            except CacheError:
                raise
            except Exception as error:  # truncated or garbled file: safetensors refuses it
                raise CacheError(f"{path}: unreadable ({error})") from error
            if k.ndim != 2 or k.shape[1] != 16 or k.dtype != torch.uint8 or n.shape != (k.shape[0],) or \
                    o.shape != (k.shape[0],):
                raise CacheError(f"{path}: keys {tuple(k.shape)}, lengths {tuple(n.shape)} and offsets "
                                 f"{tuple(o.shape)} do not describe the same N entries")
            metas.append(meta)
            keys.append(k.numpy())
            lengths.append(n.numpy().astype(np.int64))
            offsets.append(o.numpy().astype(np.int64))
            part_of.append(np.full(k.shape[0], index, dtype=np.int32))
        for name in _CONSISTENT:
            values = {m.get(name) for m in metas}
            if len(values) > 1:
                listing = ", ".join(f"{p.name}: {m.get(name)}" for p, m in zip(self.paths, metas))
                raise CacheError(f"{self.folder}: parts disagree on {name} ({listing}); rebuild them all with one "
                                 f"encoder and --max-tokens")
        meta = metas[0]
        try:
            self.max_tokens, self.dim = int(meta["max_tokens"]), int(meta["dim"])
            self.fingerprint, self.dtype, self.encoder = meta["fingerprint"], meta["dtype"], meta.get("encoder")
        except (KeyError, ValueError) as error:
            raise CacheError(f"{self.paths[0]}: bad metadata ({error!r})") from error
        self.metadata = metas

        hi, lo = _key_words(np.concatenate(keys))
        order = np.lexsort((lo, hi))  # stable: on a key stored by two parts, the lower part wins
        self._hi, self._lo = hi[order], lo[order]
        self._part = np.concatenate(part_of)[order]
        self._offset = np.concatenate(offsets)[order]
        self._length = np.concatenate(lengths)[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (self._hi[1:] != self._hi[:-1]) | (self._lo[1:] != self._lo[:-1])
        self._unique = int(first.sum())
        self._files: dict[int, object] = {}

    def wrong_max_tokens(self, wanted: int, who: str = "text_encoder.max_tokens is") -> str:
        """The message for a cache used with another max_tokens: the file, both values, the command to rebuild."""
        meta, parts = self.metadata[0], len(self.paths)
        command = (f"cascade data embed --shards {meta.get('dataset', 'DATASET')} --encoder "
                   f"{meta.get('encoder') or 'T5_FOLDER'} --max-tokens {wanted} --out {self.folder}")
        each = f" --part P --parts {parts}` for each P in 0..{parts - 1}" if parts > 1 else "`"
        return (f"{self.paths[0]}: embedding cache built with max_tokens {self.max_tokens}, but {who} {wanted} "
                f"(truncation changes every embedding); rebuild it: `{command}{each}")

    def __len__(self) -> int:
        """Distinct captions."""
        return self._unique

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def _find(self, caption: str) -> int | None:
        hi, lo = np.frombuffer(bytes.fromhex(caption_key(caption)), dtype=np.uint64)
        start, stop = np.searchsorted(self._hi, hi, "left"), np.searchsorted(self._hi, hi, "right")
        for i in range(start, stop):
            if self._lo[i] == lo:
                return i
        return None

    def __contains__(self, caption: str) -> bool:
        return self._find(caption) is not None

    def get(self, caption: str) -> Tensor | None:
        """-> (length, dim) float16, or None when the caption is not cached. Raises CacheEntryError when the stored
        entry is inconsistent with the cache (length, width, offsets)."""
        i = self._find(caption)
        if i is None:
            return None
        part, offset, length = int(self._part[i]), int(self._offset[i]), int(self._length[i])
        (rows, width), dtype = self._shapes[part]
        where = f"{self.paths[part].name}, caption key {caption_key(caption)}"
        if not 1 <= length <= self.max_tokens:
            raise CacheEntryError(f"{where}: length {length} outside 1..max_tokens {self.max_tokens}")
        if width != self.dim or dtype != "F16":
            raise CacheEntryError(f"{where}: tokens are ({rows}, {width}) {dtype}, expected (rows, {self.dim}) F16")
        if offset < 0 or offset + length > rows:
            raise CacheEntryError(f"{where}: rows {offset}..{offset + length} outside the {rows} stored")
        if part not in self._files:
            from safetensors import safe_open

            self._files[part] = safe_open(str(self.paths[part]), framework="pt")
        return self._files[part].get_slice("tokens")[offset:offset + length]

    def batch(self, captions: list[str], max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """-> embeddings (B, max_tokens, dim) float32 (padded positions zero), mask (B, max_tokens) bool, as
        `FrozenT5.encode` gives them rounded to float16. max_tokens must be the cache's (T5 truncation changes every
        embedding of a caption); a caption not in the cache is a KeyError."""
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if max_tokens != self.max_tokens:
            raise CacheError(self.wrong_max_tokens(max_tokens, "asked for"))
        entries = []
        for caption in captions:
            entry = self.get(caption)
            if entry is None:
                raise KeyError(f"caption not in the cache {self.folder}: {caption!r}")
            entries.append(entry)
        return pad_embeddings(entries, max_tokens)


# --- the loader's view

_WARNED: set[str] = set()


def _warn_once(topic: str, message: str) -> None:
    if topic not in _WARNED:
        _WARNED.add(topic)
        warnings.warn(message, EmbeddingCacheWarning, stacklevel=3)


def _load_frozen_t5(path: str, max_tokens: int, dtype: str, device: str):
    from cascade.nn.text import FrozenT5

    return FrozenT5.from_pretrained(path, max_tokens, dtype, device)


def encoder_factory(path: str | Path, max_tokens: int, dtype: str = "float32",
                    device: str = "cpu") -> Callable[[], object]:
    """A picklable no-argument factory of `FrozenT5.from_pretrained(path, ...)` (DataLoader workers may spawn)."""
    return functools.partial(_load_frozen_t5, str(path), max_tokens, dtype, device)


class TextSource:
    """Caption embeddings for training: from the cache in `cache` when it holds any part, otherwise (and for
    captions it lacks) from `encoder()`, a factory called once, on first need, returning a `FrozenT5`-like
    object (`.encode(captions)`, `.max_tokens`). Each process warns once when it falls back.

    On-the-fly embeddings are rounded through float16 like the cached ones, so a batch is the same either way.
    `fingerprint` (e.g. `encoder_fingerprint(path)`), when given, must match the cache's."""

    def __init__(self, cache: str | Path | None, encoder: Callable[[], object], max_tokens: int,
                 fingerprint: str | None = None) -> None:
        self.folder = None if cache is None else Path(cache)
        self.factory, self.max_tokens, self.fingerprint = encoder, max_tokens, fingerprint
        self._cache: EmbeddingCache | None = None
        self._encoder = None
        self._opened = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None}  # a worker builds its own encoder if it needs one

    @property
    def cache(self) -> EmbeddingCache | None:
        if not self._opened:
            self._opened = True
            if self.folder is not None and self.folder.is_dir() and any(self.folder.glob("part-*-of-*.safetensors")):
                cache = EmbeddingCache(self.folder)  # a broken cache is an error, not a reason to fall back
                if cache.max_tokens != self.max_tokens:
                    raise CacheError(cache.wrong_max_tokens(self.max_tokens))
                if self.fingerprint is not None and cache.fingerprint != self.fingerprint:
                    raise CacheError(f"{self.folder}: built with another text encoder (fingerprint "
                                     f"{cache.fingerprint}, expected {self.fingerprint}); rebuild it")
                self._cache = cache
            else:
                where = "given" if self.folder is None else f"at {self.folder}"
                _warn_once("no-cache", f"no T5 embedding cache {where}: captions are encoded on the fly (slow, and "
                                       f"the encoder stays in memory); {BUILD_HINT}")
        return self._cache

    def open(self) -> TextSource:
        """Open the cache now (it opens on first use otherwise): CacheError if it is unusable as a whole."""
        _ = self.cache
        return self

    def _encode(self, captions: list[str]) -> list[Tensor]:
        if self._encoder is None:
            self._encoder = self.factory()
            if self._encoder.max_tokens != self.max_tokens:
                raise ValueError(f"the text encoder has max_tokens {self._encoder.max_tokens}, expected "
                                 f"{self.max_tokens}")
        emb, mask = self._encoder.encode(captions)
        return [e[:int(m.sum())].half().cpu() for e, m in zip(emb, mask)]

    def entries(self, captions: list[str]) -> list[Tensor]:
        """-> one (length, dim) float16 tensor per caption. CacheEntryError for a corrupt cached entry."""
        captions = list(captions)
        found = [None] * len(captions) if self.cache is None else [self.cache.get(c) for c in captions]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            if self.cache is not None:
                _warn_once("missing-entries", f"{self.folder}: {len(missing)} of {len(captions)} captions are not "
                                              f"in the cache, encoded on the fly (is it stale?); rebuild it: "
                                              f"{BUILD_HINT}")
            for i, entry in zip(missing, self._encode([captions[i] for i in missing])):
                found[i] = entry
        return found

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> embeddings (B, max_tokens, dim) float32, mask (B, max_tokens) bool, like `FrozenT5.encode`."""
        return pad_embeddings(self.entries(captions), self.max_tokens)


# --- commands


def _fail(error: Exception) -> int:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_tiny_t5_from_tokenizer(folder: str | Path, tokenizer, dim: int = 64, layers: int = 2, heads: int = 4,
                                 seed: int = 0) -> Path:
    """A randomly initialised tiny T5 over an existing tokenizer's vocabulary, saved like `build_tiny_t5` saves
    one (config.json, model.safetensors and the tokenizer's files)."""
    from transformers import T5Config, T5EncoderModel

    if dim % heads:
        raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("spiece.model", "tokenizer.json"):  # a tokenizer left in `folder` must not shadow this one
        (folder / stale).unlink(missing_ok=True)
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=2 * dim, num_layers=layers,
                      num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_t5_command(args) -> int:
    """`cascade data tiny-t5`: a tiny T5 whose tokenizer is trained on the dataset's captions, or is --tokenizer."""
    from cascade.nn.text import build_tiny_t5

    args.tokenizer = getattr(args, "tokenizer", None)  # the argument parser may predate --tokenizer
    if args.tokenizer is None and args.shards is None:
        raise UserError("cascade data tiny-t5: give --shards (a dataset whose captions train the tokenizer) or "
                        "--tokenizer (an existing one)")
    if args.tokenizer is not None and args.vocab_size is not None:
        raise UserError("cascade data tiny-t5: --vocab-size sizes a tokenizer trained on --shards; with --tokenizer "
                        "the vocabulary is that tokenizer's")
    try:
        captions = list(iter_captions(args.shards)) if args.shards is not None else []
        if args.tokenizer is not None:
            tokenizer = load_t5_tokenizer(args.tokenizer)
            folder = build_tiny_t5_from_tokenizer(args.out, tokenizer, dim=args.dim, layers=args.layers,
                                                  heads=args.heads, seed=args.seed)
        else:
            if not captions:
                raise ValueError(f"{args.shards}: the shards hold no captions")
            folder = build_tiny_t5(args.out, captions, dim=args.dim, layers=args.layers, heads=args.heads,
                                   vocab_size=args.vocab_size or 256, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    config = json.loads((folder / "config.json").read_text())
    source = (f"tokenizer {args.tokenizer}" if args.tokenizer is not None else
              f"tokenizer trained on {len(captions)} captions")
    print(f"wrote {folder}: tiny T5 encoder, dim {args.dim}, {args.layers} layers, {args.heads} heads, vocabulary "
          f"{config['vocab_size']}, {source}")
    if args.tokenizer is not None and captions:
        from transformers import AutoTokenizer

        saved = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        _, stats = token_report(saved, list(dict.fromkeys(captions)), None)
        if stats["unknown_captions"]:
            listing = ", ".join(f"{piece!r} in {n}" for piece, n in stats["unknown_pieces"])
            print(f"warning: {stats['unknown_captions']} of {len(set(captions))} captions of {args.shards} hold "
                  f"characters the tokenizer does not know: {listing}", file=sys.stderr)
    return 0


def embed_command(args) -> int:
    """`cascade data embed`: one part of the embedding cache; warnings for damaged shards, samples left out,
    captions cut to --max-tokens and captions with characters the tokenizer does not know."""
    import time

    start = time.perf_counter()
    try:
        path = embed_shards(args.shards, args.encoder, max_tokens=args.max_tokens, dtype=args.dtype, out=args.out,
                            part=args.part, parts=args.parts, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    summary, warns = describe_part(path)
    print(f"{summary}, {time.perf_counter() - start:.1f} s")
    for line in warns:
        print(f"warning: {line}", file=sys.stderr)
    return 0
