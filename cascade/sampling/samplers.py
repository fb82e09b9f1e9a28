"""Sampling loops. One denoiser contract for all: `model(z, logsnr, step) -> x_hat`.

z: (B, C, T, H, W) (any trailing dims); logsnr: (B,) float32 (float64 for float64 z); step: the int index i,
so guidance may vary per step. `logsnrs` is the grid (N+1,) from `time_grid`, noisiest first; step i
evaluates the model at logsnrs[i]. The last step returns x_hat itself (as the progressive-distillation
reference does), so logsnrs[N] is only used by the stochastic sampler. `callback(i, z_i, x_hat_i)`
sees the input of step i and its prediction.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from cascade.diffusion.noise import Generator, randn
from cascade.diffusion.param import diffuse
from cascade.sampling.steps import ancestral_step, ddim_step, renoise_step

Model = Callable[[Tensor, Tensor, int], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


def _floats(logsnrs: Sequence[float] | Tensor) -> list[float]:
    lams = [float(x) for x in logsnrs]
    if len(lams) < 2:
        raise ValueError("logsnrs needs at least 2 levels (one step)")
    return lams


def _steps(num_steps: int, progress: bool | str) -> Iterable[int]:
    """`progress`: False, True, or the progress bar's label (e.g. the stage name)."""
    if not progress:
        return range(num_steps)
    from tqdm.auto import trange
    return trange(num_steps, desc=progress if isinstance(progress, str) else "sampling")


def _predict(model: Model, z: Tensor, logsnr: float, step: int, callback: Callback | None) -> Tensor:
    dtype = torch.promote_types(z.dtype, torch.float32)  # float32 levels even for half-precision z
    x_hat = model(z, torch.full((z.shape[0],), logsnr, dtype=dtype, device=z.device), step)
    if callback is not None:
        callback(step, z, x_hat)
    return x_hat


def _noise(z: Tensor, generator: Generator) -> Tensor:
    return randn(z.shape, generator, dtype=z.dtype, device=z.device)


@torch.no_grad()
def sample_ddim(model: Model, z: Tensor, logsnrs: Sequence[float] | Tensor, callback: Callback | None = None,
                progress: bool = False) -> Tensor:
    """Deterministic DDIM from z = z_1 over the grid; N model evaluations."""
    lams = _floats(logsnrs)
    last = len(lams) - 2
    for i in _steps(len(lams) - 1, progress):
        x_hat = _predict(model, z, lams[i], i, callback)
        z = x_hat if i == last else ddim_step(z, x_hat, lams[i], lams[i + 1])
    return z


@torch.no_grad()
def sample_ancestral(model: Model, z: Tensor, logsnrs: Sequence[float] | Tensor, gamma: float = 0.3,
                     generator: Generator = None, callback: Callback | None = None,
                     progress: bool = False) -> Tensor:
    """Ancestral sampler of VDM / Imagen Video with stochasticity gamma in [0, 1] (VDM uses 0.1-0.3)."""
    lams = _floats(logsnrs)
    last = len(lams) - 2
    for i in _steps(len(lams) - 1, progress):
        x_hat = _predict(model, z, lams[i], i, callback)
        z = x_hat if i == last else ancestral_step(z, x_hat, lams[i], lams[i + 1], gamma, _noise(z, generator))
    return z


@torch.no_grad()
def sample_stochastic(model: Model, z: Tensor, logsnrs: Sequence[float] | Tensor,
                      generator: Generator = None, callback: Callback | None = None,
                      progress: bool = False) -> Tensor:
    """N-step stochastic sampler for distilled models (Meng et al. 2023): N model evaluations.

    From level i: a DDIM step of twice the size to k = i + 2, then forward noise back to s = i + 1.
    """
    lams = _floats(logsnrs)
    last = len(lams) - 2
    for i in _steps(len(lams) - 1, progress):
        x_hat = _predict(model, z, lams[i], i, callback)
        if i == last:
            return x_hat
        z_k = ddim_step(z, x_hat, lams[i], lams[i + 2])
        z = renoise_step(z_k, lams[i + 2], lams[i + 1], _noise(z, generator))
    return z


@torch.no_grad()
def sample_consistency(model: Model, z: Tensor, logsnrs: Sequence[float] | Tensor,
                       generator: Generator = None, callback: Callback | None = None,
                       progress: bool = False) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a one-segment consistency student, whose
    x_hat at any level is the end of the probability-flow trajectory through it: x = f(z_1); then at each next level
    of the grid the sample is noised afresh, z = alpha x + sigma eps, and mapped again, x = f(z). N model
    evaluations; N = 1 is the one-step consistency model. The fresh noise lets later evaluations correct the first
    one's errors, which a deterministic DDIM step from the same x_hat would carry along."""
    lams = _floats(logsnrs)
    last = len(lams) - 2
    for i in _steps(len(lams) - 1, progress):
        x_hat = _predict(model, z, lams[i], i, callback)
        if i == last:
            return x_hat
        lam = torch.full((z.shape[0],), lams[i + 1], dtype=torch.float64, device=z.device)
        z = diffuse(x_hat, lam, _noise(z, generator))
    return z


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "ancestral": sample_ancestral,
    "stochastic": sample_stochastic,
    "consistency": sample_consistency,
}
STOCHASTIC = ("ancestral", "stochastic", "consistency")  # the samplers that draw fresh noise (take a generator)


def sample(kind: str, model: Model, z: Tensor, logsnrs: Sequence[float] | Tensor, **kw) -> Tensor:
    """Dispatch to `SAMPLERS[kind]`; keyword arguments go to that sampler."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[kind](model, z, logsnrs, **kw)
