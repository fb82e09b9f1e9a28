"""The factorized space-time video U-Net used by every stage of the cascade (Imagen Video §2.3, Fig. 7).

The network knows nothing of the diffusion parameterization: it maps a noisy video, its log-SNR and the
conditioning to one tensor of the video's shape; `cascade.diffusion.Denoiser` turns that into x-hat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cascade.diffusion.schedule import alpha_sigma
from cascade.nn.attention import group_norm
from cascade.nn.blocks import Downsample, SpaceTimeBlock, Upsample
from cascade.nn.embeddings import ScalarEmbedding

SKIP_SCALE = 1.0 / math.sqrt(2.0)  # Imagen App. B.1: skip connections scaled by 1/sqrt(2)


def upsample_condition(cond: Tensor, frames: int, height: int, width: int) -> Tensor:
    """Bring a lower-resolution conditioning video to the output's shape.

    cond: (B, C, T_in, H_in, W_in) -> (B, C, frames, height, width). Time: each frame repeated
    frames / T_in times (temporal super-resolution); space: bilinear resize of each frame (spatial
    super-resolution; Imagen Video §2.2; nearest here causes blocky inputs, see the reference's mistakes).
    """
    t_in = cond.shape[2]
    if frames != t_in:
        if frames % t_in:
            raise ValueError(f"cannot repeat {t_in} conditioning frames into {frames} frames")
        cond = cond.repeat_interleave(frames // t_in, dim=2)
    if cond.shape[-2:] != (height, width):
        b = cond.shape[0]
        flat = cond.transpose(1, 2).flatten(0, 1)  # (B*T, C, H_in, W_in)
        flat = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
        cond = flat.unflatten(0, (b, frames)).transpose(1, 2)
    return cond


def known_frame_channels(known: Tensor | None, known_mask: Tensor | None, x: Tensor,
                         channels: int) -> tuple[Tensor, Tensor]:
    """The known-frame input: the known frames with every other frame zeroed, and the mask as one channel, each
    (B, ., T, H, W) like x. Nothing given: zeros (no frame known)."""
    batch, _, frames, height, width = x.shape
    if known is None and known_mask is not None:
        raise ValueError("known_mask was given without the known frames")
    if known_mask is None:
        known_mask = torch.zeros(batch, frames, dtype=torch.bool, device=x.device)
    if known_mask.shape != (batch, frames):
        raise ValueError(f"known_mask has shape {tuple(known_mask.shape)}, expected {(batch, frames)}")
    mask = known_mask.to(x.dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    if known is None:
        known = torch.zeros(batch, channels, frames, height, width, dtype=x.dtype, device=x.device)
    if known.shape != (batch, channels, frames, height, width):
        raise ValueError(f"known frames have shape {tuple(known.shape)}, expected "
                         f"{(batch, channels, frames, height, width)}")
    return known.to(x.dtype) * mask, mask.expand(batch, 1, frames, height, width)


def _per_level(value: bool | int | str | Sequence, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries but the U-Net has {levels} levels")
    return values


class VideoUNet(nn.Module):
    """Space-time-separable U-Net over videos (B, C, T, H, W); images are one-frame videos.

    Per level (outermost first): `channel_mults[i] * channels` channels and `num_res_blocks[i]` units,
    each a per-frame ResBlock with optional spatial self-attention, text cross-attention and a temporal
    layer ("attention" with relative position bias, "conv", or "none"). Efficient U-Net layout
    (Imagen App. B.1): downsample before a level, upsample after it, one additive skip per level
    scaled by 1/sqrt(2), more blocks where the resolution is low.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        cond_channels: int = 0,
        channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int | Sequence[int] = 2,
        spatial_attention: bool | Sequence[bool] = False,
        cross_attention: bool | Sequence[bool] = True,
        temporal: str | Sequence[str] = "attention",
        head_dim: int = 64,
        text_dim: int = 4096,
        context_dim: int | None = None,
        dropout: float = 0.0,
        fps_conditioning: bool = True,
        aug_conditioning: bool = False,
        guidance_conditioning: bool = False,
        max_temporal_distance: int = 32,
        checkpointing: bool = False,
        frame_time_conditioning: bool = False,
        known_frames: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__()
        levels = len(channel_mults)
        blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        spatial = _per_level(spatial_attention, levels, "spatial_attention")
        cross = _per_level(cross_attention, levels, "cross_attention")
        temporal_kinds = _per_level(temporal, levels, "temporal")
        widths = [channels * m for m in channel_mults]
        emb_dim = 4 * channels
        context_dim = context_dim or widths[-1]
        self.in_channels, self.cond_channels, self.checkpointing = in_channels, cond_channels, checkpointing
        self.known_channels = in_channels + 1 if known_frames else 0  # the known frames (zero elsewhere), a mask
        self.downsample_factor = 2 ** (levels - 1)
        if residual and not (cond_channels and aug_conditioning):
            raise ValueError("residual: only a super-resolution U-Net (cond_channels, aug_conditioning) diffuses "
                             "the residual over its input")
        self.residual = residual

        # Conditioning embeddings, summed (Imagen: pooled text added to the noise embedding).
        self.noise_emb = ScalarEmbedding(emb_dim, scale=20.0)  # log-SNR in about [-20, 20]
        self.aug_emb = ScalarEmbedding(emb_dim, scale=20.0) if aug_conditioning else None
        self.fps_emb = ScalarEmbedding(emb_dim, scale=4.0) if fps_conditioning else None  # on log(fps)
        self.guidance_emb = ScalarEmbedding(emb_dim, scale=10.0, zero_init=True) if guidance_conditioning else None
        # Each frame's time in seconds from the clip's centre: the arrow of time. Without it a temporal attention
        # whose relative-position bias is still symmetric cannot tell a clip from its reverse, so no caption word
        # about motion direction can be learned.
        self.frame_emb = ScalarEmbedding(emb_dim, scale=1.0) if frame_time_conditioning else None
        self.uses_text = any(cross)
        if self.uses_text:
            self.text_norm = nn.LayerNorm(text_dim)
            self.text_proj = nn.Linear(text_dim, context_dim)
            self.text_pool = nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def unit(c_in: int, c_out: int, level: int) -> SpaceTimeBlock:
            return SpaceTimeBlock(c_in, c_out, emb_dim, spatial_attention=spatial[level],
                                  cross_attention=cross[level], temporal=temporal_kinds[level],
                                  context_dim=context_dim, head_dim=head_dim, dropout=dropout,
                                  max_temporal_distance=max_temporal_distance)

        self.stem = nn.Conv2d(in_channels + cond_channels + self.known_channels, widths[0], 3, padding=1)
        self.down_samplers = nn.ModuleList()
        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            prev = widths[max(level - 1, 0)]
            self.down_samplers.append(Downsample(prev, width) if level > 0 else nn.Identity())
            self.down.append(nn.ModuleList(unit(width, width, level) for _ in range(blocks[level])))
        self.up = nn.ModuleList()
        self.up_samplers = nn.ModuleList()
        for level in reversed(range(levels)):
            width = widths[level]
            self.up.append(nn.ModuleList(unit(width, width, level) for _ in range(blocks[level])))
            self.up_samplers.append(Upsample(width, widths[level - 1]) if level > 0 else nn.Identity())
        self.out_norm = group_norm(widths[0])
        self.out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _embed(self, logsnr: Tensor, batch: int, text: Tensor | None, text_mask: Tensor | None,
               aug_logsnr: Tensor | None, fps: Tensor | None, guidance: Tensor | None):
        emb = self.noise_emb(logsnr.expand(batch))
        if self.aug_emb is not None:
            if aug_logsnr is None:
                raise ValueError("this U-Net conditions on the augmentation level: pass aug_logsnr")
            emb = emb + self.aug_emb(aug_logsnr.expand(batch))
        if self.fps_emb is not None:
            if fps is None:
                raise ValueError("this U-Net conditions on frame rate: pass fps")
            emb = emb + self.fps_emb(torch.as_tensor(fps, device=emb.device, dtype=torch.float32).log().expand(batch))
        if self.guidance_emb is not None:
            if guidance is None:
                raise ValueError("this U-Net conditions on the guidance weight: pass guidance")
            emb = emb + self.guidance_emb(guidance.expand(batch))
        context = context_mask = None
        if self.uses_text:
            if text is None:  # unconditional: no tokens, only the learned null token is attended
                text = torch.zeros(batch, 1, self.text_proj.in_features, device=emb.device, dtype=emb.dtype)
                text_mask = torch.zeros(batch, 1, dtype=torch.bool, device=emb.device)
            elif text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            context = self.text_proj(self.text_norm(text))  # (B, L, D)
            weights = text_mask.to(context.dtype)[..., None]
            pooled = (context * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # masked mean
            emb = emb + self.text_pool(pooled)
        return emb, context, text_mask

    def _run(self, block: SpaceTimeBlock, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, logsnr: Tensor, *, text: Tensor | None = None, text_mask: Tensor | None = None,
                cond: Tensor | None = None, aug_logsnr: Tensor | None = None, fps: Tensor | float | None = None,
                guidance: Tensor | None = None, is_image: Tensor | None = None, known: Tensor | None = None,
                known_mask: Tensor | None = None) -> Tensor:
        """x: (B, C, T, H, W) noisy video; logsnr: (B,) or scalar; text: (B, L, text_dim) T5 embeddings with
        text_mask (B, L) bool (True = real token), None for the unconditional model; cond: (B, C, T', H', W')
        low-resolution video for super-resolution stages (upsampled here when smaller); aug_logsnr: (B,) its
        augmentation level; fps: (B,) frames per second; guidance: (B,) guidance weight for guidance-distilled
        students; is_image: (B,) bool, samples whose frames are independent images (temporal layers bypassed);
        known: (B, C, T, H, W) frames given to a known-frame U-Net, known_mask (B, T) bool which ones (none given:
        nothing is known). Returns (B, out_channels, T, H, W)."""
        batch, _, frames, height, width = x.shape
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(f"input {width}x{height} is not divisible by the U-Net's downsampling "
                             f"factor {self.downsample_factor}")
        base = None
        if self.cond_channels:
            if cond is None:
                raise ValueError("this is a super-resolution U-Net: pass the low-resolution video as cond")
            up = upsample_condition(cond.to(x.dtype), frames, height, width)
            if self.residual:  # the network sees and predicts the residual over its input's estimate `base`
                base, alpha, sigma = self._residual_base(up, logsnr, aug_logsnr, batch)
                x = x - alpha * base
            x = torch.cat([x, up], dim=1)
        if self.known_channels:
            x = torch.cat([x, *known_frame_channels(known, known_mask, x, self.in_channels)], dim=1)
        elif known is not None or known_mask is not None:
            raise ValueError("this U-Net was built without known-frame input (recipe: known_frames)")
        logsnr = torch.as_tensor(logsnr, device=x.device, dtype=torch.float32)
        emb, context, context_mask = self._embed(logsnr, batch, text, text_mask, aug_logsnr, fps, guidance)
        gate = None if is_image is None else (~is_image.bool()).to(x.dtype)
        if self.frame_emb is not None and frames > 1:
            rate = torch.as_tensor(2.0 if fps is None else fps, device=x.device, dtype=torch.float32).expand(batch)
            times = (torch.arange(frames, device=x.device, dtype=torch.float32) - (frames - 1) / 2) / rate[:, None]
            if gate is not None:  # stills: no time
                times = times * gate.to(times.dtype)[:, None]
            emb = emb[:, None] + self.frame_emb(times.flatten()).unflatten(0, (batch, frames)).to(emb.dtype)

        h = self.stem(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W)
        skips = []
        for sampler, level in zip(self.down_samplers, self.down):
            h = sampler(h)
            for block in level:
                h = self._run(block, h, emb, context, context_mask, frames, gate)
            skips.append(h)
        skips.pop()  # the deepest level's output is the up path's input, not a skip
        for level, sampler in zip(self.up, self.up_samplers):
            if level is not self.up[0]:
                h = (h + skips.pop()) * SKIP_SCALE
            for block in level:
                h = self._run(block, h, emb, context, context_mask, frames, gate)
            h = sampler(h)
        h = self.out(F.silu(self.out_norm(h)))
        h = h.unflatten(0, (batch, frames)).transpose(1, 2)
        return h if base is None else h - sigma * base

    @staticmethod
    def _residual_base(up: Tensor, logsnr: Tensor, aug_logsnr: Tensor | None, batch: int):
        """Residual diffusion of a super-resolution stage (SRDiff, Li et al. 2022), as a reparameterization of a
        v-prediction network: with the base b = alpha_aug * up(cond) (the input's linear MMSE estimate under its
        augmentation noise, for unit-variance data), the network gets z - alpha b = alpha (x - b) + sigma eps, the
        diffused residual, and its output v' (the residual's v) becomes v = v' - sigma b. Then x-hat = b + x-hat of
        the residual: with no detail learned yet the stage already returns its upsampled input, not a blob.
        -> (b, alpha, sigma), alpha and sigma broadcastable to the video."""
        if aug_logsnr is None:
            raise ValueError("a residual U-Net needs aug_logsnr, the augmentation level of its input")
        shape = (batch, 1, 1, 1, 1)
        lam = torch.as_tensor(logsnr, device=up.device, dtype=torch.float32).expand(batch)
        lam_aug = torch.as_tensor(aug_logsnr, device=up.device, dtype=torch.float32).expand(batch)
        alpha, sigma = (c.reshape(shape).to(up.dtype) for c in alpha_sigma(lam))
        return up * alpha_sigma(lam_aug)[0].reshape(shape).to(up.dtype), alpha, sigma
