"""The cascade sampler: run every stage in order, each conditioned on the previous stage's output.

Pure PyTorch (no Lightning): `CascadeSampler(stages).sample(text, text_mask, seed)`. A stage is described by a
`StageSpec`; `cascade.recipe.build.build_stage_spec` makes one from a recipe and `cascade.inference.Cascade` loads a
whole cascade (weights, text encoder, device) from a recipe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.diffusion.augment import NoiseAugmentation
from cascade.diffusion.inputs import stage_inputs
from cascade.diffusion.noise import Generator, VideoGenerators, randn
from cascade.sampling.guidance import GuidedModel, dynamic_threshold, guidance_weights
from cascade.sampling.samplers import STOCHASTIC, sample
from cascade.sampling.steps import ddim_step, time_grid
from cascade.diffusion.param import append_dims, diffuse
from cascade.diffusion.schedule import alpha_sigma


def edit_grid(steps: int, schedule: Callable[[Tensor], Tensor], strength: float) -> Tensor:
    """Log-SNRs (n+1,) at t_i = S (1 - i/n), n = max(1, round(S * steps)): the end of the sampling grid that starts
    at the noise level t = S of SDEdit, in steps of about the full grid's size."""
    n = max(1, round(strength * steps))
    t = strength * (n - torch.arange(n + 1, dtype=torch.float64)) / n
    return schedule(t).to(torch.float64)


