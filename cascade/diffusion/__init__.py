"""Log-SNR schedules, parameterizations, losses, noise conditioning augmentation and ideal denoisers."""

from cascade.diffusion.analytic import (
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    gaussian_sampler_moments,
    gaussian_step_maps,
)
from cascade.diffusion.augment import NoiseAugmentation
from cascade.diffusion.cfg import drop_captions
from cascade.diffusion.inputs import NO_AUGMENTATION, KnownFrameDraw, first_frames, stage_inputs
from cascade.diffusion.loss import diffusion_loss, loss_weight, sample_logsnr_train
from cascade.diffusion.noise import VideoGenerators
from cascade.diffusion.param import (
    Denoiser,
    append_dims,
    diffuse,
    eps_from_v,
    eps_from_x,
    v_from_eps,
    v_from_x,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
)
from cascade.diffusion.schedule import CosineSchedule, alpha_sigma, logsnr_cosine, resolution_shift, t_from_logsnr

__all__ = [
    "NO_AUGMENTATION", "CosineSchedule", "Denoiser", "GaussianDenoiser", "GaussianMixtureDenoiser", "NoiseAugmentation",
    "VideoGenerators", "alpha_sigma", "append_dims", "diffuse", "diffusion_loss", "drop_captions", "eps_from_v",
    "eps_from_x", "gaussian_sampler_moments", "gaussian_step_maps", "logsnr_cosine", "loss_weight", "resolution_shift",
    "sample_logsnr_train", "stage_inputs", "KnownFrameDraw", "first_frames", "t_from_logsnr", "v_from_eps", "v_from_x", "v_from_x_eps", "x_from_eps",
    "x_from_v",
]
