"""Resolve a ``pretrained`` argument (local folder or Hugging Face Hub repo id) to a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download, try_to_load_from_cache

# huggingface_hub.utils exports the errors in every release the project declares (0.23 to 2.x); .errors only
# has all of them since 0.24.
from huggingface_hub.utils import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

# The files whose presence makes a folder a denoiser (pipeline layout first, then the flat one).
CONFIG_FILES = ("model_index.json", "unet/config.json", "config.json")

# What a denoiser folder may hold; everything else in a Hub repo (images, logs) is not downloaded.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "unet/*.bin", "*.bin"]


def _as_path(cache_dir: str | os.PathLike | None) -> Path | None:
    return None if cache_dir is None else Path(cache_dir)


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision``, found file by file without the Hub.

    Offline, some huggingface_hub releases (1.33 among them) refuse ``snapshot_download`` of a pinned commit
    because they list the repository's tree first; the files are in the cache all the same.
    """
    for filename in CONFIG_FILES:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=_as_path(cache_dir), revision=revision)
        if isinstance(found, str):
            return Path(found).parents[filename.count("/")]
    return None


def resolve_pretrained(
    pretrained: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Return a local folder for ``pretrained``: the folder itself, or a Hub snapshot (downloaded or cached).

    Hub access honours ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` through huggingface_hub. Hub errors
    become one ``OSError`` sentence that says what to do, the way diffusers' ``load_config`` does.
    """
    path = Path(os.fspath(pretrained)).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(pretrained)
    if path.exists():
        raise ValueError(f"pretrained={name!r} is a file; pass the folder that holds the denoiser's config.json.")
    try:
        validate_repo_id(name)  # huggingface_hub's own rules (characters, length, "--" and "..")
    except HFValidationError as e:
        raise ValueError(f"pretrained={name!r} is neither an existing folder nor a valid Hub repo id ({e}).") from e
    if name.count("/") != 1:
        raise ValueError(
            f"pretrained={name!r} is neither an existing folder nor a Hub repo id of the form 'owner/name'."
        )
    # A typo in a local path of the form "runs/ddpm" is read as a Hub id: every message says both.
    local = f"there is no local folder {str(path.resolve())!r}, and "
    try:
        return Path(
            snapshot_download(name, revision=revision, cache_dir=_as_path(cache_dir), allow_patterns=ALLOW_PATTERNS)
        )
    except RepositoryNotFoundError as e:
        raise OSError(
            f"pretrained={name!r}: {local}it is not a repository on the Hugging Face Hub (or it is private and you "
            "are not logged in: run `hf auth login`). Check the folder's path or the repo id."
        ) from e
    except RevisionNotFoundError as e:
        raise OSError(
            f"revision={revision!r} does not exist in {name!r}; pass an existing branch, tag or commit hash."
        ) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        cached = _cached_snapshot(name, revision, cache_dir)
        if cached is not None:
            return cached
        rev = "" if revision is None else f" at revision {revision!r}"
        raise OSError(
            f"pretrained={name!r}{rev}: {local}as a Hub repo id it is not in the local Hub cache and the Hub "
            "cannot be reached (offline, HF_HUB_OFFLINE=1, or no network). Check the folder's path, or download "
            f"the repo once with network access (`hf download {name}`)."
        ) from e
