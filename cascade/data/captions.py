"""Captions as the loader reads them, and what a T5 tokenizer makes of them: captions cut to max_tokens and
characters it does not know. Used by `cascade data embed` and `cascade data tiny-t5`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cascade.data.shards import Manifest, scan_tar, split_member_name
from cascade.errors import UserError, one_line

# --- reading


def iter_captions(folder: str | Path, part: int = 0, parts: int = 1, manifest: Manifest | None = None,
                  errors: list | None = None) -> Iterator[str]:
    """The captions of the shards with index i % parts == part, in shard order, as the loader reads them: each
    sample's `KEY.txt`, UTF-8, stripped; only the caption members are read. What is left out is appended to
    `errors` as dict(shard, member, reason, detail): a caption that is not UTF-8 or empty, a sample whose member
    names are absolute or climb out of the tar (`unsafe_member_name`), and a truncated or unreadable tar
    (`damaged_shard`, whose complete samples' captions are still read, as the loader reads them)."""
    folder = Path(folder)
    manifest = Manifest.read(folder) if manifest is None else manifest
    errors = [] if errors is None else errors
    for index, shard in enumerate(manifest.shards):
        if index % parts != part:
            continue
        path = folder / shard["path"]
        tar = scan_tar(path)
        if tar.problem:
            errors.append(dict(shard=shard["path"], member=None, reason="damaged_shard", detail=tar.problem,
                               complete=len(tar.samples)))
        unsafe: dict[str, str] = {}
        for name in tar.unsafe:  # one entry per sample, named by its first member
            unsafe.setdefault(split_member_name(name)[0], name)
        errors += [dict(shard=shard["path"], member=name, reason="unsafe_member_name", detail="")
                   for name in unsafe.values()]
        captions = [(key, members["txt"]) for key, members in tar.samples if "txt" in members]
        if not captions:
            continue
        with open(path, "rb") as file:
            for key, member in captions:
                file.seek(member.offset_data)
                data = file.read(member.size)
                if len(data) != member.size:
                    errors.append(dict(shard=shard["path"], member=member.name, reason="truncated_member",
                                       detail=f"{len(data)} of {member.size} bytes"))
                    continue
                try:
                    caption = data.decode("utf-8").strip()
                except UnicodeDecodeError as error:
                    errors.append(dict(shard=shard["path"], member=member.name, reason="caption_not_utf8",
                                       detail=str(error)))
                    continue
                if not caption:
                    errors.append(dict(shard=shard["path"], member=member.name, reason="empty_caption", detail=""))
                    continue
                yield caption


def describe_errors(errors: list[dict], limit: int = 10) -> list[str]:
    """One line per damaged shard, and per shard the samples left out for unsafe member names or their caption;
    at most `limit` lines (the last says how many more)."""
    lines, by_shard = [], {}
    for error in errors:
        if error["reason"] == "damaged_shard":
            lines.append(f"{error['shard']}: {error['detail']}; read the captions of its {error['complete']} "
                         f"complete samples")
        else:
            by_shard.setdefault(error["shard"], []).append(error)
    for shard, found in by_shard.items():
        reasons = Counter(e["reason"] for e in found)
        first = next(e["member"] for e in found)
        lines.append(f"{shard}: left out {len(found)} samples ("
                     + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()) + f"; first: {first!r})")
    if len(lines) > limit:
        lines = lines[:limit - 1] + [f"... and {len(lines) - limit + 1} more shards (see the part's metadata)"]
    return [one_line(line, 500) for line in lines]


# --- what tokenization loses


def unknown_pieces(tokenizer, text: str, known: dict[str, bool]) -> list[str]:
    """The characters of `text` the tokenizer maps to its unknown token (each tokenized alone; `known` caches the
    answer per character across calls)."""
    unk, found = tokenizer.unk_token_id, []
    for char in dict.fromkeys(text):
        if char.isspace():
            continue
        if char not in known:
            known[char] = unk not in tokenizer(char, add_special_tokens=False, verbose=False)["input_ids"]
        if not known[char]:
            found.append(char)
    return found


def token_report(tokenizer, texts: list[str], max_tokens: int | None, batch_size: int = 1024,
                 ) -> tuple[np.ndarray, dict]:
    """Tokenize captions in full: -> (tokens of each caption, end of sequence included, before truncation: (N,)
    int64; dict(truncated: captions longer than max_tokens, longest_tokens, unknown_captions: captions holding the
    unknown token, unknown_pieces: [(character, captions holding it)] commonest first, at most 10))."""
    unk = tokenizer.unk_token_id
    full, pieces, known, unknown = [], Counter(), {}, 0
    for first in range(0, len(texts), batch_size):
        chunk = texts[first:first + batch_size]
        for text, ids in zip(chunk, tokenizer(chunk, verbose=False)["input_ids"]):
            full.append(len(ids))
            if unk is not None and unk in ids:
                unknown += 1
                pieces.update(unknown_pieces(tokenizer, text, known))
    full = np.array(full, dtype=np.int64)
    return full, dict(truncated=int((full > max_tokens).sum()) if max_tokens else 0,
                      longest_tokens=int(full.max()) if len(full) else 0, unknown_captions=unknown,
                      unknown_pieces=pieces.most_common(10))



# --- tokenizers


def load_t5_tokenizer(path: str | Path):
    """A T5 tokenizer from a sentencepiece `.model` file or a folder `T5TokenizerFast` (or `T5Tokenizer`) loads
    offline. UserError naming the path when it is neither."""
    import shutil
    import tempfile

    from transformers import T5Tokenizer, T5TokenizerFast

    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory() as tmp:  # from_pretrained converts spiece.model (see build_tiny_t5)
            shutil.copyfile(path, Path(tmp) / "spiece.model")
            try:
                tokenizer = T5Tokenizer.from_pretrained(tmp, model_max_length=512)
            except Exception as error:  # sentencepiece refuses the file: RuntimeError, OSError, a protobuf error
                raise UserError(f"--tokenizer {path}: not a sentencepiece model ({one_line(error, 200)})") from None
    elif path.is_dir():
        tokenizer = None
        for kind in (T5TokenizerFast, T5Tokenizer):
            try:
                tokenizer = kind.from_pretrained(str(path), local_files_only=True)
                break
            except Exception as error:  # missing or unreadable files: OSError, ValueError, TypeError
                problem = one_line(error, 200)
        if tokenizer is None:
            raise UserError(f"--tokenizer {path}: no T5 tokenizer in this folder (spiece.model or tokenizer.json): "
                            f"{problem}")
    else:
        raise UserError(f"--tokenizer {path}: no such file or folder")
    for role in ("pad", "eos", "unk"):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise UserError(f"--tokenizer {path}: the tokenizer has no {role} token, which T5 needs")
    return tokenizer
