"""Tokens/s (and MFU when the module reports FLOPs) for packed-row batches, via Lightning's ThroughputMonitor."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def _rows(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def _tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor that knows the batch contract, so YAML needs no functions."""

    def __init__(self, window_size: int = 50):
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)
