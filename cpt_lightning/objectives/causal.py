"""Causal language modelling with the encoder's own MLM head: the CLM detour."""

from __future__ import annotations

import torch

from cpt_lightning.objectives.base import IGNORE_INDEX, Objective


def next_token_labels(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Position i predicts token i+1 only when both lie in the same document.

    The last token of a document (and of a row) predicts nothing, so no loss ever asks the model
    to guess across a packing boundary it cannot see through.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    same_document = position_ids[:, 1:] != 0
    labels[:, :-1] = torch.where(same_document, input_ids[:, 1:], IGNORE_INDEX)
    return labels


class CausalLM(Objective):
    """Next-token prediction on every position whose next token is in its document, causal attention in every layer."""

    name = "clm"
    attention = "causal"

    def build_inputs(self, input_ids, position_ids, generator):
        return input_ids, next_token_labels(input_ids, position_ids)
