"""Checkpoint files that are either complete or absent.

``AtomicCheckpointIO`` writes next to the target and renames into place (atomic on POSIX), so a
crash or a full disk during a save never leaves a torn newest checkpoint; the previous one is
still there. A failed write is reported as a one-line error and stops the run: training never
continues believing it saved.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cpt_lightning.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-then-rename (name it in ``trainer.plugins``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise UserError(
                f"could not write checkpoint {path} ({err.strerror or err}); the previous checkpoint is intact"
            ) from err
