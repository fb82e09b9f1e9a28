"""Random streams of sampling: one generator per video, so that a video never depends on the batch it is made in.

Every function that draws noise at sampling takes `generator`: a `torch.Generator` (one stream for the whole batch,
as in training), a `VideoGenerators` (one stream per video), or None (the global generator).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def stream_seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integers (e.g. seed, video index, stage index), well mixed by numpy's
    SeedSequence: neighbouring tuples give unrelated streams."""
    if any(int(p) < 0 for p in parts):
        raise ValueError(f"seeds and indices must be >= 0, got {parts}")
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


class VideoGenerators:
    """One `torch.Generator` per video, seeded from (seed, index, stream) (edm2's StackedRandomGenerator): video
    `index` draws the same numbers whatever batch it is sampled in and whatever the other videos are. `stream`
    separates independent uses of the same video (e.g. the stages of a cascade)."""

    def __init__(self, seed: int, indices: Sequence[int], stream: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator(device=device).manual_seed(stream_seed(seed, i, stream))
                           for i in indices]

    def __len__(self) -> int:
        return len(self.generators)

    def _check(self, shape: Sequence[int]) -> None:
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"a draw of shape {tuple(shape)} for {len(self.generators)} videos: the first dimension "
                             f"must be the number of videos")

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Tensor:
        """(B, ...) standard normal, row b from video b's generator."""
        self._check(shape)
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=device or g.device)
                            for g in self.generators])


Generator = torch.Generator | VideoGenerators | None


def randn(shape: Sequence[int], generator: Generator = None, dtype: torch.dtype | None = None,
          device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise of `shape` from any of the generators above."""
    if isinstance(generator, VideoGenerators):
        return generator.randn(shape, dtype=dtype, device=device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
