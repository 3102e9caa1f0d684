"""Shared machinery of the model-based poisons: resumable state, the surrogate, batched signed-gradient steps.

A crafting run keeps everything in one checkpoint (``<work_dir>/state.pt``, written atomically with
``torch.save`` and read with ``weights_only=True``): the perturbation, the surrogate and its optimizer, the
position of the data stream and the round counter. All randomness is drawn from generators seeded by
``(seed, purpose, round, ...)``, so a run resumed from any checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from .. import functional as EF
from ..denoiser import dtype_name
from ..utils import ShardStore, atomic_write, atomic_write_json, derive_seed, keeps_global_rng
from .models import build_model
from .poisons import check_count, check_positive

logger = logging.getLogger(__name__)

#: ``view(x, generator) -> x'``: what the surrogate sees of a perturbed float batch (differentiable).
View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

__all__ = [
    "CleanMix",
    "CraftingConfig",
    "CraftState",
    "craft_in_shards",
    "digest",
    "surrogate",
    "sgd",
    "train_batches",
    "recalibrate_bn",
    "perturbed",
    "accuracy",
    "uniform_like",
    "precision",
    "check_squeeze",
    "through_squeeze",
]


class CraftingConfig:
    """What every model-based poison's settings share (a frozen dataclass's base): ``to_dict`` for the results and
    keys, and the surrogate's ``dtype``, checked.

    ``dtype`` (ours, default ``"float32"``): ``"bfloat16"`` (or ``"float16"``) runs the surrogate's arithmetic under
    :func:`torch.autocast` while crafting, with losses, ``δ`` and the weights in float32. Whether that is faster
    depends on the CPU (``benchmarks/bench_poisons.py --crafting``, 2 threads): 1.5-2.3x on an AMD EPYC with
    AVX512-BF16 (EM 2.27, TAP 1.67, SEP 1.99, REM 1.47), 0.8-1.2x on an Intel Xeon with AVX512-BF16 and no AMX
    (EM 0.82, TAP 1.00, SEP 1.20, REM 0.78). It is a different poison (another ``δ``), so it enters the keys, but
    only when not float32: every float32 result keeps the key it had before the setting existed.
    """

    dtype: str
    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass's, for type checkers: subclasses are dataclasses

    #: Fields that count steps, batches, rounds or images (at least 1), that may be 0 (off), and step sizes, budgets
    #: and rates (above 0), whichever a config has: a 0 or negative count would craft no poison at all, silently.
    COUNTS = frozenset(
        {"pgd_steps", "train_batches", "max_rounds", "batch_size", "iterations", "restarts", "shard_size"}
        | {"surrogate_epochs", "checkpoints", "eot_samples", "train_steps", "lr_decay_steps", "checkpoint_steps"}
    )
    MAY_BE_ZERO = frozenset({"translate", "bn_recalibration", "target_offset", "adversary_steps"})
    POSITIVE = frozenset({"epsilon", "step_size", "step_fraction", "lr", "adversary_step_size"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.COUNTS | self.MAY_BE_ZERO:
                check_count(f.name, value, low=0 if f.name in self.MAY_BE_ZERO else 1)
            elif f.name in self.POSITIVE:
                check_positive(f.name, value)
        widths = getattr(self, "widths", (1,))
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ValueError(f"widths must be one or more ints >= 1 (channels per stage); got {widths!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if d.get("dtype") == "float32":
            del d["dtype"]
        return d


def precision(dtype: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """The context a crafting run's surrogate computes in: as written for ``"float32"``, else autocast to ``dtype``
    on ``device``'s type (convolutions and matmuls in ``dtype``; the cross-entropy stays float32).

    The context may span optimizer steps (EM's training batches run inside it), so autocast's cache of cast
    weights is off: with it on, every forward after the first reused the weights of the first, and EM's surrogate
    stopped learning (10 % accuracy after 5 rounds on the quick tier, where float32 passes 99 % in 3)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype), cache_enabled=False)


