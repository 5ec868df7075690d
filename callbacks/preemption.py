"""PreemptionCheckpoint: on SIGTERM (SLURM's warning before a kill), save ``last.ckpt`` and exit.

Lightning turns SIGTERM into an exception at the end of the micro-batch that saw it. With gradient
accumulation that can be the middle of an optimizer step, whose accumulated gradients a checkpoint
does not hold: the resumed run would skip those micro-batches. So the signal is held back until
the optimizer step in progress has completed (accumulation boundaries come every few seconds;
SLURM's warning gives minutes) and only then handed to Lightning. The checkpoint goes where
``--ckpt_path last`` looks, so rerunning the same command resumes; the CLI exits with 143
(128 + SIGTERM), which a requeue script can test.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    def __init__(self):
        self._lightning_handler = None  # Lightning's SIGTERM handler, called once the step is whole
        self._pending: tuple | None = None
        self._step_at_batch_start = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._lightning_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._hold)

    def _hold(self, signum, frame) -> None:
        self._pending = (signum, frame)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending is not None and trainer.global_step > self._step_at_batch_start:
            self._release()

    def on_train_end(self, trainer, pl_module) -> None:
        self._release()  # a signal during the last step: Lightning still sees it (and the handler is restored)

    def _release(self) -> None:
        handler, self._lightning_handler = self._lightning_handler, None
        if handler is None:
            return
        signal.signal(signal.SIGTERM, handler)
        if self._pending is not None and callable(handler):
            handler(*self._pending)
        self._pending = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.checkpoint_callback is None:
            return
        callback = trainer.checkpoint_callback
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        rank_zero_info(f"[PreemptionCheckpoint] SIGTERM at step {trainer.global_step}: saved {path}")
