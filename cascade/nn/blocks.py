"""Per-frame convolutional blocks of the video U-Net. Activations are (B*T, C, H, W)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cascade.nn.attention import CrossAttention, SpatialSelfAttention, TemporalAttention, TemporalConv, group_norm


class ResBlock(nn.Module):
    """2-D residual block applied to each frame with shared weights; the conditioning embedding
    scales and shifts the second normalization (FiLM, as in Imagen's Efficient U-Net)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:  # h: (B*T, C, H, W); emb: (B, E) or per frame (B, T, E)
        x = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=-1)  # (B, C) or (B, T, C) each
        if emb.ndim == 2:
            scale, shift = scale[:, None], shift[:, None]
        x = self.norm2(x).unflatten(0, (emb.shape[0], -1))  # (B, T, C, H, W)
        x = x * (1 + scale[..., None, None]) + shift[..., None, None]
        x = self.conv2(self.dropout(F.silu(x.flatten(0, 1))))
        return self.skip(h) + x


class SpaceTimeBlock(nn.Module):
    """One unit of a U-Net level: ResBlock, then optional spatial self-attention, text cross-attention
    and a temporal layer (attention or convolution). Space and time are factorized (Imagen Video Fig. 7)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, spatial_attention: bool,
                 cross_attention: bool, temporal: str, context_dim: int, head_dim: int, dropout: float,
                 max_temporal_distance: int) -> None:
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_dim, dropout)
        self.self_attn = SpatialSelfAttention(out_channels, head_dim) if spatial_attention else None
        self.cross_attn = CrossAttention(out_channels, context_dim, head_dim) if cross_attention else None
        if temporal == "attention":
            self.temporal = TemporalAttention(out_channels, head_dim, max_temporal_distance)
        elif temporal == "conv":
            self.temporal = TemporalConv(out_channels)
        elif temporal == "none":
            self.temporal = None
        else:
            raise ValueError(f"temporal layer must be 'attention', 'conv' or 'none', got {temporal!r}")

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, context_mask: Tensor, frames: int,
                temporal_gate: Tensor | None) -> Tensor:
        h = self.res(h, emb)
        if self.self_attn is not None:
            h = self.self_attn(h)
        if self.cross_attn is not None:
            h = self.cross_attn(h, context, context_mask, frames)
        if self.temporal is not None and frames > 1:  # one-frame inputs (images) bypass time entirely
            h = self.temporal(h, frames, temporal_gate)
        return h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution per frame. Efficient U-Net puts it before the level's blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(h)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 convolution per frame. Efficient U-Net puts it after the level's blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
