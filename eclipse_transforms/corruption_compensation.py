"""Stage 3 of ECLIPSE: the corruption compensation module, redrawn on every call."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import functional as EF
from ._base import ImageTransform
from ._images import check_channels

__all__ = ["CorruptionCompensation"]


class CorruptionCompensation(ImageTransform):
    """Random grayscale with probability ``p_gray``, then Gaussian noise of std ``sigma``, then clamp to ``[0, 1]``.

    Applied to purified training images, freshly on every call (every epoch), it removes what purification
    leaves of a poison (paper §3.3: p = 0.4, σ = 0.05). Each image of a batch draws its own grayscale decision
    and noise. Randomness comes from torch's global RNG, like ``v2.RandomGrayscale`` and ``v2.GaussianNoise``:
    ``torch.manual_seed`` makes it reproducible, and DataLoader workers get distinct streams. For explicit
    generators use :func:`eclipse_transforms.functional.compensate`.

    Args:
        p_gray: probability that an image becomes grayscale (kept 3-channel), in ``[0, 1]``.
        sigma: std of the additive noise, in ``[0, 1]`` image units (0.05 ≈ 12.75/255).

    Input: float images ``(..., C, H, W)`` in ``[0, 1]`` with C = 1 or 3, uint8 tensors, ``tv_tensors.Image`` or
    PIL images; the output has the input's type, dtype and device (uint8 and PIL are rounded to the nearest
    level, which blurs the noise's fine structure: prefer float inputs).

    Example:
        >>> comp = CorruptionCompensation()
        >>> out = comp(torch.rand(2, 3, 17, 11))
        >>> out.shape, bool(out.min() >= 0), bool(out.max() <= 1)
        (torch.Size([2, 3, 17, 11]), True, True)
    """

    def __init__(self, p_gray: float = 0.4, sigma: float = 0.05) -> None:
        super().__init__()
        for name, value in (("p_gray", p_gray), ("sigma", sigma)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        if not 0 <= p_gray <= 1:
            raise ValueError(f"p_gray must be in [0, 1], got {p_gray}.")
        if not 0 <= sigma <= 1:
            raise ValueError(f"sigma must be in [0, 1] (image units, e.g. 0.05 for 12.75/255), got {sigma}.")
        self.p_gray = float(p_gray)
        self.sigma = float(sigma)

    def compensate(self, x: torch.Tensor, generator: EF.Generators = None) -> torch.Tensor:
        """This module's settings on a float batch ``(N, C, H, W)`` in ``[0, 1]`` that is known to be valid, without
        the transform's dispatch and input checks (what :class:`PurifiedDataset` does on every item, and the bench
        every batch); ``generator`` as in :func:`eclipse_transforms.functional.compensate`."""
        return EF.corruption_compensation(x, p_gray=self.p_gray, sigma=self.sigma, generator=generator)

    def _apply_batch(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if x.shape[1] not in (1, 3):
            check_channels(x.shape, 3)
        return self.compensate(x)
