"""What a run folder holds besides the training itself: the lock that keeps a second process out, the checkpoint a
run resumes from (the newest that loads), what changed in its recipe, and signals that arrive during start-up.

The lock is `FOLDER/run.lock`, a small JSON file (host, pid, the process's start time, since when, the command, the
SLURM job), created atomically. Only the launching process takes it (global rank 0; Lightning's own ranks > 0 and
the other ranks of torchrun or srun do not), before any work, and removes it on every exit that runs Python's
`finally`. A lock left by a killed process is taken over when it is provably stale: its pid is not running on this
host (or runs another process than the one that wrote it), or it was written by an earlier start of this same SLURM
job (a requeued job comes back under its own id, maybe on another host).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cascade.errors import UserError, one_line, short_repr

LOCK = "run.lock"


# --- the lock ---------------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/PID/stat field 22); None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[19]


def _running(pid: int, start: str | None) -> bool:
    """Whether `pid` is alive on this host and is still the process that started at `start`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def is_launcher() -> bool:
    """Whether this process is the one that launches the run: global rank 0, not one of Lightning's own ranks."""
    from cascade.files import process_rank

    return process_rank() == 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict, path: Path) -> str | None:
    """Why the lock `holder` wrote is stale, or None while its process may still be running."""
    host, pid, job = holder.get("host"), holder.get("pid"), os.environ.get("SLURM_JOB_ID")
    if not isinstance(pid, int) or not host:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            return None
        return "it does not say who holds it" if age > 60 else None  # else a lock being written this instant
    if host == socket.gethostname():
        if pid == os.getpid() and holder.get("start") != _process_start(pid):
            return f"pid {pid} was an earlier process (this one reuses its pid)"
        if not _running(pid, holder.get("start")):
            return f"pid {pid} is no longer running on {host}"
        return None
    if job is not None and holder.get("slurm_job") == job:
        return f"it was written by an earlier start of this SLURM job ({job}) on host {host}"
    return None


