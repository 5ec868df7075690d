"""The FLOP count behind MFU: hand-checked against ModernBERT-base's parameter count."""

import pytest
from transformers import ModernBertConfig

from cpt_lightning.flops import attention_context, training_flops

BASE = ModernBertConfig()  # ModernBERT-base: 22 layers, hidden 768, GLU MLP 1152, vocab 50368, window ±64


def test_dense_part_is_six_times_encoder_weights():
    encoder_weights = 110_297_088  # sum of the 2-D weights under model.layers.* in ModernBERT-base
    one_token_attention = 22 * 12 * 768 * 1  # a 1-token row attends to itself in each of the 22 layers
    assert training_flops(BASE, rows=1, seq_len=1, causal=False, predicted=0) == 6 * encoder_weights + one_token_attention


def test_attention_context_per_layer_kind():
    assert attention_context(8192, causal=False, window=None) == 8192
    assert attention_context(8192, causal=True, window=None) == pytest.approx(4096.5)
    assert attention_context(8192, causal=False, window=64) == 129
    assert attention_context(8192, causal=True, window=64) == 65


def test_sparse_head_counts_predicted_positions_only():
    full = training_flops(BASE, 1, 8192, causal=False, predicted=8192)
    sparse = training_flops(BASE, 1, 8192, causal=False, predicted=1229)
    assert full - sparse == 6 * (768 * 768 + 768 * 50368) * (8192 - 1229)
