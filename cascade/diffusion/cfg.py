"""Caption dropout in training, which trains the unconditional model of classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor


def drop_captions(text_mask: Tensor, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Mask every token of a random share `prob` of the captions: (B, L) bool -> (B, L) bool.

    A caption with no unmasked token is exactly what the samplers' unconditional pass feeds the network
    (the U-Net then attends only to its learned null token), so training and guidance agree
    (Ho & Salimans 2022; Imagen drops 10 %).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {prob}")
    keep = torch.rand(text_mask.shape[0], generator=generator, device=text_mask.device) >= prob  # (B,)
    return text_mask & keep[:, None]
