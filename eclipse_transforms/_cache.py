"""A folder of checksummed safetensors shards with a manifest: atomic writes, resumable builds, verified reads.

Layout of one cache entry (``root``)::

    manifest.json               # key, settings, and the sha256 of every complete shard
    shard-00000.safetensors     # {"images": uint8 (n, C, H, W), "labels": int64 (n,)}
    ...

    .lock                       # held by the process that builds the entry (rank 0 in a distributed build)
    .manifest.lock              # held while a shard's checksum is added to the manifest

A shard is written to a temporary file, flushed to disk and renamed into place, then its checksum is recorded
in the manifest (itself replaced atomically). A shard is trusted only when its bytes hash to the recorded
checksum, so a crash at any point leaves either a complete shard or one that is rebuilt; the next build
deletes the temporary files a crash left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import operator
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ._outputs import no_space

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
MANIFEST_LOCK = ".manifest.lock"
# What atomic_write names its temporary files in an entry: ".<name>.<random>.tmp".
_TEMPORARIES = (".shard-*.safetensors.*.tmp", f".{MANIFEST}.*.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; written files get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) to ``path`` all at once or not at all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any, **dumps_options: Any) -> None:
    """``obj`` as JSON text (``indent=2`` unless told otherwise) with a final newline, written atomically."""
    atomic_write(path, (json.dumps(obj, **{"indent": 2, **dumps_options}) + "\n").encode())


class ShardStore:
    """The shards of one cache entry. ``meta`` is what the entry was built from; it is stored in the manifest.

    Builders hold :meth:`lock` while they write, so two processes never build one entry at once; readers take
    no lock and trust a shard only when its bytes match the manifest's checksum.
    """

    def __init__(self, root: Path, num_items: int, shard_size: int, meta: dict[str, Any]) -> None:
        self.root = root
        self.num_items = num_items
        self.shard_size = shard_size
        self.meta = meta
        self.checksums: dict[str, str] = self._read_manifest()

    @staticmethod
    def saved_manifest(root: Path) -> Any:
        """The parsed manifest in ``root`` (``None`` if there is none); raises ``ValueError`` if it is unreadable."""
        path = root / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cache manifest {path} is unreadable ({e})") from e

    @staticmethod
    def made_with(saved: Any, meta: dict[str, Any]) -> bool:
        """Whether a parsed manifest (:meth:`saved_manifest`) was written for an entry built from ``meta``."""
        return isinstance(saved, dict) and saved.get("meta") == meta

    def _read_manifest(self) -> dict[str, str]:
        """The checksums of the manifest on disk; anything unreadable or built from other settings counts as none
        (its shards are rebuilt), never as an error that would stop every later open."""
        path = self.root / MANIFEST
        try:
            saved = self.saved_manifest(self.root)
        except ValueError as e:
            logger.warning("%s; rebuilding", e)
            return {}
        if saved is None:
            return {}
        if not self.made_with(saved, self.meta):
            logger.warning("cache manifest %s does not match these settings; rebuilding", path)
            return {}
        shards = saved.get("shards")
        if not isinstance(shards, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in shards.items()
        ):
            logger.warning("cache manifest %s has no valid 'shards' table; rebuilding", path)
            return {}
        return {k: v for k, v in shards.items() if int(k) < self.num_shards}

    def reload(self) -> None:
        """Read the manifest again (another process may have written shards since)."""
        self.checksums = self._read_manifest()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the entry's build lock; waits (and says so) while another process builds it."""
        lock = FileLock(self.root / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.warning("another process is building the cache %s; waiting for it to finish", self.root)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def prepare_build(self) -> list[int]:
        """The shards to build, after reading the manifest again (a process that held the lock may have written
        some) and deleting the temporary files a killed build left. Call while holding :meth:`lock`."""
        self.reload()
        for path in [p for pattern in _TEMPORARIES for p in self.root.glob(pattern)]:
            logger.info("removing %s, left by an interrupted build", path)
            path.unlink(missing_ok=True)
        return self.missing()

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
        try:
            atomic_write(self.shard_path(i), data)
            # Several processes (the ranks of a distributed build) may add shards to one manifest: each adds its
            # own to what is on disk, one at a time.
            with FileLock(self.root / MANIFEST_LOCK):
                checksums = {**self._read_manifest(), str(i): hashlib.sha256(data).hexdigest()}
                manifest = {
                    "meta": self.meta,
                    "num_items": self.num_items,
                    "shard_size": self.shard_size,
                    "shards": checksums,
                }
                atomic_write_json(self.root / MANIFEST, manifest, indent=1, sort_keys=True)
            self.checksums = checksums
        except OSError as e:
            raise no_space(
                e,
                f"shard {i} of the cache {self.root} (the shards already written are kept; "
                "pass another cache_dir or set ECLIPSE_TRANSFORMS_CACHE to move the cache)",
            ) from e

    def read(self, i: int) -> dict[str, torch.Tensor]:
        """Load shard ``i``, refusing bytes that do not match the manifest's checksum."""
        i = operator.index(i)
        data = self.shard_path(i).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.checksums.get(str(i)):
            self.reload()  # another process may have rebuilt the shard since this one verified it
            if digest != self.checksums.get(str(i)):
                raise RuntimeError(
                    f"cache shard {self.shard_path(i)} changed on disk since it was verified; construct the "
                    "PurifiedDataset again to rebuild it."
                )
        return st_load(data)
