"""Network layers and the factorized space-time video U-Net."""

from cascade.nn.unet import VideoUNet, upsample_condition

__all__ = ["VideoUNet", "upsample_condition"]
