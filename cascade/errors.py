"""Errors a user can act on: `cascade` prints each as one line (`error: ...`) and exits with its code, no traceback.

Raise `UserError` where the cause is the user's input (a file, a field, a sample) and the message names it and what is
wrong; keep the message to one line (`one_line` cuts a long one). Programming errors stay exceptions with tracebacks.
"""

from __future__ import annotations

import errno
import math
import reprlib

MAX_MESSAGE = 2000  # characters of one error message; a YAML bomb or a huge value must not make a huge message


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line, at most `limit` characters (the cut says how much was left out)."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    keep = max(limit - 40, 20)
    return f"{flat[:keep]}... ({len(flat) - keep} more characters)"


def number_text(value: float) -> str:
    """A number for a message: in full up to 30 digits, else its size (str() of an integer of 5,000 digits raises
    ValueError, and would be unreadable anyway)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"
    return f"{value:g}" if isinstance(value, float) else str(value)


class _Shown(reprlib.Repr):
    """reprlib with small limits, and integers too long to print in full shown by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = 60, 60, 40

    def repr_int(self, x: int, level: int) -> str:
        return number_text(x)


def shown(value: object) -> str:
    """repr() of a value for a message, bounded however large or deep the value is (reprlib never builds the whole
    repr of a nested list)."""
    return _Shown().repr(value)


def short_repr(value: object, limit: int = 80) -> str:
    """`shown(value)` cut to `limit` characters."""
    text = shown(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class UserError(Exception):
    """A failure caused by the user's input; `code` is the exit status (2: bad input, 1: the run stopped)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(one_line(message))
        self.code = code


def describe_os_error(error: OSError) -> str | None:
    """One line for an OSError a user can act on (disk full, quota, permission, read-only file system); None
    for the others."""
    where = f" writing {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}: free space (or point run_dir elsewhere) and rerun to resume"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where.replace(' writing', ' for')}"
    if error.errno == errno.EROFS:
        return f"read-only file system{where}"
    return None
