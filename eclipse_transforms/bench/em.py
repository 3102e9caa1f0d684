"""Error-minimizing noise, sample-wise (Huang et al., ICLR 2021, "Unlearnable Examples"): the min-min poison.

Algorithm (the paper's Algorithm 1 and its released defaults), alternating until the surrogate's accuracy on
``x + δ`` exceeds ``stop_accuracy``:

1. train the surrogate for ``train_batches`` SGD batches on ``x + δ`` (no augmentation, as in the release);
2. for every training image, ``pgd_steps`` signed-gradient steps of ``step_size`` that *minimise* the
   cross-entropy of the true label, projected to ``|δ| ≤ ε`` and ``x + δ ∈ [0, 1]``;
3. measure the surrogate's accuracy on all of ``x + δ``.

Differences from the release, all deliberate and recorded in :class:`EMConfig`:

* the surrogate is the bench's compact CNN (not ResNet-18), so the poison is crafted against the family it
  must fool, at a cost this CPU can pay;
* ``δ`` keeps both signs: the released loader stores the noise as uint8 after adding it, which our rounding
  also does, but some re-implementations clamp the negative half away; we do not;
* ``max_rounds`` caps the alternation; a run that stops there without reaching ``stop_accuracy`` says so in
  its report instead of pretending it converged;
* before every perturbation pass the surrogate's BatchNorm statistics are re-estimated on ``x + δ``
  (``bn_recalibration`` batches, see :func:`~eclipse_transforms.bench.crafting.recalibrate_bn`). The release
  crafts against the eval-mode network with whatever running statistics ten training batches left; on our
  compact surrogate that network predicted one class after three rounds (accuracy 10.7 % on ``x + δ``, while
  its weights with batch statistics reached 44 %), so ``δ`` was being fitted to a network no one trained.

The poisoned image is ``round(255 · clamp(x + δ, 0, 1))``; with ``x`` on the uint8 grid this keeps ``L∞ ≤ ε``
exactly. ``δ`` starts uniform in ``[-ε, ε]`` as in the release.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from ..utils import derive_seed, quantize
from .crafting import (
    CleanMix,
    CraftingConfig,
    CraftState,
    View,
    accuracy,
    crafting_meta,
    freeze,
    perturbed,
    precision,
    recalibrate_bn,
    sgd,
    surrogate,
    train_batches,
    uniform_like,
)
from .poisons import check_poison_inputs, num_classes, register_poison

logger = logging.getLogger(__name__)

__all__ = ["EMConfig", "em", "min_min"]


@dataclass(frozen=True)
class EMConfig(CraftingConfig):
    """Settings of sample-wise error-minimizing noise; defaults are the paper's unless marked."""

    epsilon: float = 8 / 255
    step_size: float = 0.8 / 255
    pgd_steps: int = 20
    train_batches: int = 10
    stop_accuracy: float = 0.99
    max_rounds: int = 40  # ours: a cap, reported
    batch_size: int = 256  # ours (release: 512 for the perturbation pass)
    lr: float = 0.1
    widths: tuple[int, ...] = (32, 64, 128)  # ours: the bench's compact CNN as surrogate
    bn_recalibration: int = 8  # ours: batches of x+δ that re-estimate BN statistics before each pass (0: off)
    dtype: str = "float32"  # ours: "bfloat16" crafts under autocast (see CraftingConfig)


#: Seconds between checkpoints *inside* a perturbation pass (one pass over 50,000 images is about half an hour on
#: 2 CPU cores, hours for the adaptive attack). Not a setting of the poison: where a run resumes never changes it.
SAVE_EVERY_SECONDS = 600.0


def _minimise(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    config: EMConfig,
    view: View | None = None,
    seed: int = 0,
    start: int = 0,
    save: Callable[[int], None] | None = None,
) -> None:
    """Step 2: ``pgd_steps`` error-minimizing signed steps on every image from ``start`` on, in place on ``delta``.

    Every batch draws its randomness from ``(seed, batch start, step)``, so a pass resumed at any batch boundary
    ends as an uninterrupted one; ``save(next_start)`` is called every :data:`SAVE_EVERY_SECONDS`.
    """
    freeze(model.eval())
    x_all = images.float() / 255
    last_save = time.monotonic()
    for s in range(start, len(images), config.batch_size):
        if save is not None and s > start and time.monotonic() - last_save > SAVE_EVERY_SECONDS:
            save(s)
            last_save = time.monotonic()
        x, y = x_all[s : s + config.batch_size], labels[s : s + config.batch_size]
        d = delta[s : s + config.batch_size].clone()
        for step in range(config.pgd_steps):
            d.requires_grad_(True)
            seen = (x + d).clamp(0, 1)
            if view is not None:
                seen = view(seen, torch.Generator().manual_seed(derive_seed(seed, "view-min", s, step)))
            loss = nnf.cross_entropy(model(seen.contiguous(memory_format=torch.channels_last)), y)
            (grad,) = torch.autograd.grad(loss, d)
            d = (d.detach() - config.step_size * grad.sign()).clamp(-config.epsilon, config.epsilon)
            d = (x + d).clamp(0, 1) - x
        delta[s : s + config.batch_size] = d
    freeze(model, False)


