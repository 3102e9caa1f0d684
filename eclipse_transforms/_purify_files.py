"""Purify an image collection on disk into a new one: the work behind ``eclipse-transforms purify``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from ._data import load_image_set
from .dataset import PurifiedDataset
from .purify import EclipsePurify

__all__ = ["purify_files"]


def purify_files(
    source: str | os.PathLike,
    output: str | os.PathLike,
    purify: EclipsePurify,
    *,
    split: str = "train",
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Purify (stages 1 and 2) every image of ``source`` and write them to ``output``.

    The work goes through :class:`PurifiedDataset`'s cache, so an interrupted run resumes where it stopped.

    Args:
        source: an ImageFolder root, a torchvision CIFAR-10 root, or an ``.npz`` of uint8 images.
        output: an ``.npz`` (keys ``images`` NHWC uint8 and ``labels``, or the input's split keys), or a folder,
            written as an ImageFolder tree of PNGs (the input's relative paths for an ImageFolder input).
        purify: the settings; its compensation is not applied (that is a training-time, per-epoch stage).
        split: the split of a CIFAR root or split-keyed .npz.
        batch_size, cache_dir, progress: as in :class:`PurifiedDataset`.
        overwrite: replace an existing ``output``.

    Returns:
        The output path.
    """
    out = Path(output).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} exists; pass --overwrite to replace it.")
    data = load_image_set(source, split=split)
    labels = data.labels if data.labels is not None else torch.zeros(len(data.images), dtype=torch.int64)
    ds = PurifiedDataset(
        TensorDataset(data.images, labels), purify, cache_dir=cache_dir, batch_size=batch_size, progress=progress
    )
    images = torch.stack([ds.purified(i) for i in range(len(ds))])
    if out.suffix == ".npz":
        arrays = {"images": images.permute(0, 2, 3, 1).numpy()}
        if data.labels is not None:
            arrays["labels"] = data.labels.numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
        return out
    if out.exists():
        shutil.rmtree(out)
    classes = data.classes or [str(c) for c in sorted(set(labels.tolist()))]
    for i in tqdm(range(len(images)), desc="write", disable=not progress, unit="img"):
        rel = data.files[i] if data.files else f"{classes[int(labels[i])]}/{i:05d}.png"
        path = (out / rel).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        F.to_pil_image(images[i]).save(path)
    return out
