"""TokenCheckpoint: keep the newest N checkpoints, taken every K tokens, at phase ends and at the end.

A ``ModelCheckpoint`` that thinks in tokens (converted to steps once the token clock runs),
always keeps ``last.ckpt`` (what ``--ckpt_path last`` resumes from), also saves at every phase
boundary of the ObjectiveSchedule and when training ends, and checks before the first step that
the disk can hold the checkpoints it will keep and that a fresh run's folder holds no earlier run's.
A run started from an earlier step than the folder's newest sets the later checkpoints aside.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.phase_end_export import PhaseEndExport
from callbacks.set_aside import set_aside
from callbacks.throughput import untimed
from cpt_lightning.atomic import hard_links_work, link_beside
from cpt_lightning.checkpointing import AtomicCheckpointIO, remove_abandoned_saves, restore_interrupted_replacements
from cpt_lightning.errors import UserError, refuse_on_every_rank
from cpt_lightning.export import read_checkpoint
from cpt_lightning.schedules import steps_for

ADAM_COPIES = 3  # weights + two AdamW moments, in the parameters' dtype
STEP_FILE = re.compile(r"step(?P<step>\d+)(?:-v\d+)?\.ckpt")  # the filename below, and Lightning's -vN twins


# Lightning's warning at a resume under another policy (the state key holds it): "Please add the following
# callbacks", as if one were missing. A policy change is supported, and TokenCheckpoint says what changed; cpt fit
# filters the warning where this checkpoint policy is all it names (a callback left out of the config is still told).
ANOTHER_POLICY_NOTICE = (r"Be aware that when using `ckpt_path`.*Please add the following callbacks: "
                         r"\[\"TokenCheckpoint\{[^\"]*\}\"\]\.$")


class TokenCheckpoint(ModelCheckpoint):
    """ModelCheckpoint on a token budget: a checkpoint every N tokens, the newest ``keep_last`` kept, plus ``last.ckpt``.

    Args:
        dirpath: folder of the checkpoints (default: ``checkpoints/`` in the run's log folder).
        every_n_tokens: save after every this many training tokens (rounded up to whole optimizer steps).
        every_n_train_steps: save every this many optimizer steps instead; set exactly one of the two.
        keep_last: how many of the newest ``step*.ckpt`` files to keep (``last.ckpt`` besides).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_tokens: int | None = None,
        every_n_train_steps: int | None = None,
        keep_last: int = 3,
    ):
        if (every_n_tokens is None) == (every_n_train_steps is None):
            raise UserError("TokenCheckpoint: set exactly one of every_n_tokens and every_n_train_steps")
        if any(every is not None and every < 1 for every in (every_n_tokens, every_n_train_steps)):  # 0 too: not "never"
            raise UserError("TokenCheckpoint: every_n_tokens and every_n_train_steps must be positive")
        if keep_last < 1:
            raise UserError(f"TokenCheckpoint.keep_last must be >= 1, got {keep_last}")
        super().__init__(
            dirpath=dirpath, filename="step{step:09d}", monitor="step", mode="max", save_top_k=keep_last,
            every_n_train_steps=every_n_train_steps or 1, save_last=True, auto_insert_metric_name=False,
        )
        self.every_n_tokens, self.every_n_train_steps = every_n_tokens, every_n_train_steps
        self._phase: int | None = None
        self._start_step, self._looked_for_later = 0, False
        self._beyond_keep_last: list[str] = []
        self._validated_after_saving: int | None = None  # the step validated after its checkpoint was saved
        self._resumed_step: int | None = None
        self._link_last_to: str | None = None  # the step's file just saved, which last.ckpt is made to name
        self._links_refused = False  # by the checkpoint folder's file system: last.ckpt is saved whole
        self._last_saved_with_step = False  # Lightning's save of last.ckpt after the step's file to skip

    @property
    def state_key(self) -> str:
        """Built from the configured policy, so that two policies side by side keep apart (the checkpoints a
        resume prunes are the folder's: ``_adopt_checkpoints_up_to_start``)."""
        return self._generate_state_key(
            every_n_tokens=self.every_n_tokens, every_n_train_steps=self.every_n_train_steps, keep_last=self.save_top_k
        )

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # a resumed step is the checkpoint it came from
        self._start_step, self._looked_for_later = trainer.global_step, False
        # A resume's first step may cross a phase end (stopped one step before it): compared with None, it saved nothing.
        self._phase = self._phase_index(trainer, pl_module)
        if self.dirpath and trainer.ckpt_path is not None:
            self._beyond_keep_last = self._adopt_checkpoints_up_to_start()
        if self.dirpath and not trainer.fast_dev_run:  # rank 0 looks at the folder (a fast_dev_run writes nothing)
            if trainer.is_global_zero:  # before the disk check, which counts the room they take as free
                remove_abandoned_saves(Path(self.dirpath))
            refuse_on_every_rank(
                trainer, lambda: self._earlier_run_refusal(trainer) or self._free_space_refusal(trainer, pl_module)
            )
            links = trainer.is_global_zero and hard_links_work(Path(self.dirpath))  # the folder exists by now
            self._links_refused = not trainer.strategy.broadcast(links)

    def _adopt_checkpoints_up_to_start(self) -> list[str]:
        """The folder's ``step*.ckpt`` up to the start step become the ones ``keep_last`` prunes, whatever state the
        checkpoint holds: a resume with another ``keep_last`` or cadence (what the disk check advises) found no state
        under its key, so it never deleted them, and the disk check counted them as room its saves free. Returns
        the oldest beyond ``keep_last``, deleted once the first micro-batch has passed every check.

        The folder's ``last.ckpt`` becomes the one the run replaces, for the same reason: with no state, Lightning
        saved the run's as ``last-v1.ckpt`` and ``last.ckpt`` (what export and validate are pointed at) stayed old."""
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if last.exists():  # a file, or a sharded checkpoint's folder (FSDP2's, the recipes')
            self.last_model_path = str(last)
        found = sorted((step, str(path)) for step, path in _step_checkpoints(Path(self.dirpath))
                       if step <= self._start_step)
        kept = found[-self.save_top_k:]
        self.best_k_models = {path: torch.tensor(step) for step, path in kept}
        self.kth_best_model_path = kept[0][1] if len(kept) == self.save_top_k else ""
        if kept:
            self.kth_value = self.best_k_models[kept[0][1]]
            self.best_model_path, self.best_model_score = kept[-1][1], self.best_k_models[kept[-1][1]]
        return [path for _, path in found[:-self.save_top_k]]

    def _find_last_checkpoints(self, trainer) -> set[str]:
        """Where Lightning looks for ``--ckpt_path last`` (on every rank, before it resumes): a ``last.ckpt``
        whose replacement a kill interrupted is put back first (``restore_interrupted_replacements``)."""
        restore_interrupted_replacements(Path(self._ModelCheckpoint__resolve_ckpt_dir(trainer)))
        return super()._find_last_checkpoints(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.every_n_tokens is not None:
            tokens_per_step = pl_module.measure_tokens_per_step(batch)
            self._every_n_train_steps = steps_for(self.every_n_tokens, tokens_per_step)  # >= 1: every_n_tokens >= 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._looked_for_later and self.dirpath and not trainer.fast_dev_run:  # rank 0 sets aside later ones
            refuse_on_every_rank(trainer, lambda: self._set_aside_checkpoints_after(trainer))
            for path in self._beyond_keep_last:
                if self._should_remove_checkpoint(trainer, path, ""):  # never the one resumed from
                    self._remove_checkpoint(trainer, path)
        self._looked_for_later, self._beyond_keep_last = True, []
        phase = self._phase_index(trainer, pl_module)
        crossed = self._phase is not None and phase != self._phase
        self._phase = phase
        if crossed and not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)
        else:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._resumed_step = checkpoint.get("global_step")
        saved = checkpoint.get("callbacks") or {}
        name = type(self).__qualname__
        before = [key[len(name):] for key in saved if key.startswith(name + "{")]
        if before and self.state_key not in saved:  # said in place of Lightning's ANOTHER_POLICY_NOTICE
            rank_zero_info(f"[{name}] resumed under another checkpoint policy: {before[0]} before, "
                           f"{self.state_key[len(name):]} now; the folder's checkpoints are kept and pruned by the new one")

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        # after this step's save, or before any step of a resume (TokenValidation's catch-up of the resumed step)
        if trainer.global_step in (self._last_global_step_saved, self._resumed_step):
            self._validated_after_saving = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        """The end's step is saved, unless it was already (a fast_dev_run saves nothing). ``last.ckpt`` is saved
        again when the step was saved before its validation (the last step on the checkpoint grid, or a resume's
        catch-up of it): every rerun of the finished run (a requeued job's ``--ckpt_path last``) validated that step
        again and drew its point twice. A resume that trained no step (a branch shortened to its checkpoint) sets
        aside the folder's later checkpoints, as its first step would have, and saves ``last.ckpt`` in their place."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_now(trainer)
            return
        if trainer.fast_dev_run:
            return
        save_last = self._validated_after_saving == trainer.global_step
        if not self._looked_for_later and self.dirpath and trainer.ckpt_path is not None:  # a resume that trained no step
            if trainer.strategy.broadcast(trainer.is_global_zero and bool(self._checkpoints_after_start(trainer))):
                refuse_on_every_rank(trainer, lambda: self._set_aside_checkpoints_after(trainer))
                save_last = True  # the folder's last.ckpt may have been a later step's: this run's replaces it
            self._looked_for_later = True
        if save_last:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _set_aside_checkpoints_after(self, trainer) -> str | None:
        """A start from step S beside checkpoints of later steps (a rollback, a branch into this run's folder, or a
        folder saved before ``last.ckpt`` came first, killed between the two saves): the run saved its own as
        ``step…-v1.ckpt`` beside them and ``keep_last`` never pruned the others, which it did not know;
        a ``last.ckpt`` of a later step it overwrote. They are set aside (``callbacks.set_aside``).
        Run at the end of the first micro-batch, before any save and after every check of the first
        batch (the ObjectiveSchedule's phase history among them): a refused branch changes no file."""
        later = self._checkpoints_after_start(trainer)
        return set_aside(later, Path(self.dirpath), self._start_step, "checkpoint(s) of later steps")

    def _checkpoints_after_start(self, trainer) -> list[Path]:
        """The checkpoints in the folder of steps after the one this run started from (none for a fresh start)."""
        if trainer.ckpt_path is None:
            return []
        step = self._start_step  # the first micro-batch may have finished a step
        later = [path for saved, path in _step_checkpoints(Path(self.dirpath)) if saved > step]
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if _saved_after(last, step, started_from=trainer.ckpt_path):
            later.append(last)
        return later

    def newest_saved_before(self, step: int) -> Path | None:
        """The kept checkpoint of the latest step before ``step`` (where a run that diverged at ``step`` goes back to)."""
        earlier = [(saved, path) for saved, path in _step_checkpoints(Path(self.dirpath)) if saved < step]
        return max(earlier)[1] if earlier else None

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        """An old checkpoint that cannot be deleted is a warning: only rank 0 deletes, and an error there
        (NFS refusing a folder a reader holds open) stopped the run on rank 0 alone, over housekeeping."""
        try:
            super()._remove_checkpoint(trainer, filepath)
        except OSError as err:
            rank_zero_warn(f"could not delete old checkpoint {filepath} ({err.strerror or err}); "
                           "training goes on: delete it by hand")

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        """The step's file and ``last.ckpt``, written once (``_save_checkpoint``). Where ``last.ckpt`` is saved whole,
        it comes first: Lightning saves it after the step's file, and a kill between the two left it a checkpoint
        behind, so ``--ckpt_path last`` (every requeue) went back to it, set the newer step file aside and trained its
        steps again (636 in the recipes, 2B tokens)."""
        if self._links_last(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)  # the step's file saves last.ckpt with it
            return
        self._save_last_checkpoint(trainer, monitor_candidates)
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._last_saved_with_step = True

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._last_saved_with_step:  # Lightning's call right after the step's file: saved with it
            self._last_saved_with_step = False
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """``last.ckpt`` is the step's file under a second name (hard links, ``atomic.link_beside``), made as soon as
        the step's file is in place, before Lightning deletes the oldest one: a checkpoint is written once, not twice,
        and takes the room of one (1.7 GiB for ModernBERT-base). Where the file system refuses links it is saved
        whole, and so is a ``last.ckpt`` saved again at the same step (after the step's validation, at the end): it
        holds more than the step's file. (PreemptionCheckpoint's SIGTERM save writes it whole, not through here.)"""
        if self._link_last_to is not None and filepath == self.last_model_path:  # Lightning names it, then saves it
            if self._linked(trainer, self._link_last_to, filepath):
                self._last_global_step_saved, self._last_checkpoint_saved = trainer.global_step, filepath
                return
            self._links_refused = True
        started = time.monotonic()
        with untimed(trainer):
            super()._save_checkpoint(trainer, filepath)
        rank_zero_info(f"[TokenCheckpoint] saved {filepath} (step {trainer.global_step:,}) in "
                       f"{time.monotonic() - started:.1f} s")  # not a last.ckpt linked to the step's file
        if filepath != self.last_model_path and self._links_last(trainer):
            self._link_last_to = filepath
            try:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            finally:
                self._link_last_to = None
            self._last_saved_with_step = True

    def _links_last(self, trainer) -> bool:
        """Whether ``last.ckpt`` is to be a second name for the step's file: not where the file system refused a
        link, nor where a whole save of ``last.ckpt`` writes into the file it names instead of renaming a new one
        into place (Lightning's own checkpoint IO, with ``$TMPDIR`` on another file system): that wrote a later step
        into the step's file. ``AtomicCheckpointIO`` and sharded saves (FSDP2's) rename."""
        strategy = trainer.strategy
        renames = getattr(strategy, "_save_distributed_checkpoint", False) or isinstance(
            strategy.checkpoint_io, AtomicCheckpointIO)
        return renames and not self._links_refused

    @staticmethod
    def _linked(trainer, step_file: str, filepath: str) -> bool:
        """Whether rank 0 made ``filepath`` a second name for ``step_file`` (every rank learns it: where it could not,
        every rank saves it, which a sharded checkpoint needs)."""
        linked = trainer.is_global_zero and link_beside(Path(step_file), Path(filepath))
        return bool(trainer.strategy.broadcast(linked))

    def _save_now(self, trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    @staticmethod
    def _phase_index(trainer, pl_module) -> int | None:
        from callbacks.objective_schedule import find_objective_schedule

        schedule = find_objective_schedule(trainer)
        return None if schedule is None else schedule.schedule.phase_index(pl_module.tokens_seen)

    def _earlier_run_refusal(self, trainer) -> str | None:
        """A fresh run beside another run's checkpoints saves ``last-v1.ckpt``: ``last.ckpt``, what
        ``--ckpt_path last`` and ``cpt export`` read, stays the old run's, and keep_last never prunes it."""
        if trainer.ckpt_path is not None:  # a resume: the run these checkpoints belong to goes on
            return None
        restore_interrupted_replacements(Path(self.dirpath))  # so that `--ckpt_path last` is the advice
        found = sorted(path.name for path in Path(self.dirpath).glob("*.ckpt"))
        if not found:
            return None
        # Without last.ckpt (deleted, or a kill between the two saves of an older version, which wrote it second)
        # Lightning turns `--ckpt_path last` into a fresh start.
        resume = "last" if "last.ckpt" in found else str(Path(self.dirpath) / max(found))
        return (
            f"checkpoint folder {self.dirpath} holds an earlier run's checkpoints ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}): resume that run with --ckpt_path {resume}, or give this one its "
            "own folder (another trainer.logger.init_args.name or version, or TokenCheckpoint dirpath)"
        )

    def _free_space_refusal(self, trainer, pl_module) -> str | None:
        weights = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        per_checkpoint = checkpoint_bytes(trainer, pl_module, weights)
        folder = Path(self.dirpath)
        folder.mkdir(parents=True, exist_ok=True)
        models, exported = phase_end_bytes(trainer, pl_module, folder, weights)
        needed = per_checkpoint * (self.save_top_k + 2) + exported  # kept + last + the one being written
        # A resume's own checkpoints already take part of that room (they are the ones its saves replace): counted
        # as free, a requeued run that fit when it started was refused once its checkpoints were on the disk. Not
        # those of later steps (a rollback, a branch): they are set aside, kept on the same disk, never replaced.
        later = self._checkpoints_after_start(trainer)
        held = _bytes_on_disk(path for path in folder.glob("*.ckpt") if path not in later)  # none when fresh
        free = shutil.disk_usage(folder).free
        if free + held >= needed:
            return None
        in_checkpoints = f" (and {held / 2**30:.1f} GiB in its checkpoints)" if held else ""
        and_models = f" and the {models} phase-end model(s) to come (~{exported / 2**30:.1f} GiB)" if models else ""
        return (
            f"checkpoint folder {folder} has {free / 2**30:.1f} GiB free{in_checkpoints} but keeping {self.save_top_k} "
            f"checkpoints of ~{per_checkpoint / 2**30:.1f} GiB{and_models} needs {needed / 2**30:.1f} GiB: free space, "
            "lower keep_last or point dirpath elsewhere"
        )


def phase_end_bytes(trainer, pl_module, folder: Path, weights: int) -> tuple[int, int]:
    """The phase-end models PhaseEndExport has yet to save on ``folder``'s disk, and their bytes: a whole checkpoint
    each (a decay branches off it) and, exported, the weights again. Left out, a disk that passed the check filled
    at the CLM phase's end (the English recipes: 4.7 GiB of phase-end models beside 7.3 of checkpoints)."""
    models = total = 0
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, PhaseEndExport):
            where, count = callback.models_to_come(trainer, pl_module)
            if same_disk(where, folder):
                models += count
                exported = weights if callback.export else 0  # save_pretrained writes a tied weight once
                total += count * (checkpoint_bytes(trainer, pl_module, weights) + exported)
    return models, total


def checkpoint_bytes(trainer, pl_module, weights: int) -> int:
    """A checkpoint's size: the weights and AdamW's two moments, and a tied weight again when sharded: a
    torch.distributed.checkpoint writes every name of the state dict (ModernBERT's decoder is its embedding: 8% more
    for base, measured 33% for a tiny model), a gathered torch.save file a shared tensor once."""
    sharded = getattr(getattr(trainer, "strategy", None), "_save_distributed_checkpoint", False)
    return ADAM_COPIES * weights + (tied_bytes(pl_module) if sharded else 0)


def tied_bytes(module) -> int:
    """The bytes of the parameters a module holds under a second name."""
    seen, tied = set(), 0
    for _, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied += parameter.numel() * parameter.element_size()
        seen.add(id(parameter))
    return tied


def same_disk(path: Path, other: Path) -> bool:
    """Whether two paths (which may not exist yet) are on one file system, by their nearest existing folders."""
    def device(folder: Path) -> int:
        return next(p for p in (folder, *folder.parents) if p.exists()).stat().st_dev
    return device(Path(path).absolute()) == device(Path(other).absolute())


def _step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The folder's ``step*.ckpt`` (files, or sharded checkpoints' folders) with the step each holds by its name."""
    return [(int(match["step"]), path) for path in folder.glob("step*.ckpt") if (match := STEP_FILE.fullmatch(path.name))]


def _bytes_on_disk(checkpoints) -> int:
    """The bytes checkpoint files, or sharded checkpoints' folders, take on the disk: a file under two names once
    (``last.ckpt``, a hard link to the newest step's; counted twice, a resume passed the check without the room)."""
    sizes = {}
    for checkpoint in checkpoints:
        for path in checkpoint.rglob("*") if checkpoint.is_dir() else [checkpoint]:
            if path.is_file():  # a dangling link holds nothing
                found = path.stat()
                sizes[found.st_dev, found.st_ino] = found.st_size
    return sum(sizes.values())


def _saved_after(checkpoint: Path, step: int, started_from: str | Path) -> bool:
    """Whether ``checkpoint`` exists and holds a step after ``step`` (not when it is the one the run started from)."""
    if not checkpoint.exists() or checkpoint.resolve() == Path(started_from).resolve():
        return False
    try:
        return int(read_checkpoint(checkpoint, weights=False).records.get("global_step", -1)) > step
    except UserError:  # not a checkpoint read_checkpoint knows: left as Lightning leaves it
        return False
