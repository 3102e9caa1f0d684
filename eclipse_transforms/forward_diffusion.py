"""Stage 1 of ECLIPSE: forward diffusion of clean images to ``x_{t*}``."""

from __future__ import annotations

from typing import Any

import torch

from . import functional as EF
from ._base import DiffusionTransform
from ._images import content_generators

__all__ = ["ForwardDiffusion"]


class ForwardDiffusion(DiffusionTransform):
    """Diffuse images forward to ``t_star`` in the denoiser's schedule: ``sqrt(ᾱ) x + sqrt(1 - ᾱ) ε``.

    Enough Gaussian noise swamps a small poison (paper §3.2). The output is a *noisy* image in image
    coordinates (``[-1, 1]`` mapped back by ``y / 2 + 0.5``), so values leave ``[0, 1]``: input and output are
    float tensors only. Follow it with :class:`ReverseDiffusion` of the same ``t_star``.

    Args:
        denoiser: a :class:`~eclipse_transforms.Denoiser`, a folder or Hub repo id, or ``None`` (bundled weights).
        t_star: diffusion time, in ``[1, min(T, t_max)]`` (paper: 100 of T = 4000, cosine schedule).
        seed: int for reproducible noise (a function of each image and the seed), ``None`` for fresh noise.
        revision: Hub revision when ``denoiser`` is a repo id.

    Input: float images ``(..., 3, H, W)`` in ``[0, 1]`` (plain or ``tv_tensors.Image``), H and W multiples of
    ``denoiser.size_multiple``. Output: same shape, dtype and device.

    Example:
        >>> noise = ForwardDiffusion(tiny_denoiser, t_star=10, seed=0)
        >>> noisy = noise(torch.rand(2, 3, 8, 8))
        >>> noisy.shape
        torch.Size([2, 3, 8, 8])
    """

    accepts_uint8 = False

    def _apply_batch(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        generators = content_generators(x, params["seed"])
        return EF.forward_diffusion(x.to(self.denoiser.device), self.denoiser, self.t_star, generator=generators).to(
            x.device
        )
