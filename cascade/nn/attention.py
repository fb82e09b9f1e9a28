"""Attention layers of the factorized space-time U-Net, all through `scaled_dot_product_attention`.

Activations between layers are kept per frame as (B*T, C, H, W); each layer reshapes only what it needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W positions of each frame, weights shared across frames (VDM §3)."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.out = _zero(nn.Linear(channels, channels))

    def forward(self, h: Tensor) -> Tensor:  # h: (B*T, C, H, W)
        _, _, height, width = h.shape
        x = rearrange(self.norm(h), "n c h w -> n (h w) c")
        q, k, v = rearrange(self.qkv(x), "n l (three heads d) -> three n heads l d", three=3, heads=self.heads)
        y = rearrange(F.scaled_dot_product_attention(q, k, v), "n heads l d -> n l (heads d)")
        return h + rearrange(self.out(y), "n (h w) c -> n c h w", h=height, w=width)


class CrossAttention(nn.Module):
    """Attention from every pixel of every frame to the text tokens (Imagen §2.5).

    The text is shared by all frames of a sample, so queries of all frames go into one attention call
    per sample (no per-frame copy of keys). A learned null token is always attendable: a caption whose
    tokens are all masked (classifier-free-guidance dropout) is well defined, and padding tokens are
    excluded by the mask, so they cannot change the output.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = group_norm(channels)
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, channels) / math.sqrt(channels))
        self.out = _zero(nn.Linear(channels, channels))

    def forward(self, h: Tensor, context: Tensor, context_mask: Tensor, frames: int) -> Tensor:
        # h: (B*T, C, H, W); context: (B, L, D); context_mask: (B, L) bool, True = real token
        _, _, height, width = h.shape
        batch = context.shape[0]
        q = rearrange(self.q(rearrange(self.norm(h), "n c h w -> n (h w) c")),
                      "(b t) l (heads d) -> b heads (t l) d", b=batch, t=frames, heads=self.heads)
        k, v = self.kv(context).chunk(2, dim=-1)
        null_k, null_v = self.null_kv.to(k.dtype).expand(batch, 1, 2, -1).unbind(2)
        k = rearrange(torch.cat([null_k, k], dim=1), "b l (heads d) -> b heads l d", heads=self.heads)
        v = rearrange(torch.cat([null_v, v], dim=1), "b l (heads d) -> b heads l d", heads=self.heads)
        mask = F.pad(context_mask, (1, 0), value=True)[:, None, None, :]  # (B, 1, 1, 1+L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = rearrange(y, "b heads (t h w) d -> (b t) (h w) (heads d)", t=frames, h=height, w=width)
        return h + rearrange(self.out(y), "n (h w) c -> n c h w", h=height, w=width)


class TemporalAttention(nn.Module):
    """Self-attention across frames at each pixel, with a learned scalar relative-position bias per head and
    distance (T5 style; distances clipped at `max_distance`). Not causal.

    VDM §3 specifies Shaw et al. (2018) relative position vectors added to the keys and values instead. Both were
    measured on the tiny recipe's base (2500 steps, 112 held-out samples, low-resolution read): the scalar bias
    put the motion on the captioned axis in 80 % of samples, Shaw's vectors in 57 % (64 % with a joint frame-time
    embedding); neither learned the sign of the motion. The scalar bias stays until a larger run says otherwise.
    """

    def __init__(self, channels: int, head_dim: int, max_distance: int = 32) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.max_distance = max_distance
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(self.heads, 2 * max_distance + 1))
        self.out = _zero(nn.Linear(channels, channels))

    def position_bias(self, frames: int) -> Tensor:  # -> (heads, T, T)
        pos = torch.arange(frames, device=self.bias.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.bias[:, rel]

    def forward(self, h: Tensor, frames: int, gate: Tensor | None) -> Tensor:
        # h: (B*T, C, H, W); gate: (B,) 0 for samples that are images (temporal path bypassed), else 1
        _, _, height, width = h.shape
        x = rearrange(self.norm(h), "(b t) c h w -> (b h w) t c", t=frames)
        q, k, v = rearrange(self.qkv(x), "n t (three heads d) -> three n heads t d", three=3, heads=self.heads)
        bias = self.position_bias(frames).to(q.dtype)
        y = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), "n heads t d -> n t (heads d)")
        y = rearrange(self.out(y), "(b h w) t c -> b t c h w", h=height, w=width)
        if gate is not None:
            y = y * gate.to(y.dtype)[:, None, None, None, None]
        return h + y.flatten(0, 1)


class TemporalConv(nn.Module):
    """A residual convolution across frames (kernel 3 in time, 1x1 in space), not causal.

    Imagen Video uses temporal convolutions instead of temporal attention in its super-resolution
    stages: lower memory and no measurable loss (Imagen Video §2.3).
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        # Zero padding in time is applied explicitly in forward: torch 2.13's CPU kernel returns a non-finite weight
        # gradient under bfloat16 autocast when the conv pads a clip of 2 frames itself (crop_frames 2 under
        # precision bf16-mixed trained NaN from its second step); padded first, the same kernel is right.
        self.pad = kernel_size // 2
        self.conv = _zero(nn.Conv3d(channels, channels, (kernel_size, 1, 1)))

    def forward(self, h: Tensor, frames: int, gate: Tensor | None) -> Tensor:  # h: (B*T, C, H, W)
        x = rearrange(F.silu(self.norm(h)), "(b t) c h w -> b c t h w", t=frames)
        y = self.conv(F.pad(x, (0, 0, 0, 0, self.pad, self.pad)))
        if gate is not None:
            y = y * gate.to(y.dtype)[:, None, None, None, None]
        return h + rearrange(y, "b c t h w -> (b t) c h w")
