"""Classifiers the bench trains: a compact VGG-style CNN for this CPU and the paper's CIFAR ResNet-18.

The compact net follows the shape of fast CIFAR-10 recipes (Keller Jordan's airbench): a 2x2 stem, three stages
of two 3x3 conv-BN-GELU layers with a max-pool between them, global max-pool and a linear head scaled down so
the initial logits are small. Everything runs in ``channels_last``, 1.5x faster on CPU than NCHW here.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

__all__ = ["compact_cnn", "cifar_resnet18", "build_model"]


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


class _Scale(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def compact_cnn(widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10, stem: int = 24) -> nn.Module:
    """A compact VGG-style CNN (0.30 M parameters at the default widths) for 32x32 images.

    Args:
        widths: channels of the three stages.
        num_classes: outputs of the linear head.
        stem: channels of the 2x2 stem convolution.
    """
    if len(widths) != 3:
        raise ValueError(f"widths must be three ints (channels of the three stages), got {widths!r}.")
    w1, w2, w3 = widths
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 2), nn.GELU()]
    for cin, cout in ((stem, w1), (w1, w2), (w2, w3)):
        layers += [*_conv_bn(cin, cout), nn.MaxPool2d(2), *_conv_bn(cout, cout)]
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes, bias=False), _Scale(1 / 9)]
    return nn.Sequential(*layers)


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem the poisoning papers use: 3x3 stride-1 conv1, no max-pool."""
    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, widths: tuple[int, ...] | None = None, num_classes: int = 10) -> nn.Module:
    """``"compact"`` (with ``widths``) or ``"resnet18"``, in ``channels_last``."""
    if name == "compact":
        model = compact_cnn(tuple(widths) if widths else (32, 64, 128), num_classes)
    elif name == "resnet18":
        model = cifar_resnet18(num_classes)
    else:
        raise ValueError(f"model must be 'compact' or 'resnet18', got {name!r}.")
    return model.to(memory_format=torch.channels_last)
