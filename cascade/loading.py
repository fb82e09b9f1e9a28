"""Reading files a user hands us (checkpoints, weights) with one-line errors that name the file and what is wrong.

Checkpoints are read with `torch.load(weights_only=True)` only: a pickle that asks for anything beyond tensors and
plain containers is refused, and the message never suggests turning that off.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

from cascade.errors import UserError, short_repr


def _exists(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such {what}")


def load_torch(path: str | Path, what: str = "checkpoint", **kwargs) -> dict:
    """`torch.load(path, weights_only=True)` of a file, or UserError naming the file and why it cannot be read:
    missing, empty, truncated, not a PyTorch file, or a pickle that would run code."""
    import torch

    path = Path(path)
    _exists(path, what)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a {what} file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: an empty file (0 bytes), not a {what}; it was probably cut off while being written")
    with open(path, "rb") as file:
        head = file.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a (legacy) pickle
        raise UserError(f"{path}: not a PyTorch {what} (it starts with {head!r}, neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise UserError(f"{path}: refused to load: the file asks to run code or build objects beyond tensors "
                            f"({_culprit(text)}); it is not a {what} written by cascade") from None
        raise UserError(f"{path}: not a {what} (its pickle does not parse: {_first_line(text)})") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse a user's file is that file's fault
        raise UserError(f"{path}: truncated or corrupt {what} ({size} bytes): {type(error).__name__}: "
                        f"{_first_line(str(error))}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a {what}: it holds a {type(state).__name__}, not a mapping")
    return state


def _first_line(text: str) -> str:
    """The first line of a library's message, cut short, without advice about weights_only."""
    line = text.strip().splitlines()[0] if text.strip() else "no message"
    line = line.split("weights_only")[0].split(" This is an internal")[0].rstrip(" (,;:")
    return short_repr(line, 160).strip("'\"")


def _culprit(text: str) -> str:
    """What a refused pickle asked for, from torch's message (without torch's advice)."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    if found is None:
        return "an unsupported global"
    return f"it asks for {found.group(1)}" if found.re.pattern.startswith("GLOBAL") else f"pickle opcode {found.group(1)}"


def safetensors_metadata(path: str | Path, what: str = "weights file") -> dict[str, str]:
    """The header metadata of a readable safetensors file (header parses, data complete), else UserError naming
    it: missing, a folder, empty, a PyTorch checkpoint or pickle (never unpickled), too short, corrupt."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _exists(path, what)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a {what}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: an empty file (0 bytes), not a safetensors {what}; it was probably cut off while "
                        f"being written")
    with open(path, "rb") as file:
        head = file.read(9)
    # a safetensors file: a little-endian u64 header length n, then n bytes of JSON from "{" (its first byte can be
    # anything, 0x80 included: only a file without that layout is judged by zip / pickle magic)
    layout = len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
    if not layout and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise UserError(f"{path}: a PyTorch checkpoint or pickle, not a safetensors {what}; it was not loaded "
                        f"(nothing in it is unpickled). A training checkpoint becomes weights with "
                        f"`cascade export CHECKPOINT --out {path}`")
    if size < 8:
        raise UserError(f"{path}: {size} bytes: too short to be a safetensors {what}")
    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable safetensors {what} ({size} bytes): "
                        f"{short_repr(str(error).splitlines()[0] if str(error) else type(error).__name__, 160)}"
                        ) from None


def read_safetensors(path: str | Path, what: str = "weights file") -> tuple[dict, dict[str, str]]:
    """(every tensor, the header metadata) of a safetensors file, or UserError naming the file and why it cannot be
    read (`safetensors_metadata`'s checks, then the tensors' data)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = safetensors_metadata(path, what)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: corrupt safetensors {what}: {short_repr(str(error), 160)}") from None
