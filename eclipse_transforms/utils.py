"""Public tools that the bench, the benchmark scripts and your own measurement scripts share.

The library keeps its implementation in private modules; what a script outside it may rely on is here, in the
manner of ``timm.utils`` and ``diffusers.utils``: writing files all at once, seeds derived from names, digests
of arrays and files, rounding to uint8, reading image sets, and saying which hardware a timing came from.

    >>> from eclipse_transforms.utils import derive_seed, quantize
    >>> derive_seed("tap", 0) == derive_seed("tap", 0) != derive_seed("tap", 1)
    True
    >>> quantize(torch.tensor([0.0, 0.5, 1.0]))
    tensor([  0, 128, 255], dtype=torch.uint8)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ._cache import ShardStore, atomic_write, atomic_write_json
from ._data import ImageSet, load_image_set, load_indices
from ._demo import generated_images
from ._images import content_generators, derive_seed, index_generators, keeps_global_rng, quantize
from ._machine import hardware_name

__all__ = [
    "ImageSet",
    "ShardStore",
    "array_digest",
    "atomic_write",
    "atomic_write_json",
    "content_generators",
    "derive_seed",
    "file_digest",
    "generated_images",
    "hardware_name",
    "index_generators",
    "keeps_global_rng",
    "load_image_set",
    "load_indices",
    "portable_path",
    "quantize",
]


def array_digest(array: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (hex) of an array's bytes in C order: two arrays with equal dtype, shape order and values match.

    >>> array_digest(np.zeros(3, np.uint8)) == array_digest(torch.zeros(3, dtype=torch.uint8))
    True
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def portable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` as a record that means the same on another machine: relative to ``root`` (default: the working
    directory) when it lies inside it or beside it (one ``..``), else only its file name.

    >>> portable_path("/data/repo/weights/w.json", root="/data/repo")
    'weights/w.json'
    >>> portable_path("/data/shared/cifar10.npz", root="/data/repo")
    '../shared/cifar10.npz'
    >>> portable_path("/somewhere/else/entirely/cifar10.npz", root="/data/repo")
    'cifar10.npz'
    >>> portable_path("weights/w.json")  # already relative: kept
    'weights/w.json'
    """
    path = Path(path).expanduser()
    if not path.is_absolute():
        return str(path)
    relative = Path(os.path.relpath(path, Path(root).expanduser().absolute() if root else Path.cwd()))
    return str(relative) if relative.parts.count("..") <= 1 else path.name


def file_digest(path: str | os.PathLike, length: int = 64) -> str:
    """SHA-256 (hex, the first ``length`` characters) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
