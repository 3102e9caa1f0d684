"""Targeted adversarial poisoning (Fowl et al., NeurIPS 2021, "Adversarial Examples Make Strong Poisons").

A clean surrogate is trained and frozen; every training image then gets a targeted L∞ attack toward class
``(y + 1) mod K``: ``iterations`` signed-gradient steps of ``step_fraction · ε`` that minimise the cross-entropy
of the target under a fresh differentiable random translation and flip each step (the paper's differentiable
augmentation), projected to ``|δ| ≤ ε`` and ``x + δ ∈ [0, 1]``. With several ``restarts`` (uniform random
starts), each image keeps the perturbation whose target loss on the un-augmented ``x + δ`` is lowest.

What is ours, recorded in :class:`TAPConfig`: the surrogate is the bench's compact CNN trained with the bench's
recipe (the paper: ResNet-18, 40 epochs), so the poison targets the family it must fool. Crafting runs in
shards of ``shard_size`` images written to ``work_dir`` as they finish, so an interrupted run loses at most one
shard. The poisoned image is ``round(255 · clamp(x + δ, 0, 1))``: ``L∞ ≤ ε`` exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file, save_file

from ..utils import derive_seed, quantize
from .classifier import Recipe, fit_classifier, random_crop_flip
from .crafting import (
    CraftingConfig,
    craft_in_shards,
    crafting_meta,
    digest,
    discard_work,
    freeze,
    precision,
    uniform_like,
    work_root,
)
from .models import build_model
from .poisons import check_poison_inputs, num_classes, register_poison

logger = logging.getLogger(__name__)

__all__ = ["TAPConfig", "tap"]


@dataclass(frozen=True)
class TAPConfig(CraftingConfig):
    """Settings of targeted adversarial poisoning; defaults are the paper's unless marked."""

    epsilon: float = 8 / 255
    step_fraction: float = 0.05
    iterations: int = 250
    restarts: int = 1
    translate: int = 4  # differentiable random translation (pixels, zero padding) and flip at every step
    batch_size: int = 256
    shard_size: int = 2048  # ours: the unit of checkpointing
    surrogate_epochs: int = 15  # ours: the bench's compact recipe (paper: ResNet-18, 40 epochs)
    widths: tuple[int, ...] = (32, 64, 128)  # ours: the bench's compact CNN
    dtype: str = "float32"  # ours: "bfloat16" crafts under autocast (see CraftingConfig)


def _surrogate(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TAPConfig,
    seed: int,
    num_classes: int,
    path: Path | None,
    progress: bool,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    recipe = Recipe(widths=config.widths, epochs=config.surrogate_epochs)
    if path is not None and path.is_file():
        model = build_model("compact", config.widths, num_classes)
        model.load_state_dict(load_file(path))
        return model.to(device)
    model, stats = fit_classifier(
        images,
        labels,
        recipe,
        num_classes=num_classes,
        seed=derive_seed("tap", seed),
        progress=progress,
        desc="tap surrogate",
        device=device,
        checkpoint=path.with_suffix(".work") if path is not None else None,  # per-epoch: resumable
    )
    logger.info("tap surrogate: train accuracy %.4f in %.0f s", stats["train_accuracy"], stats["train_seconds"])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
        discard_work(path.with_suffix(".work"))
    return model


def _attack(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, config: TAPConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One restart on a batch: the perturbation and its per-image target loss (un-augmented)."""
    eps, step = config.epsilon, config.step_fraction * config.epsilon
    d = uniform_like(x, eps, g)
    d = (x + d).clamp(0, 1) - x
    for _ in range(config.iterations):
        d.requires_grad_(True)
        view = random_crop_flip((x + d).clamp(0, 1), config.translate, True, g)
        loss = nnf.cross_entropy(model(view.contiguous(memory_format=torch.channels_last)), target)
        (grad,) = torch.autograd.grad(loss, d)
        d = (d.detach() - step * grad.sign()).clamp(-eps, eps)
        d = (x + d).clamp(0, 1) - x
    with torch.no_grad():
        final = nnf.cross_entropy(
            model((x + d).contiguous(memory_format=torch.channels_last)), target, reduction="none"
        )
    return d, final


@register_poison("tap")
def tap(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    config: TAPConfig = TAPConfig(),
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Targeted adversarial poisons toward ``(y + 1) mod K``, resumable shard by shard from ``work_dir``.

    Args:
        images, labels, seed: as for every poison.
        config: the crafting settings (see :class:`TAPConfig`).
        work_dir: checkpoint folder (the trained surrogate, finished shards, ``report.json``).
        progress: show tqdm bars.
        device: where the surrogate trains and the noise is crafted (``"cuda"`` on a GPU); the output is on the CPU.

    Returns:
        uint8 poisoned images ``(N, 3, H, W)``.
    """
    images, labels = check_poison_inputs(images, labels)
    k = num_classes(labels)
    meta = crafting_meta("tap", seed, config, images, labels)
    root = work_root(work_dir)
    # The surrogate's file name carries the settings, so a changed config never reuses a stale surrogate.
    surrogate_path = root / f"surrogate-{digest(meta)}.safetensors" if root else None
    model = _surrogate(images, labels, config, seed, k, surrogate_path, progress, device)
    freeze(model.eval())

    def attack(x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        target = (y + 1) % k

        def restart(r: int) -> tuple[torch.Tensor, torch.Tensor]:
            with precision(config.dtype, device):
                g = torch.Generator().manual_seed(derive_seed("tap", seed, start, r))
                return _attack(model, x, target, config, g)

        best_d, best_loss = restart(0)
        for r in range(1, config.restarts):
            d, loss = restart(r)
            better = loss < best_loss
            best_d = torch.where(better.view(-1, 1, 1, 1), d, best_d)
            best_loss = torch.minimum(loss, best_loss)
        return quantize((x + best_d).clamp(0, 1))

    report = {"target": "(y + 1) mod K"}
    return craft_in_shards(
        images, labels, attack, root=root, meta=meta, config=config, progress=progress, report=report, device=device
    )
