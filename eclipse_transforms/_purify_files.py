"""Purify an image collection on disk into a new one: the work behind ``eclipse-transforms purify``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from ._cache import atomic_write
from ._data import FolderImages, ImageSet, find_cifar_root, load_image_set
from ._dist import ranks as distributed_ranks
from ._outputs import check_output_location, is_owned, no_space, replace_folder
from .dataset import PurifiedDataset
from .purify import EclipsePurify

__all__ = ["purify_files"]


#: Written into every output folder; ``overwrite=True`` replaces a folder only when it carries this file.
MARKER = ".eclipse-transforms-purify.json"
#: Suffixes of files a user may mean instead of an .npz: such an output is refused, not written as a folder.
FILE_SUFFIXES = {".npy", ".pt", ".pth", ".pkl", ".pickle", ".zip", ".tar", ".gz", ".h5", ".hdf5", ".safetensors"}
FILE_SUFFIXES |= {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".txt", ".json", ".csv"}


def _check_output(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that would lose data; see :mod:`._outputs`."""
    check_output_location(out, name="output", inputs={"data": source})
    if str(out) == "-" or out.suffix.lower() in FILE_SUFFIXES:
        raise ValueError(
            f"output {str(out)!r} is not an .npz file or a folder name; outputs are an .npz file (name it "
            "'something.npz') or a new folder of PNGs (a name without a file suffix)."
        )
    if out.suffix.lower() == ".npz":
        if out.is_dir():
            raise ValueError(f"output {str(out)!r} is a folder, not an .npz file; pass a file name or a new folder.")
    elif out.is_file():
        raise ValueError(
            f"output {str(out)!r} is an existing file; a folder output is a new folder (or one this command wrote), "
            "and an .npz output needs the .npz suffix."
        )
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"output {str(out)!r} exists; pass --overwrite to replace it.")
    if out.is_dir() and not is_owned(out, MARKER):
        raise FileExistsError(
            f"output {str(out)!r} is a folder that `eclipse-transforms purify` did not write (it has no {MARKER}); "
            "--overwrite only replaces the command's own outputs. Pick a new folder, or empty this one yourself."
        )


def _remove_leftovers(out: Path) -> None:
    """Delete staging and replaced folders that a killed run of this command left beside ``out`` (marked ones
    only, and never one whose process still runs)."""
    for path in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = path.name.rsplit("-", 1)[-1]
        if ".partial-" in path.name and pid.isdigit() and _is_running(int(pid)):
            continue
        if path.is_dir() and is_owned(path, MARKER):
            shutil.rmtree(path, ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _folder_names(data: ImageSet | FolderImages, labels: torch.Tensor) -> list[str]:
    """The relative path of every image in a folder output; labels become class folders, checked first."""
    if data.files:
        return [str(Path(f).with_suffix(".png")) for f in data.files]
    bad = labels[labels < 0] if data.classes is None else labels[(labels < 0) | (labels >= len(data.classes))]
    if len(bad):
        allowed = "non-negative" if data.classes is None else f"in [0, {len(data.classes)}) (the input's classes)"
        raise ValueError(
            f"a folder output names class folders by label, and labels must be {allowed}; the input has label "
            f"{int(bad[0])}. Write an .npz output instead, or fix the labels."
        )
    names = data.classes or [str(c) for c in range(int(labels.max()) + 1)]
    return [f"{names[int(y)]}/{i:05d}.png" for i, y in enumerate(labels)]


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
    num_workers: int = 0,
) -> Path:
    """Purify (stages 1 and 2) every image of ``source`` and write them to ``output``.

    The work goes through :class:`PurifiedDataset`'s cache, so an interrupted run resumes where it stopped. The
    output appears whole or not at all: it is written beside its final name and renamed into place.

    Args:
        source: an ImageFolder root, a torchvision CIFAR-10 root, or an ``.npz`` of uint8 images.
        output: an ``.npz`` (keys ``images``, NHWC uint8, and ``labels`` where the input has labels, whatever
            the input's keys: a split-keyed input's ``x_train`` comes out as ``images``), or a folder,
            written as an ImageFolder tree of PNGs (the input's relative paths for an ImageFolder input; else
            one folder per class, named by the input's class names or by the label).
        purify: the settings; its compensation is not applied (that is a training-time, per-epoch stage).
        split: the split of a CIFAR root or split-keyed .npz.
        batch_size, cache_dir, progress, num_workers: as in :class:`PurifiedDataset`. An ImageFolder input is
            read one image at a time (by ``num_workers`` DataLoader workers), so a folder-to-folder run holds a
            shard of images at a time, not the dataset; an ``.npz`` output is one array, the output's size.
        overwrite: replace an existing ``output`` that this function wrote (a folder is replaced only when it
            holds the marker file every output folder gets). Never the current folder, an input, or a folder
            that holds one of them.

    Returns:
        The output path.

    Raises:
        ValueError: ``output`` would replace or contain the input or the current folder, or a folder output
            cannot name class folders by the labels.
        FileExistsError: ``output`` exists and ``overwrite`` is False, or it is a folder this function did not
            write.
    """
    out = Path(output).expanduser()
    src = Path(source).expanduser()
    _check_output(out, src, overwrite)
    if src.is_dir() and find_cifar_root(src) is None:
        # An ImageFolder tree is read one image at a time (by num_workers DataLoader workers), never held whole.
        folder = FolderImages(src)
        labels = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
        data: FolderImages | ImageSet = folder
        source_dataset: Dataset = folder
    else:  # an .npz or a CIFAR-10 root: arrays, read at once
        arrays = load_image_set(source, split=split)
        labels = arrays.labels if arrays.labels is not None else torch.zeros(len(arrays.images), dtype=torch.int64)
        data, source_dataset = arrays, TensorDataset(arrays.images, labels)
    names = None if out.suffix.lower() == ".npz" else _folder_names(data, labels)
    ds = PurifiedDataset(
        source_dataset,
        purify,
        cache_dir=cache_dir,
        batch_size=batch_size,
        progress=progress,
        num_workers=num_workers,
    )
    ranks = distributed_ranks()
    if ranks is not None and ranks[0] != 0:
        return out  # every rank built its share of the cache; rank 0 writes the output
    out.parent.mkdir(parents=True, exist_ok=True)
    what = f"the output {out} (the purified images are cached: a rerun only writes)"
    if out.suffix.lower() == ".npz":  # one array: the output's size in memory
        images = torch.stack([ds.purified(i) for i in range(len(ds))])
        columns: dict[str, Any] = {"images": images.permute(0, 2, 3, 1).numpy()}
        if isinstance(data, FolderImages) or data.labels is not None:
            columns["labels"] = labels.numpy()
        try:
            atomic_write(out, lambda f: np.savez(f, **columns))
        except OSError as e:
            raise no_space(e, what) from e
        return out
    assert names is not None  # a folder output: the .npz one has returned
    _remove_leftovers(out)
    staged = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        staged.mkdir()
        (staged / MARKER).write_text(json.dumps({"source": str(src.resolve()), "purify": repr(purify)}) + "\n")
        for i in tqdm(range(len(ds)), desc="write", disable=not progress, unit="img"):
            path = staged / names[i]
            path.parent.mkdir(parents=True, exist_ok=True)
            F.to_pil_image(ds.purified(i)).save(path)
        replace_folder(staged, out)
    except BaseException as e:
        shutil.rmtree(staged, ignore_errors=True)  # the staging folder is this call's own
        if isinstance(e, OSError):
            raise no_space(e, what) from e
        raise
    return out
