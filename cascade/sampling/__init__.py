"""Solver steps, sampling loops and classifier-free guidance."""

from cascade.sampling.guidance import GuidedModel, cfg, dynamic_threshold, guidance_weights
from cascade.sampling.samplers import SAMPLERS, sample, sample_ancestral, sample_ddim, sample_stochastic
from cascade.sampling.steps import ancestral_step, ddim_step, renoise_step, time_grid

__all__ = [
    "SAMPLERS", "GuidedModel", "ancestral_step", "cfg", "ddim_step", "dynamic_threshold", "guidance_weights",
    "renoise_step", "sample", "sample_ancestral", "sample_ddim", "sample_stochastic", "time_grid",
]
