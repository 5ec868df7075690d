"""The FlashAttention-2 varlen route: documents from cumulative lengths, causality and window from flags.

flash-attn needs CUDA, so on CPU the kernel is replaced by a reference with flash-attn's documented
contract (flattened ``[total, heads, dim]`` tensors, ``cu_seqlens``, ``causal``, inclusive
``window_size=(left, right)``); what is tested is everything around it — our varlen arguments,
transformers' flash path and ModernBERT's window — against the SDPA masks. With flash-attn on a
GPU, the last test runs the real kernel.
"""

import math

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils

from cpt_lightning.attention import flash_attn_installed, varlen_arguments
from cpt_lightning.objectives import CausalLM, MaskedLM
from helpers import packed_position_ids, tiny_module


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn_varlen_func's semantics in plain torch, one document at a time."""
    out = torch.empty_like(q)
    scale = softmax_scale or 1 / math.sqrt(q.shape[-1])
    left, right = window_size
    for start, stop in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[start:stop], k[start:stop]).float() * scale
        offset = torch.arange(stop - start)[:, None] - torch.arange(stop - start)[None, :]  # q - k
        allowed = torch.ones_like(offset, dtype=torch.bool)
        if causal:
            allowed &= offset >= 0
        if left >= 0:
            allowed &= offset <= left
        if right >= 0:
            allowed &= -offset <= right
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
        out[start:stop] = torch.einsum("hqk,khd->qhd", probs, v[start:stop])
    return out


@pytest.fixture
def reference_flash(monkeypatch):
    """transformers' flash path, with the reference standing in for the flash-attn package."""
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *a, **kw: (None, reference_varlen, None, None, None))
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)


def batch():
    g = torch.Generator().manual_seed(11)
    pos = torch.stack([packed_position_ids([30, 18]), packed_position_ids([12, 36])])  # rows of 48 > window 8
    return {"input_ids": torch.randint(5, 50000, (2, 48), generator=g), "position_ids": pos}


def test_varlen_arguments_cover_every_document_of_the_flattened_rows():
    args = varlen_arguments(batch()["position_ids"])
    assert args["cu_seq_lens_q"].tolist() == [0, 30, 48, 60, 96] and args["cu_seq_lens_q"].dtype == torch.int32
    assert args["max_length_q"] == 36 and args["cu_seq_lens_k"] is args["cu_seq_lens_q"]


def test_a_row_continuing_a_document_still_starts_its_own_sequence():
    """Positions carried on from the previous row (a custom data module) never join two rows, as with the masks."""
    carried = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [3, 4, 5, 0, 0, 1, 2, 3]])
    assert varlen_arguments(carried)["cu_seq_lens_q"].tolist() == [0, 5, 8, 11, 12, 16]


@pytest.fixture
def sdpa_and_flash(tokenizer_dir, reference_flash):
    sdpa = tiny_module(tokenizer_dir, attn_implementation="sdpa").eval()
    flash = tiny_module(tokenizer_dir, attn_implementation="sdpa").eval()
    flash.model.config._attn_implementation = "flash_attention_2"  # no flash-attn here to pass the load check
    return sdpa, flash


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_varlen_route_gives_the_sdpa_logits(sdpa_and_flash, kind):
    """Tight tolerance: with documents leaking into each other the logits move by ~1e-3."""
    b = batch()
    with torch.no_grad():
        expected, got = (m(b["input_ids"], b["position_ids"], kind).logits for m in sdpa_and_flash)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", [CausalLM, MaskedLM], ids=["clm", "mlm"])
def test_varlen_route_gives_the_sdpa_training_loss(sdpa_and_flash, objective):
    results = []
    for module in sdpa_and_flash:
        module.set_objective(objective())
        loss, predictions, _ = module.objective_step(batch(), torch.Generator().manual_seed(2))
        results.append((loss.detach(), predictions))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(results[1][1], results[0][1])


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_installed()), reason="needs flash-attn on a GPU")
@pytest.mark.parametrize("objective", [CausalLM, MaskedLM], ids=["clm", "mlm"])
def test_flash_attention_kernel_matches_sdpa_in_bf16(tokenizer_dir, objective):
    sdpa = tiny_module(tokenizer_dir, attn_implementation="sdpa").cuda().bfloat16().eval()
    flash = tiny_module(tokenizer_dir, attn_implementation="flash_attention_2").cuda().bfloat16().eval()
    cuda_batch = {k: v.cuda() for k, v in batch().items()}
    losses = []
    for module in (sdpa, flash):
        module.set_objective(objective())
        with torch.no_grad():
            losses.append(module.objective_step(cuda_batch, torch.Generator("cuda").manual_seed(2))[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
