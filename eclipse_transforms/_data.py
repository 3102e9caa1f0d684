"""Reading image collections from disk: an .npz of uint8 images, a torchvision CIFAR root, or an ImageFolder.

Used by the CLI and the trainer; the library's transforms never touch the disk.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ._images import as_index

__all__ = ["ImageSet", "load_image_set", "load_indices", "find_cifar_root"]

NPZ_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}


@dataclass
class ImageSet:
    """uint8 images ``(N, 3, H, W)``, int64 labels ``(N,)`` (or None), and what they were read from."""

    images: torch.Tensor
    labels: torch.Tensor | None
    kind: str  # "npz", "cifar" or "folder"
    files: list[str] | None = None  # ImageFolder paths, relative to the root
    classes: list[str] | None = None


def find_cifar_root(path: Path) -> Path | None:
    """The folder that holds ``cifar-10-batches-py`` (torchvision's ``root``), or None."""
    if (path / "cifar-10-batches-py").is_dir():
        return path
    if path.name == "cifar-10-batches-py" and path.is_dir():
        return path.parent
    return None


def _as_nchw(images: np.ndarray, name: str) -> torch.Tensor:
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must hold uint8 images, got dtype {images.dtype}.")
    if images.ndim == 3 or (images.ndim == 4 and 1 in (images.shape[-1], images.shape[1])):
        raise ValueError(
            f"{name} holds grayscale images (shape {images.shape}); purification needs RGB images (N, H, W, 3) or "
            "(N, 3, H, W): repeat the channel three times first (e.g. np.repeat(x.reshape(n, h, w, 1), 3, axis=-1))."
        )
    if images.ndim != 4 or 3 not in (images.shape[-1], images.shape[1]):
        raise ValueError(f"{name} must have shape (N, H, W, 3) or (N, 3, H, W), got {images.shape}.")
    t = torch.from_numpy(np.ascontiguousarray(images))
    return t.permute(0, 3, 1, 2).contiguous() if images.shape[-1] == 3 else t


def _as_labels(labels: np.ndarray, name: str, num_images: int) -> torch.Tensor:
    """int64 labels, one per image; floats only when whole numbers (nothing is silently truncated)."""
    if labels.ndim != 1 or len(labels) != num_images:
        raise ValueError(f"{name} must hold one label per image ({num_images}), got shape {labels.shape}.")
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must hold integer class indices, got dtype {labels.dtype}"
            + (f" (e.g. {labels[labels != np.round(labels)][0].item()!r})" if labels.dtype.kind == "f" else "")
            + "; labels are never rounded or truncated."
        )
    return torch.from_numpy(labels.astype(np.int64))


def _load_npz(path: Path, split: str) -> ImageSet:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is not a readable .npz archive ({type(e).__name__}); pass an .npz written by numpy.savez "
            "with uint8 images under 'images' (and 'labels'), or a folder."
        ) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single .npy array, not an .npz archive; save it with numpy.savez.")
    with archive as z:
        keys = set(z.files)
        for x_key, y_key in (NPZ_KEYS.get(split, ("", "")), ("images", "labels"), ("x", "y")):
            if x_key in keys:
                images = _as_nchw(z[x_key], f"{path}:{x_key}")
                labels = _as_labels(z[y_key], f"{path}:{y_key}", len(images)) if y_key in keys else None
                return ImageSet(images, labels, "npz")
    raise ValueError(
        f"{path} has no image array: expected key 'images' (and 'labels'), or x_{split}/y_{split}; "
        f"found {sorted(keys)}."
    )


def _read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 ``(H, W, 3)``, converted to RGB as torchvision's ``ImageFolder`` does (grayscale,
    palette, CMYK, alpha dropped); images of more than 8 bits a channel are refused, not clipped."""
    with PIL.Image.open(path) as im:
        if im.mode.startswith(("I", "F")):
            raise ValueError(
                f"{path} is a {im.mode!r} image (more than 8 bits a channel), which converting to 8-bit RGB would "
                "clip; scale it to 8 bits first."
            )
        return np.array(im.convert("RGB"))


class FolderImages(torch.utils.data.Dataset):
    """An ImageFolder tree read one image at a time: ``(uint8 (3, H, W) tensor, label)`` items, in
    ``torchvision.datasets.ImageFolder``'s order, so memory does not grow with the number of images.

    Images are converted to RGB as ``ImageFolder`` does (8 bits a channel; deeper images are refused) and must be
    of the first image's size; an item that is not raises a ``ValueError`` naming its file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        from torchvision.datasets import ImageFolder

        self.root = Path(root)
        folder = ImageFolder(self.root, loader=PIL.Image.open)
        if not folder.samples:
            raise ValueError(f"{self.root} holds no images.")
        self.samples = folder.samples
        self.classes = folder.classes
        self.files = [os.path.relpath(path, self.root) for path, _ in self.samples]
        self.size = tuple(self._read(0).shape[1:])

    def _read(self, index: int) -> torch.Tensor:
        return torch.from_numpy(_read_rgb(self.samples[index][0])).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._read(index)
        if tuple(image.shape[1:]) != self.size:
            raise ValueError(
                f"images in {self.root} have different sizes ({self.size} and {tuple(image.shape[1:])} for "
                f"{self.samples[index][0]}); resize them to one size first."
            )
        return image, self.samples[index][1]


