"""A start refused once Lightning has set up its loggers leaves the run's TensorBoard folder as it was.

Lightning opens each logger's events file before the first setup hook and logs the hyperparameters
before training starts, so checks that need the data or the checkpoint (a source too small for a
micro-batch, a resume with another data order, a fresh run beside an earlier run's checkpoints) ran
after it had written: an events file with the refused config's hyperparameters (TensorBoard listed
it beside the run's), and in a new folder an ``hparams.yaml`` of them that the corrected rerun kept,
since Lightning writes that file only when it is missing.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from cpt_lightning.errors import UserError

EVENTS_PREFIX = "events.out.tfevents."
HPARAMS_FILE = "hparams.yaml"
# What Lightning's TensorBoardLogger writes before training: its hparams-plugin summaries, the placeholder
# ``hp_metric`` -1, and the custom-scalars layout a run sets up; anything else is the run's own.
START_ONLY_PLUGINS = {"hparams", "custom_scalars"}
START_ONLY_TAGS = {"hp_metric"}


@contextmanager
def nothing_logged_if_refused(trainer):
    """Run a ``trainer.fit``/``validate`` in this; on a UserError, remove what it wrote into the TensorBoard folders
    that nothing of a run is in (rank 0, which writes them, only)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    folders = {Path(logger.log_dir): listing(Path(logger.log_dir))
               for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)}
    try:
        yield
    except UserError:
        if trainer.is_global_zero:
            for folder, before in folders.items():
                remove_start_logs(folder, before)
        raise


def listing(folder: Path) -> set[str] | None:
    """The names in ``folder``; None when it does not exist."""
    return {path.name for path in folder.iterdir()} if folder.is_dir() else None


def remove_start_logs(folder: Path, before: set[str] | None) -> None:
    """Remove what appeared in ``folder`` since ``before`` when its events files hold nothing but a start's logs (a
    run stopped after it logged keeps all of it): those files, ``hparams.yaml``, empty folders, and the folder
    itself when it appeared and is left empty."""
    if not folder.is_dir():
        return
    new = [path for path in folder.iterdir() if before is None or path.name not in before]
    if not all(holds_only_a_start(path) for path in new if path.name.startswith(EVENTS_PREFIX)):
        return
    for path in new:
        if path.is_dir() and not any(path.iterdir()):  # the checkpoint folder a callback made ready
            path.rmdir()
        elif path.name == HPARAMS_FILE or path.name.startswith(EVENTS_PREFIX):
            path.unlink()
    if before is None and not any(folder.iterdir()):
        folder.rmdir()


def holds_only_a_start(events_file: Path) -> bool:
    """Whether an events file holds only what Lightning logs before training (see START_ONLY_PLUGINS); a file that
    cannot be read whole is kept."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    try:
        for event in EventFileLoader(str(events_file)).Load():
            for value in event.summary.value:
                if value.tag not in START_ONLY_TAGS and value.metadata.plugin_data.plugin_name not in START_ONLY_PLUGINS:
                    return False
    except Exception:  # noqa: BLE001 - unreadable: not ours to judge, so kept
        return False
    return True
