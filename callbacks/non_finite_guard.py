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
unscaled are a fault, as a NaN loss is, after the 16 halvings from the default 65536. The scale is the same
on every rank, so every rank still takes the same decision.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

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
            optimizer.zero_grad(set_to_none=True)
            rank_zero_warn(
                f"non-finite gradients at step {trainer.global_step}: update skipped "
                f"({self.consecutive} in a row, {self.skipped} in this run)"
            )
            if self.consecutive >= self.max_consecutive:
                raise UserError(
                    f"{self.consecutive} consecutive non-finite updates (step {trainer.global_step}); no update "
                    "was applied for them, so the last checkpoint precedes the fault: lower the learning rate, "
                    "check the data, then resume from it"
                )
        pl_module.log("train/skipped_updates", host_scalar(self.skipped), rank_zero_only=True)

    def state_dict(self) -> dict:  # a preemption mid-fault keeps counting
        return {"skipped": self.skipped, "consecutive": self.consecutive, "scaler_overflows": self.scaler_overflows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict.get("consecutive", 0)  # checkpoints from before it was saved: 0
        self.scaler_overflows = state_dict.get("scaler_overflows", 0)


def _loss_scale(trainer) -> float | None:
    """The scale of the precision plugin's enabled GradScaler (fp16; FSDP's sharded one too), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
