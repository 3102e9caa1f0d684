"""Self-ensemble protection (Chen et al., ICLR 2023): targeted PGD against checkpoints of one training run.

One surrogate is trained on the clean set and ``checkpoints`` snapshots are kept, evenly spaced over its epochs
(the release picks ``num_model`` of 120 per-epoch checkpoints the same way). Every image then takes
``iterations`` signed steps of ``step_size`` toward class ``(y + target_offset) mod K`` on the *average*
cross-entropy of all snapshots (eval mode), starting from the clean image, projected to ``|δ| ≤ ε`` and
``x + δ ∈ [0, 1]``. This is the release's plain ensemble attack (``ens.py``: 30 iterations, step 1/255, 5
models, target offset 5); the feature-alignment and variance-reduction refinements of the paper's best variant
are not included. The budget is the bench's L∞ 8/255 (the paper's headline uses 2/255).

Ours, recorded in :class:`SEPConfig`: the surrogate is the bench's compact CNN trained by the bench's recipe
for ``surrogate_epochs`` (release: ResNet-18, 120 epochs). Crafting is shard-resumable like TAP's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file, save, save_file

from ..utils import atomic_write, derive_seed, quantize
from .classifier import Recipe, fit_classifier
from .crafting import (
    CraftingConfig,
    craft_in_shards,
    crafting_meta,
    digest,
    discard_work,
    freeze,
    precision,
    work_root,
)
from .models import build_model
from .poisons import check_poison_inputs, num_classes, register_poison

logger = logging.getLogger(__name__)

__all__ = ["SEPConfig", "sep"]


@dataclass(frozen=True)
class SEPConfig(CraftingConfig):
    """Settings of self-ensemble protection; defaults are the release's unless marked."""

    epsilon: float = 8 / 255  # the bench's budget (paper headline: 2/255)
    step_size: float = 1 / 255
    iterations: int = 30
    checkpoints: int = 5
    target_offset: int = 5
    batch_size: int = 256
    shard_size: int = 2048  # ours: the unit of checkpointing
    surrogate_epochs: int = 15  # ours (release: ResNet-18, 120 epochs)
    widths: tuple[int, ...] = (32, 64, 128)  # ours: the bench's compact CNN
    dtype: str = "float32"  # ours: "bfloat16" crafts under autocast (see CraftingConfig)


def _snapshots(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: SEPConfig,
    seed: int,
    num_classes: int,
    path: Path | None,
    progress: bool,
    device: str | torch.device = "cpu",
) -> list[torch.nn.Module]:
    """The surrogate's checkpoints, evenly spaced over its epochs (trained once, kept in ``path``)."""
    if config.checkpoints > config.surrogate_epochs:
        raise ValueError(
            f"checkpoints={config.checkpoints} needs at least as many surrogate_epochs, got {config.surrogate_epochs}."
        )
    interval = config.surrogate_epochs // config.checkpoints
    keep = {interval * (i + 1) - 1 + config.surrogate_epochs % config.checkpoints for i in range(config.checkpoints)}
    if path is not None and path.is_file():
        flat = load_file(path)
        states: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            number, name = key.split("/", 1)
            states.setdefault(int(number), {})[name] = value
    else:
        # While training, each kept snapshot is also written to ``work`` beside the per-epoch checkpoint, so an
        # interrupted run resumes its training and still has the snapshots of the epochs it does not redo.
        work = path.with_suffix(".work") if path is not None else None
        states = {}
        for e in keep:
            if work is not None and (work / f"epoch-{e}.safetensors").is_file():
                states[e] = load_file(work / f"epoch-{e}.safetensors")

        def on_epoch(epoch: int, model: torch.nn.Module) -> None:
            if epoch in keep:
                states[epoch] = {
                    k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
                }
                if work is not None:
                    work.mkdir(parents=True, exist_ok=True)
                    atomic_write(work / f"epoch-{epoch}.safetensors", save(states[epoch]))

        fit_classifier(
            images,
            labels,
            Recipe(widths=config.widths, epochs=config.surrogate_epochs),
            num_classes=num_classes,
            seed=derive_seed("sep", seed),
            progress=progress,
            desc="sep surrogate",
            device=device,
            on_epoch=on_epoch,
            checkpoint=work,
        )
        if path is not None:
            tmp = path.with_suffix(".tmp")
            save_file({f"{e}/{k}": v for e, s in states.items() for k, v in s.items()}, tmp)
            os.replace(tmp, path)
            discard_work(work)
    models = []
    for epoch in sorted(states):
        model = build_model("compact", config.widths, num_classes)
        model.load_state_dict(states[epoch])
        models.append(freeze(model.to(device).eval()))
    return models


@register_poison("sep")
def sep(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    config: SEPConfig = SEPConfig(),
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Self-ensemble protection, resumable shard by shard from ``work_dir``.

    Args:
        images, labels, seed: as for every poison.
        config: the crafting settings (see :class:`SEPConfig`).
        work_dir: checkpoint folder (the surrogate's snapshots, finished shards, ``report.json``).
        progress: show tqdm bars.
        device: where the surrogate trains and the noise is crafted (``"cuda"`` on a GPU); the output is on the CPU.

    Returns:
        uint8 poisoned images ``(N, 3, H, W)``.
    """
    images, labels = check_poison_inputs(images, labels)
    k = num_classes(labels)
    meta = crafting_meta("sep", seed, config, images, labels)
    root = work_root(work_dir)
    models = _snapshots(
        images,
        labels,
        config,
        seed,
        k,
        root / f"snapshots-{digest(meta)}.safetensors" if root else None,
        progress,
        device,
    )

    def attack(x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        target = (y + config.target_offset) % k
        adv = x.clone()
        for _ in range(config.iterations):
            adv.requires_grad_(True)
            view = adv.contiguous(memory_format=torch.channels_last)
            with precision(config.dtype, device):
                loss = cast(torch.Tensor, sum(nnf.cross_entropy(m(view), target) for m in models)) / len(models)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() - config.step_size * grad.sign()
            adv = torch.minimum(torch.maximum(adv, x - config.epsilon), x + config.epsilon).clamp(0, 1)
        return quantize(adv)

    report = {"snapshots": len(models), "target": f"(y + {config.target_offset}) mod K"}
    return craft_in_shards(
        images, labels, attack, root=root, meta=meta, config=config, progress=progress, report=report, device=device
    )