def min_min(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    name: str,
    seed: int,
    config: EMConfig,
    work_dir: str | os.PathLike | None,
    progress: bool,
    view: View | None = None,
    extra: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    clean: CleanMix | None = None,
) -> torch.Tensor:
    """The min-min alternation shared by EM and the adaptive attack (``view``: what the surrogate sees; ``clean``:
    clean images the surrogate trains on beside ``x + δ``, for a defender who adds its own).

    The images, ``δ`` and the surrogate live on ``device`` (random numbers are drawn on the CPU, so the streams are
    the same everywhere); checkpoints are read back onto it, so a run may resume on another device."""
    images, labels = check_poison_inputs(images, labels)
    meta = crafting_meta(name, seed, config, images, labels, **(extra or {}))
    store = CraftState(work_dir, meta)
    images, labels = images.to(device), labels.to(device)
    model = surrogate(config.widths, num_classes(labels), seed, device)
    opt = sgd(model, config.lr)
    state = store.load()
    if state is None:
        g = torch.Generator().manual_seed(derive_seed(f"{name}-init", seed))
        delta = uniform_like(images, config.epsilon, g)
        delta = (images.float() / 255 + delta).clamp(0, 1) - images.float() / 255
        state = {"delta": delta, "round": 0, "cursor": {"epoch": 0, "offset": 0}, "accuracy": 0.0, "done": False}
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    delta, cursor = state["delta"].to(device), dict(state["cursor"])
    # A checkpoint taken inside a perturbation pass: the surrogate is already trained and recalibrated for it.
    resume_at = state.get("minimise_from", 0)
    if resume_at:
        logger.info("%s round %d: resuming at image %d of %d", name, state["round"] + 1, resume_at, len(images))
    elif state["round"]:
        logger.info("%s: resuming after round %d of at most %d", name, state["round"], config.max_rounds)
    bar = tqdm(total=config.max_rounds, initial=state["round"], desc=name, unit="round", disable=not progress)
    while not state["done"] and state["round"] < config.max_rounds:
        r = state["round"]
        with precision(config.dtype, device):  # the surrogate's arithmetic (CraftingConfig.dtype)
            if not resume_at:
                train_batches(
                    model,
                    opt,
                    images,
                    labels,
                    delta,
                    cursor,
                    config.train_batches,
                    config.batch_size,
                    derive_seed(f"{name}-data", seed),
                    view=view,
                    clean=clean,
                )
                recalibrate_bn(
                    model,
                    images,
                    delta,
                    config.bn_recalibration,
                    config.batch_size,
                    derive_seed(f"{name}-bn", seed, r),
                    view=view,
                )

        def save_inside_pass(position: int, r: int = r, round_state: dict[str, Any] = state) -> None:
            store.save(
                {
                    **round_state,
                    "delta": delta,
                    "cursor": dict(cursor),
                    "minimise_from": position,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                }
            )
            logger.info("%s round %d: checkpoint at image %d of %d", name, r + 1, position, len(images))

        with precision(config.dtype, device):
            _minimise(
                model,
                images,
                labels,
                delta,
                config,
                view=view,
                seed=derive_seed(name, seed, r),
                start=resume_at,
                save=save_inside_pass if store.path is not None else None,
            )
            resume_at = 0
            acc = accuracy(model, images, labels, delta, view=view, seed=derive_seed(name, seed, r))
        state = {
            "delta": delta,
            "round": r + 1,
            "cursor": dict(cursor),
            "accuracy": acc,
            "done": acc > config.stop_accuracy,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
        }
        store.save(state)
        bar.update()
        bar.set_postfix(accuracy=f"{acc:.3f}")
        logger.info("%s round %d: surrogate accuracy on x+δ %.4f", name, state["round"], acc)
    bar.close()
    if not state["done"]:
        logger.warning(
            "%s stopped at max_rounds=%d with surrogate accuracy %.4f (target > %.2f)",
            name,
            config.max_rounds,
            state["accuracy"],
            config.stop_accuracy,
        )
    store.report(
        {
            "poison": name,
            "rounds": state["round"],
            "surrogate_accuracy": state["accuracy"],
            "converged": state["done"],
            "config": config.to_dict(),
            "seed": seed,
            **(extra or {}),
        }
    )
    return quantize(perturbed(images, delta)).cpu().contiguous()


@register_poison("em")
def em(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    config: EMConfig = EMConfig(),
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Sample-wise error-minimizing noise (min-min), resumable from ``work_dir``.

    Args:
        images, labels, seed: as for every poison.
        config: the crafting settings (see :class:`EMConfig`).
        work_dir: checkpoint folder; a run interrupted at any point resumes from its last finished round, and
            ``report.json`` there records the rounds, the surrogate's final accuracy and whether it converged.
        progress: show a tqdm bar over rounds.
        device: where the surrogate and the perturbation live (``"cuda"`` on a GPU); the output is on the CPU.

    Returns:
        uint8 poisoned images ``(N, 3, H, W)``.
    """
    return min_min(
        images, labels, name="em", seed=seed, config=config, work_dir=work_dir, progress=progress, device=device
    )
