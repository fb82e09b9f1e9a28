"""The randomness of a training run that a resume must reproduce, shared by stage training and distillation."""

from __future__ import annotations

import numpy as np
import torch


class StepRandomness:
    """Per-micro-batch generators seeded by (seed, rank, micro-batch count), so a resumed run draws the same noise
    for the same step on any device with no generator state to carry; plus the global RNG state (dropout), saved
    in the checkpoint and put back at the first batch after a resume, after every start-up draw."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.micro_steps = 0
        self._generator: torch.Generator | None = None
        self._pending: dict | None = None

    def next(self, device: torch.device, rank: int) -> torch.Generator:
        """The generator of the next micro-batch: different noise on every rank, the same after a resume."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        seed = np.random.SeedSequence([self.seed, rank, self.micro_steps]).generate_state(1)[0]
        self.micro_steps += 1
        return self._generator.manual_seed(int(seed))

    def state(self) -> dict:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        return dict(micro_steps=self.micro_steps, rng=dict(torch=torch.get_rng_state(), cuda=cuda))

    def load(self, state: dict) -> None:
        self.micro_steps = state.get("micro_steps", 0)
        self._pending = state.get("rng")

    def restore_global(self) -> None:
        """Call at the start of every batch: the first one after a resume gets the saved global RNG state."""
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        if torch.cuda.is_available() and self._pending.get("cuda") is not None:
            torch.cuda.set_rng_state(self._pending["cuda"])
        self._pending = None
