"""Where commands may write, and what ``--overwrite`` may delete: only what the command itself wrote.

Every place that replaces an output goes through here, so that no flag can make the library delete a user's
files: an output that is, or contains, the current folder or one of the command's inputs is refused outright,
and an existing folder is replaced only when it carries the marker file the command writes into its outputs.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = ["check_output_location", "is_owned", "no_space", "replace_folder"]


def _encloses(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_location(
    output: Path, *, name: str, inputs: Mapping[str, str | os.PathLike | None] = {}, inside_ok: tuple[str, ...] = ()
) -> None:
    """Refuse an ``output`` that would overwrite or delete the current folder, the home folder or an input.

    Args:
        output: the output path.
        name: how the user passed it (``"output"``, ``"--output-dir"``), for the message.
        inputs: ``{name: path}`` of everything the command reads; ``None`` values are skipped.
        inside_ok: names of inputs that the output may lie inside (a file input: nothing can lie inside it).

    Raises:
        ValueError: ``output`` equals or contains the current folder, the home folder, the filesystem root or
            an input, or lies inside an input folder (it would become part of that input).
    """
    out = output.expanduser().resolve()
    here = Path.cwd().resolve()
    for what, path in (("the current folder", here), ("your home folder", Path.home().resolve())):
        if _encloses(out, path):
            raise ValueError(
                f"{name} {str(output)!r} is or contains {what} ({path}); replacing it would delete files the "
                "command did not write. Write to a new folder or file instead."
            )
    if out.parent == out:
        raise ValueError(f"{name} {str(output)!r} is the filesystem root; write to a new folder or file instead.")
    for what, given in inputs.items():
        if given is None:
            continue
        src = Path(given).expanduser().resolve()
        if _encloses(out, src):
            raise ValueError(
                f"{name} {str(output)!r} is or contains the input {what} ({src}); writing there would destroy "
                "the input. Write to a new folder or file instead."
            )
        if what not in inside_ok and src in out.parents:
            raise ValueError(
                f"{name} {str(output)!r} lies inside the input {what} ({src}), where it would become part of "
                "that input; write it outside."
            )


def is_owned(folder: Path, marker: str) -> bool:
    """True when ``folder`` carries the ``marker`` file a command writes into every output folder."""
    return (folder / marker).is_file()


def replace_folder(staged: Path, target: Path) -> None:
    """Move the finished folder ``staged`` to ``target``, replacing an earlier ``target`` the caller checked.

    Both renames stay on one filesystem (``staged`` is a sibling of ``target``), so a reader sees either the old
    folder or the new one, never a half-written one; the old folder is deleted only after the new one is in place.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    try:
        staged.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old)


def no_space(e: OSError, what: str) -> OSError:
    """``e`` itself, or for a full disk (or quota) an error that says which write ran out of room."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return e
    return OSError(
        e.errno,
        f"no space left on the device while writing {what}: free some space, or write to a disk "
        "with room, and run again.",
    )
