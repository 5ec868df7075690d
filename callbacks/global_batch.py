"""GlobalBatch: hold the global batch (sequences per optimizer step) fixed whatever the hardware.

The recipe's batch is 384 sequences per optimizer step. The same YAML runs on 4 GPUs, 2 nodes
or 1 CPU process, so gradient accumulation is not a config value but derived at start-up:
``sequences = micro_batch_size × devices × num_nodes × accumulate_grad_batches``. The token clock
(tokens per step), hence the phase budgets and the learning-rate schedule, stays the same when
the hardware changes; a resumed run on other hardware lands on the same tokens per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from cpt_lightning.config_history import configured_callbacks
from cpt_lightning.errors import UserError


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's sequences are spread over devices and micro-batches."""

    micro_batch_size: int
    devices: int
    num_nodes: int
    accumulation: int

    @property
    def sequences(self) -> int:
        return self.micro_batch_size * self.devices * self.num_nodes * self.accumulation

    def describe(self, block_size: int | None = None) -> str:
        text = (
            f"{self.sequences} sequences per optimizer step = micro_batch_size {self.micro_batch_size} × "
            f"{self.devices} devices × {self.num_nodes} nodes × {self.accumulation} accumulated micro-batches"
        )
        if block_size:
            text += f" ({self.sequences * block_size:,} tokens at block_size {block_size})"
        return text


def derive_layout(sequences: int, micro_batch_size: int, devices: int, num_nodes: int) -> BatchLayout:
    """The accumulation that makes ``sequences`` exact, or a UserError naming the fields to change."""
    per_pass = micro_batch_size * devices * num_nodes
    if sequences % per_pass:
        fits = [m for m in range(1, sequences + 1) if sequences % (m * devices * num_nodes) == 0]
        hint = (
            f"micro_batch_size values that fit: {fits}" if fits
            else f"no micro_batch_size fits {devices * num_nodes} processes: use a device count that divides {sequences}"
        )
        raise UserError(
            f"GlobalBatch.sequences={sequences} is not divisible by data.init_args.micro_batch_size ({micro_batch_size}) "
            f"× trainer.devices ({devices}) × trainer.num_nodes ({num_nodes}) = {per_pass}; {hint}"
        )
    return BatchLayout(micro_batch_size, devices, num_nodes, sequences // per_pass)


def check_configured_layout(config) -> None:
    """``derive_layout`` on the parsed config's own numbers, before the model loads: at setup, an indivisible batch
    was refused only once the model had loaded and every rank had started (seconds to minutes, a download more).
    Numbers known only at setup (``devices: auto`` or ``-1``, GPU indices as ``"0,1"``) are left to it."""
    trainer = config.get("trainer") or {}
    devices, num_nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():  # --trainer.devices=4 is parsed as "4": Lightning counts it
        devices = int(devices)
    devices = len(devices) if isinstance(devices, list) else devices
    micro_batch_size = ((config.get("data") or {}).get("init_args") or {}).get("micro_batch_size")
    if not all(type(n) is int and n >= 1 for n in (devices, num_nodes, micro_batch_size)):
        return
    for callback in configured_callbacks(trainer):
        module, _, name = str(callback.get("class_path", "")).rpartition(".")
        sequences = (callback.get("init_args") or {}).get("sequences")
        named = getattr(import_module(module), name) if module else None
        is_global_batch = isinstance(named, type) and issubclass(named, GlobalBatch)
        if is_global_batch and type(sequences) is int and sequences >= 1:  # other values: GlobalBatch's own refusal
            derive_layout(sequences, micro_batch_size, devices, num_nodes)


class GlobalBatch(L.Callback):
    """Derive ``trainer.accumulate_grad_batches`` so every optimizer step sees ``sequences`` rows.

    Reads ``micro_batch_size`` from the datamodule and the world from the trainer at setup (the
    fit loop reads ``trainer.accumulate_grad_batches`` at every batch, so setting it here holds),
    and checks the first batch really has that many rows.
    """

    def __init__(self, sequences: int):
        if type(sequences) is not int or sequences < 1:  # True is an int to Python: a global batch of 1
            raise UserError(f"GlobalBatch.sequences must be a positive integer, got {sequences!r}")
        self.sequences = sequences
        self.layout: BatchLayout | None = None
        self._checked = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        micro_batch_size = getattr(trainer.datamodule, "micro_batch_size", None)
        if micro_batch_size is None:
            raise UserError("GlobalBatch needs a datamodule with micro_batch_size (e.g. cpt_lightning.data.PackedDataModule)")
        layout = derive_layout(self.sequences, micro_batch_size, trainer.num_devices, trainer.num_nodes)
        if trainer.accumulate_grad_batches not in (1, layout.accumulation):
            raise UserError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} conflicts with GlobalBatch, "
                f"which derives {layout.accumulation}: remove trainer.accumulate_grad_batches from the config"
            )
        trainer.accumulate_grad_batches = layout.accumulation
        self.layout = layout
        rank_zero_info(f"[GlobalBatch] {layout.describe(getattr(trainer.datamodule, 'block_size', None))}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._checked:
            return
        rows = batch["input_ids"].shape[0]
        if rows != self.layout.micro_batch_size:
            raise UserError(
                f"GlobalBatch: the first batch has {rows} rows, not data.init_args.micro_batch_size="
                f"{self.layout.micro_batch_size}; the global batch would not be {self.sequences}"
            )
        self._checked = True
