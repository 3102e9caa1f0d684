"""A folder of checksummed safetensors shards with a manifest: atomic writes, resumable builds, verified reads.

Layout of one cache entry (``root``)::

    manifest.json               # key, settings, and the sha256 of every complete shard
    shard-00000.safetensors     # {"images": uint8 (n, C, H, W), "labels": int64 (n,)}
    ...

A shard is written to a temporary file, flushed to disk and renamed into place, then its checksum is recorded
in the manifest (itself replaced atomically). A shard is trusted only when its bytes hash to the recorded
checksum, so a crash at any point leaves either a complete shard or one that is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; written files get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_umask()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, obj: Any, **dumps_options: Any) -> None:
    """``obj`` as JSON text (``indent=2`` unless told otherwise) with a final newline, written atomically."""
    _atomic_write(path, (json.dumps(obj, **{"indent": 2, **dumps_options}) + "\n").encode())


class ShardStore:
    """The shards of one cache entry. ``meta`` is what the entry was built from; it is stored in the manifest."""

    def __init__(self, root: Path, num_items: int, shard_size: int, meta: dict[str, Any]) -> None:
        self.root = root
        self.num_items = num_items
        self.shard_size = shard_size
        self.meta = meta
        self.checksums: dict[str, str] = {}
        manifest = root / MANIFEST
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
                if saved.get("meta") == meta:
                    self.checksums = dict(saved.get("shards", {}))
                else:
                    logger.warning("cache manifest %s does not match these settings; rebuilding", manifest)
            except (json.JSONDecodeError, AttributeError):
                logger.warning("cache manifest %s is unreadable; rebuilding", manifest)

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.safetensors"

    def shard_range(self, i: int) -> range:
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_items))

    def is_valid(self, i: int) -> bool:
        path, expected = self.shard_path(i), self.checksums.get(str(i))
        if expected is None or not path.is_file():
            return False
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            logger.warning("cache shard %s does not match its checksum; it will be rebuilt", path)
            return False
        return True

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.is_valid(i)]

    def write(self, i: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        expected = len(self.shard_range(i))
        if images.shape[0] != expected or labels.shape[0] != expected:
            raise RuntimeError(f"shard {i} must hold {expected} items, got {images.shape[0]}.")
        data = st_save({"images": images.contiguous(), "labels": labels.contiguous()})
        _atomic_write(self.shard_path(i), data)
        self.checksums[str(i)] = hashlib.sha256(data).hexdigest()
        manifest = {
            "meta": self.meta,
            "num_items": self.num_items,
            "shard_size": self.shard_size,
            "shards": self.checksums,
        }
        _atomic_write_json(self.root / MANIFEST, manifest, indent=1, sort_keys=True)

    def read(self, i: int) -> dict[str, torch.Tensor]:
        """Load shard ``i``, refusing bytes that do not match the manifest's checksum."""
        data = self.shard_path(i).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.checksums.get(str(i)):
            raise RuntimeError(
                f"cache shard {self.shard_path(i)} changed on disk since it was verified; construct the "
                "PurifiedDataset again to rebuild it."
            )
        return st_load(data)