def input_view(x: Tensor, frames: int, height: int, width: int) -> Tensor:
    """What a stage's output looks like at its input's shape: (B, C, T, H, W) -> (B, C, frames, height, width), every
    (T / frames)-th frame and area-averaged pixels, as the data loader makes a super-resolution stage's input from
    its clip (cascade.data.clips.downsample); differentiable."""
    batch, channels, total = x.shape[:3]
    x = x[:, :, :: total // frames]
    if x.shape[-2:] != (height, width):
        flat = F.interpolate(x.transpose(1, 2).flatten(0, 1), size=(height, width), mode="area")
        x = flat.unflatten(0, (batch, frames)).transpose(1, 2)
    return x


def spread_in_time(x: Tensor, frames: int) -> Tensor:
    """(B, C, T', H, W) -> (B, C, frames, H, W), frames = r T': input frame i lands on output frame r i and the
    frames between two input frames are their linear interpolation (after the last one it holds), matching the
    frame times of `input_view`."""
    total = x.shape[2]
    ratio = frames // total
    if ratio == 1:
        return x
    position = torch.arange(frames, dtype=torch.float64) / ratio
    lo = position.floor().long().clamp(max=total - 1)
    hi = (lo + 1).clamp(max=total - 1)
    w = (position - lo).clamp(max=1.0).to(x.dtype).to(x.device)[None, None, :, None, None]
    return (1 - w) * x[:, :, lo] + w * x[:, :, hi]


def input_consistency_guided(model: Callable[[Tensor, Tensor, int], Tensor], low: Tensor, weight: float
                             ) -> Callable[[Tensor, Tensor, int], Tensor]:
    """A super-resolution sampler model whose prediction agrees with its clean input `low` (B, C, T', H', W').

    Each step's prediction is corrected by the residual of its input view (`input_view`: every r-th frame,
    area-averaged pixels): x~ = x^ + w U(low - input_view(x^)), U putting each input frame back at its frame and
    spreading the pixel residuals bilinearly (a data-consistency step in the manner of ILVR, Choi et al. 2021, which
    does it with a low-pass filter). With w = 1 the frames a TSR stage shares with its input become those frames
    (to rounding); nearest spreading would also make the area averages exact, but leaves block edges in the output (on
    the tiny cascade it upscaled 0.3 dB worse than bilinear)."""
    frames, height, width = low.shape[2:]

    def guided(z: Tensor, logsnr: Tensor, step: int) -> Tensor:
        x_hat = model(z, logsnr, step)
        residual = low.to(x_hat.dtype) - input_view(x_hat, frames, height, width)  # (B, C, T', H', W')
        batch, _, total, full_h, full_w = x_hat.shape
        if (full_h, full_w) != (height, width):
            flat = F.interpolate(residual.transpose(1, 2).flatten(0, 1), size=(full_h, full_w), mode="bilinear",
                                 align_corners=False)
            residual = flat.unflatten(0, (batch, frames)).transpose(1, 2)
        return x_hat + weight * spread_in_time(residual, total)

    return guided


def known_kept(model: Callable[[Tensor, Tensor, int], Tensor], known: Tensor, known_mask: Tensor
               ) -> Callable[[Tensor, Tensor, int], Tensor]:
    """A sampler model whose prediction of the known frames is the known frames (the replacement method of Ho et
    al. 2022, Video Diffusion Models, section 3.1): each step carries them into z, so the last step returns them and
    the other frames are denoised against them. For a network that also takes them as input (trained with
    known_frames), which predicts them only approximately (tiny base: first-frame PSNR about 24 dB at 8x8).
    `region_kept` with the unknown frames as the region (0/1: the known frames are returned exactly)."""
    return region_kept(model, known, (~known_mask)[:, None, :, None, None].to(known.dtype))


def region_kept(model: Callable[[Tensor, Tensor, int], Tensor], init: Tensor, region: Tensor
                ) -> Callable[[Tensor, Tensor, int], Tensor]:
    """A sampler model whose prediction outside `region` (B, 1, T, H, W) in [0, 1] is `init`: x~ = r x^ + (1 - r)
    init, so an edit changes only the region (DiffEdit, Couairon et al. 2023, blends the inverted latents the same
    way)."""
    def kept(z: Tensor, logsnr: Tensor, step: int) -> Tensor:
        x_hat = model(z, logsnr, step)
        r = region.to(x_hat.dtype)
        return r * x_hat + (1 - r) * init.to(x_hat.dtype)

    return kept


def reconstruction_guided(model: Callable[[Tensor, Tensor, int], Tensor], known: Tensor, known_mask: Tensor,
                          weight: float) -> Callable[[Tensor, Tensor, int], Tensor]:
    """A sampler model whose prediction agrees with the known frames, for a network that cannot take them as input.

    Reconstruction guidance (Ho et al. 2022, Video Diffusion Models, eq. 7): the unknown frames' prediction is moved
    against the gradient of the known frames' reconstruction error,
        x~_b = x^_b - (w_r alpha_t / 2) grad_{z_t} || x_a - x^_a(z_t) ||^2,
    and the known frames' prediction is replaced by the known frames (the replacement method), so the sampler's
    steps carry them into z. Costs one backward pass per network evaluation."""
    mask = known_mask[:, None, :, None, None]  # (B, 1, T, 1, 1)

    def guided(z: Tensor, logsnr: Tensor, step: int) -> Tensor:
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            x_hat = model(z_in, logsnr, step)
            error = ((x_hat - known.to(x_hat.dtype)) ** 2 * mask).sum()
            (grad,) = torch.autograd.grad(error, z_in)
        alpha = torch.sigmoid(logsnr.to(torch.float64)).sqrt().to(z.dtype)  # alpha_t = sqrt(sigmoid(lambda_t))
        x_tilde = x_hat.detach() - weight * append_dims(alpha, z.ndim) / 2 * grad
        return torch.where(mask, known.to(x_tilde.dtype), x_tilde)

    return guided


def _stage_model(stage: "StageSpec", cond: dict, batch: int, device) -> tuple[Callable, Callable[[], int]]:
    """The sampler model of a stage for the conditioning `cond` (text, text_mask, fps, ...): classifier-free
    guidance over the stage's weights per step (or the guidance-distilled student's one pass), dynamic thresholding;
    with a function that counts its network evaluations per video."""
    weights = guidance_weights(stage.steps, stage.guidance, stage.oscillate, stage.constant_steps)
    percentile = stage.dynamic_threshold
    if stage.guidance_distilled:  # one pass per step: the student takes w as input (Meng et al. 2023)
        counter = [0]

        def model(z: Tensor, logsnr: Tensor, step: int) -> Tensor:
            counter[0] += 1
            x_hat = stage.denoiser(z, logsnr, **cond, guidance=torch.full((batch,), weights[step], device=device))
            return x_hat if percentile is None else dynamic_threshold(x_hat, percentile)

        return model, lambda: counter[0]

    def fn(z: Tensor, logsnr: Tensor, uncond: Tensor) -> Tensor:
        reps = z.shape[0] // batch  # 2 when the conditional and unconditional passes share a batch
        kw = {k: v.repeat(reps, *[1] * (v.ndim - 1)) for k, v in cond.items()}
        kw["text_mask"] = kw["text_mask"] & ~uncond[:, None]  # dropped caption = every token masked
        return stage.denoiser(z, logsnr, **kw)

    guided = GuidedModel(fn, weights, thresholding=None if percentile is None else "dynamic",
                         percentile=percentile or 99.5)
    return guided, lambda: guided.nfe


@torch.no_grad()
def ddim_invert(model: Callable[[Tensor, Tensor, int], Tensor], x: Tensor, logsnrs: Tensor) -> Tensor:
    """DDIM inversion (Song et al. 2021; as used for editing by Mokady et al. 2023): the z at logsnrs[0] from
    which deterministic DDIM over `logsnrs` (noisiest first, a sampler grid) returns about x. Runs the grid
    backwards: z_{i} -> z_{i-1} by the DDIM step with the prediction at z_i. The first step starts at the clean end,
    where eps = (z - alpha x^) / sigma is undefined, so its prediction is taken at the next level from alpha x
    (no noise). Model evaluations: len(logsnrs) - 1; each is called with the sampler's step index of its level."""
    lams = [float(v) for v in logsnrs]
    n = len(lams) - 1
    z = x
    for k in range(n):  # from level n - k (less noisy) to n - k - 1
        here, there = lams[n - k], lams[n - k - 1]
        if k == 0:
            alpha = alpha_sigma(torch.tensor(there, dtype=torch.float64))[0].item()
            z_in = alpha * x
            x_hat = model(z_in, torch.full((x.shape[0],), there, dtype=x.dtype, device=x.device), n - 1)
            z = alpha * x + (z_in - alpha * x_hat)  # alpha x + sigma eps^, eps^ = (z_in - alpha x^) / sigma
        else:
            x_hat = model(z, torch.full((x.shape[0],), here, dtype=x.dtype, device=x.device), n - k)
            z = ddim_step(z, x_hat, here, there)
    return z


@dataclass
class StageSpec:
    """What sampling one stage needs. `denoiser(z, logsnr, **cond) -> x_hat` (a `Denoiser`)."""

    name: str
    kind: str  # base | tsr | ssr
    frames: int
    height: int
    width: int
    fps: float
    denoiser: Callable[..., Tensor]
    schedule: Callable[[Tensor], Tensor]
    sampler: str = "ddim"
    steps: int = 64
    gamma: float = 0.3
    guidance: float = 0.0
    oscillate: tuple[float, float] | None = None
    constant_steps: int = 0
    dynamic_threshold: float | None = 99.5
    augmentation: NoiseAugmentation | None = None
    guidance_distilled: bool = False
    """The student takes the guidance weight as input: one network pass per step, no unconditional pass."""
    known_frames: bool = False
    """The network takes known frames as input (trained with `known_frames`); otherwise known frames are imposed by
    reconstruction guidance."""
    reconstruction_weight: float = 4.0
    """w_r of reconstruction guidance (Ho et al. 2022, Video Diffusion Models, eq. 7), for a network without
    known-frame input."""


@dataclass
class CascadeResult:
    videos: dict[str, Tensor]  # stage name -> (B, 3, T, H, W) in [-1, 1]
    stats: list[dict] = field(default_factory=list)  # per stage: seconds, nfe per video, steps, ...

    @property
    def final(self) -> Tensor:
        return next(reversed(self.videos.values()))


class CascadeSampler:
    def __init__(self, stages: Sequence[StageSpec]) -> None:
        if not stages or stages[0].kind != "base":
            raise ValueError("a cascade starts with a base stage")
        self.stages = list(stages)

    @torch.no_grad()
    def sample(self, text: Tensor, text_mask: Tensor, seed: int = 0, indices: Sequence[int] | None = None,
               up_to: str | None = None, progress: bool = True) -> CascadeResult:
        """text: (B, L, D) T5 embeddings, text_mask: (B, L) bool. Returns every stage's output.

        Video b draws all its noise from its own generators, seeded from (seed, indices[b], stage number), on the
        text's device: it is the same whatever the batch and the other prompts (indices default to 0..B-1)."""
        names = [s.name for s in self.stages]
        if up_to is not None and up_to not in names:
            raise ValueError(f"no stage named {up_to!r}; stages are {', '.join(names)}")
        indices = list(range(text.shape[0])) if indices is None else list(indices)
        result = CascadeResult(videos={})
        previous: Tensor | None = None
        for number, stage in enumerate(self.stages):
            start = time.perf_counter()
            generator = VideoGenerators(seed, indices, stream=number, device=text.device)
            video, nfe = self.sample_stage(stage, text, text_mask, previous, generator, progress)
            result.videos[stage.name] = video
            result.stats.append(dict(stage=stage.name, kind=stage.kind, sampler=stage.sampler, steps=stage.steps,
                                     guidance=stage.guidance, oscillate=stage.oscillate,
                                     aug_logsnr=None if stage.augmentation is None else stage.augmentation.sample_logsnr,
                                     guidance_distilled=stage.guidance_distilled, nfe_per_video=nfe,
                                     seconds=time.perf_counter() - start,
                                     shape=[stage.frames, stage.width, stage.height, stage.fps]))
            previous = video
            if stage.name == up_to:
                break
        return result

    @staticmethod
    @torch.no_grad()
    def edit_region(stage: StageSpec, text: Tensor, text_mask: Tensor, source_text: Tensor, source_mask: Tensor,
                    video: Tensor, previous: Tensor | None = None, generator: Generator = None, draws: int = 4,
                    strength: float = 0.5, threshold: float = 0.5) -> Tensor:
        """Where an edit from the source caption to the new one changes `video` (B, 3, T, H, W): DiffEdit's mask
        (Couairon et al. 2023). The video is noised to t = `strength` `draws` times; the mean over draws and
        channels of |x^(new caption) - x^(source caption)|, divided by each video's maximum, above `threshold`
        -> (B, 1, T, H, W) float 0/1. One network evaluation per caption and draw, without guidance."""
        batch, device = text.shape[0], text.device
        low = {} if stage.kind == "base" else {"cond": previous}
        target = stage_inputs(dict(text=text, text_mask=text_mask, fps=stage.fps, **low), stage.augmentation,
                              generator=generator)
        source = dict(target, text=source_text.to(device), text_mask=source_mask.to(device))
        extra = {}
        if stage.guidance_distilled:
            extra["guidance"] = torch.full((batch,), float(stage.guidance), device=device)
        logsnr = stage.schedule(torch.full((batch,), strength, dtype=torch.float64, device=device)).to(video.dtype)
        total = torch.zeros_like(video[:, :1])
        for _ in range(draws):
            z = diffuse(video, logsnr, randn(video.shape, generator, dtype=video.dtype, device=device))
            difference = stage.denoiser(z, logsnr, **target, **extra) - stage.denoiser(z, logsnr, **source, **extra)
            total += difference.abs().mean(dim=1, keepdim=True)
        peak = total.flatten(1).amax(dim=1).clamp_min(1e-12)
        return (total / append_dims(peak, total.ndim) > threshold).to(video.dtype)

    @staticmethod
    def sample_stage(stage: StageSpec, text: Tensor, text_mask: Tensor, previous: Tensor | None,
                     generator: Generator = None, progress: bool = False, *, known: Tensor | None = None,
                     known_mask: Tensor | None = None, init: Tensor | None = None,
                     strength: float = 1.0, consistency: float = 0.0, keep_known: bool = True,
                     invert_text: tuple[Tensor, Tensor] | None = None, edit_region: Tensor | None = None
                     ) -> tuple[Tensor, int]:
        """One stage: noise -> video (B, 3, T, H, W) in [-1, 1]; also returns network evaluations per video.
        Draws, in order: the input's augmentation noise, the known frames' augmentation noise, the initial noise,
        the sampler's noise.

        known (B, 3, T, H, W) in [-1, 1] with known_mask (B, T) bool: frames the video must have (the first frame for
        image-to-video, the last frames of the previous segment of a long video). A network trained with known
        frames takes them as input and, with keep_known (default), its prediction of them is replaced by them at
        every step (`known_kept`), so the video has them exactly; any other network is steered by reconstruction
        guidance (`reconstruction_guided`, which always replaces).
        init (B, 3, T, H, W) with strength S in [0, 1]: SDEdit (Meng et al. 2022). The sampler starts from init
        noised to the level of t = S and runs the part of its grid from t = S to 0 in about S * steps steps
        (at least one); S = 0 returns init without a network evaluation, S = 1 ignores it. With invert_text
        (text, text_mask) of the source video (an empty mask: unconditional), init is brought to t = S by DDIM
        inversion under that text (`ddim_invert`) instead of random noise, which keeps its layout. edit_region
        (B, 1, T, H, W) in [0, 1] with init: where the video may change (`CascadeSampler.edit_region`); elsewhere
        each step's prediction is init (blended where the region is fractional), as DiffEdit does.
        consistency > 0 (a super-resolution stage): each step's prediction is corrected toward agreeing with the
        (clean) input at the input's size and frame rate, by that share of the residual (`input_consistency_guided`),
        e.g. to upscale a real video."""
        batch, device = text.shape[0], text.device
        if stage.kind != "base" and previous is None:
            raise ValueError(f"stage {stage.name} needs the previous stage's output")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if init is not None and strength == 0.0:
            return init.clamp(-1.0, 1.0), 0
        low = {} if stage.kind == "base" else {"cond": previous}
        given = {}
        if known is not None and stage.known_frames:
            given = dict(known=known, known_mask=known_mask)
        cond = stage_inputs(dict(text=text, text_mask=text_mask, fps=stage.fps, **low, **given), stage.augmentation,
                            generator=generator)
        model, nfe = _stage_model(stage, cond, batch, device)
        if known is not None and not stage.known_frames:
            model = reconstruction_guided(model, known, known_mask, stage.reconstruction_weight)
        elif known is not None and keep_known:
            model = known_kept(model, known, known_mask)
        if edit_region is not None:
            if init is None:
                raise ValueError(f"stage {stage.name}: an edit region needs the video to edit (init)")
            model = region_kept(model, init, edit_region)
        if consistency:
            if previous is None:
                raise ValueError(f"stage {stage.name}: input consistency needs the input video")
            model = input_consistency_guided(model, previous, consistency)
        z = randn((batch, 3, stage.frames, stage.height, stage.width), generator, device=device)
        extra_nfe = 0
        logsnrs = time_grid(stage.steps, stage.schedule)
        if init is not None and strength < 1.0:
            logsnrs = edit_grid(stage.steps, stage.schedule, strength)
            if invert_text is None:
                z = diffuse(init.to(z.dtype), logsnrs[0].to(z.dtype), z)  # init at the level of t = strength
            else:  # deterministic: DDIM run backwards from init with the inversion text
                source = dict(cond, text=invert_text[0].to(device), text_mask=invert_text[1].to(device))
                inverse, inverse_nfe = _stage_model(stage, source, batch, device)
                z = ddim_invert(inverse, init.to(z.dtype), logsnrs)
                extra_nfe = inverse_nfe()
        kind = "ddim" if invert_text is not None else stage.sampler  # deterministic back along the inversion
        extra = {"gamma": stage.gamma} if kind == "ancestral" else {}
        if kind in STOCHASTIC:
            extra["generator"] = generator
        video = sample(kind, model, z, logsnrs, progress=progress and f"{stage.name} ({kind})", **extra)
        return video.clamp(-1.0, 1.0), nfe() + extra_nfe
