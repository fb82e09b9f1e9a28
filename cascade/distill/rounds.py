"""The distillation schedule of one stage: guidance distillation (optional), then progressive halvings or one
consistency-distillation round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from cascade.distill.methods import (ConsistencyDistillation, DistillationMethod, GuidanceDistillation,
                                     ProgressiveDistillation)


@dataclass(frozen=True)
class Round:
    """One distillation run: its folder name, method, optimizer steps and learning rate (annealed to 0)."""

    name: str
    method: DistillationMethod
    max_steps: int
    lr: float


def distillation_rounds(schedule: Callable[[Tensor], Tensor], *, start_steps: int, end_steps: int,
                        steps_per_round: int, lr: float, weighting: str = "truncated_snr",
                        guidance: tuple[float, float] | None = None, guidance_steps: int | None = None,
                        guidance_lr: float | None = None, consistency: dict | None = None) -> list[Round]:
    """Guidance distillation on the `start_steps` grid when `guidance` = (w_min, w_max) is given (Meng et al. 2023),
    then halvings start_steps -> ... -> end_steps (Salimans & Ho 2022), each student starting from its teacher;
    or, with `consistency` = dict(steps, substeps, max_steps, lr, target_ema[, weighting]), one
    consistency-distillation round to `steps` steps from the (guidance-distilled) teacher instead of the halvings.
    Folder names: "guidance", then "steps-NNNN" by the student's step count, or "consistency-NNNN"."""
    if end_steps < 1 or start_steps <= end_steps or start_steps % end_steps or (start_steps // end_steps) & (
            start_steps // end_steps - 1):
        raise ValueError(f"start_steps ({start_steps}) must be end_steps ({end_steps}) times a power of two > 1")
    if guidance is not None and (guidance_steps is None or guidance_steps < 1 or guidance_lr is None):
        raise ValueError(f"guidance distillation needs its optimizer steps (>= 1) and learning rate, got "
                         f"{guidance_steps} and {guidance_lr}")
    rounds = []
    if guidance is not None:
        method = GuidanceDistillation(schedule, start_steps, tuple(guidance), weighting)
        rounds.append(Round("guidance", method, guidance_steps, guidance_lr))
    if consistency is not None:
        c = consistency
        method = ConsistencyDistillation(schedule, c["steps"], c["substeps"],
                                         None if guidance is None else tuple(guidance),
                                         c.get("weighting", weighting), c["target_ema"])
        rounds.append(Round(f"consistency-{c['steps']:04d}", method, c["max_steps"], c["lr"]))
        return rounds
    steps = start_steps
    while steps > end_steps:
        steps //= 2
        method = ProgressiveDistillation(schedule, steps, None if guidance is None else tuple(guidance), weighting)
        rounds.append(Round(f"steps-{steps:04d}", method, steps_per_round, lr))
    return rounds
