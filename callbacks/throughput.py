"""Tokens/s, FLOP/s and MFU for packed-row batches, via Lightning's ThroughputMonitor.

Logged (TensorBoard) every ``trainer.log_every_n_steps`` optimizer steps once ``window_size`` micro-batches have been
timed (rounded up to whole optimizer steps: the clock is read, after waiting for the GPU, at the end of each step only,
so the first step's end starts it and the first point comes one step after the window's steps):
``train/device/items_per_sec`` is tokens/s per device (rows are packed: every token counts),
``train/device/flops_per_sec`` the module's model FLOPs (``EncoderPretraining.flops_per_batch``,
see ``cpt_lightning/flops.py``) and ``train/device/mfu`` their share of the device's peak; with
several devices the same without ``device/`` for the whole job. ``train/hours_left`` divides the
tokens until the ObjectiveSchedule's last phase ends by the job's tokens/s. Validation, checkpoint saves and
phase-end exports are not training time. On a GPU,
``train/device/peak_allocated_gib`` and ``train/device/peak_reserved_gib`` are the CUDA allocator's
peaks on rank 0 since the previous point (what tensors held; what the allocator kept, as ``nvidia-smi``
counts it): the memory left for a larger micro-batch, in each phase (CLM's head predicts every position).
Lightning's running totals beside them (``train/time``, ``train/batches``, ``train/samples``, ``train/lengths``:
rank 0's training seconds, micro-batches, rows and tokens) are kept in checkpoints, so a resumed run carries them on.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks import throughput_monitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from callbacks.objective_schedule import find_objective_schedule
from cpt_lightning.devices import host_scalar
from cpt_lightning.errors import UserError
from cpt_lightning.peak_flops import compute_dtype, peak_flops


def _rows(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def _tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor that knows the batch contract, so YAML needs no functions.

    Args:
        window_size: micro-batches averaged over, rounded up to whole optimizer steps for training.
        peak_tflops: one device's peak dense TFLOP/s in the compute dtype, for MFU. Default:
            ``cpt_lightning.peak_flops`` (Lightning's table, with the dense figures of the Hopper chips
            it lists with sparsity or lacks: H100 NVL, H200 and H200 NVL); where none is known no MFU
            is logged. 989 is an H100/H200 SXM's bf16 dense figure.
    """

    def __init__(self, window_size: int = 50, peak_tflops: float | None = None):
        if not isinstance(window_size, int) or window_size < 2:  # Lightning's Throughput asserts it at setup
            raise UserError(f"callbacks.TokenThroughput window_size={window_size!r}: must be at least 2 (micro-batches averaged over)")
        if peak_tflops is not None and not peak_tflops > 0:
            raise UserError(f"callbacks.TokenThroughput peak_tflops={peak_tflops}: must be a positive TFLOP/s figure, or null")
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)
        self.peak_tflops = peak_tflops
        self._resumed_totals: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():  # Lightning's lookup, whose figure is replaced below, warns for a plain H200
            warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        self.available_flops = (self.peak_tflops * 1e12 if self.peak_tflops is not None
                                else peak_flops(device, compute_dtype(trainer)))
        if self.available_flops is None and device.type == "cuda":
            rank_zero_warn(f"no peak FLOP/s known for {torch.cuda.get_device_name(device)}: no MFU is logged; set "
                           "callbacks.TokenThroughput peak_tflops (its dense TFLOP/s in the compute dtype)")
        for throughput in self._throughputs.values():  # built by setup with Lightning's figure
            throughput.available_flops = self.available_flops

    @rank_zero_only
    def on_train_start(self, trainer, *args) -> None:
        """Training is timed once per optimizer step, so its window counts steps: ``window_size`` micro-batches
        rounded up to whole steps (the accumulation is known now, after GlobalBatch's setup)."""
        old = self._throughputs[RunningStage.TRAINING]
        # n clock readings hold n - 1 steps: one more reading than the steps asked for
        steps = math.ceil(self.kwargs["window_size"] / trainer.accumulate_grad_batches) + 1
        self._throughputs[RunningStage.TRAINING] = Throughput(
            available_flops=old.available_flops, world_size=old.world_size, window_size=steps, separator=old.separator
        )
        self._untimed_flops, self._flops_known = 0.0, False
        super().on_train_start(trainer, *args)
        if self._resumed_totals:  # Lightning's start set them to 0; a resumed run carries on from the checkpoint's
            stage = RunningStage.TRAINING
            self._batches[stage], self._samples[stage], self._lengths[stage] = (
                self._resumed_totals[key] for key in ("batches", "samples", "lengths"))
            self._t0s[stage] -= self._resumed_totals["time"]

    def state_dict(self) -> dict:
        """Training's running totals so far (rank 0's; none on the other ranks, which count nothing)."""
        stage = RunningStage.TRAINING
        if stage not in self._t0s:  # saved before training started again: what the checkpoint it resumed held
            return dict(self._resumed_totals)
        return {"time": throughput_monitor.time.perf_counter() - self._t0s[stage], "batches": self._batches[stage],
                "samples": self._samples[stage], "lengths": self._lengths[stage]}

    def leave_out(self, seconds: float) -> None:
        """Take ``seconds`` of saving out of training time, as Lightning takes validation's out."""
        if RunningStage.TRAINING in self._t0s:  # rank 0, training under way
            self._t0s[RunningStage.TRAINING] += seconds

    def load_state_dict(self, state_dict: dict) -> None:
        """Kept until training starts: Lightning's start of training sets the totals to 0 after a restore."""
        self._resumed_totals = dict(state_dict)

    @torch.inference_mode()
    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        """Lightning's update, but a training micro-batch inside an accumulation is only counted: reading the
        clock needs ``torch.cuda.synchronize()``, which, at every micro-batch, left the GPU idle while the host
        fetched and prepared the next one. The step's last micro-batch is timed with the step's tokens and FLOPs."""
        stage = trainer.state.stage
        self._lengths[stage] += _tokens(batch)
        self._samples[stage] += _rows(batch)
        self._batches[stage] += 1
        flops = getattr(pl_module, "flops_per_batch", None)
        if stage != RunningStage.TRAINING:
            self._time(trainer, stage, flops)
            return
        self._untimed_flops += flops or 0.0
        self._flops_known = flops is not None
        if not trainer.fit_loop._should_accumulate():
            self._time_training(trainer)

    def _time_training(self, trainer) -> None:
        """Time the training micro-batches counted since the last timing, with their FLOPs."""
        self._time(trainer, RunningStage.TRAINING, self._untimed_flops if self._flops_known else None)
        self._untimed_flops = 0.0

    def _time(self, trainer, stage: RunningStage, flops: float | None) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the clock must see the GPU's work done
        elapsed = throughput_monitor.time.perf_counter() - self._t0s[stage]  # the clock Lightning's _start read
        self._throughputs[stage].update(
            time=elapsed, batches=self._batches[stage], samples=self._samples[stage], lengths=self._lengths[stage],
            flops=flops,
        )

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        """Lightning's metrics, and in training the hours left and the GPU memory peaks."""
        super()._compute(trainer, iter_num)
        if trainer.state.stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return
        self._log_hours_left(trainer)
        log_peak_memory(trainer)

    def _log_hours_left(self, trainer) -> None:
        """``train/hours_left``: the tokens until the ObjectiveSchedule's last phase ends at the job's current rate
        (validation and checkpoints not counted)."""
        schedule = find_objective_schedule(trainer)
        if schedule is None:
            return
        throughput = self._throughputs[RunningStage.TRAINING]
        per_device = throughput.compute().get(f"device{throughput.separator}items_per_sec")
        left = schedule.tokens_left(trainer.lightning_module.tokens_seen)
        if per_device and left is not None:
            hours = left / (per_device * trainer.world_size) / 3600
            trainer.lightning_module.log("train/hours_left", host_scalar(hours), rank_zero_only=True)

    @rank_zero_only
    def on_validation_start(self, trainer, *args) -> None:
        """Validation between two micro-batches of a step (``val_check_interval`` counts micro-batches):
        time the step's micro-batches run so far first. Lightning takes the training clock to have stopped
        at its last reading and takes everything up to validation's start for idle time, so the untimed
        micro-batches' compute dropped out of training time while their tokens still counted."""
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and RunningStage.TRAINING in self._t0s and trainer.fit_loop._should_accumulate():
            self._time_training(trainer)
        super().on_validation_start(trainer, *args)

    @rank_zero_only
    def on_validation_end(self, trainer, *args) -> None:
        """Training's clock resumes from its last reading: the validation, up to now, is not training time.

        Lightning's own ended validation at its last batch, so what runs after it (the module's all-reduce of
        the loss sums, where rank 0 waits for the slowest rank, and the logging) was counted as training.
        A validation before the fit's first training reading (TokenValidation's of the step a run resumes at, in
        on_train_start) is taken out alone: counting from the clock's start, which a resume sets back by the time
        trained before, ``train/time`` started again near 0 (and each later checkpoint kept the loss)."""
        if RunningStage.TRAINING not in self._t0s:  # the sanity check, cpt validate: training's clock not started
            return
        now = throughput_monitor.time.perf_counter()
        if train_times := self._throughputs[RunningStage.TRAINING]._time:
            self._t0s[RunningStage.TRAINING] = now - train_times[-1]
        else:
            self._t0s[RunningStage.TRAINING] += now - self._t0s[RunningStage.VALIDATING]

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        """Timed, not logged: Lightning logged ``validate/*`` against the validation batch counter, not the
        step TensorBoard plots training against, and priced a forward at ``flops_per_batch`` (3 passes)."""
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)


@contextmanager
def untimed(trainer):
    """Around a checkpoint save or a phase-end export: not training time. Counted, it cut the tokens/s and MFU
    logged at each phase end several-fold (an export of a full checkpoint and an HF folder in a window of a few
    steps) and raised ``train/hours_left`` and ``train/time``."""
    start = throughput_monitor.time.perf_counter()
    try:
        yield
    finally:
        seconds = throughput_monitor.time.perf_counter() - start
        for callback in trainer.callbacks:
            if isinstance(callback, TokenThroughput):
                callback.leave_out(seconds)


def log_peak_memory(trainer) -> None:
    """The CUDA allocator's peaks since the last call, in GiB, then a new window: a query of the allocator's
    counters, no wait for the GPU. Nothing off CUDA."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return
    for name, peak in (("allocated", torch.cuda.max_memory_allocated), ("reserved", torch.cuda.max_memory_reserved)):
        trainer.lightning_module.log(f"train/device/peak_{name}_gib", host_scalar(peak(device) / 2**30),
                                     rank_zero_only=True)
    torch.cuda.reset_peak_memory_stats(device)
