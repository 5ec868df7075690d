"""TokenValidation: validate every N training tokens, whatever the hardware.

Lightning's ``trainer.val_check_interval`` counts one rank's micro-batches. GlobalBatch derives the
accumulation from the GPU count, so one value validated every 500 optimizer steps on 4 GPUs and every
1000 on 8, while the phases, checkpoints and learning rate follow the token clock, the same on both.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from callbacks.objective_schedule import find_objective_schedule
from cpt_lightning.errors import UserError
from cpt_lightning.schedules import steps_for
from cpt_lightning.validation import PHASE_ENDS_RECORD, VALIDATED_STEP_RECORD


class TokenValidation(L.Callback):
    """Validate after every ``every_n_tokens`` training tokens (rounded up to whole optimizer steps), after each
    phase's last step and when training ends (its last phase, or ``trainer.max_steps``; a ``max_time`` stop is a
    pause: StepTimer validates there only when a point is due). Only a run with validation data
    (``data.init_args.val_sources``) validates; without any, this callback changes nothing. A ``fast_dev_run`` keeps
    Lightning's own cadence, which validates after its steps: the smoke test of the validation code.

    The model a phase ends with (the detour's, compared with the baseline's at the same tokens) gets its own point:
    the grid's nearest was up to ``every_n_tokens`` away, on one side in the previous phase, on the other already in
    the next (the English recipe: after steps 15,741 and 15,900 around a switch after step 15,895).

    Args:
        every_n_tokens: training tokens between two validations, over all devices.
    """

    def __init__(self, every_n_tokens: int):
        if type(every_n_tokens) is not int or every_n_tokens < 1:  # True is an int to Python: every step
            raise UserError(f"TokenValidation.every_n_tokens must be a positive integer, got {every_n_tokens!r}")
        self.every_n_tokens = every_n_tokens
        self._tokens_per_step: int | None = None  # measured at the first batch
        self.phase_ends_since = 0  # the step from which phase ends are validated (a resume of an earlier run: its step)
        self.validated_step: int | None = None  # the step the last validation of the fit followed
        self._resumed_unvalidated = False  # the checkpoint resumed was saved before the validation due at its step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's own cadences are replaced at every batch (``on_train_batch_start``): refused, not ignored."""
        if stage != "fit":
            return
        self.phase_ends_since = 0  # a checkpoint's record replaces it (on_load_checkpoint comes after setup)
        self.validated_step, self._resumed_unvalidated = None, False
        # a time ("00:01:00:00") leaves trainer.val_check_interval unset (an AttributeError when read)
        by_time = getattr(trainer, "_val_check_time_interval", None) is not None
        interval = "a time" if by_time else trainer.val_check_interval
        if by_time or not (isinstance(interval, float) and interval == 1.0):  # 1.0: Lightning's default, per epoch
            raise UserError(
                f"trainer.val_check_interval={interval} conflicts with TokenValidation, which sets "
                "when to validate (every_n_tokens): remove one of them from the config"
            )
        if trainer.check_val_every_n_epoch not in (None, 1):
            raise UserError(
                f"trainer.check_val_every_n_epoch={trainer.check_val_every_n_epoch} conflicts with TokenValidation: "
                "a run is one endless epoch and every_n_tokens sets when to validate; remove it from the config"
            )

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A checkpoint without the record was saved by a run that did not validate its phase ends (an earlier
        version, or no TokenValidation): from its step on, this one does."""
        self.phase_ends_since = checkpoint.get(PHASE_ENDS_RECORD, checkpoint.get("global_step", 0))
        self.validated_step = checkpoint.get(VALIDATED_STEP_RECORD)
        # saved at a step before its validation ran (a TokenCheckpoint's save); not after it (a SIGTERM's, the end's)
        self._resumed_unvalidated = VALIDATED_STEP_RECORD in checkpoint and self.validated_step != checkpoint.get(
            "global_step")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A record of the checkpoint, not the callback's state: a resume without TokenValidation is no mismatch.
        Written only by a run with validation data (Lightning's own test of a val_dataloader): one without validated
        nothing, and a resume that adds the data validates from its step on."""
        if trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined():
            checkpoint[PHASE_ENDS_RECORD] = self.phase_ends_since
            checkpoint[VALIDATED_STEP_RECORD] = self.validated_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resume from a checkpoint saved before the validation due at its step validates that step first.
        TokenCheckpoint saves a step before its validation runs, so a hard kill in that validation (SIGKILL, OOM, a
        lost node) lost the point for good: the phase switch's, every 4th of the recipes' grid, the run's last (whose
        rerun then trained nothing and exited 0). The checkpoint records the step last validated: one saved after
        its step's validation (a SIGTERM's, the end's) is not validated again."""
        if not trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined():  # the recipes as shipped: said once
            rank_zero_info("[TokenValidation] no validation data (data.init_args.val_sources): this run logs no val/ "
                           "curve; docs/recipes.md, \"One validation curve for every run\", adds cpt prepare's holdouts")
            return
        step = self._resumed_step_due(trainer, pl_module)
        if step is None:
            return
        schedule = find_objective_schedule(trainer)
        if schedule is not None:  # a refused branch logs nothing (the schedule may be listed after this callback)
            schedule.check_resumed_history(trainer, pl_module)
        rank_zero_info(f"[TokenValidation] validating step {step:,} before training on: the checkpoint resumed was "
                       "saved before that step's validation, which a stop may have cut off")
        if schedule is not None and not pl_module.val_objectives:  # validated with the objective that step trained
            pl_module.set_objective(schedule.phases[schedule.phase_of_step(step, pl_module.tokens_per_step)].objective)
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        val_loop.restarting = False  # a whole validation: its counters restored from the checkpoint are the last one's
        trainer.validating = True  # as Lightning's training loop runs a validation
        first_loop_iter = trainer._logger_connector._first_loop_iter
        val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter

    def _resumed_step_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        """The step of the checkpoint resumed, if TokenValidation validates after it and it was saved before that."""
        step, tokens_per_step = pl_module.global_step, getattr(pl_module, "tokens_per_step", None)
        if not self._resumed_unvalidated or trainer.fast_dev_run or not step or not tokens_per_step:
            return None
        return step if self.validates_after(trainer, step, tokens_per_step) else None

    def validates_after(self, trainer: L.Trainer, step: int, tokens_per_step: int) -> bool:
        """Whether the token grid validates after optimizer step ``step`` (counted from 1): every ``every_n_tokens``
        (rounded up to whole steps), the run's last (``max_steps``) and each phase's last."""
        schedule = find_objective_schedule(trainer)
        return (step % steps_for(self.every_n_tokens, tokens_per_step) == 0 or 0 < trainer.max_steps <= step
                or (schedule is not None and schedule.ends_a_phase((step - 1) * tokens_per_step, tokens_per_step)))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.fast_dev_run:  # its steps are fewer than a grid's: none of them validated
            return
        if self._tokens_per_step is None:  # the token clock runs from the first batch (a resumed run's too)
            self._tokens_per_step = pl_module.measure_tokens_per_step(batch)
        # Replaces what Lightning set from val_check_interval when the loop started (and sets again when it reloads
        # the dataloaders, hence at every batch). Lightning validates after the run's micro-batch number n when n is a
        # multiple of val_check_batch: n itself for the micro-batch that ends a step of the grid, n + 1 for any other.
        # A fixed count (steps × accumulation) drifted off the steps after an epoch that ended inside a step.
        trainer.check_val_every_n_epoch = None
        micro_batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # this one included
        ends_step = not trainer.fit_loop._should_accumulate()
        on_grid = ends_step and self.validates_after(trainer, trainer.global_step + 1, self._tokens_per_step)
        trainer.val_check_batch = micro_batches if on_grid else micro_batches + 1
