"""The bench's classifier training: one recipe for every cell, on uint8 tensors held in memory.

Augmentation (random crop with zero padding, horizontal flip), the per-epoch defense transform and the optional
PGD adversary are applied to whole batches, so a 2-core CPU spends its time in the network, not in a DataLoader.
All randomness comes from generators seeded by ``(seed, epoch)``: a cell is reproducible and two cells that differ
only in their defense see the same order, crops and flips. With a ``checkpoint`` folder, training saves its state
after every epoch and an interrupted run resumes after its last finished epoch, ending bit-identical to an
uninterrupted one (a `standard`-tier cell is 20 minutes or more on a 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from ..utils import derive_seed, keeps_global_rng
from .crafting import CraftState, digest, uniform_like
from .models import build_model

__all__ = ["Recipe", "fit_classifier", "train_classifier", "evaluate", "random_crop_flip"]

EpochTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """How a bench classifier is trained (same for every cell of a table)."""

    model: str = "compact"
    widths: tuple[int, ...] = (32, 64, 128)
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    warmup: float = 0.2
    crop_padding: int = 4
    flip: bool = True
    tta: bool = True
    adversarial_epsilon: float = 0.0
    adversarial_steps: int = 10
    adversarial_epochs: int | None = None  # PGD in the first k epochs only (None: every epoch)
    worst_of: int = 1  # k > 1: every image trained on the worst (highest-loss) of k draws of its augmentation

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "worst_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe {name} must be >= 1, got {getattr(self, name)}.")
        if self.adversarial_epochs is not None and self.adversarial_epochs < 1:
            raise ValueError(f"recipe adversarial_epochs must be >= 1 or None, got {self.adversarial_epochs}.")
        if self.lr <= 0:
            raise ValueError(f"recipe lr must be > 0, got {self.lr}.")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"recipe warmup must be a fraction in [0, 1), got {self.warmup}.")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        for name, default in (("adversarial_epochs", None), ("worst_of", 1)):
            if d[name] == default:  # added later: absent at its default, so earlier keys stay valid
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) - names:
            raise ValueError(f"unknown recipe keys {sorted(set(d) - names)}; known: {sorted(names)}.")
        return cls(**d)


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding)`` (zero padding) and ``RandomHorizontalFlip`` of ``(N, C, H, W)``.

    The offsets and flips are drawn from ``generator`` (a CPU one) and moved to ``x``'s device, so a batch on a
    GPU gets the crops and flips the same batch gets on the CPU.
    """
    n, c, h, w = x.shape
    if padding > 0:
        padded = nnf.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        n_idx = torch.arange(n, device=x.device)[:, None, None, None]
        x = padded[n_idx, torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def _pgd(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int, generator: torch.Generator
) -> torch.Tensor:
    """L∞ PGD (Madry et al.): random start, ``steps`` signed steps of 2.5·ε/steps, maximising cross-entropy."""
    step = 2.5 * epsilon / steps
    delta = uniform_like(x, epsilon, generator)
    model.eval()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = nnf.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-epsilon, epsilon)
    model.train()
    return (x + delta).clamp(0, 1).detach()


def _augment(
    x: torch.Tensor, recipe: Recipe, epoch_transform: EpochTransform | None, generator: torch.Generator
) -> torch.Tensor:
    """One draw of a float batch's training augmentation: the epoch transform, then crop and flip."""
    if epoch_transform is not None:
        x = epoch_transform(x, generator)
    return random_crop_flip(x, recipe.crop_padding, recipe.flip, generator)


