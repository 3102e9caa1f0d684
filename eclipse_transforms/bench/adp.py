"""The adaptive attack on ECLIPSE (the paper's §4.4, "ADP"): error-minimizing noise crafted *through* the defense.

``adp`` attacks ECLIPSE as shipped; ``adp[despeckle=true,jpeg_quality=20,diffusion=false,compensation=false]``
attacks despeckle-then-JPEG (JPEG through a straight-through estimator), and the settings combine for other
recipes of the same stages (``repair_border=true,despeckle_threshold=64``: the bench's ``border-despeckle-jpeg``).

The attacker knows the denoiser and the compensation, and runs EM's min-min (:mod:`.em`) with the surrogate
looking at ``C(purify(x + δ))`` instead of ``x + δ``: every signed step on ``δ`` backpropagates through the
compensation (random grayscale, Gaussian noise) and the reverse diffusion, with fresh diffusion and compensation
noise each step (expectation over the defense's randomness, one sample per step).

Ours, recorded in :class:`ADPConfig` and the report: the purifier inside the loop runs ``purifier_steps``
reverse steps (default 1, the one-step ``x_0`` estimate, whose output matches the 4-step default's within 0.4
points of poison residue, benchmarks/poison_residue.py) because every step multiplies the cost of backpropagating
through the UNet; the EM settings default to a reduced budget (``pgd_steps``, ``max_rounds``) for the same
reason. The crafted noise is then evaluated against the *full* defense by the bench.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import functional as EF
from ..denoiser import dtype_name, load_denoiser
from ..utils import derive_seed
from .crafting import CleanMix, check_squeeze, freeze, through_squeeze
from .em import EMConfig, min_min
from .poisons import register_poison

__all__ = ["ADPConfig", "adp"]


@dataclass(frozen=True)
class ADPConfig:
    """The adaptive attack: EM settings plus the defense the attacker differentiates through."""

    em: EMConfig = EMConfig(pgd_steps=5, max_rounds=10)  # ours: reduced (each step backpropagates the UNet)
    weights: str | None = None  # the defender's denoiser (default: the bundled one)
    t_star: int = 100
    purifier_steps: int = 1  # ours: the defense uses 4; 1 keeps the UNet backward affordable
    # The attacker's UNet precision. "bfloat16" was ~2x faster on one AMD EPYC with AVX512-BF16, no faster per signed
    # step on another (family 26), 0.55x on an Intel Xeon with it (no AMX) and 1.7x on a Xeon with AMX: time both with
    # benchmarks/bench_poisons.py --crafting --poisons adp before a long run.
    dtype: str = "float32"
    p_gray: float = 0.4
    sigma: float = 0.05
    # The defense's stages before the diffusion, as the attacker models them: despeckle (differentiable almost
    # everywhere: a replaced pixel passes the gradient to its median's source), then JPEG at jpeg_quality (0: none)
    # through a straight-through estimator (forward: the real JPEG; backward: identity, BPDA). compensation=False
    # for a defense without the per-epoch corruption.
    despeckle: bool = False
    jpeg_quality: int = 0
    diffusion: bool = True  # False: a defense without the denoiser (e.g. despeckle then JPEG)
    compensation: bool = True
    # Before the despeckle: the outer ring from the ring inside it (RepairBorder; a copy, so the gradient flows to
    # the copied pixels); and the despeckle's threshold in uint8 levels.
    repair_border: bool = False
    despeckle_threshold: int = 32
    # A defender who trains also on clean images of its own (the bench's ``clean_images`` defenses), as the attacker
    # models it: clean_images of the attacker's own clean images (class-balanced; the attacker cannot reach the
    # defender's) join every surrogate batch in the defender's proportion, through the per-epoch stages only;
    # clean_repeat: how many times the defender shows each of them per epoch (its ``clean_repeat``).
    clean_images: int = 0
    clean_repeat: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        check_squeeze(self)
        if self.clean_images < 0:
            raise ValueError(
                f"clean_images must be >= 0 (0: a defender without clean images); got {self.clean_images}."
            )
        if self.clean_repeat < 1:
            raise ValueError(
                f"clean_repeat must be >= 1 (how many times each clean image is seen per epoch); got {self.clean_repeat}."
            )
        if self.clean_repeat != 1 and not self.clean_images:
            raise ValueError(f"clean_repeat={self.clean_repeat} needs clean_images > 0 (the images it repeats).")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["em"] = self.em.to_dict()
        # Settings added after ADP was first crafted are keyed only when changed, so earlier keys stay valid.
        later = (
            ("despeckle", False),
            ("jpeg_quality", 0),
            ("diffusion", True),
            ("compensation", True),
            ("repair_border", False),
            ("despeckle_threshold", 32),
            ("clean_images", 0),
            ("clean_repeat", 1),
        )
        for name, default in later:
            if d[name] == default:
                del d[name]
        return d


@register_poison("adp")
def adp(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    config: ADPConfig = ADPConfig(),
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Adaptive error-minimizing noise through ECLIPSE's purifier and compensation, resumable from ``work_dir``.

    Args:
        images, labels, seed: as for every poison.
        config: the attack's settings (see :class:`ADPConfig`).
        work_dir: checkpoint folder, as for :func:`~eclipse_transforms.bench.em.em`.
        progress: show a tqdm bar over rounds.
        device: where the surrogate, the perturbation and the defender's denoiser run.

    Returns:
        uint8 poisoned images ``(N, 3, H, W)``.
    """
    denoiser = freeze(load_denoiser(config.weights, device=device, dtype=config.dtype))

    def per_epoch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # the defense's per-epoch stages
        if not config.compensation:
            return x
        return EF.corruption_compensation(x, p_gray=config.p_gray, sigma=config.sigma, generator=g)

    def through_defense(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = through_squeeze(x, config)
        purified = (
            EF.purify(x, denoiser, config.t_star, steps=config.purifier_steps, generator=g, differentiable=True)
            if config.diffusion
            else x
        )
        return per_epoch(purified, g)

    extra = {"defense": {k: v for k, v in config.to_dict().items() if k != "em"}, "denoiser": denoiser.fingerprint}
    clean = None
    if config.clean_images:
        if config.clean_images >= len(labels):
            raise ValueError(
                f"clean_images ({config.clean_images}) must be smaller than the training set ({len(labels)} images)."
            )
        pick = _balanced(labels, config.clean_images, seed)
        shown = config.clean_images * config.clean_repeat  # clean images per epoch, beside len(labels) poisoned
        per_batch = max(1, round(config.em.batch_size * shown / len(labels)))
        clean = CleanMix(images[pick].to(device), labels[pick].to(device), per_batch, per_epoch)
    return min_min(
        images,
        labels,
        name="adp",
        seed=seed,
        config=config.em,
        work_dir=work_dir,
        progress=progress,
        view=through_defense,
        extra=extra,
        device=device,
        clean=clean,
    )


def _balanced(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices, ``n / num_classes`` per class (the first of a seeded permutation of each class)."""
    g = torch.Generator().manual_seed(derive_seed("adp-clean", seed))
    order = torch.randperm(len(labels), generator=g)
    classes = labels.unique()
    per_class = max(1, n // len(classes))
    return torch.cat([order[labels[order] == c][:per_class] for c in classes]).sort().values
