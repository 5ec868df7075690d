"""Where a requeued job goes on from when its run folder's ``last.ckpt`` is not its own.

A start from a checkpoint in its run's own folder (a rollback) finds there the ``last.ckpt`` of the later steps it
rolls back from. It sets that aside only once its first micro-batch has passed every check (``TokenCheckpoint``), so
that a refused rollback changes no file; a job killed before then (a node lost while the model loaded or the
checkpoint restored) and requeued went on from that ``last.ckpt``: the rollback undone without a word. So the start
writes down, in its run folder, the checkpoint it started from and each ``last.ckpt`` as it found it; a requeue that
finds them unchanged (nothing saved since) starts where its job did (``start_checks.requeued_ckpt_path``). The
record is written once the start holds its run folder's lock (``SaveConfigOnceTraining.setup``): a kill before (while
the model loads) leaves none, and that requeue still goes on from the later ``last.ckpt``. A refused start puts back
the record it found (``SaveConfigOnceTraining.on_exception``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from cpt_lightning.atomic import write_beside
from cpt_lightning.errors import UserError

RECORD_NAME = ".start-from-checkpoint.json"
NO_CHECKPOINT_FILE = (None, "last", "hpc")  # no checkpoint, the run's own last.ckpt, Lightning's SLURM checkpoint


def record_the_start(run_folder: Path, ckpt_path, lasts: Iterable[str]) -> str | None:
    """Write the record of a start from ``ckpt_path`` beside the run's ``last.ckpt`` files ``lasts`` (nothing for a
    start from none, or where none is saved yet). Returns why it could not be written, for every rank to stop on."""
    lasts = sorted(lasts)
    if ckpt_path in NO_CHECKPOINT_FILE or not lasts:
        return None
    text = json.dumps(_record(ckpt_path, lasts))
    try:
        write_beside(run_folder / RECORD_NAME, lambda partial: partial.write_text(text), "start record")
    except UserError as err:
        return str(err)
    return None


def held_record(run_folder: Path) -> bytes | None:
    """What the run folder's record holds now (None: no record), for ``put_back_the_record``."""
    record = run_folder / RECORD_NAME
    return record.read_bytes() if record.is_file() else None


def put_back_the_record(run_folder: Path, held: bytes | None) -> None:
    """The record as ``held`` before a start that was refused wrote its own: a refused start changes no file."""
    if held_record(run_folder) == held:
        return
    if held is None:
        (run_folder / RECORD_NAME).unlink(missing_ok=True)
    else:
        write_beside(run_folder / RECORD_NAME, lambda partial: partial.write_bytes(held), "start record")


def saved_nothing_since_the_start(run_folder: Path, ckpt_path, lasts: Iterable[str]) -> bool:
    """Whether the run's latest start from a checkpoint was from ``ckpt_path`` and every ``last.ckpt`` is the one it
    found: a save replaces the file (another inode, another time), so none was saved since."""
    if ckpt_path in NO_CHECKPOINT_FILE:
        return False
    try:
        return json.loads((run_folder / RECORD_NAME).read_text()) == _record(ckpt_path, sorted(lasts))
    except (OSError, ValueError):  # none written, or one a kill cut short: nothing known
        return False


def _record(ckpt_path, lasts: list[str]) -> dict:
    return {"ckpt_path": _location(ckpt_path), "last": {_location(path): _identity(path) for path in lasts}}


def _location(path) -> str:
    """A checkpoint however it is written (relative, through a link); a URL as given."""
    return str(path) if "://" in str(path) else str(Path(path).resolve())


def _identity(path: str) -> list[int]:
    found = os.stat(path)
    return [found.st_ino, found.st_mtime_ns]
