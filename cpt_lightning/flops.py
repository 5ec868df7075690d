"""Training FLOPs of one packed micro-batch, spelled out, for tokens/s → MFU.

Counted per token, forward + backward = 3 × forward, a multiply-add = 2 FLOPs:
- encoder matmuls: 6 · N_layers, N_layers = the weights of every encoder layer (Wqkv, Wo, Wi, mlp.Wo);
  4 for a weight that needs no gradient (a frozen layer: backward computes only its input's
  gradient); embedding lookups cost nothing;
- attention scores and values: 12 · d · keys per layer (QKᵀ and AV, 2·d each per query-key pair,
  ×3). Nominal count: the row taken as one document, every key the causal mask and the window leave
  (L or (L+1)/2 a query in global layers; in sliding ones about 2w+1 or w+1, fewer near the row's
  ends: 128.49 and 64.75 at L=8192, ±64); document masking is not subtracted. (The PaLM convention of torchtitan
  and nanoGPT counts L keys in every layer whatever the mask, so its MFU is higher for the same speed.)
  Document-masked count (``position_ids`` given): the keys each query may really see inside its own
  document, exactly; with abstracts of a few hundred tokens in 8192-token rows it is a small
  fraction of the nominal one: the attention the masks require, a lower bound on what kernels
  compute (FlexAttention's tiles cover 1.8–4.5× it, SDPA every pair);
- MLM head (dense h×h + decoder h×V): 6 · (h² + h·V) per *predicted* position only (sparse head).
"""

from __future__ import annotations

import torch


def attention_context(seq_len: int, causal: bool, window: int | None) -> float:
    """Keys per query over a row taken as one document: what causality and the window leave, a query near either
    end of the row seeing fewer (``visible_keys`` of one document, in closed form). Clamping to 2w+1 (w+1 causal)
    instead counted rows a few windows long up to a third too much: 128 keys a query at L=128, ±64, where the
    mask leaves 96.5."""
    reach = seq_len - 1 if window is None else min(window, seq_len - 1)
    before = reach * (reach + 1) / 2 + (seq_len - 1 - reach) * reach  # Σ over positions p of min(p, reach)
    return 1 + (1 if causal else 2) * before / seq_len


def visible_keys(position_ids: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """Query-key pairs that document masking (and causality, and the window) allow, summed over the batch.

    A 0-dim tensor on ``position_ids``' device, computed without synchronising. A token at position
    ``p`` of an ``n``-token document sees ``n`` keys (global), ``p + 1`` (causal), and within a
    window ``w`` ``min(p, w) + min(n - 1 - p, w) + 1`` (``min(p, w) + 1`` causal).
    """
    length = position_ids.shape[-1]
    index = torch.arange(length, device=position_ids.device)
    position_ids = torch.minimum(position_ids, index)  # a row's first document starts at the row, as the masks have it
    starts = torch.where(position_ids == 0, index, length)  # where documents begin, `length` elsewhere
    after = torch.cat([starts[..., 1:], starts.new_full((*starts.shape[:-1], 1), length)], dim=-1)
    next_start = after.flip(-1).cummin(-1).values.flip(-1)  # first document start after each token
    document_length = next_start - (index - position_ids)
    before = position_ids if window is None else position_ids.clamp(max=window)
    if causal:
        return (before + 1).sum()
    after_keys = document_length - 1 - position_ids
    return (before + (after_keys if window is None else after_keys.clamp(max=window)) + 1).sum()


def training_flops(config, rows: int, seq_len: int, causal: bool, predicted: int, position_ids=None,
                   frozen_weights: int = 0):
    """Nominal training FLOPs of a ``rows × seq_len`` micro-batch (a float); with ``position_ids``, the
    attention counted over the keys document masking leaves visible (a 0-dim tensor, not synchronised).
    ``frozen_weights``: how many of the encoder layers' weights require no gradient."""
    hidden, vocab = config.hidden_size, config.vocab_size
    per_layer = 3 * hidden * hidden + hidden * hidden + 2 * hidden * config.intermediate_size + hidden * config.intermediate_size
    # Wqkv (3h²) + Wo (h²) + Wi (h × 2·inter, GLU) + mlp.Wo (inter × h)
    tokens = rows * seq_len
    dense = (6 * per_layer * config.num_hidden_layers - 2 * frozen_weights) * tokens
    keys = {}
    for layer_type in set(config.layer_types):
        window = config.sliding_window if layer_type == "sliding_attention" else None
        if position_ids is None:
            keys[layer_type] = attention_context(seq_len, causal, window) * tokens
        else:
            keys[layer_type] = visible_keys(position_ids, causal, window)
    attention = sum(12 * hidden * keys[layer_type] for layer_type in config.layer_types)
    head = 6 * (hidden * hidden + hidden * vocab) * predicted
    return dense + attention + head
