"""NonFiniteGuard: skip an update whose gradients are not finite; stop after too many in a row.

A NaN/inf loss makes every gradient non-finite, so checking the global gradient norm right
before the optimizer step covers both. Skipping = dropping the gradients: AdamW then changes
neither weights nor moments. The norm is computed on all ranks (DDP and FSDP2 gradients are
already reduced/sharded consistently), so every rank takes the same decision and none hangs.
The norm it checks is logged too (``train/grad_norm``, before clipping): the curve to read beside
the loss when it spikes, and how far above ``gradient_clip_val`` the updates run.

Under fp16's GradScaler an overflow is how the scaler finds its scale: it skips that update and halves
the scale itself, several times in a row at a start or after a jump in the gradients, and once every
``growth_interval`` steps for the rest of the run. Counted as faults, five of them stopped runs the
scaler recovers (with "lower the learning rate"). They are counted apart (``train/grad_scaler_overflows``)
until the scale has fallen to ``MIN_LOSS_SCALE`` (DeepSpeed's ``min_loss_scale``): gradients that overflow
unscaled are a fault, as a NaN loss is, after the 16 halvings from the default 65536. A fault does not lower
the scale further: the scaler halves it after every skipped update and grows it back only after
``growth_interval`` (2000) clean steps, so faults that never come 5 in a row took it down until gradients
underflowed to 0 and the run trained on nothing, without a word. The scale is the same on every rank, so every
rank still takes the same decision.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.token_checkpoint import TokenCheckpoint
from cpt_lightning.devices import host_scalar
from cpt_lightning.errors import UserError

MIN_LOSS_SCALE = 1.0  # a GradScaler's overflow at or below it is a fault: the gradients overflow unscaled


class NonFiniteGuard(L.Callback):
    """Skip non-finite updates (counted in ``train/skipped_updates``); raise after ``max_consecutive``. Logs each
    step's global gradient L2 norm before clipping as ``train/grad_norm`` (a skipped one's NaN or inf included).
    A GradScaler's overflows above ``MIN_LOSS_SCALE`` are its own to skip (``train/grad_scaler_overflows``)."""

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise UserError(f"NonFiniteGuard.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.scaler_overflows = 0
        self._scale_to_keep = None  # a GradScaler's scale at a fault, put back after the scaler's update halved it

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor; read once a step
        # a skipped step's NaN/inf too: unlogged, its point showed the previous step's norm, which Lightning keeps
        pl_module.log("train/grad_norm", host_scalar(norm), rank_zero_only=True)
        if math.isfinite(norm):
            self.consecutive = 0
        elif (scale := _loss_scale(trainer)) is not None and scale > MIN_LOSS_SCALE:
            self.scaler_overflows += 1  # the scaler skips this update and lowers its scale
            pl_module.log("train/grad_scaler_overflows", host_scalar(self.scaler_overflows), rank_zero_only=True)
        else:
            self.skipped += 1
            self.consecutive += 1
            self._scale_to_keep = scale
            optimizer.zero_grad(set_to_none=True)
            rank_zero_warn(
                f"non-finite gradients at step {trainer.global_step}: update skipped "
                f"({self.consecutive} in a row, {self.skipped} in this run)"
            )
            if self.consecutive >= self.max_consecutive:
                _log_now(trainer, {"train/grad_norm": norm, "train/skipped_updates": self.skipped})
                raise UserError(self._stop_message(trainer))
        pl_module.log("train/skipped_updates", host_scalar(self.skipped), rank_zero_only=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._scale_to_keep is not None:  # after the optimizer step, where the scaler halved it
            trainer.precision_plugin.scaler.update(self._scale_to_keep)
            self._scale_to_keep = None

    def _stop_message(self, trainer) -> str:
        """Where to resume from: every checkpoint saved since the first fault holds the weights that faulted."""
        first = trainer.global_step - self.consecutive + 1
        before = [path for callback in trainer.checkpoint_callbacks if isinstance(callback, TokenCheckpoint)
                  if (path := callback.newest_saved_before(first)) is not None]
        where = f"the newest: {before[0]}" if before else "none is kept"
        steps = f"step {first}" if first == trainer.global_step else f"steps {first}-{trainer.global_step}"
        return (f"{self.consecutive} consecutive non-finite updates ({steps}): none was "
                f"applied, so the weights are those step {first} started from, as in every checkpoint saved since. "
                f"If a batch is at fault, check the data; if the weights diverged, resume with a lower learning "
                f"rate from a checkpoint saved before step {first} ({where})")

    def state_dict(self) -> dict:  # a preemption mid-fault keeps counting
        return {"skipped": self.skipped, "consecutive": self.consecutive, "scaler_overflows": self.scaler_overflows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict.get("consecutive", 0)  # checkpoints from before it was saved: 0
        self.scaler_overflows = state_dict.get("scaler_overflows", 0)


def _log_now(trainer, metrics: dict[str, float]) -> None:
    """Write ``metrics`` at this step before the run stops (Lightning writes a step's logged values after it)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        logger.save()


def _loss_scale(trainer) -> float | None:
    """The scale of the precision plugin's enabled GradScaler (fp16; FSDP's sharded one too), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
