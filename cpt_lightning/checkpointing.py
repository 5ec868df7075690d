"""Checkpoint files that are either complete or absent.

``AtomicCheckpointIO`` streams the checkpoint into a hidden file beside the target, syncs it to
disk and renames it into place (``cpt_lightning.atomic.write_beside``). A crash or a full disk
during a save never leaves a torn newest checkpoint; the previous one is still there. A failed
write is reported as a one-line error and stops the run: training never continues believing it saved.

Lightning's own save serialises into memory first (a second copy of weights and AdamW moments
in host RAM) and stages the file in ``$TMPDIR``, which copies it across filesystems and blames
the wrong disk when ``$TMPDIR`` fills up; writing beside the target avoids both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cpt_lightning.atomic import write_beside


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-beside, fsync, then rename (name it in ``trainer.plugins``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        def stream(partial: Path) -> None:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)

        write_beside(Path(path), stream, "checkpoint")
