"""StepLearningRateMonitor: Lightning's LearningRateMonitor, one point per optimizer step."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor


class StepLearningRateMonitor(LearningRateMonitor):
    """Logs the learning rate at the first micro-batch of a logging step only.

    Lightning's logs it at every micro-batch of a logging step (its test holds for the whole step): with the
    recipes' 12 to 48 accumulated micro-batches, as many identical points at each step, and as many rows in a CSV.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step_seen: int | None = None

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs the point at
        if step != self._step_seen:
            self._step_seen = step
            super().on_train_batch_start(trainer, *args, **kwargs)
