"""LossSpikeMonitor: flag training losses far above their recent level.

A spike is an optimizer step's loss more than ``threshold`` standard deviations above the mean of
the previous ``window`` steps of the same phase (a phase switch starts a fresh window: CLM and
MLM losses live on different scales, and so do MLM's at 30% and 15% masking, the baseline's two
phases). A step's loss is the mean over the positions it predicted on every rank (one small
all-reduce per step), so a spike in any rank's data is seen. Spikes are counted in
``train/loss_spikes`` and warned about with the step, so a diverging run is visible before it
produces NaNs. A non-finite loss (the NonFiniteGuard's business) never enters the window, where
it would hide every later spike. The window is checkpointed: a resumed run keeps watching.
"""

from __future__ import annotations

import math
from collections import deque

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.objective_schedule import find_objective_schedule
from cpt_lightning.devices import host_scalar
from cpt_lightning.errors import UserError


class LossSpikeMonitor(L.Callback):
    """Count and warn about optimizer steps whose loss jumps far above its recent level.

    Args:
        window: how many previous steps of the same phase make the recent level.
        threshold: a spike is a loss more than this many standard deviations above their mean.
    """

    def __init__(self, window: int = 100, threshold: float = 6.0):
        if window < 2:  # one loss has no standard deviation: such a monitor would never flag anything
            raise UserError(f"LossSpikeMonitor.window must be >= 2 steps, got {window}")
        if not threshold > 0:
            raise UserError(f"LossSpikeMonitor.threshold must be a positive number of standard deviations, got {threshold}")
        self.window = window
        self.threshold = threshold
        self.spikes = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._phase: tuple[int | None, str] | None = None  # the ObjectiveSchedule's phase and its objective's name
        self._micro_batch_losses: list[torch.Tensor] = []  # kept on the device: read once per step, not per micro-batch
        self._predicted = 0  # the positions this step's micro-batches predicted on this rank
        self._step_at_batch_start = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if predicted := outputs.get("predicted", 0):  # weighed by its predicted positions, as the gradient
            self._micro_batch_losses.append(outputs["mean_loss"].float() * predicted)
            self._predicted += predicted
        if trainer.global_step == self._step_at_batch_start:
            return  # mid-accumulation: the step is not whole yet
        losses, self._micro_batch_losses = self._micro_batch_losses, []
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=pl_module.device)
        local = torch.stack([total, torch.full_like(total, self._predicted)])  # filled on the device: no host copy
        self._predicted = 0
        total, count = trainer.strategy.reduce(local, reduce_op="sum").tolist()  # the step's one host sync
        if count == 0:
            return
        loss = total / count
        phase = _phase(trainer, pl_module)
        if self._phase == (None, phase[1]):  # saved before the phase was, by objective name: the window is this one's
            self._phase = phase
        if phase != self._phase:
            self._phase = phase
            self._recent.clear()
        if math.isfinite(loss):
            self._check(loss, self._step_at_batch_start)
            self._recent.append(loss)
        pl_module.log("train/loss_spikes", host_scalar(self.spikes), rank_zero_only=True)

    def _check(self, loss: float, step: int) -> None:
        if len(self._recent) < self.window:
            return
        history = torch.tensor(self._recent)
        mean, std = history.mean().item(), history.std().item()
        if loss > mean + self.threshold * max(std, 1e-8):
            self.spikes += 1
            rank_zero_warn(
                f"loss spike at step {step}: {loss:.4f} vs {mean:.4f} ± {std:.4f} "
                f"over the last {self.window} steps ({self.spikes} so far)"
            )

    def state_dict(self) -> dict:
        index, objective = self._phase or (None, None)
        return {"spikes": self.spikes, "recent": list(self._recent), "objective": objective, "phase": index}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spikes = state_dict["spikes"]
        self._recent.extend(state_dict.get("recent", []))  # checkpoints from before the window was saved: none
        self._phase = (state_dict.get("phase"), state_dict.get("objective"))  # no phase: saved before it was


def _phase(trainer, pl_module) -> tuple[int | None, str]:
    """The phase a step trained in: the ObjectiveSchedule's index (the MLM baseline's two phases share the
    objective's name), with the objective's name (a run without a schedule has one phase per objective)."""
    schedule = find_objective_schedule(trainer)
    return (schedule.current if schedule is not None else None), pl_module.objective.name
