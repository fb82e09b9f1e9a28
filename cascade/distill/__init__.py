"""Distillation: the targets and losses of progressive distillation (Salimans & Ho 2022) and guidance distillation
(Meng et al. 2023), built on the samplers' own `time_grid` and `ddim_step`; both as methods behind one protocol; and
the rounds of a stage's distillation."""

from cascade.distill.methods import DistillationMethod, Draw, GuidanceDistillation, ProgressiveDistillation
from cascade.distill.rounds import Round, distillation_rounds
from cascade.distill.targets import distillation_loss, guided_target, progressive_target, sample_student_levels

__all__ = [
    "DistillationMethod", "Draw", "GuidanceDistillation", "ProgressiveDistillation", "Round", "distillation_loss",
    "distillation_rounds", "guided_target", "progressive_target", "sample_student_levels",
]
