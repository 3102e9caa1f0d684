"""``EclipsePurify``: the three ECLIPSE stages behind one torchvision transform."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import functional as EF
from ._base import DiffusionTransform
from ._images import check_channels, content_generators
from .corruption_compensation import CorruptionCompensation
from .forward_diffusion import ForwardDiffusion
from .reverse_diffusion import ReverseDiffusion

__all__ = ["EclipsePurify", "DEFAULT_STEPS"]

# Reverse steps of the default setting. The paper's sampler is steps=None (t_star ancestral steps). Four respaced
# ancestral steps leave as much of a perturbation as the paper's 100 (benchmarks/poison_residue.py: 47.2 % vs
# 46.8 % of uniform 8/255 noise, 91.3 % vs 91.3 % of 8x8-patch noise) at 27x its speed; see docs/poisons.md.
DEFAULT_STEPS = 4


class EclipsePurify(DiffusionTransform):
    """Purify images of clean-label availability poisons: noise, denoise, then compensate (ECLIPSE).

    Calling the transform runs all three stages on the image leaves of its input: forward diffusion to
    ``t_star`` (:class:`ForwardDiffusion`), the reverse DDPM with the sparse-set denoiser
    (:class:`ReverseDiffusion`), then ``compensation`` (:class:`CorruptionCompensation`, fresh on every call).
    A batch ``(N, 3, H, W)`` is purified as one batch, which is much faster than N single images. To purify a
    dataset once and cache it, wrap it in :class:`~eclipse_transforms.PurifiedDataset` with this transform.

    Args:
        denoiser: a :class:`~eclipse_transforms.Denoiser`, a folder or Hub repo id, or ``None`` for the bundled
            CIFAR-10 weights.
        t_star: diffusion time in ``[1, min(T, t_max)]``; paper: 100 (of T = 4000, cosine schedule).
        steps: reverse steps; ``None`` for the paper's ``t_star``-step ancestral sampler, 1 for the one-step
            ``x_0`` estimate. Default :data:`DEFAULT_STEPS`.
        compensation: the stage-3 transform, or ``None`` to return purified images without it.
        prefilter: an optional deterministic transform applied before the diffusion, e.g. :class:`Despeckle`
            against the one-pixel shortcut, or ``v2.Compose([Despeckle(), JPEGCompression(10)])``. It runs inside
            :meth:`purify_batch`, so :class:`PurifiedDataset` caches its output and keys the cache by its ``repr``.
        diffusion: ``False`` skips stages 1 and 2: the prefilter's output is what is cached, and the compensation
            is still drawn on every call. With ``prefilter=v2.Compose([RepairBorder(), Despeckle(64 / 255),
            JPEGCompression(20)])`` and ``CorruptionCompensation(0.4, sigma=0.0)`` this is the bench's
            ``border-despeckle-jpeg``, the defense search's best recipe (docs/usage.md).
        seed: int for reproducible purification (a function of each image and the seed; the compensation stays
            random, from torch's global RNG), ``None`` for fresh noise on every call.
        revision: Hub revision when ``denoiser`` is a repo id; pin a commit for reproducibility.

    Input: float images in ``[0, 1]`` of shape ``(3, H, W)`` or ``(..., 3, H, W)``, uint8 tensors,
    ``tv_tensors.Image`` or RGB PIL images; H and W multiples of ``denoiser.size_multiple`` (4 for the bundled
    weights, trained on 32x32). The output keeps the input's type, dtype and device; uint8 and PIL outputs are
    rounded to the nearest level. Labels and other non-image leaves pass through.

    Example:
        >>> from torchvision.transforms import v2
        >>> purify = EclipsePurify(seed=0)  # the bundled CIFAR-10 weights
        >>> tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), purify])
        >>> out = purify(torch.rand(4, 3, 32, 32))
        >>> out.shape, out.dtype
        (torch.Size([4, 3, 32, 32]), torch.float32)
    """

    def __init__(
        self,
        denoiser: Any = None,
        *,
        t_star: int = 100,
        steps: int | None = DEFAULT_STEPS,
        compensation: CorruptionCompensation | None = CorruptionCompensation(),  # noqa: B008 - immutable settings
        prefilter: Callable[[torch.Tensor], torch.Tensor] | None = None,
        diffusion: bool = True,
        seed: int | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__(denoiser, t_star=t_star, seed=seed, revision=revision)
        if not isinstance(diffusion, bool):
            raise TypeError(f"diffusion must be True or False, got {diffusion!r} ({type(diffusion).__name__}).")
        self.diffusion = diffusion
        if prefilter is not None and not callable(prefilter):
            raise TypeError(f"prefilter must be a transform (callable) or None, got {type(prefilter).__name__}.")
        self.prefilter = prefilter
        self.steps = EF.check_steps(steps, self.t_star) if steps is not None else None
        if compensation is not None and not isinstance(compensation, CorruptionCompensation):
            raise TypeError(
                f"compensation must be a CorruptionCompensation or None, got {type(compensation).__name__}."
            )
        self.compensation = compensation

    @property
    def forward_diffusion(self) -> ForwardDiffusion:
        """Stage 1 alone, sharing this transform's denoiser, t_star and seed."""
        return ForwardDiffusion(self.denoiser, t_star=self.t_star, seed=self.seed)

    @property
    def reverse_diffusion(self) -> ReverseDiffusion:
        """Stage 2 alone, sharing this transform's denoiser, t_star, steps and seed."""
        return ReverseDiffusion(self.denoiser, t_star=self.t_star, steps=self.steps, seed=self.seed)

    @property
    def noise(self) -> ForwardDiffusion:
        """Deprecated name of :attr:`forward_diffusion`."""
        warnings.warn("EclipsePurify.noise is deprecated; use .forward_diffusion.", FutureWarning, stacklevel=2)
        return self.forward_diffusion

    @property
    def denoise(self) -> ReverseDiffusion:
        """Deprecated name of :attr:`reverse_diffusion`."""
        warnings.warn("EclipsePurify.denoise is deprecated; use .reverse_diffusion.", FutureWarning, stacklevel=2)
        return self.reverse_diffusion

    def purify_batch(
        self, x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """The prefilter (if any), then stages 1 and 2 (no compensation) on a float batch ``(N, 3, H, W)`` in
        ``[0, 1]``, on the denoiser's device, with explicit randomness. This is what :class:`PurifiedDataset`
        caches."""
        check_channels(x.shape, self.denoiser.in_channels)
        if self.prefilter is not None:
            x = self.prefilter(x)
        x = x.to(self.denoiser.device)
        if not self.diffusion:
            return x
        return EF.purify(x, self.denoiser, self.t_star, steps=self.steps, generator=generator)

    def _apply_batch(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        out = self.purify_batch(x, content_generators(x, params["seed"]))
        if self.compensation is not None:
            out = self.compensation.compensate(out)
        return out.to(x.device)

    def extra_repr(self) -> str:
        comp = "None" if self.compensation is None else repr(self.compensation)
        pre = "" if self.prefilter is None else f", prefilter={self.prefilter!r}"
        off = "" if self.diffusion else ", diffusion=False"
        return f"{super().extra_repr()}{pre}{off}, compensation={comp}"
