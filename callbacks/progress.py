"""PhaseProgressBar: Lightning's Rich progress bar for a run measured in tokens, not epochs.

A run here is one endless epoch (``max_epochs: -1``) over a stream, so Lightning's bar read
"Epoch 0/-2", counted micro-batches towards "--" and never gave a time left. This one names the phase
("clm 1/2") and counts optimizer steps towards the step where the last phase ends (known from the
``ObjectiveSchedule`` once the first batch has measured the tokens per step), so it fills and Rich
shows the time left. A run without a schedule, or one that trains on past its last phase
(``stop_after_last_phase: false``), keeps the open count.

``cpt fit`` adds it when the config names no progress bar and does not turn the bar off.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

from callbacks.objective_schedule import find_objective_schedule


class PhaseProgressBar(RichProgressBar):
    _total: float = float("inf")  # what the bar counts towards; Lightning starts it open-ended
    _description: str | None = None

    def _get_train_description(self, current_epoch: int) -> str:
        schedule = find_objective_schedule(self.trainer)
        if schedule is None or schedule.current is None:
            text = "training"
        else:
            text = f"{schedule.phases[schedule.current].objective.name} {schedule.current + 1}/{len(schedule.phases)}"
        return text.ljust(len(self.validation_description))  # as Lightning pads: no flicker beside the val bar

    @property
    def total_train_batches(self) -> int | float:
        """Optimizer steps until the last phase ends; inf while the tokens per step are unknown, or for a run
        without phases or one that trains on past them."""
        schedule = find_objective_schedule(self.trainer)
        tokens_per_step = getattr(self.trainer.lightning_module, "tokens_per_step", None)
        if schedule is None or not schedule.stop_after_last_phase or not tokens_per_step:
            return float("inf")
        return schedule.total_steps(tokens_per_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self._follow_the_schedule(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)  # counts steps

    def _follow_the_schedule(self, trainer) -> None:
        total, description = self.total_train_batches, self._get_train_description(trainer.current_epoch)
        if total != self._total:  # the first batch measured the tokens per step
            # a new task: Lightning's open-ended one never shows a time left. reset() starts its clock and
            # speed samples at the current step, so a resumed run's jump from 0 does not count as speed.
            self.progress.remove_task(self.train_progress_bar_id)
            self.train_progress_bar_id = self._add_task(total, description)
            self.progress.reset(self.train_progress_bar_id, completed=trainer.global_step)
            self._total, self._description = total, description
        elif description != self._description:  # a phase began
            styled = f"[{self.theme.description}]{description}" if self.theme.description else description
            self.progress.update(self.train_progress_bar_id, description=styled)
            self._description = description
