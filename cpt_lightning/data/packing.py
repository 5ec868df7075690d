"""Packed rows: documents back to back in fixed blocks, and the position ids that separate them.

Batch contract (DESIGN §3): ``{"input_ids": LongTensor[B, L], "position_ids": LongTensor[B, L]}``.
Position ids restart at 0 on the first token of every document (the token after a separator)
and at the start of each row, so ``cumsum(position_ids == 0)`` numbers the documents and no
attention mask built from it crosses a document boundary.
"""

from __future__ import annotations

import numpy as np
import torch


def position_ids_from_separators(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Positions counting from each document start; a document starts after ``separator_id``.

    Vectorised: the index of the latest document start is a running maximum along the row.
    """
    length = input_ids.shape[-1]
    index = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[..., 1:] = input_ids[..., :-1] == separator_id
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - last_start


class PackedCollate:
    """Stacks token blocks into the batch contract; runs in the loader's worker processes."""

    def __init__(self, separator_id: int):
        self.separator_id = separator_id

    def __call__(self, blocks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(np.stack(blocks).astype(np.int64))
        return {"input_ids": input_ids, "position_ids": position_ids_from_separators(input_ids, self.separator_id)}


class BlockPacker:
    """Cuts a stream of token arrays into ``block_size`` rows; a short remainder waits for more."""

    def __init__(self, block_size: int, dtype: np.dtype):
        self.block_size = block_size
        self.pending = np.empty(0, dtype)

    def add(self, tokens: np.ndarray) -> list[np.ndarray]:
        stream = np.concatenate([self.pending, tokens]) if len(self.pending) else tokens
        full = len(stream) // self.block_size * self.block_size
        self.pending = stream[full:].copy()
        return list(stream[:full].reshape(-1, self.block_size))

    @property
    def leftover(self) -> int:
        """Tokens that never filled a row (dropped at the end of a shard)."""
        return len(self.pending)