class CraftState:
    """A checkpoint folder for one long run (crafting, or a bench cell's training); ``meta`` must match to resume."""

    def __init__(self, work_dir: str | os.PathLike | None, meta: dict[str, Any]) -> None:
        self.path = Path(work_dir).expanduser() / "state.pt" if work_dir is not None else None
        self.meta = meta

    def load(self) -> dict[str, Any] | None:
        """The checkpoint's state, or ``None`` to start over.

        A checkpoint that cannot be resumed (unreadable, or made with other settings) is moved aside to
        ``state.<reason>-<n>.pt`` before the run starts over, so the run's first save never overwrites hours of
        someone else's work: the old file stays for a person to inspect or restore."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as e:  # a damaged checkpoint restarts the run, never corrupts it
            kept = _rename_aside(self.path, "state.unreadable", ".pt")
            logger.warning("checkpoint %s is unreadable (%s); moved to %s, starting over", self.path, e, kept)
            return None
        if state.get("meta") != self.meta:
            kept = _rename_aside(self.path, "state.other-settings", ".pt")
            logger.warning("checkpoint %s was made with other settings; moved to %s, starting over", self.path, kept)
            return None
        logger.info("resuming from checkpoint %s", self.path)
        return state

    def report(self, report: dict[str, Any]) -> None:
        """Write ``report.json`` (what the run did: rounds, convergence, settings) beside the checkpoint."""
        if self.path is not None:
            atomic_write_json(self.path.parent / "report.json", report)

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({**state, "meta": self.meta}, buf)
        atomic_write(self.path, buf.getvalue())


def _rename_aside(path: Path, stem: str, suffix: str) -> Path:
    """Rename ``path`` to the first free ``<stem>-<n><suffix>`` beside it (n = 0, 1, ...): never over another."""
    n = 0
    while (kept := path.with_name(f"{stem}-{n}{suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept


def discard_work(work_dir: Path | None) -> None:
    """Delete a finished run's work folder, except the checkpoints :meth:`CraftState.load` set aside (they are
    someone's earlier work, kept until a person removes them)."""
    if work_dir is None or not work_dir.is_dir():
        return
    kept = [p for p in work_dir.iterdir() if p.is_file() and p.name.startswith("state.") and p.name != "state.pt"]
    if not kept:
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    for path in work_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path not in kept:
            path.unlink(missing_ok=True)
    logger.warning("kept %s in %s: checkpoints set aside from an earlier run", [p.name for p in kept], work_dir)


def digest(*parts: Any) -> str:
    """A short sha256 of tensors (their bytes) and JSON-able settings, in order: cache keys and fingerprints."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.numpy().tobytes() if isinstance(p, torch.Tensor) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:20]


def crafting_meta(
    name: str, seed: int, config: Any, images: torch.Tensor, labels: torch.Tensor, **extra: Any
) -> dict[str, Any]:
    """Everything a crafting run's output depends on; a checkpoint made with other settings is not resumed."""
    return {
        "poison": name,
        "seed": seed,
        "config": config.to_dict(),
        "n": len(images),
        "data": digest(images, labels),
        **extra,
    }


