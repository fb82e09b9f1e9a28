"""Scalar conditioning embeddings: noise level, augmentation level, fps, guidance weight."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fourier_features(value: Tensor, dim: int, max_freq: float = 1000.0) -> Tensor:
    """Sinusoidal features of a scalar per sample.

    value: (B,) -> (B, dim). Frequencies are geometric in [1, max_freq] (Transformer / DDPM style),
    so an input of order one is resolved finely and coarsely at once.
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=value.device, dtype=torch.float32))
    angles = value.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ScalarEmbedding(nn.Module):
    """Embeds one scalar per sample: (value - offset) / scale -> Fourier features -> MLP.

    `zero_init=True` zeroes the last layer, so a newly added conditioning (e.g. the guidance weight
    of a guidance-distilled student, Meng et al. 2023) starts with no effect on a pretrained network.
    """

    def __init__(self, emb_dim: int, scale: float, offset: float = 0.0, num_features: int = 128,
                 zero_init: bool = False) -> None:
        super().__init__()
        self.scale, self.offset, self.num_features = scale, offset, num_features
        self.mlp = nn.Sequential(nn.Linear(num_features, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, value: Tensor) -> Tensor:  # value: (B,) -> (B, emb_dim)
        feats = fourier_features((value - self.offset) / self.scale, self.num_features)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))
