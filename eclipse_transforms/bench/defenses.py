"""Defenses the bench compares, in a small registry: none, ISS grayscale / JPEG, ECLIPSE and its ablations, the
defense search's border-despeckle-JPEG recipe (the squeeze) alone and beside the defender's trusted images, and
adversarial training.

A defense has two parts, either of which may be absent:

* ``prepare(images, labels) -> images``: a deterministic map of the whole uint8 training set, computed once and
  cached by the runner (ECLIPSE's purification, ISS's compression). ISS applies its compression "to training
  images every epoch"; grayscale and JPEG at a fixed quality are deterministic, so applying them once is the same.
* ``epoch_transform(x, generator) -> x``: applied to every float training batch afresh each epoch, before the
  crop/flip augmentation (ECLIPSE's corruption compensation).

and may ask the trainer for PGD adversarial training (``adversarial_epsilon``, ``adversarial_steps``), or to train
every image on the worst of ``worst_of`` draws of its per-epoch stages and crop/flip (the highest loss), or to add
``clean_images`` images of the defender's own clean set (the denoiser's sparse set) to the training set.

    >>> from eclipse_transforms.bench.defenses import list_defenses
    >>> [name for name in list_defenses() if name.startswith("border-despeckle-jpeg")]  # the squeeze, with trusted images
    ['border-despeckle-jpeg', 'border-despeckle-jpeg-clean2000', 'border-despeckle-jpeg-clean2000x5', 'border-despeckle-jpeg-clean400', 'border-despeckle-jpeg-clean400x5']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import TensorDataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .. import functional as EF
from ..corruption_compensation import CorruptionCompensation
from ..dataset import PurifiedDataset
from ..denoiser import load_denoiser
from ..despeckle import Despeckle
from ..purify import DEFAULT_STEPS, EclipsePurify
from ..repair_border import RepairBorder
from ..utils import quantize
from .registry import Registry

__all__ = ["Defense", "DefenseContext", "register_defense", "list_defenses", "get_defense", "with_trusted"]


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may need from the run: the denoiser, where to cache, the seed, progress bars."""

    weights: str | None = None
    cache_dir: str | None = None
    t_star: int = 100
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    progress: bool = True
    dtype: str = "float32"  # the denoiser's compute precision (see load_denoiser)


@dataclass(frozen=True)
class Defense:
    """One row of the bench's table. ``options`` is recorded in the results (everything that changes the row)."""

    name: str
    prepare: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    epoch_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    adversarial_epsilon: float = 0.0
    adversarial_steps: int = 10  # PGD steps per batch when ``adversarial_epsilon`` > 0
    adversarial_epochs: int | None = None  # PGD in the first k epochs only (None: every epoch)
    worst_of: int = 1  # k > 1: the trainer keeps the highest-loss of k draws of each image's per-epoch stages
    # n > 0: train also on n images (class-balanced) of the defender's own clean set, the sparse set the denoiser was
    # trained on (the test images the bench excludes), as they are: no one-time stage, the per-epoch ones as for all
    clean_images: int = 0
    clean_repeat: int = 1  # each of those images that many times per epoch (more weight beside a large poisoned set)
    options: dict[str, Any] = field(default_factory=dict)


DefenseFactory = Callable[[DefenseContext], Defense]
_DEFENSES: Registry[DefenseFactory] = Registry("defense")


def register_defense(name: str) -> Callable[[DefenseFactory], DefenseFactory]:
    """Register ``factory(context) -> Defense`` under ``name``."""
    return _DEFENSES.register(name)


def list_defenses() -> list[str]:
    return _DEFENSES.names()


def get_defense(name: str, context: DefenseContext | None = None) -> Defense:
    """Build the defense ``name`` for ``context`` (default: bundled weights, default cache)."""
    return _DEFENSES.get(name)(context or DefenseContext())


# -- building blocks ------------------------------------------------------------------------------------------------


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of uint8 ``(N, 3, H, W)``, kept 3-channel (ISS-Gray: ``transforms.Grayscale(3)``)."""
    return F.rgb_to_grayscale(images, num_output_channels=3)


def jpeg(images: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` through JPEG at ``quality`` (:func:`eclipse_transforms.functional.jpeg`, Pillow;
    ISS-JPEG uses quality 10)."""
    return quantize(EF.jpeg_compression(images.float() / 255, quality=quality))


