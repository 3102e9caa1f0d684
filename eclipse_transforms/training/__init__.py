"""Train a DDPM denoiser on a sparse clean set (``eclipse-transforms train``)."""

from .config import TrainConfig
from .trainer import build_scheduler, build_unet, train

__all__ = ["TrainConfig", "train", "build_unet", "build_scheduler"]
