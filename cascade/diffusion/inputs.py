"""A stage network's conditioning, built in one place for training, distillation and sampling.

The U-Net of a stage takes, beside z and its log-SNR: the T5 token embeddings and their mask (a dropped caption is a
mask with no token), the frame rate, `is_image` for stills in joint training and, for super-resolution stages, the
low-resolution input `cond` and the log-SNR `aug_logsnr` of the noise added to it (Imagen Video sec. 2.5).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from cascade.diffusion.augment import NoiseAugmentation
from cascade.diffusion.cfg import drop_captions
from cascade.diffusion.noise import Generator

NO_AUGMENTATION = 20.0
"""The `aug_logsnr` of a clean low-resolution input (a stage without noise conditioning augmentation): the top of
the default training range, sigma ~ 4.5e-5."""


def stage_inputs(batch: Mapping[str, Tensor | float], augmentation: NoiseAugmentation | None = None, *,
                 training: bool = False, text_drop_prob: float = 0.0, generator: Generator = None) -> dict[str, Tensor]:
    """The network's keyword inputs for one stage.

    batch: text (B, L, D), text_mask (B, L) bool, fps (B,) or one number, optionally is_image (B,) bool and, for
    super-resolution, cond (B, 3, T', H', W') in [-1, 1]: the input stage's clip (training) or samples (sampling).
    training: a share `text_drop_prob` of the captions is dropped and each sample's augmentation level is drawn
    from the training range; otherwise captions stay and the input is noised at the fixed sampling level. Draws
    come from `generator`, in this order: caption dropout (training only), then augmentation.
    Returns text, text_mask, fps (B,), is_image when given, and cond with aug_logsnr (B,) when given.
    """
    text, text_mask = batch["text"], batch["text_mask"]
    size, device = text.shape[0], text.device
    if training:
        text_mask = drop_captions(text_mask, text_drop_prob, generator)
    fps = batch["fps"]
    fps = fps if isinstance(fps, Tensor) else torch.full((size,), float(fps), device=device)
    inputs = dict(text=text, text_mask=text_mask, fps=fps)
    if batch.get("is_image") is not None:
        inputs["is_image"] = batch["is_image"]
    low = batch.get("cond")
    if low is not None:
        if augmentation is None:
            inputs.update(cond=low, aug_logsnr=torch.full((size,), NO_AUGMENTATION, device=device))
        else:  # a random level per sample in training, the fixed level at sampling, in the same units
            noisy, aug_logsnr = (augmentation.train if training else augmentation.sample)(low, generator=generator)
            inputs.update(cond=noisy, aug_logsnr=aug_logsnr)
    return inputs