def purified(
    images: torch.Tensor,
    labels: torch.Tensor,
    context: DefenseContext,
    steps: int | None,
    prefilter: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """ECLIPSE stages 1-2 of every image (after ``prefilter``), through :class:`PurifiedDataset` (cached and
    resumable)."""
    denoiser = load_denoiser(context.weights, dtype=context.dtype)  # the dtype enters the cache key (fingerprint)
    purify = EclipsePurify(
        denoiser, recipe="eclipse", t_star=context.t_star, steps=steps, compensation=None, prefilter=prefilter
    )
    # The paper's sampler costs t* network evaluations per image (25x the default): smaller shards keep an
    # interrupted run's loss to minutes on a CPU (a 4,096-image shard would be hours). Other steps keep the default.
    shards: dict[str, Any] = {"shard_size": 512} if steps is None else {}
    ds = PurifiedDataset(
        TensorDataset(images, labels),
        purify,
        cache_dir=context.cache_dir,
        batch_size=context.batch_size,
        device=context.device,
        seed=context.seed,
        progress=context.progress,
        **shards,
    )
    return torch.stack([ds.purified(i) for i in range(len(ds))])


def compensation(p_gray: float = 0.4, sigma: float = 0.05) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    return CorruptionCompensation(p_gray=p_gray, sigma=sigma).compensate


# -- the registry ---------------------------------------------------------------------------------------------------


@register_defense("none")
def _none(context: DefenseContext) -> Defense:
    return Defense("none")


@register_defense("iss-gray")
def _iss_gray(context: DefenseContext) -> Defense:
    return Defense("iss-gray", prepare=lambda x, y: grayscale(x))


@register_defense("iss-jpeg")
def _iss_jpeg(context: DefenseContext) -> Defense:
    return Defense("iss-jpeg", prepare=lambda x, y: jpeg(x, 10), options={"quality": 10})


def _eclipse(name: str, steps: int | None, compensate: bool, prefilter: Any = None) -> DefenseFactory:
    def factory(context: DefenseContext) -> Defense:
        return Defense(
            name,
            prepare=lambda x, y: purified(x, y, context, steps, prefilter),
            epoch_transform=compensation() if compensate else None,
            options={
                "t_star": context.t_star,
                "steps": "paper" if steps is None else steps,
                "compensation": compensate,
                "weights": context.weights or "bundled",
                # only when not float32 / when present, so the earlier cells' keys stay what they were
                **({"dtype": context.dtype} if context.dtype != "float32" else {}),
                **({"prefilter": repr(prefilter)} if prefilter is not None else {}),
            },
        )

    return factory


register_defense("eclipse")(_eclipse("eclipse", DEFAULT_STEPS, True))
register_defense("purify-only")(_eclipse("purify-only", DEFAULT_STEPS, False))
register_defense("eclipse-paper-sampler")(_eclipse("eclipse-paper-sampler", None, True))
register_defense("eclipse-1step")(_eclipse("eclipse-1step", 1, True))
# ECLIPSE after a despeckle: the one-pixel shortcut, which the diffusion keeps, is gone before it (the defense
# search: OPS 70.8 % against ECLIPSE's 27.4 on the quick tier).
register_defense("eclipse-despeckle")(_eclipse("eclipse-despeckle", DEFAULT_STEPS, True, Despeckle()))


@register_defense("border-despeckle-jpeg")
def _border_despeckle_jpeg(context: DefenseContext) -> Defense:
    # The defense search's best recipe (benchmarks/results/defense-search), once: the outer pixel ring from the
    # ring inside it (CUDA's zero-padded border), the outlier pixels to their 3x3 median (OPS; at 64/255 a clean
    # image loses 0.7 % of its pixels to it), JPEG at quality 20 (the adversarial poisons, and CUDA's class-wise
    # blur); then grayscale with p = 0.4 every epoch (LSP). No diffusion: its Gaussian noise costs clean data.
    squeeze = v2.Compose([RepairBorder(), Despeckle(threshold=64 / 255)])
    return Defense(
        "border-despeckle-jpeg",
        prepare=lambda x, y: jpeg(squeeze(x), 20),
        epoch_transform=compensation(p_gray=0.4, sigma=0.0),
        options={"ring": 1, "threshold": 64, "quality": 20, "p_gray": 0.4},
    )


def with_trusted(base: str, name: str, n: int, repeat: int = 1) -> DefenseFactory:
    """A factory for defense ``base`` whose classifier trains also on ``n`` trusted images, ``repeat`` times each per
    epoch: class-balanced images of the defender's own clean set (the denoiser's sparse set, which the bench leaves
    out of its test set), through the per-epoch stages only (what ``PurifiedDataset.with_trusted`` does)."""

    def factory(context: DefenseContext) -> Defense:
        defense = get_defense(base, context)
        options = {**defense.options, "clean_images": n, **({"clean_repeat": repeat} if repeat != 1 else {})}
        return replace(defense, name=name, clean_images=n, clean_repeat=repeat, options=options)

    return factory


# The squeeze beside the defender's trusted images (README, "Trusted images change the picture"): 400 on the quick
# tier and 2,000 on the standard one (4 % of the training set; 2,000 is the whole sparse set), once or five times an
# epoch (``repeat=5``: the library's recommendation when a clean set is at hand).
for _n, _repeat in ((400, 1), (2000, 1), (400, 5), (2000, 5)):
    _name = f"border-despeckle-jpeg-clean{_n}" + (f"x{_repeat}" if _repeat != 1 else "")
    register_defense(_name)(with_trusted("border-despeckle-jpeg", _name, _n, _repeat))


@register_defense("compensation-only")
def _compensation_only(context: DefenseContext) -> Defense:
    return Defense("compensation-only", epoch_transform=compensation(), options={"p_gray": 0.4, "sigma": 0.05})


@register_defense("adv-training")
def _adversarial(context: DefenseContext) -> Defense:
    return Defense("adv-training", adversarial_epsilon=8 / 255, options={"pgd": "Linf 8/255, 10 steps"})
