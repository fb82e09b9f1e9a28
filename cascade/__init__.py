"""cascade: train, distill, sample and evaluate Imagen Video-style cascaded text-to-video diffusion models."""

__version__ = "0.1.0"
