"""``EclipsePurify``: the three ECLIPSE stages behind one torchvision transform."""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable
from typing import Any, Final

import torch
from torchvision.transforms import v2

from . import functional as EF
from ._base import DiffusionTransform
from ._images import check_channels, content_generators
from .corruption_compensation import CorruptionCompensation
from .despeckle import Despeckle
from .forward_diffusion import ForwardDiffusion
from .jpeg_compression import JPEGCompression
from .repair_border import RepairBorder
from .reverse_diffusion import ReverseDiffusion

__all__ = ["EclipsePurify", "DEFAULT_STEPS", "DEFAULT_RECIPE", "RECIPES", "recipe_settings"]

# Reverse steps of recipe="eclipse" unless given. The paper's sampler is steps=None (t_star ancestral steps). Four
# respaced ancestral steps leave as much of a perturbation as the paper's 100 (benchmarks/poison_residue.py: 47.2 % vs
# 46.8 % of uniform 8/255 noise, 91.3 % vs 91.3 % of 8x8-patch noise) at 27x its speed; see docs/poisons.md.
DEFAULT_STEPS = 4

#: What ``EclipsePurify(recipe=...)`` accepts. ``"squeeze"``: the bench's ``border-despeckle-jpeg``, its best
#: defense (docs/bench.md); ``"eclipse"``: the paper's three stages.
RECIPES = ("squeeze", "eclipse")
DEFAULT_RECIPE = "squeeze"


class _RecipeDefault(enum.Enum):
    """The default of a setting that the recipe decides (a sentinel, so that a value the user passed is known; an
    enum member, so that type checkers narrow ``x is _RECIPE``)."""

    RECIPE = "recipe"

    def __repr__(self) -> str:
        return "<recipe's>"


_RECIPE: Final = _RecipeDefault.RECIPE


def recipe_settings(recipe: str) -> dict[str, Any]:
    """The ``prefilter``, ``diffusion`` and ``compensation`` a recipe of :data:`RECIPES` stands for (new objects on
    every call).

    * ``"squeeze"``: :class:`RepairBorder`, :class:`Despeckle` at 64/255 and :class:`JPEGCompression` at quality 20,
      once (cached by :class:`PurifiedDataset`); no diffusion; grayscale with probability 0.4 on every access
      (``CorruptionCompensation(0.4, sigma=0.0)``).
    * ``"eclipse"``: no prefilter; forward and reverse diffusion to ``t_star``; ``CorruptionCompensation()``
      (grayscale p = 0.4 and Gaussian noise σ = 0.05), as in the paper.
    """
    if recipe == "eclipse":
        return {"prefilter": None, "diffusion": True, "compensation": CorruptionCompensation()}
    if recipe == "squeeze":
        return {
            "prefilter": v2.Compose([RepairBorder(), Despeckle(64 / 255), JPEGCompression(20)]),
            "diffusion": False,
            "compensation": CorruptionCompensation(0.4, sigma=0.0),
        }
    raise ValueError(f"recipe must be one of {', '.join(map(repr, RECIPES))}, got {recipe!r}.")


