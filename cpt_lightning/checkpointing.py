"""Checkpoint files that are either complete or absent.

``AtomicCheckpointIO`` streams the checkpoint into a hidden file beside the target, syncs it to
disk and renames it into place (atomic on POSIX), then syncs the folder so the rename itself
survives a power loss. A crash or a full disk during a save never leaves a torn newest
checkpoint; the previous one is still there. A failed write is reported as a one-line error and
stops the run: training never continues believing it saved.

Lightning's own save serialises into memory first (a second copy of weights and AdamW moments
in host RAM) and stages the file in ``$TMPDIR``, which copies it across filesystems and blames
the wrong disk when ``$TMPDIR`` fills up; writing beside the target avoids both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cpt_lightning.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-beside, fsync, then rename (name it in ``trainer.plugins``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
            sync_folder(path.parent)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise UserError(
                f"could not write checkpoint {path} ({err.strerror or err}); the previous checkpoint is intact"
            ) from err


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
