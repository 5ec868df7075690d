"""A user-written objective, living outside the library, plugged in by ``class_path``.

This is the example docs/objectives.md walks through: whole spans of a document are replaced by
[MASK] (SpanBERT / T5-style corruption), bidirectional attention, loss on the masked tokens.
"""

import torch

from cpt_lightning.errors import UserError
from cpt_lightning.objectives import IGNORE_INDEX, Objective


class SpanMaskedLM(Objective):
    """Mask spans of ``span_length`` tokens starting at ``mask_rate / span_length`` of the positions, each cut at the
    end of its document. Overlapping spans merge, so a little under ``mask_rate`` is masked: 1 − (1 − rate/span)^span,
    0.143 at 0.15 and 3."""

    name = "span_mlm"
    attention = "bidirectional"

    def __init__(self, mask_rate: float = 0.15, span_length: int = 3):
        if span_length < 1:  # a UserError: one line from cpt fit, not a traceback
            raise UserError(f"SpanMaskedLM.span_length must be at least 1, got {span_length}")
        self.mask_rate = mask_rate
        self.span_length = span_length

    def build_inputs(self, input_ids, position_ids, generator):
        draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        starts = draws < self.mask_rate / self.span_length
        document = (position_ids == 0).cumsum(dim=1)  # a packed row's documents each start at position 0
        masked = torch.zeros_like(starts)
        for offset in range(self.span_length):  # a position is masked when a span of its document started offset before
            length = input_ids.shape[1] - offset
            masked[:, offset:] |= starts[:, :length] & (document[:, :length] == document[:, offset:])
        special = torch.as_tensor(self.tokens.special_ids, device=input_ids.device)
        masked &= ~torch.isin(input_ids, special)
        labels = torch.where(masked, input_ids, IGNORE_INDEX)
        return torch.where(masked, self.tokens.mask_id, input_ids), labels


class MisspeltObjective(Objective):
    """``build_input`` for ``build_inputs``: abstract, which was all jsonargparse said."""

    name = "misspelt"
    attention = "bidirectional"

    def build_input(self, input_ids, position_ids, generator):
        return input_ids, input_ids
