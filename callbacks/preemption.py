"""PreemptionCheckpoint: on SIGTERM (SLURM's warning before a kill), finish the step, save ``last.ckpt``, exit.

Lightning alone turns SIGTERM into an exception at the end of the micro-batch that saw it, and its
handler broadcasts to the other ranks from inside the signal handler, at whatever point each rank
happens to be. Two problems for long sharded runs: with gradient accumulation the stop can fall in
the middle of an optimizer step, whose accumulated gradients a checkpoint does not hold (the resumed
run would skip those micro-batches); and a collective started at an arbitrary point can interleave
with FSDP's own collectives differently on each rank.

So this callback takes SIGTERM over from the sanity validation on: the handler only notes the signal. After every
optimizer step, all ranks agree (one all-reduce of a flag) whether any of them was signalled, and if
so all of them stop at that same step boundary, through Lightning's own path (``SIGTERMException``,
``on_exception`` below saves where ``--ckpt_path last`` looks). The CLI then exits with 143
(128 + SIGTERM), which a requeue script can test. Boundaries come every few seconds; SLURM's
warning gives minutes. A validation due at that boundary runs before the save, so the run's
TensorBoard curves go on from the resume as if uninterrupted.

Ctrl-C (SIGINT) stays Python's KeyboardInterrupt, noted too: one raised while a finalizer runs (a validation
loader's workers being shut down) is printed as ignored and lost, and the run trained on; the next batch raises it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(L.Callback):
    def __init__(self):
        self._replaced_handler = None
        self._signalled = False
        self._interrupted = False  # a SIGINT came: raised again at the next batch, in case a finalizer swallowed it
        self._stopping = False  # all ranks agreed to stop after this step
        self._step_at_batch_start = 0

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_over(trainer)  # Lightning's flag stopped the sanity validation and saved at step 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_over(trainer)  # a run without sanity validation

    def _take_over(self, trainer) -> None:
        # signal handlers live in the main thread
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) != self._note:
            self._replaced_handler = signal.getsignal(signal.SIGTERM)
            # A SIGTERM since Lightning's handler took over (the restore, the loaders' start): ours to stop with
            # at the first step boundary; left in Lightning's flag it stopped the run after the first
            # micro-batch, and the save held half an optimizer step.
            self._signalled = trainer._signal_connector.received_sigterm
            trainer._signal_connector.received_sigterm = False
            signal.signal(signal.SIGTERM, self._note)
        # Not where SIGINT is ignored (a script's background job) or handled otherwise; Lightning puts the handler
        # back at the end of the fit, as every one it found at its start.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._interrupted = False  # one noted in an earlier fit of this callback (a notebook's) is not this one's
            signal.signal(signal.SIGINT, self._note_interrupt)

    def _note(self, signum, frame) -> None:
        self._signalled = True

    def _note_interrupt(self, signum, frame) -> None:
        self._interrupted = True
        raise KeyboardInterrupt

    def _raise_a_lost_interrupt(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._raise_a_lost_interrupt()
        self._step_at_batch_start = trainer.global_step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._raise_a_lost_interrupt()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._replaced_handler is None or trainer.global_step == self._step_at_batch_start:
            return  # not ours to handle, or mid-accumulation: the step is not whole yet
        if trainer.should_stop:  # the run ends at this step anyway (its last phase did, on every rank): let it finish,
            return  # saving its end; stopped here it skipped that save and exited 143, so a requeue script requeued it
        if trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            rank_zero_info(f"[PreemptionCheckpoint] SIGTERM: stopping after step {trainer.global_step}")
            # Lightning raises SIGTERMException at the end of this batch on every rank (its own flag).
            self._stopping = True
            trainer._signal_connector.received_sigterm = True

    def on_validation_start(self, trainer, pl_module) -> None:
        # A validation due after the last step runs whole. With the flag up, Lightning's loop stopped at its first
        # batch: the point was lost, and the checkpoint's logger step (counted after validation) was one short, so
        # every point the resumed run logged sat one step early in TensorBoard.
        if self._stopping:
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._stopping:
            trainer._signal_connector.received_sigterm = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if signal.getsignal(signal.SIGTERM) == self._note:  # Lightning restores its predecessors after this
            signal.signal(signal.SIGTERM, self._replaced_handler)
        self._replaced_handler = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn != TrainerFn.FITTING:
            rank_zero_info("[PreemptionCheckpoint] Ctrl-C: cpt validate saves nothing, so rerun it as it was")
            return
        if isinstance(exception, KeyboardInterrupt):  # Lightning says only "attempting graceful shutdown", exit 1
            rank_zero_info(f"[PreemptionCheckpoint] Ctrl-C at step {trainer.global_step}: nothing is saved on an "
                           "interrupt (the step may be half done); --ckpt_path last resumes from the run's newest "
                           "checkpoint, if it saved one, and trains the steps since again. To stop and keep them: "
                           "SIGTERM (kill PID), which finishes the step, saves last.ckpt and exits 143")
            return
        if not isinstance(exception, SIGTERMException) or trainer.checkpoint_callback is None:
            return
        if trainer.fast_dev_run:  # Lightning's smoke test writes nothing (its last.ckpt could replace the run's)
            exception.saves_nothing = "a fast_dev_run"
            return
        if trainer.state.fn != TrainerFn.FITTING:  # cpt validate's step-0 save replaced the run's last.ckpt, and
            exception.saves_nothing = f"cpt {trainer.state.fn.value}"  # --ckpt_path last then trained it from step 0
            return
        callback = trainer.checkpoint_callback
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # whole: the requeued run resumes from it
        exception.saved_checkpoint = path  # for cpt fit's exit message
        rank_zero_info(f"[PreemptionCheckpoint] SIGTERM at step {trainer.global_step}: saved {path}")
