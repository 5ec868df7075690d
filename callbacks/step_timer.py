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


class StepTimer(Timer):
    """Lightning's ``Timer`` (same arguments), stopping only where an optimizer step ends.

    Args:
        duration: the time budget, ``DD:HH:MM:SS`` or as Lightning's Timer takes it (none: it only keeps the
            wall-clock, for the model card).
        interval: ``step`` (look at the clock after every optimizer step) or ``epoch``.
        verbose: log when the budget is spent.
    """

    def __init__(self, duration: str | datetime.timedelta | dict[str, int] | None = None, interval: str = "step",
                 verbose: bool = True):
        super().__init__(duration=duration, interval=interval, verbose=verbose)
        self._step_at_batch_start = 0

    @property
    def state_key(self) -> str:
        return Timer.__qualname__

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step != self._step_at_batch_start:  # not mid-accumulation: the step is whole
            super().on_train_batch_end(trainer, *args, **kwargs)
