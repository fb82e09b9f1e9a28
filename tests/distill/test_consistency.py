"""Consistency distillation (cascade.distill.targets.consistency_target) against the closed form on Gaussian data.

With x ~ N(m, s^2) per element the ideal denoiser is known exactly (`GaussianDenoiser`), every DDIM step is affine
in z, and the probability-flow ODE's solution map is affine and known in closed form (`gaussian_flow_map`). A
student x_hat = a_j z + b_j per noise level (the smallest network that can hold the answer) is distilled from the
exact teacher with the library's target; its N-step sampler must then be the ODE's map from pure noise to data,
within the teacher's own discretisation error, at N = 1 and 2; and the same loop with a wrong target must miss.
"""

import copy
import math

import pytest
import torch
from torch import nn

from cascade.diffusion.analytic import GaussianDenoiser, gaussian_flow_map
from cascade.diffusion.param import diffuse
from cascade.diffusion.schedule import CosineSchedule
from cascade.distill.targets import consistency_target, distillation_loss
from cascade.sampling.samplers import sample_ddim
from cascade.sampling.steps import ddim_step, time_grid

MEAN, STD = 0.5, 0.4
SUBSTEPS = 32  # teacher DDIM steps per student step: their own error against the ODE is then <= 0.022 here
TOLERANCE = 0.03  # |A - A_ode| and |B - B_ode| of the student's sampler z_1 -> x = A z_1 + B


class PerLevelAffine(nn.Module):
    """x_hat = a_j z + b_j at the fine grid's level j (the nearest one to the logsnr it is given)."""

    def __init__(self, levels: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("levels", levels.float())
        self.a = nn.Parameter(torch.zeros(len(levels)))
        self.b = nn.Parameter(torch.zeros(len(levels)))

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        j = (logsnr.float()[:, None] - self.levels[None]).abs().argmin(dim=1)
        return self.a[j][:, None] * z + self.b[j][:, None]


def distil(steps: int, target_fn, iterations: int = 1200, seed: int = 0) -> PerLevelAffine:
    """Adam on the method's loss, the target network an EMA (0.5) of the student, 8 samples of 4 elements per
    level and step."""
    torch.manual_seed(seed)
    schedule = CosineSchedule()
    fine = time_grid(steps * SUBSTEPS, schedule)
    teacher = GaussianDenoiser(MEAN, STD)
    student = PerLevelAffine(fine[:-1])
    ema = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.03)
    j = torch.arange(8 * steps * SUBSTEPS) % (steps * SUBSTEPS)
    for _ in range(iterations):
        x = teacher.sample((len(j), 4), dtype=torch.float32)
        z = diffuse(x, fine[j].float(), torch.randn_like(x))
        target, logsnr = target_fn(lambda z_, l_: teacher(z_, l_).float(), ema, z, j, steps, SUBSTEPS, schedule)
        loss = distillation_loss(student(z, logsnr), target, logsnr, "snr+1").mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p, q in zip(ema.parameters(), student.parameters()):
                p.lerp_(q, 0.5)
    return student


def sampler_map(student: PerLevelAffine, steps: int) -> tuple[float, float]:
    """(A, B) of the student's `steps`-step DDIM sampler x = A z_1 + B, read off two inputs."""
    grid = time_grid(steps, CosineSchedule())
    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    with torch.no_grad():
        out = sample_ddim(lambda z_, l_, i: student(z_.float(), l_.float()).double(), z, grid)
    return float(out[1] - out[0]), float(out[0])


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_student_is_the_flow_map(steps):
    grid = time_grid(steps, CosineSchedule())
    exact = gaussian_flow_map(MEAN, STD, float(grid[0]), None)  # from t = 1 to the data
    a, b = sampler_map(distil(steps, consistency_target), steps)
    assert abs(a - exact[0]) < TOLERANCE and abs(b - exact[1]) < TOLERANCE, (a, b, exact)
    # The teacher's own sampler at as few steps is far from it (one step: the data mean, A ~ 0).
    teacher = GaussianDenoiser(MEAN, STD)
    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    out = sample_ddim(lambda z_, l_, i: teacher(z_, l_), z, grid)
    assert abs(float(out[1] - out[0]) - exact[0]) > 5 * TOLERANCE


def test_a_wrong_target_misses_the_flow_map():
    """Two plausible mistakes, each caught: regressing on the teacher's x_hat at the student's own level (plain
    denoiser distillation: the data mean at one step), and, at two steps, taking the target network's x_hat at the
    teacher's next level as the answer in every segment (not carried by DDIM to the segment's end)."""

    def denoiser_target(teacher, ema, z, j, steps, substeps, schedule):
        fine = time_grid(steps * substeps, schedule)
        return teacher(z, fine[j].float()), fine[j].float()

    def uncarried_target(teacher, ema, z, j, steps, substeps, schedule):
        fine = time_grid(steps * substeps, schedule)
        z_next = ddim_step(z, teacher(z, fine[j].float()), fine[j], fine[j + 1])
        return ema(z_next, fine[j + 1].float()), fine[j].float()

    for steps, wrong in ((1, denoiser_target), (2, uncarried_target)):
        exact = gaussian_flow_map(MEAN, STD, float(time_grid(steps, CosineSchedule())[0]), None)
        a, b = sampler_map(distil(steps, wrong, iterations=600), steps)
        assert max(abs(a - exact[0]), abs(b - exact[1])) > 2 * TOLERANCE, (steps, a, b, exact)


def test_flow_map_is_the_limit_of_ddim_steps():
    """The closed form against the teacher's DDIM steps on ever finer grids (independent of the distillation)."""
    teacher = GaussianDenoiser(MEAN, STD)
    lam_t, lam_s = -1.0, 2.0
    exact = gaussian_flow_map(MEAN, STD, lam_t, lam_s)
    errors = []
    for n in (8, 64, 512):
        lams = torch.linspace(lam_t, lam_s, n + 1, dtype=torch.float64)
        z = torch.tensor([0.0, 1.0], dtype=torch.float64)
        for i in range(n):
            z = ddim_step(z, teacher(z, lams[i]), lams[i], lams[i + 1])
        errors.append(abs(float(z[1] - z[0]) - exact[0]) + abs(float(z[0]) - exact[1]))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3 and not math.isnan(errors[2])
