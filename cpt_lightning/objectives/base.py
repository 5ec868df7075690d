"""The objective protocol: what a training objective must say so the module can run it.

An objective turns a packed batch into model inputs and per-position targets, and names the
attention it needs. The module does the rest (masks, encoder, head on predicted positions only,
logging under ``objective.name``), so a custom objective is a small class named by ``class_path``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cpt_lightning.attention import AttentionKind

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer ids an objective may need; filled in by the module from the real tokenizer."""

    mask_id: int | None
    special_ids: tuple[int, ...]  # never masked, never drawn as a random token (e.g. [CLS], [MASK], [unused0])
    vocab_size: int  # ids [0, vocab_size) minus special_ids are the ordinary tokens


class Objective(ABC):
    """One training objective. Subclasses set ``name`` (logging prefix) and ``attention``."""

    name: str
    attention: AttentionKind

    def bind(self, tokens: TokenizerFacts) -> None:
        """Receive the tokenizer facts before the first batch (override to validate them)."""
        self.tokens = tokens

    @abstractmethod
    def build_inputs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(model_input_ids, labels)``, both ``[B, L]``; ``labels == IGNORE_INDEX`` is not predicted."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss over the predicted positions only: ``logits [N, V]``, ``labels [N]``."""
        return F.cross_entropy(logits.float(), labels)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "tokens")
        return f"{type(self).__name__}({args})"
