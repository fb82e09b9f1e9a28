"""The LightningDataModule of one stage: the resumable stage loader, and the data position of what was trained on."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

from cascade.data.loader import StageLoader


class _Batches:
    """The loader as Lightning sees it: an iterable without `state_dict`. Lightning would otherwise save the
    loader's own position, which runs one prefetched batch ahead of training, and restore it over ours."""

    def __init__(self, loader: StageLoader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


class StageDataModule(L.LightningDataModule):
    """`make_loader(rank, world_size) -> StageLoader`. The position saved in a checkpoint is that of the batches the
    module trained on (`consumed`), not of the loader, which runs ahead (prefetching)."""

    def __init__(self, make_loader: Callable[[int, int], StageLoader]) -> None:
        super().__init__()
        self.make_loader = make_loader
        self.position = dict(batches=0, positions={})
        self._restored: dict | None = None
        self.loader: StageLoader | None = None

    def train_dataloader(self) -> _Batches:
        self.loader = self.make_loader(self.trainer.global_rank, self.trainer.world_size)
        if self._restored is not None:
            self.loader.load_state_dict(self._restored)
        return _Batches(self.loader)

    def consumed(self, batch: dict) -> None:
        """Called by the module for every batch it trains on."""
        self.position["batches"] += 1
        self.position["positions"][str(batch["role"])] = batch["position"]

    def report(self) -> str:
        """One line for the end of a run: samples read and bad ones by reason (StageLoader.report); this rank's."""
        if self.loader is None:
            return "data: no samples read"
        world = self.trainer.world_size if self.trainer is not None else 1
        return self.loader.report() + (f" (rank {self.trainer.global_rank} of {world})" if world > 1 else "")

    def state_dict(self) -> dict:
        base = self.loader.state_dict() if self.loader is not None else {}
        state = {**base, "batches": self.position["batches"], "positions": dict(self.position["positions"]),
                 "bad_counts": self.loader.total_bad if self.loader is not None else {}}
        if self.trainer is not None and self.trainer.world_size > 1:
            # Only rank 0's checkpoint is written, and every rank reads other samples: keep each rank's position.
            # Saving is collective already (Trainer.save_checkpoint ends in a barrier on every rank).
            import torch.distributed as dist

            own = dict(rank=self.trainer.global_rank, batches=state["batches"], positions=state["positions"])
            ranks: list = [None] * self.trainer.world_size
            dist.all_gather_object(ranks, own)
            state["ranks"] = {str(r["rank"]): r for r in ranks}
        return state

    def load_state_dict(self, state: dict) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if "ranks" in state:
            state = {**state, **state["ranks"][str(rank)]}
        elif state.get("rank", 0) != rank and state.get("world_size") == world:  # (another world size: the loader says)
            raise ValueError(f"the saved data position is rank {state.get('rank')}'s; this is rank {rank}")
        self._restored = state
        self.position = dict(batches=state["batches"], positions=dict(state["positions"]))
