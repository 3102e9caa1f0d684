"""The bench runner: poisons × defenses on one tier, every cell cached, resumable, and written as it finishes.

Layout of ``output_dir``::

    bench_config.json        # the table's layout: the training runs' rows and columns together, or --report-only's
    cells/<poison>__<defense>.json  # <poison> as the column names it: "lsp", or a variant "rem[train_steps=1000]"
    cells/superseded/        # cells this folder held from runs with other settings, moved here, never overwritten
    results.json             # every cell of this config, with its config, seed, timings and library version
    table.md                 # rows = defenses, columns = clean, poisons, mean over poisons
    chart.png                # grouped bars, one group per column (needs matplotlib)

Poisoned training sets are cached in ``<cache_dir>/poisoned`` (one safetensors file each, written atomically) and
purified sets through :class:`~eclipse_transforms.PurifiedDataset`, so a re-run only trains cells that are missing
and an interrupted run resumes where it stopped: a cell's training keeps its state after every epoch in
``<cache_dir>/training/<cell key>/`` (deleted once the cell is written), and a cell is written only when its
training finished.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from .. import __version__
from ..dataset import default_cache_dir
from ..denoiser import bundled_weights_path, dtype_name
from ..utils import atomic_write, atomic_write_json, hardware_name, load_image_set, load_indices, portable_path
from .classifier import Recipe, train_classifier
from .crafting import digest, discard_work
from .defenses import DefenseContext, get_defense, list_defenses
from .poisons import get_poison
from .report import write_chart, write_table
from .specs import parse_poison, poison_call_options, poison_settings, split_poisons

logger = logging.getLogger(__name__)

__all__ = ["BenchConfig", "TIERS", "run_bench"]

CLEAN = "clean"
#: The table's layout, written first into every output folder: the mark that the bench wrote the folder.
BENCH_CONFIG = "bench_config.json"


@dataclass(frozen=True)
class Tier:
    """A training budget: how many training images (class-balanced subset; None = all) and the recipe."""

    subset: int | None
    recipe: Recipe
    about: str


TIERS: dict[str, Tier] = {
    "quick": Tier(
        10_000,
        Recipe(model="compact", widths=(32, 64, 128), epochs=15),
        "class-balanced 10,000-image subset, 0.30 M-parameter compact CNN, 15 epochs",
    ),
    "standard": Tier(
        None,
        Recipe(model="compact", widths=(32, 64, 128), epochs=15),
        "all 50,000 training images, 0.30 M-parameter compact CNN, 15 epochs",
    ),
    "paper": Tier(
        None,
        Recipe(model="resnet18", epochs=80, batch_size=128, lr=0.1, warmup=0.0, label_smoothing=0.0, tta=False),
        "the paper's protocol: ResNet-18, 80 epochs, SGD lr 0.1 (meant for a GPU)",
    ),
}

DEFAULT_POISONS = ("urp", "lsp", "ar", "ops", "cuda")
DEFAULT_DEFENSES = ("none", "iss-gray", "iss-jpeg", "eclipse", "purify-only", "compensation-only")


@dataclass(frozen=True)
class BenchConfig:
    """One bench run. Every cell of a table shares the tier's recipe and seed and differs only in its defense."""

    data: str = field(metadata={"help": "CIFAR-10 as an .npz (x_train/y_train/x_test/y_test) or a torchvision root"})
    poisons: tuple[str, ...] = field(
        default=DEFAULT_POISONS,
        metadata={
            "help": "comma-separated poisons; a variant as name[setting=value,...], e.g. 'rem[train_steps=1000]'"
        },
    )
    defenses: tuple[str, ...] = field(default=DEFAULT_DEFENSES, metadata={"help": "comma-separated defenses"})
    tier: str = field(default="quick", metadata={"help": "quick | standard | paper"})
    output_dir: str = field(default="bench-results", metadata={"help": "where cells, results, table, chart go"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache of poisoned and purified sets"})
    weights: str | None = field(default=None, metadata={"help": "denoiser folder or Hub id (default: bundled)"})
    exclude_test: str | None = field(
        default=None,
        metadata={
            "help": "indices of test images left out of the test set (default: the bundled denoiser's sparse set)"
        },
    )
    clean: bool = field(default=True, metadata={"help": "also train every defense on clean data"})
    subset: int | None = field(default=None, metadata={"help": "override the tier's training-set size (0: all)"})
    epochs: int | None = field(default=None, metadata={"help": "override the tier's epochs"})
    widths: tuple[int, ...] | None = field(default=None, metadata={"help": "override the compact net's widths"})
    t_star: int = field(default=100, metadata={"help": "ECLIPSE's diffusion timestep"})
    seed: int = field(default=0, metadata={"help": "seed of subset, poisons, purification and training"})
    device: str = field(
        default="cpu", metadata={"help": "'cpu' or 'cuda' for crafting model-based poisons, purification and training"}
    )
    purify_batch_size: int = field(
        default=256,
        metadata={
            "help": "images per purification batch (a GPU wants thousands); in the purified cache's key, as the "
            "UNet's float rounding depends on it"
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "the denoiser's precision for purification: float32, bfloat16 (about 2x on CPUs with "
            "AVX512-BF16, within one uint8 level of float32) or float16; recorded in the purifying cells"
        },
    )
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        poisons = split_poisons(self.poisons) if isinstance(self.poisons, str) else self.poisons
        object.__setattr__(self, "poisons", tuple(parse_poison(p)[2] for p in poisons))
        defenses = self.defenses.split(",") if isinstance(self.defenses, str) else self.defenses
        object.__setattr__(self, "defenses", tuple(d.strip().lower() for d in defenses if d.strip()))
        unknown = [d for d in self.defenses if d not in list_defenses()]
        if unknown:
            raise ValueError(f"defenses: unknown {unknown}; available: {', '.join(list_defenses())}.")
        if not self.defenses:
            raise ValueError("defenses is empty; name at least one, e.g. 'none,eclipse'.")
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {self.tier!r}.")
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.purify_batch_size < 1:
            raise ValueError(f"purify_batch_size must be >= 1, got {self.purify_batch_size}.")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}.") from None

    def recipe(self) -> Recipe:
        recipe = TIERS[self.tier].recipe
        changes: dict[str, Any] = {}
        if self.epochs is not None:
            changes["epochs"] = self.epochs
        if self.widths is not None:
            changes["widths"] = self.widths
        return dataclasses.replace(recipe, **changes)

    def subset_size(self) -> int | None:
        n = TIERS[self.tier].subset if self.subset is None else self.subset
        return n or None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) - names:
            raise ValueError(f"unknown BenchConfig keys {sorted(set(d) - names)}; known: {sorted(names)}.")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)


