"""StepTimer: ``trainer.max_time`` enforced where an optimizer step ends.

Lightning's ``Timer`` checks the clock after every micro-batch and stops there: between two accumulated
micro-batches the step is half done, its gradients are not in the checkpoint saved at the end, and the
resumed run starts after the micro-batches already drawn, so they are never trained on (what
``PreemptionCheckpoint`` avoids for SIGTERM). Its check is also a broadcast from rank 0, a host sync per
micro-batch. This one looks at the clock once per optimizer step; otherwise it is Lightning's Timer, under
the same checkpoint key, so the wall-clock (the model card's) carries over between the two.

The recipes list one without a duration (the model card's wall-clock); ``cpt fit --trainer.max_time DD:HH:MM:SS``
gets one with it (``CptCLI`` puts it in place of Lightning's). As in Lightning, the time counts every resume of
the run, so a resume needs a larger ``max_time`` to train on.
"""

from __future__ import annotations

import datetime

from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from cpt_lightning.errors import UserError


class StepTimer(Timer):
    """Lightning's ``Timer`` (same arguments), stopping only where an optimizer step ends.

    Args:
        duration: the time budget, ``DD:HH:MM:SS`` or as Lightning's Timer takes it (none: it only keeps the
            wall-clock, for the model card).
        interval: ``step``, looking at the clock after every optimizer step. ``epoch`` is refused with a
            duration: a run is one endless epoch, whose end comes only when training is over.
        verbose: log when the budget is spent.
    """

    def __init__(self, duration: str | datetime.timedelta | dict[str, int] | None = None, interval: str = "step",
                 verbose: bool = True):
        try:
            super().__init__(duration=duration, interval=interval, verbose=verbose)
        except (MisconfigurationException, TypeError, ValueError, OverflowError):  # Lightning's named a Timer
            raise UserError(f"trainer.max_time (or StepTimer's duration) {duration!r}: not a time budget; give "
                            "DD:HH:MM:SS, e.g. 00:12:00:00 for 12 hours, or {hours: 12}") from None
        if self._duration is not None and interval != "step":  # it trained the whole run, then said time was up
            raise UserError(f"StepTimer interval={interval!r} with a duration: the mix is one endless epoch, so its "
                            "time limit would be looked at only when training is over; use interval: step")
        self._step_at_batch_start = 0

    @property
    def state_key(self) -> str:
        return Timer.__qualname__

    def on_fit_start(self, trainer, *args, **kwargs) -> None:
        """A resume whose budget the run already spent (the time counts every resume) trained nothing and exited 0
        without a word, Lightning's Timer stopping it here: refused instead, saying what to pass."""
        if self._duration is not None and self.time_elapsed() >= self._duration:
            raise UserError(
                f"trainer.max_time {datetime.timedelta(seconds=self._duration)} (or StepTimer's duration) is already "
                f"spent by this run: {datetime.timedelta(seconds=int(self.time_elapsed()))} trained, counted over "
                "every resume; pass a larger --trainer.max_time to train on"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self._step_at_batch_start:  # mid-accumulation: the step is not whole yet
            return
        stopping = trainer.should_stop
        super().on_train_batch_end(trainer, *args, **kwargs)
        if trainer.should_stop and not stopping and not validation_due(trainer):
            # Lightning validates wherever should_stop is set (early stopping's habit): the whole holdout, off the
            # grid, before last.ckpt is saved, so a max_time set just under a job's limit was spent there and the
            # steps since the last checkpoint were lost with the job
            trainer.fit_loop.epoch_loop._skip_next_val = True


def validation_due(trainer) -> bool:
    """Whether the cadence (Lightning's, or TokenValidation's token grid) validates after this micro-batch anyway."""
    loop = trainer.fit_loop.epoch_loop
    every = trainer.val_check_batch
    if every is None or every == float("inf"):
        return False
    count = loop.total_batch_idx if trainer.check_val_every_n_epoch is None else loop.batch_idx
    return (count + 1) % every == 0