class EclipsePurify(DiffusionTransform):
    """Purify images of clean-label availability poisons: a one-time purification, then a per-call compensation.

    The ``recipe`` picks the stages (:func:`recipe_settings`); ``prefilter``, ``diffusion`` and ``compensation``
    override it one by one.

    * ``"squeeze"`` (the default, the bench's best purification, ``border-despeckle-jpeg`` in docs/bench.md): repair the
      outer pixel ring (:class:`RepairBorder`), take isolated outlier pixels to their 3x3 median
      (:class:`Despeckle` at 64/255) and compress with JPEG at quality 20 (:class:`JPEGCompression`), then
      grayscale with probability 0.4 on every call. No diffusion: the denoiser is not used, and about 100x faster.
    * ``"eclipse"``: the paper's stages: forward diffusion to ``t_star`` (:class:`ForwardDiffusion`), the reverse
      DDPM with the sparse-set denoiser (:class:`ReverseDiffusion`), then :class:`CorruptionCompensation`
      (grayscale p = 0.4 and Gaussian noise σ = 0.05, fresh on every call).

    A batch ``(N, 3, H, W)`` is purified as one batch, which is much faster than N single images. To purify a
    dataset once and cache it, wrap it in :class:`~eclipse_transforms.PurifiedDataset` with this transform.

    Args:
        denoiser: a :class:`~eclipse_transforms.Denoiser`, a folder or Hub repo id, or ``None`` for the bundled
            CIFAR-10 weights, loaded only where the diffusion runs (without it, ``self.denoiser`` stays ``None``).
        recipe: ``"squeeze"`` or ``"eclipse"`` (:data:`RECIPES`). Passing ``denoiser``, ``t_star``, ``steps`` or
            ``revision`` to a recipe without diffusion is an error, not silently ignored: pass
            ``recipe="eclipse"`` (or ``diffusion=True`` to add the diffusion after the squeeze).
        t_star: diffusion time in ``[1, min(T, t_max)]``; paper: 100 (of T = 4000, cosine schedule). Default 100.
        steps: reverse steps; ``None`` for the paper's ``t_star``-step ancestral sampler, 1 for the one-step
            ``x_0`` estimate. Default :data:`DEFAULT_STEPS`.
        compensation: the per-call transform, or ``None`` to return purified images without it. Default: the
            recipe's.
        prefilter: a deterministic transform applied before the diffusion (if any), e.g. :class:`Despeckle`
            against the one-pixel shortcut, or ``v2.Compose([Despeckle(), JPEGCompression(10)])``, or ``None``. It
            runs inside :meth:`purify_batch`, so :class:`PurifiedDataset` caches its output and keys the cache by
            its ``repr``. Default: the recipe's.
        diffusion: ``False`` skips stages 1 and 2: the prefilter's output is what is cached, and the compensation
            is still drawn on every call. Default: the recipe's.
        seed: int for reproducible purification (a function of each image and the seed; the compensation stays
            random, from torch's global RNG), ``None`` for fresh noise on every call.
        revision: Hub revision when ``denoiser`` is a repo id; pin a commit for reproducibility.

    Input: float images in ``[0, 1]`` of shape ``(3, H, W)`` or ``(..., 3, H, W)``, uint8 tensors,
    ``tv_tensors.Image`` or RGB PIL images; where the diffusion runs, H and W multiples of
    ``denoiser.size_multiple`` (4 for the bundled weights, trained on 32x32). The output keeps the input's type,
    dtype and device; uint8 and PIL outputs are rounded to the nearest level. Labels and other non-image leaves
    pass through.

    Example:
        >>> from torchvision.transforms import v2
        >>> purify = EclipsePurify()  # the squeeze
        >>> tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), purify])
        >>> out = purify(torch.rand(4, 3, 32, 32))
        >>> out.shape, out.dtype
        (torch.Size([4, 3, 32, 32]), torch.float32)
        >>> paper = EclipsePurify(recipe="eclipse", seed=0)  # the bundled CIFAR-10 weights, t* = 100
        >>> paper(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        denoiser: Any = None,
        *,
        recipe: str = DEFAULT_RECIPE,
        t_star: int | _RecipeDefault = _RECIPE,
        steps: int | None | _RecipeDefault = _RECIPE,
        compensation: CorruptionCompensation | None | _RecipeDefault = _RECIPE,
        prefilter: Callable[[torch.Tensor], torch.Tensor] | None | _RecipeDefault = _RECIPE,
        diffusion: bool | _RecipeDefault = _RECIPE,
        seed: int | None = None,
        revision: str | None = None,
    ) -> None:
        settings = recipe_settings(recipe)
        if diffusion is _RECIPE and not settings["diffusion"]:
            given = {
                "denoiser": denoiser is not None,
                "t_star": t_star is not _RECIPE,
                "steps": steps is not _RECIPE,  # steps=None is a setting too: the paper's sampler
                "revision": revision is not None,
            }
            named = [name for name, passed in given.items() if passed]
            if named:
                raise ValueError(
                    f"{', '.join(named)} set{'s' if len(named) == 1 else ''} the diffusion, which recipe={recipe!r} "
                    "does not run; pass recipe='eclipse' for ECLIPSE's diffusion (or diffusion=True to run it "
                    "after the squeeze)."
                )
        self.recipe = recipe
        prefilter = settings["prefilter"] if prefilter is _RECIPE else prefilter
        compensation = settings["compensation"] if compensation is _RECIPE else compensation
        diffusion = settings["diffusion"] if diffusion is _RECIPE else diffusion
        t_star = 100 if t_star is _RECIPE else t_star
        steps = DEFAULT_STEPS if steps is _RECIPE else steps
        if not isinstance(diffusion, bool):
            raise TypeError(f"diffusion must be True or False, got {diffusion!r} ({type(diffusion).__name__}).")
        # Without the diffusion the bundled denoiser is not loaded: nothing would run it, and it would cost the
        # construction 0.1-0.3 s and every pickled copy (a DataLoader worker's) 23 MB.
        super().__init__(denoiser, t_star=t_star, seed=seed, revision=revision, required=diffusion)
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
        return ForwardDiffusion(self._stage_denoiser("forward_diffusion"), t_star=self.t_star, seed=self.seed)

    @property
    def reverse_diffusion(self) -> ReverseDiffusion:
        """Stage 2 alone, sharing this transform's denoiser, t_star, steps and seed."""
        return ReverseDiffusion(
            self._stage_denoiser("reverse_diffusion"), t_star=self.t_star, steps=self.steps, seed=self.seed
        )

    def _stage_denoiser(self, stage: str) -> Any:
        if self.denoiser is None:
            raise ValueError(
                f"{stage}: this EclipsePurify (recipe={self.recipe!r}, diffusion=False) has no denoiser; "
                f"EclipsePurify(recipe='eclipse').{stage} is the paper's stage."
            )
        return self.denoiser

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
        ``[0, 1]``, with explicit randomness: on the denoiser's device when the diffusion runs, else where ``x``
        is. This is what :class:`PurifiedDataset` caches."""
        if self.diffusion:
            check_channels(x.shape, self.denoiser.in_channels)
        if self.prefilter is not None:
            x = self.prefilter(x)
        if not self.diffusion:
            return x
        x = x.to(self.denoiser.device)
        return EF.purify(x, self.denoiser, self.t_star, steps=self.steps, generator=generator)

    def _apply_batch(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        out = self.purify_batch(x, content_generators(x, params["seed"]))
        if self.compensation is not None:
            out = self.compensation.compensate(out)
        return out.to(x.device)

    def extra_repr(self) -> str:
        # Without the diffusion, the denoiser, t_star and steps do nothing and go unsaid.
        shown = [f"recipe={self.recipe!r}", super().extra_repr() if self.diffusion else f"seed={self.seed!r}"]
        if self.prefilter is not None:
            shown.append(f"prefilter={self.prefilter!r}")
        if not self.diffusion:
            shown.append("diffusion=False")
        shown.append(f"compensation={self.compensation!r}")
        return ", ".join(shown)
