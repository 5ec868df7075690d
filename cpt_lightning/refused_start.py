"""A start refused once Lightning has set up its loggers, or one that logged nothing of a run (a finished run
started again), leaves the run's log folder as it was.

Lightning opens each logger's events file before the first setup hook and logs the hyperparameters
before training starts, so checks that need the data or the checkpoint (a source too small for a
micro-batch, a resume with another data order, a fresh run beside an earlier run's checkpoints) ran
after it had written: an events file with the refused config's hyperparameters (TensorBoard listed
it beside the run's), and in a new folder an ``hparams.yaml`` of them that the corrected rerun kept,
since TensorBoardLogger writes that file only when it is missing. CSVLogger rewrites its ``hparams.yaml``
and deletes its ``metrics.csv`` at every start into a folder that has them: a refused resume replaced the
run's hyperparameters with the refused config's and lost its metrics. Both loggers write to a local
folder and are tidied this way; others (MLflow, W&B) keep their own records.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cpt_lightning.errors import UserError

EVENTS_PREFIX = "events.out.tfevents."
HPARAMS_FILE = "hparams.yaml"
METRICS_FILE = "metrics.csv"  # CSVLogger's, which deletes it at each start and writes it once a run logs
REWRITTEN_FILES = (HPARAMS_FILE, METRICS_FILE)
# What Lightning's TensorBoardLogger writes before training: its hparams-plugin summaries, the placeholder
# ``hp_metric`` -1, and the custom-scalars layout a run sets up; anything else is the run's own.
START_ONLY_PLUGINS = {"hparams", "custom_scalars"}
START_ONLY_TAGS = {"hp_metric"}


@contextmanager
def nothing_logged_without_a_run(trainer):
    """Run a ``trainer.fit``/``validate`` in this; once it is refused (a UserError) or done, undo what its TensorBoard
    and CSV loggers wrote when they logged nothing of a run (rank 0, which writes them, only). Done without a run: a
    finished run started again (every phase already done, as a rerun job finds it) left an events file of its
    hyperparameters alone at each start."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    starts = [LoggerStart.open(logger) for logger in trainer.loggers
              if isinstance(logger, (TensorBoardLogger, CSVLogger)) and trainer.is_global_zero]
    try:
        yield
    except UserError:
        for start in starts:
            start.undo()
        raise
    for start in starts:
        start.undo()


@dataclass
class LoggerStart:
    """A logger's folder before a start: what it held (and the files a CSVLogger rewrites, as they were), the
    folders it is made in, and the events file the start opened there (TensorBoard's)."""

    folder: Path
    before: set[str]
    made: list[Path]  # the folder and the parents it is created in, deepest first
    events: list[Path]
    rewritten: dict[str, bytes]  # REWRITTEN_FILES the folder held, by name

    @classmethod
    def open(cls, logger) -> LoggerStart:
        """Open the logger's events file now (Lightning does at setup), so it is known which one is this start's."""
        folder = Path(logger.log_dir)
        made = list(itertools.takewhile(lambda path: not path.exists(), [folder, *folder.parents]))
        before = listing(folder)
        rewritten = {name: (folder / name).read_bytes() for name in REWRITTEN_FILES if (folder / name).is_file()}
        logger.experiment  # noqa: B018 - opens the events file (a CSVLogger makes its folder, deletes metrics.csv)
        events = [folder / name for name in listing(folder) - before if name.startswith(EVENTS_PREFIX)]
        return cls(folder, before, made, events, rewritten)

    def logged_a_run(self) -> bool:
        """Whether the start logged more than its hyperparameters (a run stopped after it trained)."""
        metrics = self.folder / METRICS_FILE
        if metrics.is_file() and metrics.read_bytes() != self.rewritten.get(METRICS_FILE):
            return True
        return not all(holds_only_a_start(path) for path in self.events)

    def undo(self) -> None:
        """Remove this start's events file, a new ``hparams.yaml`` and new empty folders, put back the files a CSVLogger
        rewrote, then remove the folders it was made in when left empty; nothing when it logged a run."""
        if self.logged_a_run():
            return
        for path in self.events:
            path.unlink(missing_ok=True)
        for name, content in self.rewritten.items():
            path = self.folder / name
            if not path.is_file() or path.read_bytes() != content:
                path.write_bytes(content)
        for name in listing(self.folder) - self.before:
            path = self.folder / name
            if name == HPARAMS_FILE:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):  # the checkpoint folder a callback made ready
                path.rmdir()
        for folder in self.made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def listing(folder: Path) -> set[str]:
    """The names in ``folder`` (none when it does not exist)."""
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


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
