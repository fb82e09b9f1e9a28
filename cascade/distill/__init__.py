"""Distillation targets and losses: progressive distillation (Salimans & Ho 2022) and guidance distillation
(Meng et al. 2023), built on the samplers' own `time_grid` and `ddim_step`."""

from cascade.distill.targets import distillation_loss, guided_target, progressive_target, sample_student_levels

__all__ = ["distillation_loss", "guided_target", "progressive_target", "sample_student_levels"]
