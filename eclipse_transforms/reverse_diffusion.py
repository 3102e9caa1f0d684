"""Stage 2 of ECLIPSE: the reverse DDPM from ``x_{t*}`` back to a clean image."""

from __future__ import annotations

from typing import Any

import torch

from . import functional as EF
from ._base import DiffusionTransform
from ._images import content_generators

__all__ = ["ReverseDiffusion"]


class ReverseDiffusion(DiffusionTransform):
    """Run the reverse DDPM from ``t_star`` to 0 with the sparse-set denoiser (paper §3.2).

    Args:
        denoiser: a :class:`~eclipse_transforms.Denoiser`, a folder or Hub repo id, or ``None`` (bundled weights).
        t_star: the diffusion time of the input, as given to :class:`ForwardDiffusion`.
        steps: ``None`` for the paper's sampler (``t_star`` ancestral steps), fewer for an evenly respaced
            ancestral schedule, 1 for the one-step estimate of ``x_0``. See
            :func:`eclipse_transforms.functional.sampling_timesteps`.
        seed: int for reproducible sampling noise (a function of each image and the seed), ``None`` for fresh.
        revision: Hub revision when ``denoiser`` is a repo id.

    Input: noisy float images ``(..., 3, H, W)`` from :class:`ForwardDiffusion` (values may leave ``[0, 1]``).
    Output: images in ``[0, 1]``, same shape, dtype and device.

    Example:
        >>> from eclipse_transforms import ForwardDiffusion
        >>> noisy = ForwardDiffusion(tiny_denoiser, t_star=10, seed=0)(torch.rand(2, 3, 8, 8))
        >>> denoise = ReverseDiffusion(tiny_denoiser, t_star=10, steps=2, seed=0)
        >>> clean = denoise(noisy)
        >>> clean.shape, bool(clean.min() >= 0 and clean.max() <= 1)
        (torch.Size([2, 3, 8, 8]), True)
    """

    accepts_uint8 = False
    check_range = False

    def __init__(
        self,
        denoiser: Any = None,
        *,
        t_star: int = 100,
        steps: int | None = None,
        seed: int | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__(denoiser, t_star=t_star, seed=seed, revision=revision)
        self.steps = EF.check_steps(steps, self.t_star) if steps is not None else None

    def _apply_batch(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        generators = content_generators(x, params["seed"])
        return EF.reverse_diffusion(x, self.denoiser, self.t_star, steps=self.steps, generator=generators)
