"""Distillation: the targets and losses of progressive distillation (Salimans & Ho 2022), guidance distillation
(Meng et al. 2023) and multistep consistency distillation (Heek et al. 2024), built on the samplers' own `time_grid`
and `ddim_step`; all as methods behind one protocol; and the rounds of a stage's distillation."""

from cascade.distill.methods import (ConsistencyDistillation, DistillationMethod, Draw, GuidanceDistillation,
                                     ProgressiveDistillation)
from cascade.distill.rounds import Round, distillation_rounds
from cascade.distill.targets import (consistency_target, distillation_loss, guided_target, progressive_target,
                                     sample_student_levels)

__all__ = [
    "ConsistencyDistillation", "DistillationMethod", "Draw", "GuidanceDistillation", "ProgressiveDistillation", "Round", "distillation_loss",
    "consistency_target", "distillation_rounds", "guided_target", "progressive_target", "sample_student_levels",
]
