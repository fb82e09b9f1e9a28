"""Small file helpers shared across the package."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (weights, checkpoints, students' lineage); of a folder (a
    sharded checkpoint), of its files' names and bytes in name order."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def process_rank() -> int:
    """This process's global rank as the launcher tells it (SLURM, torchrun or Lightning's own launcher); 0 alone.
    For writes made outside a trainer (run info); inside one, `trainer.is_global_zero` is the authority."""
    import os

    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def wait_for(path: str | Path, timeout: float = 900.0, poll: float = 0.2) -> Path:
    """Wait until another rank has written `path` (written atomically by rank 0)."""
    import time

    path, deadline = Path(path), time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written by rank 0 within {timeout:.0f} s")
        time.sleep(poll)
    return path