@torch.no_grad()
def _worst_of(model: torch.nn.Module, candidates: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per image, the candidate (one draw of its augmentation each) on which ``model`` has the highest loss."""
    model.eval()
    losses = torch.stack([nnf.cross_entropy(model(c), y, reduction="none") for c in candidates])
    model.train()
    pick = losses.argmax(0)
    stacked = torch.stack(candidates)
    return stacked[pick, torch.arange(len(y), device=y.device)].contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    tta: bool = True,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy on uint8 ``images`` (``(N, 3, H, W)``); with ``tta``, logits averaged with the flipped image."""
    model.eval()
    hits = 0
    for start in range(0, len(images), batch_size):
        x = (
            images[start : start + batch_size]
            .to(device)
            .float()
            .div_(255)
            .contiguous(memory_format=torch.channels_last)
        )
        logits = model(x)
        if tta:
            logits = logits + model(x.flip(-1))
        hits += (logits.argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return hits / len(images)


@keeps_global_rng
def fit_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe = Recipe(),
    *,
    num_classes: int | None = None,
    epoch_transform: EpochTransform | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``recipe``'s classifier on uint8 ``images``; the model and its training statistics.

    Args:
        images: uint8 ``(N, 3, H, W)`` training images (already poisoned and/or defended).
        labels: int64 ``(N,)``.
        recipe: the training recipe.
        num_classes: outputs of the network (default: ``labels.max() + 1``).
        epoch_transform: ``f(x, generator)`` applied to every float training batch in ``[0, 1]`` before the
            augmentation, freshly each epoch (e.g. ECLIPSE's compensation).
        seed: seed of the initialisation, data order, augmentation and epoch transform.
        progress: show a tqdm bar.
        desc: label of the progress bar.
        device: where the network trains; batches are built on the CPU and moved there.
        on_epoch: called as ``on_epoch(epoch, model)`` after every epoch (e.g. to keep snapshots); not called again
            for epochs finished before a resume.
        checkpoint: a folder for this run's ``state.pt``, written atomically after every epoch. A call with the same
            folder, data, recipe and seed resumes after the last finished epoch; one with other settings starts over
            (and overwrites it). ``epoch_transform`` is not part of that check: give each defense its own folder.
            The file is left in place; delete the folder once the result is stored.

    Returns:
        ``(model, {"train_accuracy", "train_seconds", "images_per_second", "parameters"})``; ``train_seconds``
        adds up the time of every resumed part.
    """
    if images.dtype != torch.uint8:
        raise TypeError("images must be a uint8 tensor (N, 3, H, W).")
    labels = labels.long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    torch.manual_seed(seed)
    model = build_model(recipe.model, recipe.widths, num_classes).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
    )
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warm = max(1, int(recipe.warmup * total))  # linear warm-up to lr, then linear decay to 0 at the last step
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    store = None
    first, done_seconds, correct, seen = 0, 0.0, 0, 0
    if checkpoint is not None:
        meta = {"recipe": recipe.to_dict(), "seed": seed, "num_classes": num_classes, "data": digest(images, labels)}
        store = CraftState(checkpoint, meta)
        state = store.load()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            first, done_seconds = state["epoch"] + 1, state["seconds"]
            correct, seen = state["correct"], state["seen"]
    bar = tqdm(total=total, initial=first * steps_per_epoch, desc=desc, disable=not progress, unit="step", leave=False)
    start = time.perf_counter()
    for epoch in range(first, recipe.epochs):
        g = torch.Generator().manual_seed(derive_seed("classifier", seed, epoch))
        order = torch.randperm(len(images), generator=g)
        correct, seen = 0, 0
        model.train()
        for b in range(steps_per_epoch):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            x = images[idx].float().div_(255)
            y = labels[idx].to(device)
            draws = [
                _augment(x, recipe, epoch_transform, g).to(device).contiguous(memory_format=torch.channels_last)
                for _ in range(recipe.worst_of)
            ]
            x = draws[0] if len(draws) == 1 else _worst_of(model, draws, y)
            if recipe.adversarial_epsilon > 0 and epoch < (recipe.adversarial_epochs or recipe.epochs):
                x = _pgd(model, x, y, recipe.adversarial_epsilon, recipe.adversarial_steps, g)
            out = model(x)
            loss = nnf.cross_entropy(out, y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, model)
        if store is not None:
            store.save(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "seconds": done_seconds + time.perf_counter() - start,
                    "correct": correct,
                    "seen": seen,
                }
            )
    bar.close()
    seconds = done_seconds + time.perf_counter() - start
    return model, {
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": seconds,
        "images_per_second": recipe.epochs * len(images) / seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    recipe: Recipe = Recipe(),
    *,
    epoch_transform: EpochTransform | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``recipe``'s classifier on uint8 ``images`` (see :func:`fit_classifier`) and test it.

    Args:
        test_images: uint8 ``(M, 3, H, W)`` clean test images; test_labels: ``(M,)``.
        the rest: as for :func:`fit_classifier`.

    Returns:
        ``{"test_accuracy", "train_accuracy", "train_seconds", "images_per_second", "parameters"}``.
    """
    if test_images.dtype != torch.uint8:
        raise TypeError("test_images must be a uint8 tensor (N, 3, H, W).")
    test_labels = test_labels.long()
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    model, stats = fit_classifier(
        images,
        labels,
        recipe,
        num_classes=num_classes,
        epoch_transform=epoch_transform,
        seed=seed,
        progress=progress,
        desc=desc,
        device=device,
        checkpoint=checkpoint,
    )
    return {"test_accuracy": evaluate(model, test_images, test_labels, tta=recipe.tta, device=device), **stats}
