"""The FLOP count behind MFU: hand-checked against ModernBERT-base's parameter count."""

import pytest
import torch
from transformers import ModernBertConfig

from cpt_lightning.attention import dense_mask
from cpt_lightning.flops import attention_context, training_flops, visible_keys

BASE = ModernBertConfig()  # ModernBERT-base: 22 layers, hidden 768, GLU MLP 1152, vocab 50368, window ±64


def test_dense_part_is_six_times_encoder_weights():
    encoder_weights = 110_297_088  # sum of the 2-D weights under model.layers.* in ModernBERT-base
    one_token_attention = 22 * 12 * 768 * 1  # a 1-token row attends to itself in each of the 22 layers
    assert training_flops(BASE, rows=1, seq_len=1, causal=False, predicted=0) == 6 * encoder_weights + one_token_attention


def test_attention_context_per_layer_kind():
    assert attention_context(8192, causal=False, window=None) == 8192
    assert attention_context(8192, causal=True, window=None) == pytest.approx(4096.5)
    # ±64: 129 keys (65 causal) a query but near the row's ends, 64 of 8192 positions at each
    assert attention_context(8192, causal=False, window=64) == pytest.approx(1 + 2 * (64 * 65 / 2 + 8127 * 64) / 8192)
    assert attention_context(8192, causal=True, window=64) == pytest.approx(1 + (64 * 65 / 2 + 8127 * 64) / 8192)


def test_the_nominal_context_is_the_row_taken_as_one_document():
    """Rows a few windows long: the context was clamped to 2w+1 (w+1 causal), 128 keys a query at L=128, ±64, where
    the mask leaves 96.5 (a third more sliding-layer attention, MFU inflated). Each pair counted one by one here."""
    import random

    draw = random.Random(0)
    for _ in range(200):
        length, causal = draw.randint(1, 300), draw.random() < 0.5
        window = draw.choice([None, draw.randint(1, 200)])
        pairs = sum(1 for q in range(length) for k in range(length)
                    if (not causal or k <= q) and (window is None or abs(q - k) <= window))
        assert attention_context(length, causal, window) * length == pytest.approx(pairs), (length, causal, window)


def test_sparse_head_counts_predicted_positions_only():
    full = training_flops(BASE, 1, 8192, causal=False, predicted=8192)
    sparse = training_flops(BASE, 1, 8192, causal=False, predicted=1229)
    assert full - sparse == 6 * (768 * 768 + 768 * 50368) * (8192 - 1229)


@pytest.mark.parametrize("window", [None, 3, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_visible_keys_count_what_the_attention_mask_allows(causal, window):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(3):
        lengths = torch.randint(1, 40, (20,), generator=g).tolist()
        rows.append(torch.cat([torch.arange(n) for n in lengths])[:100])
    second_document = int((rows[1] == 0).nonzero()[1])
    rows[1][:second_document] += 5  # a row continuing a document from the one before (a custom data module)
    position_ids = torch.stack(rows)
    allowed = dense_mask(position_ids, "causal" if causal else "bidirectional", window)
    assert visible_keys(position_ids, causal, window).item() == allowed.sum().item()


def test_document_masked_count_is_the_nominal_one_for_whole_row_documents_without_window():
    position_ids = torch.arange(512).repeat(2, 1)
    config = ModernBertConfig(global_attn_every_n_layers=1, num_hidden_layers=3)  # global layers only
    for causal in (True, False):
        nominal = training_flops(config, 2, 512, causal, predicted=100)
        assert training_flops(config, 2, 512, causal, predicted=100, position_ids=position_ids).item() == pytest.approx(nominal)


def test_short_documents_leave_little_attention_to_compute():
    position_ids = torch.arange(256).repeat(32).view(1, 8192)  # 32 abstracts of 256 tokens in one 8192 row
    nominal = training_flops(BASE, 1, 8192, False, predicted=1229)
    masked = training_flops(BASE, 1, 8192, False, predicted=1229, position_ids=position_ids).item()
    global_layers = sum(t == "full_attention" for t in BASE.layer_types)
    global_lost = 8192 * (8192 - 256)  # each query sees its 256-token document instead of the row
    # the window is cut at both ends of each document, of which the nominal count (the row as one) cuts the row's two
    sliding_lost = (32 * 2 - 2) * sum(64 - p for p in range(64))
    expected = 12 * 768 * (global_layers * global_lost + (22 - global_layers) * sliding_lost)
    assert nominal - masked == pytest.approx(expected)
    assert masked / nominal < 0.6


def test_a_frozen_weight_costs_four_flops_per_token_not_six():
    frozen = 10_000
    assert training_flops(BASE, 1, 8192, True, 8192) - training_flops(BASE, 1, 8192, True, 8192, frozen_weights=frozen) == 2 * frozen * 8192


def test_the_module_counts_the_weights_that_require_no_gradient(tokenizer_dir):
    """LayerFreeze's frozen layers: backward computes their input's gradient but not their weights'."""
    from helpers import tiny_module

    module = tiny_module(tokenizer_dir)
    module._last_batch = (torch.arange(64).view(1, 64), 10)  # what training_step keeps: position_ids, predicted
    trained = module.flops_per_batch
    layer = module.model.model.layers[1]
    layer.requires_grad_(False)
    matrices = sum(p.numel() for p in layer.parameters() if p.ndim >= 2)  # Wqkv, Wo, Wi, mlp.Wo (norms uncounted)
    assert trained - module.flops_per_batch == 2 * matrices * 64


def test_rows_shorter_than_the_window_count_only_their_own_keys():
    """A row shorter than the ±64 window (a CPU demo block, a smoke test) costs a sliding layer what it costs a
    global one, causal or not: counting the window's 65 or 129 keys instead would inflate MFU."""
    for causal, context in ((False, 16), (True, 8.5)):  # causal: query p sees p + 1 keys, (1 + 2 + … + 16) / 16
        assert attention_context(16, causal, window=64) == pytest.approx(context)
        assert attention_context(16, causal, window=None) == pytest.approx(context)


def test_the_module_halves_attention_for_the_causal_objective_only(tokenizer_dir):
    """CLM's queries see the keys before them, MLM's every key: the module must hand its own objective's mask to the
    count, or the attention share of CLM's and MLM's FLOPs (and so their MFU) would be swapped."""
    from helpers import tiny_module

    from cpt_lightning.objectives import CausalLM, MaskedLM

    module = tiny_module(tokenizer_dir)
    module._last_batch = (torch.arange(64).view(1, 64), 0)  # one 64-token row, no head
    flops = {}
    for objective in (CausalLM(), MaskedLM()):
        module.set_objective(objective)
        flops[objective.name] = module.flops_per_batch
    # TINY: hidden 32, layers full / sliding / full, window 8. Keys per query: MLM 64 + 17 + 64, CLM 32.5 + 9 + 32.5,
    # but for the 8 queries at each end of the row the window cuts: 36 keys fewer at each end (MLM), at the start (CLM)
    mlm, clm = 64 + 17 - 2 * 36 / 64 + 64, 32.5 + 9 - 36 / 64 + 32.5
    assert flops["mlm"] - flops["clm"] == pytest.approx(12 * 32 * 64 * (mlm - clm))
