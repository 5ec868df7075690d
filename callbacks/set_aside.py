"""Move what a later point of a run saved out of the way when a run starts again from an earlier point.

A run started from step S (a rollback to an earlier checkpoint, a kill between two saves of an older version, or a
branch off another run's checkpoint into that run's folders) would overwrite or mix with files
saved after S under the same names. Those are kept, not deleted: a rollback may want them back,
and a branch may be sharing the parent's folders by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from cpt_lightning.atomic import unused_path

BRANCH_HINT = "(a branch off another run's checkpoint wants a run folder of its own: another trainer.logger.init_args.name)"


def set_aside(later: list[Path], folder: Path, step: int, what: str,
              moved: Callable[[Path, Path], None] | None = None) -> str | None:
    """Move ``later`` (files or folders in ``folder``) into a new ``after-step{S}-set-aside`` subfolder, with a
    warning naming them; a second start from S gets ``…-set-aside-2``; ``moved(old, new)`` follows each move.
    Returns why they could not be moved, for every rank to stop on, or None."""
    if not later:
        return None
    aside = unused_path(lambda suffix: folder / f"after-step{step:09d}-set-aside{suffix}")
    names = ", ".join(sorted(path.name for path in later))
    try:
        aside.mkdir()
        for path in later:
            path.rename(aside / path.name)
            if moved is not None:
                moved(path, aside / path.name)
    except OSError as err:
        return (f"could not move the {what} ({names}) to {aside} ({err.strerror or err}): "
                "move or delete them, then resume again")
    rank_zero_warn(f"resumed at step {step} beside {len(later)} {what} ({names}): moved to {aside}; "
                   f"delete them when unneeded {BRANCH_HINT}")
    return None
