"""PhaseEndExport: a checkpoint and a Hugging Face folder at the end of every phase (CLM end, final).

The phase ends are where the researcher's models are (``phase0-clm`` to analyse the detour,
``phase1-mlm`` to evaluate), so they are exported as the run passes them, not left to be found
among the periodic checkpoints.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from callbacks.objective_schedule import ObjectiveSchedule, find_objective_schedule
from callbacks.set_aside import set_aside
from callbacks.throughput import untimed
from cpt_lightning.checkpointing import remove_abandoned_saves
from cpt_lightning.errors import UserError, refuse_on_every_rank
from cpt_lightning.export import export_checkpoint, read_checkpoint
from cpt_lightning.model_card import python_string


class PhaseEndExport(L.Callback):
    """Save a checkpoint and an HF folder at the end of every ObjectiveSchedule phase (CLM end, final).

    It needs a ``callbacks.ObjectiveSchedule``; ``cpt fit`` runs it after the other callbacks (Lightning's checkpoints
    aside), so each phase-end checkpoint holds their state after the step. Outputs go to
    ``dirpath/phase{i}-{objective}.ckpt`` and ``dirpath/phase{i}-{objective}/``. A resumed run
    exports the phases that end after the resume point (and a phase that ends at the resume point when the folder
    lacks that step's model: a phase shortened to the checkpoint; its HF folder alone when a kill cut that short),
    and sets aside the models of those phases that the folder already holds (a rollback, or a branch into this run's
    folder). A fresh run into a folder that holds another run's phase-end models is refused before its first step:
    it would replace them (a second seed that changed only the run name) and mislabel them. A ``fast_dev_run``
    (Lightning's smoke test of a config) neither looks at the folder nor writes to it.

    Args:
        dirpath: folder of the phase-end checkpoints and exports (default: ``export/`` beside the run's
            ``checkpoints/``, in ``save_dir/name/version`` of the logger, so a run with another name gets its own).
        export: also write the Hugging Face folder beside each checkpoint (false: checkpoints only).
        language: the model card's language (front matter and fill-mask example), as ``cpt export --language``.
    """

    def __init__(self, dirpath: str | None = None, export: bool = True, language: str = "en"):
        self.dirpath = Path(dirpath) if dirpath else None
        self.export = export
        self.language = language
        self._tokens_before: int | None = None
        self._start_step, self._looked_for_later = 0, False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # found at the first batch's end it came after a step: config.yaml already replaced
            _objective_schedule(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # Lightning's smoke test of a config writes nothing, beside a run or not
            return
        self._tokens_before = pl_module.tokens_seen
        self._start_step, self._looked_for_later = trainer.global_step, False
        if self.dirpath is None:
            self.dirpath = Path(trainer.strategy.broadcast(str(default_dirpath(trainer))))
        if trainer.is_global_zero:
            remove_abandoned_saves(self.dirpath)
        refuse_on_every_rank(trainer, lambda: self._earlier_run_refusal(trainer))
        self._save_a_resumed_phase_end(trainer, pl_module)

    def _save_a_resumed_phase_end(self, trainer, pl_module) -> None:
        """A run resumed from the step that ends a phase passes that end in no step it trains, so no step saved that
        phase's model: a phase shortened to where its checkpoint stopped (what a refused shorter phase is advised)
        had none, whether the run then stops, enters the next phase or trains on past the last. Saved from the
        resumed state, unless the folder holds that step's already (a finished run's rerun); one of another step (a
        longer run's, or the parent's of a branch into its folder) is set aside first. The checkpoint's phase history
        is checked before, wherever the schedule is listed: a refused branch moves no file."""
        tokens_per_step = getattr(pl_module, "tokens_per_step", None)
        if trainer.ckpt_path is None or not tokens_per_step:
            return
        ended = [name for end, name in _phase_ends(trainer)  # every end in the step, as a step saves: a phase under a step
                 if pl_module.tokens_seen - tokens_per_step < end <= pl_module.tokens_seen]
        if ended:
            _objective_schedule(trainer).check_resumed_history(trainer, pl_module)
        for name in ended:
            if trainer.strategy.broadcast(trainer.is_global_zero and self._saved_step(name) != trainer.global_step):
                refuse_on_every_rank(trainer, lambda name=name: set_aside(
                    [path for path in (self.dirpath / f"{name}.ckpt", self.dirpath / name) if path.exists()],
                    self.dirpath, trainer.global_step, "phase-end model(s) of another step", moved=repoint_card))
                self._save(trainer, name)
            elif self.export and trainer.is_global_zero and not (self.dirpath / name).exists() and self._export(name):
                rank_zero_info(f"[PhaseEndExport] exported {self.dirpath / name}: the run was stopped before it was")

    def _saved_step(self, name: str) -> int | None:
        """The step of the phase-end checkpoint ``name`` the folder holds (None: none, or unreadable)."""
        path = self.dirpath / f"{name}.ckpt"
        try:
            return read_checkpoint(path, weights=False).records.get("global_step") if path.exists() else None
        except UserError:
            return None

    def _earlier_run_refusal(self, trainer) -> str | None:
        if trainer.ckpt_path is not None:  # a resume: the run these models belong to goes on
            return None
        found = sorted(path.name for path in self.dirpath.glob("phase*"))
        if not found:
            return None
        return (
            f"export folder {self.dirpath} holds an earlier run's phase-end models ({', '.join(found[:4])}): "
            f"resume that run ({self._resume_advice(trainer)}), or give this "
            "one its own folder (another trainer.logger.init_args.name or version, or PhaseEndExport dirpath)"
        )

    def _resume_advice(self, trainer) -> str:
        """A run killed while exporting its first phase end saved no step checkpoint (those follow the phase-end
        export in the step): ``--ckpt_path last`` starts it afresh, into this refusal again. Its phase-end checkpoint
        is a whole one (saved under a hidden name, then renamed) to go on from."""
        step_saves = any(any(Path(callback.dirpath).glob("*.ckpt")) for callback in trainer.checkpoint_callbacks
                         if getattr(callback, "dirpath", None))
        ends = {path: self._saved_step(path.stem) for path in self.dirpath.glob("phase*.ckpt")}
        ends = {path: step for path, step in ends.items() if step is not None}
        if step_saves or not ends:
            return "--ckpt_path last, or its newest step*.ckpt if last.ckpt is missing"
        return f"it saved no step checkpoint: --ckpt_path {max(ends, key=ends.get)}"

    def _set_aside_later_exports(self, trainer, start_tokens: int) -> str | None:
        """A start before a phase end whose models this folder already holds (a rollback, or a branch into
        this run's folder) would replace them: those are set aside (``callbacks.set_aside``). Run at the end
        of the first micro-batch, before any save and after every check of the first batch (the
        ObjectiveSchedule's phase history among them), whatever the callback order: a refused branch
        changes no file."""
        if trainer.ckpt_path is None:  # a fresh run into a folder with phase-end models was refused
            return None
        later = [path for end, name in _phase_ends(trainer) if end > start_tokens
                 for path in (self.dirpath / f"{name}.ckpt", self.dirpath / name) if path.exists()]
        return set_aside(later, self.dirpath, self._start_step, "phase-end model(s) of phases that end later",
                         moved=repoint_card)

    def models_to_come(self, trainer, pl_module) -> tuple[Path, int]:
        """Its folder and how many phase ends it has yet to save there (TokenCheckpoint's disk check counts them)."""
        folder = self.dirpath or default_dirpath(trainer)
        return folder, sum(1 for end, _ in _phase_ends(trainer) if end > pl_module.tokens_seen)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fast_dev_run:
            return
        if not self._looked_for_later:  # the start's tokens: the first micro-batch may have finished a step
            refuse_on_every_rank(trainer, lambda: self._set_aside_later_exports(trainer, self._tokens_before))
        self._looked_for_later = True
        now, before = pl_module.tokens_seen, self._tokens_before
        self._tokens_before = now
        for end, name in _phase_ends(trainer):
            if before < end <= now:
                self._save(trainer, name)

    def _save(self, trainer, name: str) -> None:
        """Every rank saves its part of the checkpoint; rank 0 exports it (with the run config the
        checkpoint holds) while the others wait. A failed export is a warning, not a stop: the
        checkpoint is saved and ``cpt export`` redoes the folder from it, while rank 0 raising alone
        would leave the other ranks at the barrier (srun does not stop them) and end a days-long run.
        """
        with untimed(trainer):
            ckpt = self.dirpath / f"{name}.ckpt"
            trainer.save_checkpoint(ckpt, weights_only=False)  # whole: a decay branches off it
            saved = f"[PhaseEndExport] {name} ended at step {trainer.global_step:,}: saved {ckpt}"
            if self.export and trainer.is_global_zero and self._export(name):
                saved += f", exported {self.dirpath / name}"
            rank_zero_info(saved)
            trainer.strategy.barrier("phase_end_export")

    def _export(self, name: str) -> bool:
        """Export the phase-end checkpoint ``name`` to its HF folder (False: it failed, with a warning)."""
        ckpt, folder = self.dirpath / f"{name}.ckpt", self.dirpath / name
        try:
            export_checkpoint(ckpt, folder, overwrite=True, language=self.language)
            return True
        except Exception as err:
            warnings.warn(f"phase-end export of {name} failed ({type(err).__name__}: {err}); training goes on. "
                          f"The checkpoint is saved: cpt export {ckpt} {folder} --overwrite", stacklevel=1)
            return False


def repoint_card(old: Path, new: Path) -> None:
    """A model folder's card loads it by its path (``model_id``): moved aside, its snippets would load the folder the
    new run writes in its place, other weights under the same name."""
    card = new / "README.md"
    if card.is_file():  # the snippets' string literals first, then the path as the text names it
        text = card.read_text().replace(python_string(str(old)), python_string(str(new)))
        card.write_text(text.replace(str(old), str(new)))


def _phase_ends(trainer) -> list[tuple[int, str]]:
    """(token count where the phase ends, ``phase{i}-{objective}``: the name of its models) of every phase:
    what a phase end saves and what a restart before it sets aside."""
    schedule = _objective_schedule(trainer)
    return [(end, f"phase{index}-{phase.objective.name}")
            for index, (end, phase) in enumerate(zip(schedule.schedule.starts[1:], schedule.phases))]


def _objective_schedule(trainer) -> ObjectiveSchedule:
    schedule = find_objective_schedule(trainer)
    if schedule is not None:
        return schedule
    raise UserError("PhaseEndExport needs a callbacks.ObjectiveSchedule in trainer.callbacks")


def default_dirpath(trainer) -> Path:
    """``export/`` beside the run's ``checkpoints/``."""
    return run_folder(trainer) / "export"


def run_folder(trainer) -> Path:
    """The folder Lightning's ModelCheckpoint puts a run's ``checkpoints/`` in: ``save_dir/name/version`` of the
    first logger (per run for every logger, where ``trainer.log_dir`` is a shared folder for Wandb or MLflow),
    else ``default_root_dir``."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version