def work_root(work_dir: str | os.PathLike | None) -> Path | None:
    """``work_dir`` as a created folder, or None."""
    if work_dir is None:
        return None
    root = Path(work_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


_Module = TypeVar("_Module", bound=torch.nn.Module)


def freeze(model: _Module, frozen: bool = True) -> _Module:
    """Stop (or restart) gradients to the parameters: crafting differentiates w.r.t. the input only."""
    for p in model.parameters():
        p.requires_grad_(not frozen)
    return model


@keeps_global_rng
def surrogate(
    widths: tuple[int, ...], num_classes: int, seed: int, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The bench's compact classifier as the crafting surrogate (so poisons hit the bench at full strength).

    Initialised on the CPU, then moved to ``device``: the same weights wherever it runs. The caller's global random
    stream is left as it was."""
    torch.manual_seed(derive_seed("surrogate", seed))
    return build_model("compact", widths, num_classes).to(device)


def uniform_like(x: torch.Tensor, radius: float, generator: torch.Generator) -> torch.Tensor:
    """``U(-radius, radius)`` noise of ``x``'s shape, drawn from a CPU ``generator`` and moved to ``x``'s device:
    a crafting run draws the same random starts on any device."""
    return ((torch.rand(x.shape, generator=generator) * 2 - 1) * radius).to(x.device)


def check_squeeze(config: Any) -> None:
    """Refuse squeeze settings an attack cannot model (``config``: an ADP or REM config; named as in the spec)."""
    if not 0 <= config.jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], or 0 for no JPEG; got {config.jpeg_quality}.")
    if not 0 <= config.despeckle_threshold <= 255:
        raise ValueError(f"despeckle_threshold must be in [0, 255] (uint8 levels); got {config.despeckle_threshold}.")


def _straight_through_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG in the forward pass, identity in the backward pass (the attacker's approximation of a step that has
    no useful gradient)."""
    return x + (EF.jpeg_compression(x.detach().clamp(0, 1), quality=quality).to(x) - x).detach()


def through_squeeze(x: torch.Tensor, config: Any) -> torch.Tensor:
    """A defense's one-time squeeze as an attacker differentiates through it, as ``config`` (an ADP or REM config)
    sets it: the border repair if ``repair_border`` (a copy, so the gradient flows to the copied pixels), the
    despeckle at ``despeckle_threshold`` uint8 levels if ``despeckle`` (a replaced pixel passes the gradient to its
    median's source), then JPEG at ``jpeg_quality`` (0: none) through a straight-through estimator (forward: the
    real JPEG; backward: identity, BPDA)."""
    if config.repair_border:
        x = EF.repair_border(x)
    if config.despeckle:
        x = EF.despeckle(x, threshold=config.despeckle_threshold / 255)
    if config.jpeg_quality:
        x = _straight_through_jpeg(x, config.jpeg_quality)
    return x


def sgd(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def perturbed(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``clamp(x + δ, 0, 1)`` for uint8 ``images`` and float ``δ``, in ``channels_last``."""
    return (images.float() / 255 + delta).clamp_(0, 1).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class CleanMix:
    """Clean images the defender trains on beside the poisoned set, as an attacker models them: ``per_batch`` of
    ``images`` (uint8, with ``labels``) drawn afresh beside every surrogate batch of ``x + δ``, through ``view`` (the
    defender's per-epoch stages; the clean images skip its one-time ones)."""

    images: torch.Tensor
    labels: torch.Tensor
    per_batch: int
    view: View | None = None


def train_batches(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    cursor: dict[str, int],
    num_batches: int,
    batch_size: int,
    seed: int,
    view: View | None = None,
    clean: CleanMix | None = None,
) -> float:
    """``num_batches`` SGD steps on ``x + δ`` from a data stream (epoch order seeded by ``(seed, epoch)``).

    ``cursor`` (``{"epoch", "offset"}``) is advanced in place and belongs in the checkpoint. ``view(x, generator)``,
    if given, is what the surrogate sees of ``x + δ`` (e.g. a purifier, for the adaptive attack); ``clean``, if
    given, adds clean images to every batch. Returns the mean loss.
    """
    model.train()
    total = 0.0
    for _ in range(num_batches):
        if cursor["offset"] >= len(images):
            cursor["epoch"], cursor["offset"] = cursor["epoch"] + 1, 0
        order = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(derive_seed(seed, cursor["epoch"]))
        )
        idx = order[cursor["offset"] : cursor["offset"] + batch_size].to(images.device)
        x = perturbed(images[idx], delta[idx])
        if view is not None:
            g = torch.Generator().manual_seed(derive_seed(seed, "view", cursor["epoch"], cursor["offset"]))
            with torch.no_grad():
                x = view(x, g).contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        if clean is not None:
            g = torch.Generator().manual_seed(derive_seed(seed, "clean", cursor["epoch"], cursor["offset"]))
            n = len(clean.labels)
            pick = (  # more per batch than there are: some twice, as a defender who repeats them shows them
                torch.randperm(n, generator=g)[: clean.per_batch]
                if clean.per_batch <= n
                else torch.randint(n, (clean.per_batch,), generator=g)
            ).to(clean.labels.device)
            xc = clean.images[pick].float().div(255)
            if clean.view is not None:
                with torch.no_grad():
                    xc = clean.view(xc, g)
            x = torch.cat([x, xc.to(x.dtype)]).contiguous(memory_format=torch.channels_last)
            y = torch.cat([y, clean.labels[pick]])
        cursor["offset"] += batch_size
        loss = nnf.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(num_batches, 1)


@torch.no_grad()
def recalibrate_bn(
    model: torch.nn.Module,
    images: torch.Tensor,
    delta: torch.Tensor,
    num_batches: int,
    batch_size: int,
    seed: int,
    view: View | None = None,
) -> None:
    """Re-estimate every BatchNorm's running statistics on ``x + δ``, then leave ``model`` in eval mode.

    A surrogate trained for only a few batches between perturbation passes (EM's min-min) has running statistics
    that lag far behind its weights: measured on EM's compact surrogate after 30 batches, eval mode predicted one
    class for 91 % of the images (11.6 % accuracy) while the same weights with batch statistics reached 44 %.
    Optimising ``δ`` against that eval-mode network is optimising against a network nobody trained. Here the
    statistics are replaced by exact averages (``momentum=None``) over ``num_batches`` random batches of
    ``x + δ`` (through ``view`` if given); the weights are untouched.
    """
    if num_batches < 1:
        model.eval()
        return
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)[: num_batches * batch_size].to(images.device)

    def batches() -> Iterator[torch.Tensor]:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            x = perturbed(images[idx], delta[idx])
            yield (x if view is None else view(x, g)).contiguous(memory_format=torch.channels_last)

    torch.optim.swa_utils.update_bn(batches(), model)  # exact averages (momentum=None), momenta restored after
    model.eval()


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    batch_size: int = 1000,
    view: View | None = None,
    seed: int = 0,
) -> float:
    """Accuracy of ``model`` (eval mode) on ``x + δ``, through ``view`` if given."""
    model.eval()
    hits = 0
    for s in range(0, len(images), batch_size):
        x = perturbed(images[s : s + batch_size], delta[s : s + batch_size])
        if view is not None:
            x = view(x, torch.Generator().manual_seed(derive_seed(seed, "view-eval", s)))
        logits = model(x.contiguous(memory_format=torch.channels_last))
        hits += (logits.argmax(1) == labels[s : s + batch_size]).sum().item()
    return hits / len(images)


def _set_aside_other_shards(folder: Path, meta: dict[str, Any]) -> None:
    """Rename crafted shards made with other settings (or with an unreadable manifest) to
    ``shards.other-settings-<n>`` so the new run rebuilds beside them instead of overwriting hours of crafting."""
    try:
        saved = ShardStore.saved_manifest(folder)
    except ValueError:
        saved = {}
    if saved is None or ShardStore.made_with(saved, meta):
        return
    kept = _rename_aside(folder, f"{folder.name}.other-settings", "")
    logger.warning("crafted shards in %s were made with other settings; moved to %s, crafting anew", folder, kept)


def craft_in_shards(
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    *,
    root: Path | None,
    meta: dict[str, Any],
    config: Any,
    progress: bool,
    report: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-image crafting (the surrogate is frozen), batch by batch, saved in checksummed shards under ``root``.

    ``attack(x, y, start)`` gets float images ``x`` in ``[0, 1]`` and their labels, both on ``device``, and the
    index of the batch's first image (to seed its randomness) and returns the poisoned batch as uint8. Finished
    shards are reused by a later call with the same ``meta``, so an interrupted run loses at most one shard.
    ``config`` gives ``shard_size`` and ``batch_size``; ``report`` (plus the poison, its config and seed) is written
    to ``root/report.json`` at the end.
    """
    shard_size, batch_size, desc = config.shard_size, config.batch_size, meta["poison"]
    store = None
    if root is not None:
        _set_aside_other_shards(root / "shards", meta)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        store = ShardStore(root / "shards", len(images), shard_size, meta)
    out = torch.empty_like(images)
    num_shards = -(-len(images) // shard_size)
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)
    for shard in range(num_shards):
        lo, hi = shard * shard_size, min(len(images), (shard + 1) * shard_size)
        if store is not None and store.is_valid(shard):
            out[lo:hi] = store.read(shard)["images"]
        else:
            for s in range(lo, hi, batch_size):
                e = min(hi, s + batch_size)
                out[s:e] = attack(images[s:e].to(device).float() / 255, labels[s:e].to(device), s).cpu()
                bar.update(e - s)
            if store is not None:
                store.write(shard, out[lo:hi].contiguous(), labels[lo:hi])
            if not progress:  # without a bar, an hour-long crafting in a log file still shows that it moves
                logger.info(
                    "%s: shard %d of %d crafted (%d of %d images)", desc, shard + 1, num_shards, hi, len(images)
                )
            continue
        bar.update(hi - lo)
    bar.close()
    if root is not None:
        CraftState(root, meta).report(
            {"poison": desc, "config": meta["config"], "seed": meta["seed"], **(report or {})}
        )
    return out
