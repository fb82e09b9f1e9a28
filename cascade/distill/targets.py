"""Regression targets of progressive and guidance distillation, and their weighted x-space loss.

Pure functions: the teacher is any denoiser `teacher(z, logsnr, **cond) -> x_hat` (logsnr: (B,)), the student
is trained elsewhere (lit/). Teacher steps are the samplers' `ddim_step` on the samplers' `time_grid`, so a
distilled student is sampled with `sample_ddim(student, z, time_grid(N, schedule))` on exactly the grid
it was trained on.

Index convention (ours vs. the reference code, google-research diffusion_distillation dpm.py):
  ours:       grid index i in {0..N-1}, t_i = 1 - i/N; i = 0 is the top step (t = 1, SNR ~ 0), sampled first,
              and a student step goes from grid point i to i + 1 (t -> t - 1/N).
  reference:  i_ref in {0..N-1} with u = (i_ref + 1)/N, i.e. i_ref = N - 1 - i; its i_ref == 0 (the last
              student step, ending at t = 0) is our i = N - 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cascade.diffusion.loss import loss_weight
from cascade.diffusion.param import append_dims
from cascade.sampling.guidance import cfg
from cascade.sampling.steps import ddim_step, time_grid

Teacher = Callable[..., Tensor]  # teacher(z, logsnr, **cond) -> x_hat, z: (B, ...), logsnr: (B,)


def _levels(i: Tensor | int, batch: int, num_steps: int, device: torch.device) -> Tensor:
    i = torch.as_tensor(i, dtype=torch.int64, device=device)
    if i.ndim == 0:
        i = i.expand(batch)
    if i.shape != (batch,):
        raise ValueError(f"student levels must be an int or a ({batch},) tensor, got shape {tuple(i.shape)}")
    if bool(((i < 0) | (i >= num_steps)).any()):
        raise ValueError(f"student levels must lie in [0, {num_steps - 1}]")
    return i


def _invert_ddim(z_s: Tensor, z_t: Tensor, lam_t: Tensor, lam_s: Tensor) -> Tensor:
    """The x for which one DDIM step z_t -> level s lands on z_s (PD Alg. 2): (z_s - r z_t) / (alpha_s - r alpha_t),
    r = sigma_s / sigma_t; levels (B,) float64, lam_s > lam_t."""
    r = torch.exp(0.5 * (F.logsigmoid(-lam_s) - F.logsigmoid(-lam_t)))
    den = torch.sigmoid(lam_s).sqrt() - r * torch.sigmoid(lam_t).sqrt()  # > 0 since SNR_s > SNR_t
    c_s, c_t = (append_dims(c.to(z_t.dtype), z_t.ndim) for c in (1.0 / den, r / den))
    return c_s * z_s - c_t * z_t


@torch.no_grad()
def progressive_target(teacher: Teacher, z_t: Tensor, i: Tensor | int, num_student_steps: int,
                       schedule: Callable[[Tensor], Tensor], **cond) -> tuple[Tensor, Tensor]:
    """Progressive-distillation target x~ for a student with `num_student_steps` = N DDIM steps (PD Alg. 2).

    z_t: (B, ...) noisy inputs at the student's level; i: (B,) int64 (or an int) student grid index in
    {0..N-1}: the student's step goes from t = 1 - i/N to t'' = 1 - (i+1)/N. `cond` is passed to the teacher
    (e.g. text, or the guidance weight of a guidance-distilled teacher, Meng et al. 2023 stage 2).

    The teacher takes two DDIM steps on the 2N-step grid `time_grid(2N, schedule)`, from point 2i (= t)
    to 2i+1 (t' = t - 0.5/N) to 2i+2 (t'' = t - 1/N). Mind the order: the midpoint t' comes first;
    swapping t' and t'' (diffusers#1010) or drawing a continuous t instead of a grid point gives a
    different, wrong target. The target is the x for which ONE student DDIM step t -> t'' lands on the
    teacher's z_t'':
        x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)    (PD Alg. 2)
    At the student's last step (i = N-1, t'' = 0) the samplers return x_hat itself instead of stepping to
    t = 0, so the target is what the teacher's 2N-step sampler returns there: the teacher's x_hat at the
    midpoint, x_hat(z_t'). This is the reference's `jnp.where(i == 0, x_pred, x_target)` (i_ref = N-1-i),
    where `x_pred` has by then been reassigned to the midpoint prediction; taking x_hat(z_t) instead
    drops the teacher's last half step (for N = 1 the student would learn E[x], the data mean).

    Returns (x_target (B, ...) in z_t's dtype, logsnr_t (B,)) where logsnr_t is the student's input level,
    in the samplers' dtype (float32, float64 for float64 z). Coefficients are float64; no gradient flows.
    """
    n = int(num_student_steps)
    if n < 1:
        raise ValueError(f"num_student_steps must be >= 1, got {num_student_steps}")
    batch = z_t.shape[0]
    i = _levels(i, batch, n, z_t.device)
    fine = time_grid(2 * n, schedule).to(z_t.device)  # (2N+1,) float64, fine[2i] is the student's grid point i
    lam_t, lam_mid, lam_s = fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]  # (B,) each: t, t', t''
    level_dtype = torch.promote_types(z_t.dtype, torch.float32)  # what the samplers feed the model

    # two teacher DDIM steps t -> t' -> t'' (PD Alg. 2), with the samplers' own step
    x_t = teacher(z_t, lam_t.to(level_dtype), **cond)
    z_mid = ddim_step(z_t, x_t, lam_t, lam_mid)
    x_mid = teacher(z_mid, lam_mid.to(level_dtype), **cond)
    z_s = ddim_step(z_mid, x_mid, lam_mid, lam_s)

    # x~ = (z_t'' - r z_t) / (alpha_t'' - r alpha_t), r = sigma_t'' / sigma_t (PD Alg. 2); log form as in dpm.py
    x_target = _invert_ddim(z_s, z_t, lam_t, lam_s)
    # last student step: the teacher sampler's output x_hat(z_t'); our i = N-1 is the reference's i == 0
    last = append_dims(i == n - 1, z_t.ndim)
    return torch.where(last, x_mid, x_target), lam_t.to(level_dtype)


@torch.no_grad()
def consistency_target(teacher: Teacher, target_net: Teacher, z_t: Tensor, j: Tensor | int, num_student_steps: int,
                       substeps: int, schedule: Callable[[Tensor], Tensor], **cond) -> tuple[Tensor, Tensor]:
    """Multistep consistency-distillation target x~ (Heek et al. 2024, after Song et al. 2023) for a student sampled
    with N = `num_student_steps` DDIM steps on `time_grid(N, schedule)`.

    Time is cut into N segments; segment k runs from the student's grid point k down to k + 1, and a consistent
    student maps every z on a probability-flow trajectory inside a segment, in ONE DDIM step with its x_hat, to the
    trajectory's point at the segment's end (in the last segment: its x_hat is the trajectory's end itself, what the
    samplers return at their last step). The teacher's ODE is followed on the finer grid `time_grid(N K, schedule)`,
    K = `substeps` per segment; j: (B,) int64 (or an int) fine index in {0..N K - 1}, the student's input level,
    e = (j // K + 1) K the end of its segment. One teacher DDIM step j -> j + 1 gives z'; then
      - j + 1 = e: the segment's end is the teacher's z' itself (in the last segment: the teacher's x_hat(z_t),
        the sampler's convention, as in `progressive_target`);
      - otherwise the target network (the student's EMA, no gradient) carries z' on to the end: in the last segment
        x~ = target_net(z'); before it, z_e = DDIM(z', target_net(z'), j + 1 -> e).
    x~ is the x for which one DDIM step from z_t lands on z_e (PD Alg. 2's inversion). Its fixed point is the
    composition of the teacher's DDIM steps over the rest of the segment, which for K -> infinity is the
    probability-flow ODE's solution map (affine and known in closed form on Gaussian data,
    `cascade.diffusion.analytic.gaussian_flow_map`). K = 1 is progressive distillation's one-teacher-step target
    without the second step: use `progressive_target` for that.

    Returns (x_target (B, ...) in z_t's dtype, logsnr_j (B,)) where logsnr_j is the student's input level in the
    samplers' dtype. Coefficients are float64; no gradient flows.
    """
    n, k = int(num_student_steps), int(substeps)
    if n < 1 or k < 1:
        raise ValueError(f"num_student_steps and substeps must be >= 1, got {num_student_steps} and {substeps}")
    batch = z_t.shape[0]
    j = _levels(j, batch, n * k, z_t.device)
    fine = time_grid(n * k, schedule).to(z_t.device)  # (N K + 1,) float64
    end = (j // k + 1) * k  # (B,) the segment's end on the fine grid
    lam_j, lam_next, lam_end = fine[j], fine[j + 1], fine[end]
    level_dtype = torch.promote_types(z_t.dtype, torch.float32)
    last_segment = append_dims(end == n * k, z_t.ndim)
    at_end = append_dims(j + 1 == end, z_t.ndim)

    x_teacher = teacher(z_t, lam_j.to(level_dtype), **cond)
    z_next = ddim_step(z_t, x_teacher, lam_j, lam_next)
    x_ema = target_net(z_next, lam_next.to(level_dtype), **cond)
    z_end = torch.where(at_end, z_next, ddim_step(z_next, x_ema, lam_next, lam_end))
    x_target = _invert_ddim(z_end, z_t, lam_j, lam_end)  # lam_end > lam_j: finite; unused in the last segment
    x_last = torch.where(at_end, x_teacher, x_ema)  # the last segment: the sampler returns x_hat, no inversion
    return torch.where(last_segment, x_last, x_target), lam_j.to(level_dtype)


@torch.no_grad()
def guided_target(cond_fn: Callable[[Tensor, Tensor], Tensor], uncond_fn: Callable[[Tensor, Tensor], Tensor],
                  z: Tensor, logsnr: Tensor, w: float | Tensor) -> Tensor:
    """Guidance-distillation target (Meng et al. 2023 stage 1): x~ = (1 + w) x_hat(z, c) - w x_hat(z).

    z: (B, ...); logsnr: (B,); w: float or (B,) per-sample guidance weight ((1 + w) convention, w = 0 is
    the conditional model). Returns (B, ...) without gradient.
    """
    return cfg(cond_fn(z, logsnr), uncond_fn(z, logsnr), w)


def distillation_loss(x_hat_student: Tensor, x_target: Tensor, logsnr: Tensor,
                      weighting: str = "truncated_snr") -> Tensor:
    """Per-sample loss (B,): w(lambda) mean((x_target - x_hat)^2) in x-space (PD sec. 4).

    x_hat_student, x_target: (B, ...); logsnr: (B,) the student's input level. "truncated_snr":
    w = max(SNR, 1), i.e. max(||x - x_hat||^2, ||eps - eps_hat||^2); "snr+1": w = 1 + SNR = ||v - v_hat||^2.
    Plain SNR weighting (eps-MSE) is refused: it gives zero weight at the SNR-0 top step (PD sec. 4).
    Means are over all non-batch dims, in at least float32.
    """
    diff = (x_target - x_hat_student).to(torch.promote_types(x_hat_student.dtype, torch.float32))
    mse = diff.square().flatten(1).mean(dim=1)  # (B,)
    # w = exp(log w): exp(relu(lambda)) or exp(softplus(lambda)) (PD sec. 4)
    return loss_weight(logsnr.to(mse.dtype), weighting) * mse


def sample_student_levels(batch: int, num_steps: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> Tensor:
    """Student grid indices i (B,) int64, uniform over {0..N-1} (PD Alg. 2: t = 1 - i/N, i = 0 at SNR ~ 0)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.randint(0, num_steps, (batch,), generator=generator, device=device, dtype=torch.int64)
