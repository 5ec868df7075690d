"""Training FLOPs of one packed micro-batch, spelled out, for tokens/s → MFU.

Counted per token, forward + backward = 3 × forward, a multiply-add = 2 FLOPs:
- encoder matmuls: 6 · N_layers, N_layers = the weights of every encoder layer (Wqkv, Wo, Wi, mlp.Wo);
  embedding lookups cost nothing;
- attention scores and values: 12 · d · ctx per layer (QKᵀ and AV, 2·d·ctx each, ×3), where ctx is
  the keys a query may see in the row: L (global) or 2w+1 (sliding), halved-ish when causal
  ((L+1)/2 and w+1). Document masking is not subtracted (nominal, as kernels without block
  skipping compute it);
- MLM head (dense h×h + decoder h×V): 6 · (h² + h·V) per *predicted* position only (sparse head).
"""

from __future__ import annotations


def attention_context(seq_len: int, causal: bool, window: int | None) -> float:
    if window is None:
        return (seq_len + 1) / 2 if causal else seq_len
    return min(window + 1, (seq_len + 1) / 2) if causal else min(2 * window + 1, seq_len)


def training_flops(config, rows: int, seq_len: int, causal: bool, predicted: int) -> float:
    hidden, vocab = config.hidden_size, config.vocab_size
    per_layer = 3 * hidden * hidden + hidden * hidden + 2 * hidden * config.intermediate_size + hidden * config.intermediate_size
    # Wqkv (3h²) + Wo (h²) + Wi (h × 2·inter, GLU) + mlp.Wo (inter × h)
    tokens = rows * seq_len
    dense = 6 * per_layer * config.num_hidden_layers * tokens
    attention = 0.0
    for layer_type in config.layer_types:
        window = config.sliding_window if layer_type == "sliding_attention" else None
        attention += 12 * hidden * attention_context(seq_len, causal, window) * tokens
    head = 6 * (hidden * hidden + hidden * vocab) * predicted
    return dense + attention + head
