"""`cascade run`'s status line: each running node's step / max_steps, elapsed time and an estimate of the time left.

Read from what the nodes already write: the step journal of a training run (RUN/STAGE/train_steps.jsonl) and of
each distillation round (RUN/STAGE/distill/ROUND/train_steps.jsonl, finished when its student.safetensors exists),
one JSON line per micro-batch whose `step` is the optimizer steps done before it. Only the journal's last line is
read (its tail), so polling costs the same at step 10 and at step 100,000.

On a terminal the line is rewritten in place; otherwise (a log file) it is printed every `every` seconds.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cascade.recipe import Recipe

__all__ = ["Journal", "node_journals", "last_step", "format_duration", "Progress", "StatusLine", "StatusThread"]

TAIL_BYTES = 65536  # one journal line lists the batch's sample keys: a few KiB at most


@dataclass
class Journal:
    """One training run's step journal, its length in optimizer steps, and the file that says it is finished."""

    path: Path
    max_steps: int
    finished: Path | None = None


def node_journals(recipe: Recipe, node: str) -> list[Journal]:
    """The step journals of a `train/STAGE` or `distill/STAGE` node, in order (none for the other nodes)."""
    kind, _, name = node.partition("/")
    if kind == "train":
        stage = recipe.stage(name)
        return [Journal(recipe.run_folder(name) / "train_steps.jsonl", stage.train.max_steps)]
    if kind == "distill":
        from cascade.recipe.build import build_distillation_rounds

        journals = []
        for r in build_distillation_rounds(recipe.stage(name)):
            folder = recipe.run_folder(name) / "distill" / r.name
            journals.append(Journal(folder / "train_steps.jsonl", r.max_steps, folder / "student.safetensors"))
        return journals
    return []


def last_step(path: Path) -> int | None:
    """Optimizer steps reached by the run whose journal is `path` (its last line's step + 1: the step in
    progress), None when there is no complete line yet."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - TAIL_BYTES))
            tail = file.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")[1 if size > TAIL_BYTES else 0:]):
        try:
            return int(json.loads(line)["step"]) + 1
        except (ValueError, KeyError, TypeError):
            continue  # empty, cut off mid-write, or not a step record
    return None


def format_duration(seconds: float) -> str:
    """42s, 5m07s, 2h03m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _Running:
    started: float
    journals: list[Journal]
    first_steps: int = 0  # steps already done when the node started (a resumed run): not this run's speed


class Progress:
    """The nodes running now and where each stands (thread-safe: a status thread reads while nodes start and
    stop). `clock`: seconds (time.monotonic; a fake one in tests)."""

    def __init__(self, recipe: Recipe, clock=time.monotonic) -> None:
        self.recipe, self.clock = recipe, clock
        self.running: dict[str, _Running] = {}
        self._lock = threading.Lock()

    def start(self, node: str) -> None:
        entry = _Running(self.clock(), node_journals(self.recipe, node))
        entry.first_steps = self._steps(entry)[0]
        with self._lock:
            self.running[node] = entry

    def stop(self, node: str) -> None:
        with self._lock:
            self.running.pop(node, None)

    def steps(self, node: str) -> tuple[int, int]:
        """(steps done, steps in all) over the node's journals; (0, 0) for a node without any."""
        with self._lock:
            entry = self.running[node]
        return self._steps(entry)

    @staticmethod
    def _steps(entry: _Running) -> tuple[int, int]:
        done = total = 0
        for journal in entry.journals:
            total += journal.max_steps
            if journal.finished is not None and journal.finished.exists():
                done += journal.max_steps
            else:
                done += min(last_step(journal.path) or 0, journal.max_steps)
        return done, total

    def describe(self, node: str) -> str:
        """e.g. `train/base 1201/3500 steps, 5m12s elapsed, ~9m58s left`."""
        with self._lock:
            entry = self.running[node]
        return self._describe(node, entry)

    def _describe(self, node: str, entry: _Running) -> str:
        elapsed = self.clock() - entry.started
        done, total = self._steps(entry)
        if not total:
            return f"{node} {format_duration(elapsed)} elapsed"
        text = f"{node} {done}/{total} steps, {format_duration(elapsed)} elapsed"
        new = done - entry.first_steps
        if new > 0 and elapsed > 0:  # the speed of this run so far, start-up included
            return text + f", ~{format_duration((total - done) * elapsed / new)} left"
        return text + ", estimating"

    def line(self) -> str:
        """One line for every running node, or "" when none runs."""
        with self._lock:
            entries = list(self.running.items())
        return " | ".join(self._describe(node, entry) for node, entry in entries)


class StatusLine:
    """Writes the status to `stream`: in place on a terminal (every call), else one line every `every` seconds.
    `clear()` before printing anything else keeps the terminal's line from mixing with it."""

    def __init__(self, stream=None, every: float | None = None, clock=time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = (1.0 if self.tty else 30.0) if every is None else every
        self.clock = clock
        self.last = clock()  # the first line after `every`: nodes that end sooner need none
        self.shown = False

    def update(self, text: str) -> None:
        now = self.clock()
        if not text or now - self.last < self.every:
            return
        self.last = now
        if self.tty:
            width = max(20, _columns() - 1)
            self.stream.write("\r" + (text if len(text) <= width else text[:width - 3] + "...") + "\x1b[K")
            self.shown = True
        else:
            self.stream.write(f"status: {text}\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size().columns


class StatusThread:
    """The status line while one node runs in this process (`cascade run --jobs 1`): a daemon thread polls
    every second. On a terminal it stays quiet: the node's own progress bars are live there."""

    def __init__(self, progress: Progress, status: StatusLine, poll: float = 1.0) -> None:
        self.progress, self.status, self.poll = progress, status, min(poll, status.every)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cascade-status", daemon=True)

    def __enter__(self) -> StatusThread:
        if not self.status.tty:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.status.update(self.progress.line())
            except Exception as error:  # never let the status line stop a run
                print(f"(status line disabled: {error})", file=sys.stderr, flush=True)
                return
