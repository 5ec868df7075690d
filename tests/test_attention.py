"""The CLM detour is causal in every layer; MLM is bidirectional; packed documents never mix."""

import pytest
import torch

from transformers import BertConfig

from cpt_lightning import EncoderPretraining
from cpt_lightning.attention import dense_mask, flash_attn_installed, resolve_implementation
from cpt_lightning.errors import UserError
from helpers import packed_position_ids, tiny_module

LAYOUTS = {
    "global": ["full_attention"] * 3,
    "sliding": ["sliding_attention"] * 3,
    "mixed": ["full_attention", "sliding_attention", "full_attention"],
}
ROW = 40  # longer than the sliding window (8) so local layers are really windowed


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def impl(request):
    return request.param


def logits(module, ids, pos, attention):
    with torch.no_grad():
        return module(ids, pos, attention).logits


def random_row(module, length=ROW, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (1, length), generator=g)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal_logits_ignore_every_later_token(tokenizer_dir, impl, layout):
    module = tiny_module(tokenizer_dir, attn_implementation=impl, model_config={"layer_types": LAYOUTS[layout]})
    ids = random_row(module)
    pos = packed_position_ids([ROW])[None]
    base = logits(module, ids, pos, "causal")
    for i in (0, 5, 17, ROW - 2):
        changed = ids.clone()
        changed[0, i + 1 :] = torch.randint(0, 50000, (ROW - i - 1,))
        after = logits(module, changed, pos, "causal")
        torch.testing.assert_close(after[0, : i + 1], base[0, : i + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(after[0, i + 1 :], base[0, i + 1 :], atol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bidirectional_logits_see_later_tokens(tokenizer_dir, impl, layout):
    module = tiny_module(tokenizer_dir, attn_implementation=impl, model_config={"layer_types": LAYOUTS[layout]})
    ids = random_row(module)
    pos = packed_position_ids([ROW])[None]
    base = logits(module, ids, pos, "bidirectional")
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 50000  # within every layer's window of position 5
    assert not torch.allclose(logits(module, changed, pos, "bidirectional")[0, 5], base[0, 5], atol=1e-4)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_packed_documents_never_see_each_other(tokenizer_dir, impl, attention):
    module = tiny_module(tokenizer_dir, attn_implementation=impl)
    lengths = [15, 10, 15]
    ids = random_row(module)
    pos = packed_position_ids(lengths)[None]
    base = logits(module, ids, pos, attention)
    middle = slice(15, 25)
    changed = ids.clone()
    changed[0, :15] = torch.randint(0, 50000, (15,))
    changed[0, 25:] = torch.randint(0, 50000, (15,))
    torch.testing.assert_close(logits(module, changed, pos, attention)[0, middle], base[0, middle], rtol=0, atol=1e-5)


def test_sliding_window_reaches_exactly_config_sliding_window():
    """|q - k| <= sliding_window (inclusive, like transformers at inference), restricted to k <= q when causal."""
    pos = packed_position_ids([30])[None]
    bidirectional = dense_mask(pos, "bidirectional", window=8)[0, 0]
    causal = dense_mask(pos, "causal", window=8)[0, 0]
    assert bidirectional[20, 12] and bidirectional[20, 28] and not bidirectional[20, 11] and not bidirectional[20, 29]
    assert causal[20, 12] and causal[20, 20] and not causal[20, 11] and not causal[20, 21]


def test_single_document_bidirectional_matches_plain_transformers(tokenizer_dir, impl):
    """Training-time masks reproduce the model's own inference masks, so the exported model behaves as trained."""
    module = tiny_module(tokenizer_dir, attn_implementation=impl).eval()
    ids = random_row(module)
    pos = packed_position_ids([ROW])[None]
    with torch.no_grad():
        reference = module.model(input_ids=ids).logits
    torch.testing.assert_close(logits(module, ids, pos, "bidirectional"), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flex_attention_block_masks_match_sdpa(tokenizer_dir):
    """The GPU fast path's block masks encode the same rule (forward only: flex has no CPU backward)."""
    sdpa = tiny_module(tokenizer_dir, attn_implementation="sdpa").eval()
    flex = tiny_module(tokenizer_dir, attn_implementation="flex_attention").eval()
    flex.load_state_dict(sdpa.state_dict())
    ids = random_row(sdpa, length=ROW)
    pos = packed_position_ids([15, 25])[None]
    for attention in ("causal", "bidirectional"):
        torch.testing.assert_close(logits(flex, ids, pos, attention), logits(sdpa, ids, pos, attention), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks a GPU kernel here")
def test_auto_picks_sdpa_without_a_gpu(tokenizer_dir):
    assert resolve_implementation("auto") == "sdpa"
    module = tiny_module(tokenizer_dir, attn_implementation="auto")
    assert module.model.config._attn_implementation == module.hparams.attn_implementation == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available() and flash_attn_installed(), reason="flash-attention is usable here")
def test_flash_attention_without_its_package_names_the_fix(tokenizer_dir):
    with pytest.raises(UserError, match=r"flash-attn package \(pip install 'cpt-lightning\[gpu\]'\)"):
        tiny_module(tokenizer_dir, attn_implementation="flash_attention_2")


def test_unknown_kernel_and_non_modernbert_models_are_refused(tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="attn_implementation='flash'; choose one of"):
        tiny_module(tokenizer_dir, attn_implementation="flash")
    BertConfig(vocab_size=60000).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="is a 'bert' model; .* built for ModernBERT"):
        EncoderPretraining(model=str(tmp_path), tokenizer=str(tokenizer_dir))


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_eager_and_sdpa_give_the_same_packed_logits(tokenizer_dir, attention):
    sdpa = tiny_module(tokenizer_dir, attn_implementation="sdpa").eval()
    eager = tiny_module(tokenizer_dir, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = random_row(sdpa, length=ROW)
    pos = packed_position_ids([15, 25])[None]
    torch.testing.assert_close(logits(eager, ids, pos, attention), logits(sdpa, ids, pos, attention), rtol=1e-5, atol=1e-5)
