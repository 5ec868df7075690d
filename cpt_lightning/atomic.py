"""Files and folders that are either complete or absent: written beside their target, renamed into place.

A crash, a full disk or a preemption during a write leaves the previous version where it was, so a
checkpoint, a run config, prepared data or an export is never read half-written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from cpt_lightning.errors import UserError


def write_beside(path: Path, write: Callable[[Path], None], what: str) -> None:
    """``write`` a hidden ``.NAME.partial`` beside ``path``, fsync it, rename it into place, fsync the folder.

    The folder sync makes the rename itself survive a power loss. A failed write (full disk,
    permissions) removes the partial file and raises a one-line UserError naming ``what`` and ``path``.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
        _sync_folder(path.parent)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(f"could not write the {what} {path} ({err.strerror or err}); the previous {what} is intact") from err


def replace_folder(ready: Path, out: Path) -> None:
    """Rename the finished folder ``ready`` to ``out``.

    An earlier ``out`` is moved aside first and deleted only once ``ready`` is in place; if that rename
    fails, it is moved back. (A ``.NAME.old`` left by a crash between the two renames is dropped first.)
    """
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    try:
        ready.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
