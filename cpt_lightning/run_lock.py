"""One ``cpt fit`` at a time in a run folder.

Two fits in one folder (the same command in two terminals, a job requeued while its first run still ran) both
trained and exited 0 while each replaced the other's checkpoints, exports and ``last.ckpt``, and one could die on
the other's half-written save. The first takes a lock on the folder; a second is refused before it writes there.
The lock is the kernel's (``flock``): it goes with its process, so a killed run leaves none behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_held: dict[int, Path] = {}  # descriptor → folder, of the locks this process holds


def _close_in_child() -> None:
    """A forked loader worker does not keep its parent's lock: closed there, the lock goes with the parent."""
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def lock_run_folder(folder: Path) -> str | None:
    """Take the folder's lock for this process; the refusal when another process holds it, else None (also where
    the file system has no locks: some network ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return (f"run folder {folder} is in use by another cpt fit, still running: wait for it or stop it (its "
                "checkpoints would be overwritten), or give this run a folder of its own "
                "(trainer.logger.init_args.name or version)")
    except OSError:
        os.close(fd)
        return None
    _held[fd] = folder
    return None


def unlock_run_folder(folder: Path) -> None:
    for fd in [fd for fd, held in _held.items() if held == folder]:
        os.close(fd)
        del _held[fd]
