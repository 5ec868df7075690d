"""Locks between cpt processes on the folders they share, held with the kernel's ``flock``.

A lock goes with its process: a killed run leaves none behind. Forked children (loader workers, tokenizers) close
their copies, so the lock is their parent's alone. The folders themselves are locked (no lock file changes what a
folder holds), which guards processes on one machine's local disks: NFS takes no exclusive lock on a folder, and a
file system without flock none at all, so there nothing is guarded.

- One ``cpt fit`` at a time in a run folder: two (the same command in two terminals, a job requeued while its
  first run still ran) both trained and exited 0 while each replaced the other's checkpoints, exports and
  ``last.ckpt``.
- A prepared folder is not replaced while a run reads it: ``cpt prepare --overwrite`` swapped the data under a
  running fit, which read on from deleted chunks and opened new ones under the old index, and whose resume was
  then refused (its data gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

_held: set[int] = set()  # the descriptors of the locks this process holds


def _close_in_child() -> None:
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def try_lock(folder: Path, shared: bool) -> int | bool:
    """The descriptor holding ``folder``'s lock (shared, or this process's alone), False when another process holds
    it against this one, True when the file system has no locks (nothing is held: nothing to release)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder this user may enter but not list (mode 0711): its files still read by name
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:  # no flock here (NFS refuses an exclusive one on a folder: EBADF)
        os.close(fd)
        return True
    _held.add(fd)
    return fd


def release(lock: int | bool | None) -> None:
    if not isinstance(lock, bool) and lock in _held:
        _held.discard(lock)
        os.close(lock)


def release_all(locks: list[int | bool]) -> None:
    """Release each lock and empty the list."""
    for lock in locks:
        release(lock)
    locks.clear()


def lock_run_folder(folder: Path) -> tuple[int | bool, str | None]:
    """The run folder's lock for a fit, and the refusal when another fit holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = try_lock(folder, shared=False)
    refusal = None if lock is not False else (
        f"run folder {folder} is in use by another cpt fit, still running: wait for it or stop it (its checkpoints "
        "would be overwritten), or give this run a folder of its own (trainer.logger.init_args.name or version)")
    return lock, refusal


def lock_for_reading(folders: list[Path]) -> list[int | bool]:
    """Shared locks on the prepared folders a run reads; a UserError when one is being prepared again."""
    from cpt_lightning.errors import UserError

    locks = []
    for folder in folders:
        lock = try_lock(folder, shared=True)
        if lock is False:
            release_all(locks)
            raise UserError(f"{folder} is being prepared again (cpt prepare --overwrite): let it finish, then start")
        locks.append(lock)
    return locks


@contextlib.contextmanager
def replacing(folder: Path):
    """``cpt prepare`` holds a prepared folder it replaces (and its holdout) alone while it does; a UserError, before
    any work, while a run reads either."""
    from cpt_lightning.errors import UserError

    locks = []
    try:
        for part in (folder, folder / "holdout"):
            if not part.is_dir():
                continue
            lock = try_lock(part, shared=False)
            if lock is False:
                raise UserError(f"{part} is read by a running cpt fit or cpt validate: replacing it would change the "
                                "data under that run (and leave it unable to resume); stop it first, or prepare into "
                                "another --output")
            locks.append(lock)
        yield
    finally:
        release_all(locks)
