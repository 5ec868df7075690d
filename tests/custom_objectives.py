"""A user-written objective, living outside the library, plugged in by ``class_path``.

This is the example docs/objectives.md walks through: whole spans of a document are replaced by
[MASK] (SpanBERT / T5-style corruption), bidirectional attention, loss on the masked tokens.
"""

import torch

from cpt_lightning.objectives import IGNORE_INDEX, Objective


class SpanMaskedLM(Objective):
    """Mask spans of ``span_length`` tokens starting at ``mask_rate / span_length`` of the positions."""

    name = "span_mlm"
    attention = "bidirectional"

    def __init__(self, mask_rate: float = 0.15, span_length: int = 3):
        self.mask_rate = mask_rate
        self.span_length = span_length

    def build_inputs(self, input_ids, position_ids, generator):
        starts = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        starts = (starts < self.mask_rate / self.span_length).float()
        # a position is masked when a span started within the previous span_length positions
        kernel = torch.ones(1, 1, self.span_length, device=input_ids.device)
        covered = torch.nn.functional.conv1d(starts[:, None], kernel, padding=self.span_length - 1)
        masked = covered[:, 0, : input_ids.shape[1]] > 0
        special = torch.as_tensor(self.tokens.special_ids, device=input_ids.device)
        masked &= ~torch.isin(input_ids, special)
        labels = torch.where(masked, input_ids, IGNORE_INDEX)
        return torch.where(masked, self.tokens.mask_id, input_ids), labels
