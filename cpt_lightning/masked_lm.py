"""ModernBertForPretraining: Hugging Face's ModernBertForMaskedLM with a training forward that fuses head and loss.

Same class hierarchy, weights, state-dict keys and inference behaviour as ``ModernBertForMaskedLM``
(exports rebuild the plain class). Only when labels are given and ``loss_chunk_size`` is set does
the forward differ: the head runs on the labelled positions and the tied decoder + cross-entropy
run chunk by chunk (:mod:`cpt_lightning.fused_loss`), returning the loss and the argmax
predictions instead of ``[N, vocab]`` logits. It stays the root module's forward, so FSDP2
gathers the embeddings, head and decoder exactly as for the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import ModernBertForMaskedLM
from transformers.utils import ModelOutput

from cpt_lightning.fused_loss import linear_cross_entropy


@dataclass
class FusedLossOutput(ModelOutput):
    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None  # [N] argmax ids at the labelled positions, in order
    targets: torch.Tensor | None = None  # [N] the labels at those positions, in the same order


class ModernBertForPretraining(ModernBertForMaskedLM):
    """``loss_chunk_size``: rows of logits computed at once by the fused loss; None = the dense HF path.
    ``compile_loss``: run the fused loss's per-chunk arithmetic through ``torch.compile``."""

    loss_chunk_size: int | None = None
    compile_loss: bool = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        if labels is None or self.loss_chunk_size is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
        labels = labels.reshape(-1)
        # One host sync for the data-dependent row count (the labelled positions), then integer gathers: a
        # boolean mask would count them again for the hidden states, for the labels and in the backward.
        index = torch.nonzero(labels != self.sparse_pred_ignore_index).squeeze(1)
        targets = labels.index_select(0, index)
        hidden = self.head(hidden.reshape(labels.shape[0], -1).index_select(0, index))
        loss, predictions = linear_cross_entropy(
            hidden, self.decoder.weight, self.decoder.bias, targets, self.loss_chunk_size, self.compile_loss
        )
        return FusedLossOutput(loss=loss, predictions=predictions, targets=targets)
