"""What every benchmark script writes: its figures plus the environment they were measured in, as JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def write_results(path: Path, result: dict) -> Path:
    """Add the environment (python, torch, threads, cores, load average) to `result` and write it as JSON."""
    result = dict(result, environment=dict(python=platform.python_version(), torch=torch.__version__,
                                           threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                                           load_average=os.getloadavg()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
