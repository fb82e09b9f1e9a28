"""Sampling and evaluation across processes: who this process is (torchrun or srun), its device, the process group,
and the few collectives `cascade sample` and `cascade eval` need.

    ranks = distributed.init(device)          # Ranks(rank, world, local_rank, device); a group when world > 1
    mine = distributed.share(batches, ranks)  # this rank's whole batches of the one-process run
    ...
    total = distributed.all_reduce_sum(partial_sums, ranks)
    parts = distributed.gather(objects, ranks)  # a list on rank 0, None elsewhere

A video keeps its global index wherever it is made (its random streams are seeded from the index,
`cascade.diffusion.noise`), and a rank takes whole batches of the one-process run, so every video is computed in the
same batch as without ranks: the results are the same for any number of ranks. Collectives are no-ops for one
process; every rank calls them the same number of times, also a rank with no videos.
"""

from __future__ import annotations

import atexit
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

__all__ = ["Ranks", "all_reduce_max", "all_reduce_sum", "barrier", "destroy", "gather", "init", "launched",
           "resolve_device", "share"]

T = TypeVar("T")
# Ranks with less work wait in the next collective for the slowest one (a whole cascade's samples): generous.
TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def launched() -> tuple[int, int, int]:
    """(rank, world, local rank) as the launcher says: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), an srun step
    (SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0) otherwise. The batch script of
    an allocation (no srun step) is one process, whatever the allocation's task count."""
    env = os.environ
    if env.get("RANK", "").isdigit() and env.get("WORLD_SIZE", "").isdigit():
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0") or 0)
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID", "").isdigit():
        world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        return int(env["SLURM_PROCID"]), int(world), int(env.get("SLURM_LOCALID", "0") or 0)
    return 0, 1, 0


def resolve_device(requested: torch.device | str | None, local_rank: int = 0, world: int = 1) -> torch.device:
    """The device this process runs on: `requested` (a bare "cuda" means cuda:LOCAL_RANK when there are ranks), or
    CUDA (cuda:LOCAL_RANK) when present, else the CPU. A ValueError with one line when the device cannot be had."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {requested}: not a device (e.g. cuda, cuda:1, cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = "" if hidden is None else f", CUDA_VISIBLE_DEVICES={hidden!r}"
            raise ValueError(f"--device {requested}: no CUDA device is visible here (CUDA is not available: "
                             f"torch.cuda.is_available() is False{why}); use --device cpu, or leave --device out")
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _master_address() -> str:
    """MASTER_ADDR for an srun step that did not set one: this host on one node, else the step's first host."""
    if os.environ.get("SLURM_NNODES", "1") == "1":
        return "127.0.0.1"
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=60)
        return done.stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        raise RuntimeError(f"cannot find the first host of {nodes!r} (scontrol show hostnames); set "
                           f"MASTER_ADDR") from None

_created = False


def init(device: torch.device | str | None = None) -> Ranks:
    """This process's Ranks on its device (`resolve_device`); with more than one process, the process group too
    (gloo on the CPU, NCCL on CUDA; env:// rendezvous: torchrun sets it, an srun step gets the first host and a
    port from the job id), destroyed at exit. Reuses a group that is already there."""
    import torch.distributed as dist

    global _created
    rank, world, local_rank = launched()
    device = resolve_device(device, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", _master_address() if "SLURM_PROCID" in os.environ else "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                world_size=world, timeout=TIMEOUT)
        _created = True
        atexit.register(destroy)
    return Ranks(rank, world, local_rank, device)


def destroy() -> None:
    """Destroy the process group `init` created (idempotent)."""
    import torch.distributed as dist

    global _created
    if _created and dist.is_initialized():
        dist.destroy_process_group()
    _created = False


def share(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's contiguous share of `items` (e.g. the batches of a run): rank r of w takes items
    [ceil(r n / w), ceil((r + 1) n / w)), so rank 0 has the first and most; a rank may get none."""
    n, r, w = len(items), ranks.rank, ranks.world
    return list(items[-(-r * n // w):-(-(r + 1) * n // w)])


def _collective_device(ranks: Ranks) -> torch.device:
    import torch.distributed as dist

    return ranks.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum over ranks of `values` (any shape), float64 on the CPU; the same on every rank."""
    return _all_reduce(values, ranks, "sum")


def all_reduce_max(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The maximum over ranks of `values`, float64 on the CPU."""
    return _all_reduce(values, ranks, "max")


def _all_reduce(values: torch.Tensor, ranks: Ranks, op: str) -> torch.Tensor:
    x = torch.as_tensor(values, dtype=torch.float64).cpu().clone()
    if ranks.world == 1:
        return x
    import torch.distributed as dist

    y = x.to(_collective_device(ranks))
    dist.all_reduce(y, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return y.cpu()


def gather(obj: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's `obj` (picklable) in rank order on rank 0; None on the other ranks."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * ranks.world if ranks.is_zero else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (e.g. until rank 0 has written what the others read)."""
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()