def _load_folder(root: Path) -> ImageSet:
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(root, loader=PIL.Image.open)
    images, files, sizes = [], [], set()
    for path, _ in folder.samples:
        arr = _read_rgb(path)
        sizes.add(arr.shape[:2])
        if len(sizes) > 1:
            raise ValueError(
                f"images in {root} have different sizes ({sorted(sizes)}); resize them to one size first."
            )
        images.append(arr)
        files.append(os.path.relpath(path, root))
    if not images:
        raise ValueError(f"{root} holds no images.")
    labels = torch.tensor(folder.targets, dtype=torch.int64)
    return ImageSet(_as_nchw(np.stack(images), str(root)), labels, "folder", files, folder.classes)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches only: dicts of bytes, lists and numpy arrays, never arbitrary callables."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_batch(path: Path, keys: tuple[str, ...]) -> dict:
    """A CIFAR-10 batch file as a dict with str keys, holding at least ``keys``, or a ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(
            f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {e}); restore it from the original "
            "cifar-10-python.tar.gz."
        ) from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch file (it holds a {type(batch).__name__}, not a dict).")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{path} is not a CIFAR-10 batch file: it has no {missing} (keys: {sorted(batch)}).")
    return batch


def _load_cifar(folder: Path, split: str) -> ImageSet:
    """torchvision's CIFAR-10 layout (``data_batch_1..5``, ``test_batch``, ``batches.meta``), read without
    torchvision's md5 check, so a re-packed root works too."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}; is it a complete torchvision CIFAR-10 root?")
    parts, labels = [], []
    for n in names:
        batch = _read_batch(folder / n, ("data", "labels"))
        data, ys = np.asarray(batch["data"]), np.asarray(batch["labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or ys.shape != (len(data),):
            raise ValueError(
                f"{folder / n} is not a CIFAR-10 batch file: 'data' must be uint8 (N, 3072) with N labels, got "
                f"{data.dtype} {data.shape} and {ys.shape[0] if ys.ndim else 0} labels."
            )
        parts.append(data.reshape(-1, 3, 32, 32))
        labels.append(_as_labels(ys, f"{folder / n}:labels", len(data)))
    data = np.concatenate(parts)
    classes = None
    if (folder / "batches.meta").is_file():
        meta = _read_batch(folder / "batches.meta", ("label_names",))
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta["label_names"]]
    return ImageSet(torch.from_numpy(data), torch.cat(labels), "cifar", classes=classes)


def load_image_set(source: str | os.PathLike, *, split: str = "train") -> ImageSet:
    """Read images from an ``.npz``, a torchvision CIFAR-10 root, or an ImageFolder tree.

    Args:
        source: path to the ``.npz`` (keys ``images``/``labels`` or ``x_{split}``/``y_{split}``, uint8 HWC or
            CHW), to a folder holding ``cifar-10-batches-py``, or to an ImageFolder root (``class/xxx.png``).
        split: ``"train"`` or ``"test"`` for CIFAR roots and split-keyed .npz files.

    Returns:
        An :class:`ImageSet` with uint8 ``(N, 3, H, W)`` images.
    """
    if split not in NPZ_KEYS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist.")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ValueError(f"data file {path} must be an .npz of uint8 images (or pass a folder).")
        return _load_npz(path, split)
    cifar = find_cifar_root(path)
    if cifar is not None:
        return _load_cifar(cifar / "cifar-10-batches-py", split)
    return _load_folder(path)


def load_indices(path: str | os.PathLike) -> list[int]:
    """Integer indices from a ``.json`` list (or ``{"indices": [...]}``), ``.npy`` or text file (one per line)."""
    p = Path(path).expanduser()
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"indices file {p} is not valid JSON ({e}).") from e
        data = data.get("indices") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise ValueError(f'indices file {p} must hold a JSON list of ints or {{"indices": [...]}}.')
    elif p.suffix == ".npy":
        data = np.load(p, allow_pickle=False).tolist()
    else:
        data = [line for line in p.read_text().split() if line]
    try:
        return [as_index(int(i) if isinstance(i, str) else i, name=f"an index in {p}") for i in data]
    except (TypeError, ValueError) as e:
        raise ValueError(f"indices file {p} must hold integers (never rounded or truncated): {e}") from e
