"""Distillation methods behind one small protocol: which noise levels a step draws, the target, the loss, and what
the student takes as input. A training loop (`cascade.lit.distill.DistillModule`) runs any of them:

    draw = method.draw(batch, generator, device)           # levels (and w) of this step
    z = diffuse(x, draw.logsnr, noise)                      # the student's input
    target = method.target(teacher, z, draw, cond)          # no gradient (target_net=EMA for a method that has one)
    loss = method.loss(student(z, draw.logsnr, **method.student_inputs(cond, draw)), target, draw)

A new method is a new class here, not a flag on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cascade.diffusion.loss import sample_logsnr_train
from cascade.distill.targets import (consistency_target, distillation_loss, guided_target, progressive_target,
                                     sample_student_levels)
from cascade.sampling.steps import time_grid

Denoiser = Callable[..., Tensor]  # denoiser(z, logsnr, **cond) -> x_hat


@dataclass(frozen=True)
class Draw:
    """What one distillation step drew for its batch."""

    logsnr: Tensor  # (B,) float32, the student's input levels
    index: Tensor | None = None  # (B,) int64 grid indices (discrete-time methods)
    guidance: Tensor | None = None  # (B,) guidance weights w ((1 + w) convention) when the student takes w


class DistillationMethod(Protocol):
    name: str
    """Recorded with the student ("guidance", "progressive")."""
    student_steps: int
    """The step count the student is trained for and must be sampled with."""
    sampler: str
    """The sampler the student must run with (`cascade.sampling.SAMPLERS`)."""
    guidance_input: bool
    """The student takes the guidance weight w as an input (one network pass per guided step)."""
    w_range: tuple[float, float] | None
    """The guidance weights [w_min, w_max] drawn for the student, None when it takes no w."""
    target_ema: float | None
    """The EMA decay of the target network (a copy of the student) the method's target needs, passed to `target` as
    `target_net`; None (or absent): the method has none and `target` gets four arguments."""

    def draw(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Draw: ...

    def target(self, teacher: Denoiser, z: Tensor, draw: Draw, cond: dict,
               target_net: Denoiser | None = None) -> Tensor: ...

    def loss(self, x_hat: Tensor, target: Tensor, draw: Draw) -> Tensor: ...

    def student_inputs(self, cond: dict, draw: Draw) -> dict: ...


def _weights(w_range: tuple[float, float], batch: int, generator, device) -> Tensor:
    w_min, w_max = w_range
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator, device=device)  # w ~ U[w_min, w_max]


def _with_guidance(cond: dict, draw: Draw) -> dict:
    return cond if draw.guidance is None else {**cond, "guidance": draw.guidance}


@dataclass(frozen=True)
class GuidanceDistillation:
    """Meng et al. 2023, stage 1: a student that takes w as an input learns (1 + w) x_cond - w x_uncond of its
    teacher, w ~ U[w_min, w_max]. Half the samples are at continuous levels, half on the `grid_steps` grid the
    student will be sampled (and progressively distilled) on: continuous t alone almost never reaches the top step
    (SNR ~ 0), the first step of every sampler."""

    schedule: Callable[[Tensor], Tensor]
    grid_steps: int
    w_range: tuple[float, float] = (0.0, 4.0)
    weighting: str = "truncated_snr"
    name = "guidance"
    sampler = "ddim"
    guidance_input = True
    target_ema = None

    @property
    def student_steps(self) -> int:
        return self.grid_steps

    def draw(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Draw:
        w = _weights(self.w_range, batch, generator, device)
        logsnr = sample_logsnr_train(batch, self.schedule, generator=generator, device=device).float()
        on_grid = torch.rand(batch, generator=generator, device=device) < 0.5
        i = sample_student_levels(batch, self.grid_steps, generator=generator, device=device)
        grid = time_grid(self.grid_steps, self.schedule).to(device)[i].float()
        return Draw(torch.where(on_grid, grid, logsnr), i, w)

    def target(self, teacher: Denoiser, z: Tensor, draw: Draw, cond: dict,
               target_net: Denoiser | None = None) -> Tensor:
        uncond = {**cond, "text_mask": torch.zeros_like(cond["text_mask"])}  # every token masked
        return guided_target(lambda z_, l_: teacher(z_, l_, **cond), lambda z_, l_: teacher(z_, l_, **uncond),
                             z, draw.logsnr, draw.guidance)

    def loss(self, x_hat: Tensor, target: Tensor, draw: Draw) -> Tensor:
        return distillation_loss(x_hat, target, draw.logsnr, self.weighting)

    def student_inputs(self, cond: dict, draw: Draw) -> dict:
        return _with_guidance(cond, draw)


@dataclass(frozen=True)
class ProgressiveDistillation:
    """Salimans & Ho 2022, Alg. 2: the student learns in one DDIM step what its teacher does in two, on the
    discrete `student_steps` grid with the top step at SNR ~ 0. With `w_range` (a guidance-distilled teacher, Meng
    et al. 2023 stage 2) teacher and student get the same w ~ U[w_min, w_max]."""

    schedule: Callable[[Tensor], Tensor]
    student_steps: int
    w_range: tuple[float, float] | None = None
    weighting: str = "truncated_snr"
    name = "progressive"
    sampler = "ddim"
    target_ema = None

    @property
    def guidance_input(self) -> bool:
        return self.w_range is not None

    def draw(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Draw:
        w = None if self.w_range is None else _weights(self.w_range, batch, generator, device)
        i = sample_student_levels(batch, self.student_steps, generator=generator, device=device)
        return Draw(time_grid(self.student_steps, self.schedule).to(device)[i].float(), i, w)

    def target(self, teacher: Denoiser, z: Tensor, draw: Draw, cond: dict,
               target_net: Denoiser | None = None) -> Tensor:
        target, _ = progressive_target(teacher, z, draw.index, self.student_steps, self.schedule,
                                       **_with_guidance(cond, draw))
        return target

    def loss(self, x_hat: Tensor, target: Tensor, draw: Draw) -> Tensor:
        return distillation_loss(x_hat, target, draw.logsnr, self.weighting)

    def student_inputs(self, cond: dict, draw: Draw) -> dict:
        return _with_guidance(cond, draw)


@dataclass(frozen=True)
class ConsistencyDistillation:
    """Multistep consistency distillation (Heek et al. 2024; Song et al. 2023 at one step): the student learns, at
    every level of a segment of its `student_steps`-step grid, the one DDIM step that lands where the teacher's ODE
    (`substeps` DDIM steps per segment) lands at the segment's end; the rest of the way from the teacher's next
    level is taken by the target network, an EMA (`target_ema`) of the student. A multistep student (N > 1) is
    sampled with DDIM on its grid, like a progressive student (Heek et al.); a one-step student (N = 1) maps every
    level to the trajectory's end, a consistency function (Song et al. 2023), and is sampled with multistep
    consistency sampling at any step count (fresh noise at every step, `sample_consistency`). With `w_range` (a
    guidance-distilled teacher) both get the same w."""

    schedule: Callable[[Tensor], Tensor]
    student_steps: int
    substeps: int = 16
    w_range: tuple[float, float] | None = None
    weighting: str = "truncated_snr"
    target_ema: float = 0.95
    name = "consistency"

    @property
    def sampler(self) -> str:
        return "consistency" if self.student_steps == 1 else "ddim"

    @property
    def guidance_input(self) -> bool:
        return self.w_range is not None

    def draw(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Draw:
        w = None if self.w_range is None else _weights(self.w_range, batch, generator, device)
        fine = self.student_steps * self.substeps
        j = sample_student_levels(batch, fine, generator=generator, device=device)
        return Draw(time_grid(fine, self.schedule).to(device)[j].float(), j, w)

    def target(self, teacher: Denoiser, z: Tensor, draw: Draw, cond: dict,
               target_net: Denoiser | None = None) -> Tensor:
        if target_net is None:
            raise ValueError("consistency distillation needs its target network (the student's EMA)")
        target, _ = consistency_target(teacher, target_net, z, draw.index, self.student_steps, self.substeps,
                                       self.schedule, **_with_guidance(cond, draw))
        return target

    def loss(self, x_hat: Tensor, target: Tensor, draw: Draw) -> Tensor:
        return distillation_loss(x_hat, target, draw.logsnr, self.weighting)

    def student_inputs(self, cond: dict, draw: Draw) -> dict:
        return _with_guidance(cond, draw)
