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

import warnings
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cpt_lightning.atomic import hidden_beside, remove_abandoned_partials, write_beside
from cpt_lightning.export import DCP_METADATA, LIGHTNING_EXTRA, zip_damage


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-beside, fsync, then rename (name it in ``trainer.plugins``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        def stream(partial: Path) -> None:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)

        write_beside(Path(path), stream, "checkpoint")


def restore_interrupted_replacements(folder: Path) -> None:
    """Put back the checkpoints of ``folder`` that a sharded save was replacing when it was killed mid-rename.

    Where names cannot be exchanged (``atomic.replace_folder``: NFS), ``FSDP2.save_checkpoint`` publishes a folder
    by moving the previous one aside (``.NAME.old``) and renaming the new one (``.NAME.partial``, whole by then)
    into place. A kill between the two renames left no ``NAME``:
    ``--ckpt_path last`` found nothing and Lightning started the run afresh. The new save is restored when it
    is whole (Lightning's ``meta.pt``, written after every shard, loads), otherwise the previous one. Every rank
    may call this before it looks for ``last``: the first rename restores ``NAME``, the others find it there.
    """
    for old in sorted(folder.glob(".*.ckpt.old")):
        out = old.with_name(old.name[1:-len(".old")])
        restored = replacement_to_restore(out)
        if restored is None:
            continue  # a leftover beside a published NAME: the next save of NAME removes it
        try:
            restored.rename(out)
        except OSError:
            if not out.exists():
                raise
            continue  # another rank restored it first
        which = "the one it was replacing" if restored == old else "the save that was replacing it"
        warnings.warn(f"{out}: a save was killed between moving the previous one aside and renaming the new one "
                      f"into place; restored {which} ({restored.name})", stacklevel=2)


def remove_abandoned_saves(folder: Path) -> None:
    """Delete the hidden ``.NAME.ckpt.partial`` of saves killed mid-write: a whole checkpoint each (1.7 GiB for
    ModernBERT-base), kept for good and left out of the disk check. A replacement killed between its renames is put
    back first: its new save may be the one to restore."""
    restore_interrupted_replacements(folder)
    remove_abandoned_partials(folder, "*.ckpt")


def replacement_to_restore(out: Path) -> Path | None:
    """What stands for ``out`` after a sharded save was killed between its renames: the new save when it is whole
    (Lightning's ``meta.pt``, written after every shard, loads), else the previous one; None when ``out`` exists
    or no save was replacing it."""
    old, new = hidden_beside(out, "old"), hidden_beside(out, "partial")
    if out.exists() or not old.exists():
        return None
    return new if _whole_sharded_checkpoint(new) else old


def damage(path: Path) -> str | None:
    """What is wrong with a saved checkpoint, from its files alone (no tensor loaded), or None when it looks whole: a
    ``.ckpt`` file that is no zip archive (torch.save's format) or whose bytes fail their CRC (``zip_damage``), a
    sharded folder whose ``meta.pt`` does not load or whose shards are missing or shorter than ``.metadata`` says (a
    copy cut short, a file system fault)."""
    import zipfile

    if path.is_file():
        return zip_damage(path) if zipfile.is_zipfile(path) else "not a whole PyTorch checkpoint (cut short or damaged)"
    if not _whole_sharded_checkpoint(path):
        return f"a sharded checkpoint without a whole {DCP_METADATA} and {LIGHTNING_EXTRA} (cut short or damaged)"
    import torch.distributed.checkpoint as dcp

    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data.values()
    except Exception as err:  # garbled .metadata
        return f"a sharded checkpoint whose {DCP_METADATA} cannot be read ({type(err).__name__})"
    needed: dict[str, int] = {}
    for item in storage:
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    short = sorted(name for name, size in needed.items()
                   if not (path / name).is_file() or (path / name).stat().st_size < size)
    return f"a sharded checkpoint with shards missing or cut short ({', '.join(short)})" if short else None


def _whole_sharded_checkpoint(path: Path) -> bool:
    if not (path / DCP_METADATA).is_file():
        return False
    try:
        torch.load(path / LIGHTNING_EXTRA, map_location="cpu", weights_only=False)
    except Exception:  # missing, or torn by a kill while it was written: the save did not finish
        return False
    return True