class RunLock:
    """`FOLDER/run.lock` held for the life of a `with` block (or acquire/release); reentrant within one process."""

    def __init__(self, folder: str | Path, what: str = "run folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK
        self.held = False

    def _mine(self) -> dict:
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
        return dict(host=socket.gethostname(), pid=os.getpid(), start=_process_start(os.getpid()),
                    since=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=short_repr(command, 200).strip("'\""),
                    slurm_job=os.environ.get("SLURM_JOB_ID"), slurm_restart=os.environ.get("SLURM_RESTART_COUNT"))

    def acquire(self) -> bool:
        """Take the lock (True), or find it already ours (False); UserError naming the holder when another process
        holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self._mine()
        tmp = self.path.with_name(f".{LOCK}.{mine['host']}.{mine['pid']}")
        tmp.write_text(json.dumps(mine) + "\n")
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic, and fails where the lock exists (also over NFS)
                    self.held = True
                    return True
                except FileExistsError:
                    pass
                holder = _holder(self.path)
                if holder is None:  # released meanwhile
                    continue
                if (holder.get("host"), holder.get("pid"), holder.get("start")) == (
                        mine["host"], mine["pid"], mine["start"]):
                    return False  # this process holds it already
                reason = _stale(holder, self.path)
                if reason is None:
                    if holder:
                        raise UserError(
                            f"{self.folder} is in use by pid {holder['pid']} on host {holder['host']} since "
                            f"{holder.get('since', '?')} ({holder.get('command', '?')}); two processes in one "
                            f"{self.what} would overwrite each other's checkpoints. Wait for it or stop it; if that "
                            f"process is gone (its machine died), delete {self.path} and rerun")
                    time.sleep(0.2)  # a lock being written
                    continue
                if _holder(self.path) != holder:  # taken over by someone else meanwhile: look again
                    continue
                print(f"note: {self.path}: taking over a stale lock ({reason})", file=sys.stderr, flush=True)
                self.path.unlink(missing_ok=True)
            raise UserError(f"{self.path}: could not take the lock of {self.folder} (another process keeps taking "
                            f"it); rerun")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _holder(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def locked(folder: str | Path, what: str = "run folder"):
    """Hold the run folder's lock in the launching process; other ranks go on without it."""
    if not is_launcher():
        yield None
        return
    with RunLock(folder, what) as lock:
        yield lock


# --- signals during start-up ------------------------------------------------------------------------------------
class StartupInterrupted(BaseException):
    """SIGTERM or SIGUSR1 before the first training step: there is nothing to save; the run stops at once.
    A BaseException, as KeyboardInterrupt: no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextmanager
def interruptible_startup(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
    """Until the trainer installs its own handlers (cascade.lit.callbacks.Preemption, at the start of training),
    SIGTERM and SIGUSR1 raise StartupInterrupted: loading data and building networks can take minutes, and a
    preempted job must stop cleanly, not be killed. The previous handlers come back afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise StartupInterrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def startup_error(error: StartupInterrupted, what: str, resume: str) -> UserError:
    """The one line for a signal during start-up; the exit status is 128 + the signal's number, as for a process
    the signal killed (143 for SIGTERM)."""
    return UserError(f"{what}: received {error.name} during start-up, before the first step: stopped with nothing "
                     f"to save; {resume}", code=128 + error.signum)


# --- the checkpoint to resume from ------------------------------------------------------------------------------
@dataclass
class Resume:
    """The checkpoint a run resumes from (None: start at step 0), its step, and the newer ones that did not load."""

    path: Path | None = None
    step: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def checkpoint_step(path: Path) -> int:
    """The step of a training checkpoint (a file, or a sharded folder), or UserError saying why it does not load.
    A file is read memory-mapped: its tensors are not copied, but a truncated or refused file fails here."""
    from cascade.lit.sharding import DCP_META, META, checkpoint_complete
    from cascade.loading import load_torch

    path = Path(path)
    if path.is_dir():
        if not checkpoint_complete(path):
            raise UserError(f"{path}: an incomplete sharded checkpoint (no {DCP_META} or {META}); it was probably "
                            f"cut off while being written")
        state = load_torch(path / META, "checkpoint")
    else:
        zipped = False
        if path.is_file():
            with open(path, "rb") as file:
                zipped = file.read(2) == b"PK"
        state = load_torch(path, "checkpoint", **(dict(mmap=True) if zipped else {}))
    step = state.get("global_step")
    if not isinstance(step, int) or "state_dict" not in state and not path.is_dir():
        raise UserError(f"{path}: not a training checkpoint (no global_step and state_dict)")
    return step


def _numbered(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for p in folder.glob("step-*.ckpt"):
        m = re.fullmatch(r"step-(\d+)\.ckpt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def find_resume(folder: str | Path) -> Resume:
    """The newest checkpoint of a run folder that loads: `last.ckpt` (or, sharded, the `last.ckpt.old` it was
    replacing), or a newer or intact `step-*.ckpt`. UserError when checkpoints exist and none loads: a run never
    restarts from step 0 over them."""
    from cascade.lit.sharding import complete_checkpoint

    checkpoints = Path(folder) / "checkpoints"
    resume, tried = Resume(), []
    last = checkpoints / "last.ckpt"
    lasts = [last] if last.exists() else []
    old = complete_checkpoint(last)
    if old is not None and old != last:
        lasts.append(old)
    for path in lasts:
        try:
            resume = Resume(path, checkpoint_step(path))
            break
        except UserError as error:
            tried.append((path, str(error)))
    for number, path in _numbered(checkpoints):
        if resume.path is not None and number <= resume.step:
            break  # last.ckpt is at least as new
        try:
            step = checkpoint_step(path)
        except UserError as error:
            tried.append((path, str(error)))
            continue
        if resume.path is None or step > resume.step:
            resume = Resume(path, step)
        break
    resume.skipped = [(p, why) for p, why in tried if p != resume.path]
    if resume.path is None and tried:
        listed = "; ".join(why for _, why in tried)
        raise UserError(f"{checkpoints}: no checkpoint loads, and training would otherwise start again from step 0: "
                        f"{listed}. Move them away to start anew")
    return resume


def describe_skipped(path: Path, why: str) -> str:
    """One line for a checkpoint that was passed over."""
    why = why[len(str(path)) + 2:] if why.startswith(f"{path}: ") else why
    return one_line(f"warning: not resuming from {path}: {why}", 400)


# --- what changed in a recipe -----------------------------------------------------------------------------------
def changed_fields(old: object, new: object, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, old, new) of every leaf that differs between two resolved recipe parts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += changed_fields(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def format_changes(changes: list[tuple[str, object, object]], limit: int = 8) -> str:
    """`a.b: 1 -> 2; c: x -> y` (the first `limit`, then how many more)."""
    shown = [f"{name}: {short_repr(old, 40)} -> {short_repr(new, 40)}" for name, old, new in changes[:limit]]
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(shown) + more
