"""Sharded training (FSDP2): `fully_shard` per U-Net block and at the root, a sharded EMA, sharded checkpoints.

`launch.strategy: fsdp` on more than one device trains through Lightning's `ModelParallelStrategy` (its device mesh
is built from the device type, so it runs on a CPU mesh with gloo as on GPUs with NCCL). The module's
`configure_model` calls `shard_module`, which applies `fully_shard` to every space-time block of the network and of
its EMA copy, then to their roots: each rank holds 1/world of the weights, gradients, optimizer state and EMA.
Under `bf16-mixed` the gathered weights are cast to bfloat16 for compute and gradients are reduced in float32.

A checkpoint is a folder (torch.distributed.checkpoint: one file per rank, `.metadata`, and Lightning's `meta.pt`).
It is written under `NAME.tmp` and renamed to `NAME` by rank 0 once every rank's part and both metadata files are
on disk, so a folder named `*.ckpt` is always complete. Replacing `last.ckpt` renames the old folder to
`last.ckpt.old` first; `complete_checkpoint` takes that one when a kill fell between the two renames.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

META = "meta.pt"  # Lightning's metadata file in a distributed checkpoint folder (everything but module and optimizer)
DCP_META = ".metadata"  # torch.distributed.checkpoint's index of the tensors and their shards


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def unet_blocks(net: nn.Module) -> Iterator[nn.Module]:
    """The units `fully_shard` wraps one by one: every space-time block of the down and up paths."""
    for path in ("down", "up"):
        for level in getattr(net, path, ()):
            yield from level


def mixed_precision(precision: str):
    """The FSDP2 policy of a Lightning precision flag: bf16 compute, fp32 gradient reduction under bf16-mixed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_network(net: nn.Module, mesh, policy) -> None:
    """`fully_shard` each block, then the root (stem, embeddings, samplers, output): one block's full weights are
    gathered at a time in forward and backward."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # The U-Net returns a transposed view; FSDP2 warns that an in-place op on it would skip a hook. Nothing here
    # modifies a network's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    for block in unet_blocks(net):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(tensors) -> int:
    """Bytes this rank holds of these tensors (their local shards)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float, first: bool) -> None:
    """The EMA step of `torch.optim.swa_utils` (copy on the first update, then lerp towards the weights by
    1 - decay), on each rank's local shards: sharded weights make a sharded EMA, never a full copy."""
    mine = [local(p) for p in (*ema.parameters(), *ema.buffers())]
    theirs = [local(p).detach() for p in (*net.parameters(), *net.buffers())]
    if first:
        torch._foreach_copy_(mine, theirs)
        return
    floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - decay)
    for a, b in zip(mine, theirs):
        if not a.is_floating_point():
            a.copy_(a * decay + b * (1 - decay))


def total_grad_norm(parameters) -> float:
    """The global 2-norm of the gradients, whether they are sharded (all-reduced over ranks) or whole."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return float("nan")
    squares = torch.stack([local(g).detach().float().pow(2).sum() for g in grads]).sum()
    if any(hasattr(g, "to_local") for g in grads):
        import torch.distributed as dist

        dist.all_reduce(squares)
    return squares.sqrt().item()


def checkpoint_complete(path: Path) -> bool:
    """A checkpoint file, or a distributed checkpoint folder with its tensor index and Lightning's metadata."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and (path / DCP_META).is_file() and (path / META).is_file())


def complete_checkpoint(path: Path) -> Path | None:
    """`path` if complete; else the folder it was replacing (`PATH.old`, kept until the new one is in place)."""
    for candidate in (Path(path), Path(str(path) + ".old")):
        if checkpoint_complete(candidate):
            return candidate
    return None


def strategy(world_size: int):
    """Lightning's ModelParallelStrategy as the data-parallel axis of FSDP2 over every rank, with atomic sharded
    checkpoints."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class ShardedStrategy(ModelParallelStrategy):
        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            final = Path(self.broadcast(str(filepath)))
            tmp = final.with_name(final.name + ".tmp")
            if self.is_global_zero and tmp.exists():
                shutil.rmtree(tmp)  # a folder left by a kill mid-write
            self.barrier()
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier()  # every rank's shard and both metadata files are written
            if self.is_global_zero:
                old = final.with_name(final.name + ".old")
                if final.exists():
                    if old.exists():
                        shutil.rmtree(old)
                    final.rename(old)
                tmp.rename(final)
                if old.exists():
                    shutil.rmtree(old)
            self.barrier()

        def remove_checkpoint(self, filepath) -> None:
            if self.is_global_zero:
                path = Path(filepath)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()

    return ShardedStrategy(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True)


# --- reading a sharded checkpoint in one process ---------------------------------------------------------------
def checkpoint_meta(path: Path) -> dict:
    """Lightning's metadata of a distributed checkpoint (step, callbacks, the cascade state): tensors only."""
    return torch.load(Path(path) / META, map_location="cpu", weights_only=True)


def tensor_index(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor of a distributed checkpoint: full shape and dtype, read from `.metadata` alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata()
    return {key: (m.size, m.properties.dtype) for key, m in meta.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def read_tensors(path: Path, keys: list[str], index: dict | None = None) -> dict[str, Tensor]:
    """The full tensors `keys` of a distributed checkpoint, assembled from every rank's shards, in this process
    (no process group): only these tensors are allocated."""
    import warnings

    import torch.distributed.checkpoint as dcp

    index = tensor_index(path) if index is None else index
    state = {key: torch.empty(index[key][0], dtype=index[key][1]) for key in keys}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def ema_groups(index: dict, prefix: str = "state_dict.ema.module.") -> list[list[str]]:
    """The EMA's tensors of a distributed checkpoint in groups of one block each (the unit `fully_shard` gathered),
    the root's tensors as one group: an export holds one group's full tensors at a time."""
    groups: dict[str, list[str]] = {}
    for key in sorted(index):
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split(".")
        unit = ".".join(parts[:3]) if parts[0] in ("down", "up") and len(parts) > 3 else "root"
        groups.setdefault(unit, []).append(key)
    return list(groups.values())