def balanced_subset(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of ``size`` images, ``size / num_classes`` per class, drawn with numpy ``default_rng(seed)``."""
    if size is None or size >= len(labels):
        return torch.arange(len(labels))
    y = labels.numpy()
    classes = np.unique(y)
    per_class = size // len(classes)
    if per_class < 1:
        raise ValueError(f"subset={size} is smaller than the number of classes ({len(classes)}).")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(y == c), min(per_class, int((y == c).sum())), replace=False) for c in classes]
    return torch.from_numpy(np.sort(np.concatenate(picked)))


def append_clean_images(
    images: torch.Tensor,
    labels: torch.Tensor,
    clean: torch.Tensor,
    clean_labels: torch.Tensor,
    n: int,
    seed: int,
    repeat: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` and ``labels`` with ``n`` class-balanced images of ``clean`` (:func:`balanced_subset` with ``seed``)
    appended as they are, ``repeat`` times each: what a bench defense's ``clean_images`` and ``clean_repeat`` train on.
    """
    if n > len(clean_labels):
        raise ValueError(f"n={n} clean images asked for; clean has {len(clean_labels)}.")
    if repeat < 1:
        raise ValueError(
            f"repeat must be >= 1 (the defense's clean_repeat: copies of each image per epoch); got {repeat}."
        )
    pick = balanced_subset(clean_labels, n, seed).repeat(repeat)
    return torch.cat([images, clean[pick]]), torch.cat([labels, clean_labels[pick]])


@dataclass(frozen=True)
class BenchData:
    """What a bench run trains and tests on: uint8 images ``(N, 3, H, W)`` and int64 labels."""

    images: torch.Tensor  # the training split's class-balanced subset, in the split's order
    labels: torch.Tensor
    test_images: torch.Tensor  # the test split without the excluded indices
    test_labels: torch.Tensor
    excluded_test_images: int
    # the excluded test images themselves (the denoiser's sparse set: the defender's own clean images), index order
    excluded_images: torch.Tensor
    excluded_labels: torch.Tensor


def load_bench_data(
    data: str | Path, subset_size: int | None = None, seed: int = 0, *, exclude_test: str | Path | None = None
) -> BenchData:
    """The bench's images: ``balanced_subset(train labels, subset_size, seed)`` of the training split, and the test
    split without the indices listed in ``exclude_test`` (a JSON file as :func:`~eclipse_transforms.utils.load_indices`
    reads it; the bench passes the denoiser's sparse set, which the denoiser was trained on).

    ``data`` is what :func:`~eclipse_transforms.utils.load_image_set` reads (a CIFAR-10 ``.npz`` or a torchvision
    root). Scripts that measure something the bench measures load their images here, so they test on what the
    bench's cells test on.
    """
    train = load_image_set(data, split="train")
    test = load_image_set(data, split="test")
    if train.labels is None or test.labels is None:
        raise ValueError(f"data={str(data)!r} has no labels; the bench trains and tests on a labelled CIFAR-10.")
    idx = balanced_subset(train.labels, subset_size, seed)
    exclude = load_indices(exclude_test) if exclude_test else []
    excluded = np.unique(np.asarray(exclude, dtype=np.int64))
    excluded = excluded[(excluded >= 0) & (excluded < len(test.labels))]  # a list for a larger test split
    keep = torch.from_numpy(np.setdiff1d(np.arange(len(test.labels)), excluded))
    return BenchData(
        images=train.images[idx].contiguous(),
        labels=train.labels[idx].contiguous(),
        test_images=test.images[keep].contiguous(),
        test_labels=test.labels[keep].contiguous(),
        excluded_test_images=len(exclude),
        excluded_images=test.images[torch.from_numpy(excluded)].contiguous(),
        excluded_labels=test.labels[torch.from_numpy(excluded)].contiguous(),
    )


def _poison_key(poison: str) -> tuple[Any, ...]:
    """What names a poison in the cache and cell keys: its name and the settings it is really crafted with (a
    model-based poison's whole config; a model-free poison's changed keyword arguments, if any), not the spec's
    text, so a change of defaults keeps every result whose real settings did not change."""
    if poison == CLEAN:
        return (CLEAN,)
    name, settings = parse_poison(poison)[0], poison_settings(poison)
    return (name,) if settings is None else (name, settings)


class _Run:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir).expanduser()
        self.cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir() / "bench"
        self.recipe = config.recipe()
        exclude_file = config.exclude_test
        shown = portable_path(exclude_file) if exclude_file else None
        bundled = bundled_weights_path()
        if exclude_file is None and config.weights is None and bundled is not None:
            exclude_file = str(bundled.parent / "cifar10_sparse_indices.json")
            shown = "bundled weights/cifar10_sparse_indices.json"  # not this machine's absolute path
        data = load_bench_data(config.data, config.subset_size(), config.seed, exclude_test=exclude_file)
        self.images, self.labels = data.images, data.labels
        self.test_images, self.test_labels = data.test_images, data.test_labels
        self.clean_set = (data.excluded_images, data.excluded_labels)  # the defender's own clean images
        self.data_key = digest(self.images, self.labels, self.test_images, self.test_labels)
        self.context = DefenseContext(
            weights=config.weights,
            cache_dir=str(self.cache / "purified"),
            t_star=config.t_star,
            seed=config.seed,
            batch_size=config.purify_batch_size,
            device=config.device,
            progress=config.progress,
            dtype=config.dtype,
        )
        self.test_info = {
            "test_images": len(data.test_labels),
            "excluded_test_images": data.excluded_test_images,
            "exclude_file": shown,
        }

    def poisoned(self, poison: str) -> tuple[torch.Tensor, float, dict[str, Any] | None]:
        """The poisoned training set (cached), the seconds it took now (0 if cached) and the crafting report."""
        if poison == CLEAN:
            return self.images, 0.0, None
        name, *settings = _poison_key(poison)
        key = digest(name, self.config.seed, __version__, *settings, self.images, self.labels)
        path = self.cache / "poisoned" / f"{name}-{key}.safetensors"
        report_path = path.with_suffix(".work") / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        if path.is_file():
            try:
                return load_file(path)["images"], 0.0, report
            except Exception as e:  # a damaged file is regenerated, never trusted
                logger.warning("poisoned set %s is unreadable (%s); regenerating it", path, e)
        fn = get_poison(name)
        options: dict[str, Any] = poison_call_options(poison)
        accepted = inspect.signature(fn).parameters
        if "work_dir" in accepted:  # model-based poisons checkpoint their crafting and resume from it
            options["work_dir"] = path.with_suffix(".work")
        if "progress" in accepted:
            options["progress"] = self.config.progress
        if "device" in accepted:  # model-based poisons craft where the classifiers train
            options["device"] = self.config.device
        start = time.perf_counter()
        images = fn(self.images, self.labels, seed=self.config.seed, **options)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save({"images": images.contiguous()}, metadata={"poison": poison, "version": __version__}))
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        return images, seconds, report

    def cell_path(self, poison: str, defense: str) -> Path:
        safe = re.sub(r"[^\w.,=\[\]-]", "_", poison)  # a variant's "16/255" must not make a folder
        return self.out / "cells" / f"{safe}__{defense}.json"

    def cell_key(self, poison: str, defense_options: dict[str, Any], defense: str) -> str:
        first, *settings = _poison_key(poison)
        parts = (self.data_key, first, defense, defense_options, self.recipe.to_dict(), self.config.seed)
        return digest(*parts, *settings)  # a changed crafting config retrains the cell

    @staticmethod
    def _set_aside(path: Path, key: str) -> None:
        """Move a cell run with other settings to ``cells/superseded/`` before its name is reused: a result is
        never overwritten (a run into the wrong folder, with another ``--t-star`` or ``--dtype``, loses nothing).
        A cell with ``key`` itself (two identical runs side by side) is simply replaced."""
        if not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
            old_key = str(old.get("key", "unknown")) if isinstance(old, dict) else "unknown"
        except (json.JSONDecodeError, UnicodeDecodeError):
            old_key = "unreadable"
        if old_key == key:
            return
        aside = path.parent / "superseded" / f"{path.stem}.{old_key[:12]}.json"
        aside.parent.mkdir(exist_ok=True)
        path.replace(aside)
        logger.warning("kept the result run with other settings as %s", aside)

    def _with_clean_images(self, images: torch.Tensor, n: int, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (the training set after the defense's one-time stages) with ``n`` images of the defender's
        clean set appended (:func:`append_clean_images`), and the labels to go with them."""
        clean, clean_labels = self.clean_set
        if n > len(clean_labels):
            raise ValueError(
                f"the defense asks for {n} images of the defender's clean set (the test images the bench excludes, "
                f"the denoiser's sparse set); this run excludes {len(clean_labels)}: pass exclude_test or use the "
                "bundled weights."
            )
        return append_clean_images(images, self.labels, clean, clean_labels, n, self.config.seed, repeat)

    def run_cell(self, poison: str, defense_name: str, train: bool = True) -> dict[str, Any] | None:
        """The cell's result: from ``cells/`` if it was run with these settings, else trained now (or None)."""
        defense = get_defense(defense_name, self.context)
        key = self.cell_key(poison, defense.options, defense_name)
        path = self.cell_path(poison, defense_name)
        if path.is_file():
            try:
                cell = json.loads(path.read_text())
                if cell.get("key") == key:
                    return cell
                logger.info(
                    "cell %s was run with other settings; %s", path.name, "re-running it" if train else "left out"
                )
            except json.JSONDecodeError:
                logger.warning("cell %s is unreadable; %s", path, "re-running it" if train else "left out")
        if not train:
            return None
        images, poison_seconds, poison_report = self.poisoned(poison)
        start = time.perf_counter()
        if defense.prepare is not None:
            images = defense.prepare(images, self.labels)
        prepare_seconds = time.perf_counter() - start
        recipe = self.recipe
        work = self.cache / "training" / key  # the training's per-epoch state: an interrupted cell resumes
        labels = self.labels
        if defense.clean_images:
            images, labels = self._with_clean_images(images, defense.clean_images, defense.clean_repeat)
        if defense.adversarial_epsilon:
            recipe = dataclasses.replace(
                recipe,
                adversarial_epsilon=defense.adversarial_epsilon,
                adversarial_steps=defense.adversarial_steps,
                adversarial_epochs=defense.adversarial_epochs,
            )
        if defense.worst_of > 1:
            recipe = dataclasses.replace(recipe, worst_of=defense.worst_of)
        result = train_classifier(
            images,
            labels,
            self.test_images,
            self.test_labels,
            recipe,
            epoch_transform=defense.epoch_transform,
            seed=self.config.seed,
            progress=self.config.progress,
            desc=f"{poison}/{defense_name}",
            device=self.config.device,
            checkpoint=work,
        )
        cell = {
            "poison": poison,
            "defense": defense_name,
            "test_accuracy": result["test_accuracy"],
            "train_accuracy": result["train_accuracy"],
            "key": key,
            "tier": self.config.tier,
            "recipe": recipe.to_dict(),
            "defense_options": defense.options,
            "poison_report": poison_report,
            **({"poison_overrides": parse_poison(poison)[1]} if "[" in poison else {}),
            "seed": self.config.seed,
            "train_images": len(labels),
            **self.test_info,
            "seconds": {
                "poison": poison_seconds,
                "defense_prepare": prepare_seconds,
                "train": result["train_seconds"],
            },
            "train_images_per_second": result["images_per_second"],
            "parameters": result["parameters"],
            "version": __version__,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {hardware_name(self.config.device)}, {self.config.device}",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        self._set_aside(path, key)
        atomic_write_json(path, cell)
        discard_work(work)
        logger.info("%s / %s: test accuracy %.4f", poison, defense_name, cell["test_accuracy"])
        return cell


def run_bench(config: BenchConfig, *, train: bool = True) -> dict[str, Any]:
    """Run (or resume) every cell of ``config`` and write results.json, table.md and chart.png.

    A training run adds its rows and columns to the folder's table: the outputs cover this run's poisons and
    defenses after those of the folder's earlier runs of the same tier (their ``bench_config.json``), with every
    cell that was run with these settings, so filling a table one row or column at a time keeps the rest of it.
    The outputs are rewritten after every cell, re-reading ``bench_config.json``, so runs side by side in one
    folder keep each other's entries.

    Args:
        config: the bench run.
        train: ``False`` trains nothing: the outputs tabulate exactly ``config``'s poisons and defenses, from the
            cells already in ``cells/`` that were run with its settings (the others show as missing).

    Returns:
        the results dictionary written to ``results.json``.
    """
    if train and torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r}, but torch sees no CUDA device here; use --device cpu.")
    _check_output_dir(Path(config.output_dir).expanduser())
    run = _Run(config)
    run.out.mkdir(parents=True, exist_ok=True)
    results = _publish(run, config, merge=train)
    if train:
        done = {(c["poison"], c["defense"]) for c in results["cells"]}  # finished with these settings: not retrained
        for poison in _columns(config):
            for defense in config.defenses:
                if (poison, defense) not in done and run.run_cell(poison, defense) is not None:
                    results = _publish(run, config, merge=True)  # after every new cell, so a long run shows progress
    return results


def _check_output_dir(out: Path) -> None:
    """Refuse, before any work, a folder the bench did not write: its outputs would replace the files there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} is a file; pass a folder (a new one, or an earlier run's).")
    if out.is_dir() and any(out.iterdir()) and not (out / BENCH_CONFIG).is_file():
        raise FileExistsError(
            f"output_dir {str(out)!r} holds files the bench did not write (it has no {BENCH_CONFIG}); the bench "
            "writes results.json, table.md, chart.png and cells/ there and would replace files of those names. "
            "Pick a new folder, or an earlier bench run's."
        )


def _columns(config: BenchConfig) -> list[str]:
    return ([CLEAN] if config.clean else []) + list(config.poisons)


def _earlier(out: Path) -> BenchConfig | None:
    """The settings of the folder's earlier runs; ``None`` if there are none, or none this version can read."""
    try:
        return BenchConfig.from_dict(json.loads((out / BENCH_CONFIG).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _layout(config: BenchConfig, earlier: BenchConfig | None) -> BenchConfig:
    """``config`` with the poisons, defenses and clean column of the folder's earlier runs of the same tier first."""
    if earlier is None or earlier.tier != config.tier:
        return config
    return dataclasses.replace(
        config,
        poisons=tuple(dict.fromkeys(earlier.poisons + config.poisons)),
        defenses=tuple(dict.fromkeys(earlier.defenses + config.defenses)),
        clean=earlier.clean or config.clean,
    )


def _publish(run: _Run, config: BenchConfig, *, merge: bool) -> dict[str, Any]:
    """Tabulate the finished cells of the folder's layout and write bench_config.json and the outputs."""
    earlier = _earlier(run.out)
    if merge:
        layout = _layout(config, earlier)
    elif config.cache_dir is None and earlier is not None:
        # a report trains nothing and reads no cache: the cells came from the earlier runs, whose cache is the one
        # to record (not None, which would say "the default cache")
        layout = dataclasses.replace(config, cache_dir=earlier.cache_dir)
    else:
        layout = config
    # the table's settings; not ``progress``, a run-time option that would flip the files with --no-progress
    settings = {k: v for k, v in layout.to_dict().items() if k != "progress"}
    atomic_write_json(run.out / BENCH_CONFIG, settings)
    results: dict[str, Any] = {
        "config": settings,
        "tier": {"name": layout.tier, "about": TIERS[layout.tier].about},
        "recipe": run.recipe.to_dict(),
        "columns": _columns(layout),
        "defenses": list(layout.defenses),
        "cells": [],
        "version": __version__,
    }
    for poison in results["columns"]:
        for defense in layout.defenses:
            cell = run.run_cell(poison, defense, train=False)
            if cell is not None:
                results["cells"].append(cell)
    _write_outputs(results, run.out)
    return results


def _write_outputs(results: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "results.json", results)
    write_table(results, out / "table.md")
    write_chart(results, out / "chart.png")
