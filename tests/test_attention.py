"""The CLM detour is causal in every layer; MLM is bidirectional; packed documents never mix."""

import pytest
import torch

from transformers import BertConfig

from cpt_lightning import EncoderPretraining
from cpt_lightning.attention import (FLEX_BLOCK, additive_mask, block_mask, dense_mask, document_mask_mod,
                                     flash_attn_installed, kernel_for_run, resolve_implementation)
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM, MaskedLM
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


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_dense_masks_follow_the_rule_pair_by_pair_on_random_rows(attention):
    """Random rows of one-token to row-long documents, some starting mid-document (a document continued from the
    previous row: its positions do not start at 0), under windows from 0 to past the row: every (query, key) pair
    is allowed iff same document ∧ (causal ⇒ key ≤ query) ∧ (window ⇒ |query − key| ≤ window)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        length = int(torch.randint(1, 60, (1,), generator=g))
        document, positions, offset = [], [], int(torch.randint(0, 3, (1,), generator=g)) * 7  # 0: a fresh document
        while len(positions) < length:
            n = min(int(torch.randint(1, 20, (1,), generator=g)), length - len(positions))
            document += [len(set(document))] * n
            positions += list(range(offset, offset + n))
            offset = 0
        window = [None, *range(0, length + 3)][int(torch.randint(0, length + 4, (1,), generator=g))]
        expected = torch.tensor([[document[q] == document[k] and (attention == "bidirectional" or k <= q)
                                  and (window is None or abs(q - k) <= window) for k in range(length)]
                                 for q in range(length)])
        assert torch.equal(dense_mask(torch.tensor([positions]), attention, window)[0, 0], expected), (positions, window)


def lone_document_masks(length, window, impl):
    """Causal masks of one lone document: the rule written out here rather than built by ``dense_mask``."""
    q = torch.arange(length)[:, None]
    causal = q >= q.T
    masks = {"full_attention": causal, "sliding_attention": causal & (q - q.T <= window)}
    if impl == "eager":
        masks = {kind: additive_mask(allowed, torch.float32) for kind, allowed in masks.items()}
    return {kind: m[None, None] for kind, m in masks.items()}


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_each_packed_document_gets_the_logits_plain_transformers_gives_it_alone(tokenizer_dir, impl, attention):
    """Training's masks give every packed document the logits the exported model gives it on a row of its own: with
    the model's own inference masks when bidirectional, with a lone document's causal masks (the key itself and up
    to ``sliding_window`` before it in local layers) for CLM. The masks alone make it so: rotary embeddings see
    positions only through their differences (the packed positions offset by 1,000 move these logits by 1e-7)."""
    module = tiny_module(tokenizer_dir, attn_implementation=impl).eval()
    lengths = [7, 15, 18]  # two longer than the sliding window (8): windowed inside a document
    ids = random_row(module)
    packed = logits(module, ids, packed_position_ids(lengths)[None], attention)
    start = 0
    for n in lengths:
        alone = ids[:, start:start + n]
        masks = lone_document_masks(n, module.model.config.sliding_window, impl) if attention == "causal" else None
        with torch.no_grad():  # plain transformers: its own positions (0 … n-1), and its own masks when bidirectional
            reference = module.model(input_ids=alone, attention_mask=masks).logits
        torch.testing.assert_close(packed[:, start:start + n], reference, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.slow
def test_flex_attention_block_masks_match_sdpa(tokenizer_dir):
    """The GPU fast path's block masks encode the same rule (forward only: flex has no CPU backward)."""
    sdpa = tiny_module(tokenizer_dir, attn_implementation="sdpa").eval()
    flex = tiny_module(tokenizer_dir, attn_implementation="flex_attention").eval()
    flex.load_state_dict(sdpa.state_dict())
    ids = random_row(sdpa, length=2 * FLEX_BLOCK)  # whole tiles: the tile-level BlockMask path
    pos = packed_position_ids([15, 25, 150, 66])[None]
    for attention in ("causal", "bidirectional"):
        torch.testing.assert_close(logits(flex, ids, pos, attention), logits(sdpa, ids, pos, attention), rtol=1e-4, atol=1e-4)


def library_block_mask(position_ids, kind, window):
    """The same rule classified position by position by ``create_block_mask`` (the reference)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = position_ids.shape
    mask_mod = document_mask_mod(position_ids, kind, window)
    return create_block_mask(mask_mod, batch, None, length, length, device=position_ids.device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def random_packing(length, generator):
    """A row of documents from 1 token to several tiles long, some ending exactly on a tile edge."""
    lengths, total = [], 0
    while total < length:
        n = int(torch.randint(1, 3 * FLEX_BLOCK, (1,), generator=generator))
        if torch.rand(1, generator=generator) < 0.3:
            n = FLEX_BLOCK - total % FLEX_BLOCK  # end on a tile boundary
        n = min(n, length - total)
        lengths.append(n)
        total += n
    return packed_position_ids(lengths)


BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "seq_lengths")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 64, 200])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_tile_level_block_masks_equal_create_block_mask(attention, window, device):
    """BlockMasks classified from each tile's document range equal the library's position-by-position ones."""
    generator = torch.Generator().manual_seed(0)
    for length in (FLEX_BLOCK, 4 * FLEX_BLOCK, 8 * FLEX_BLOCK):
        rows = torch.stack([random_packing(length, generator) for _ in range(3)])
        rows[0] = torch.arange(length)  # one document filling the row
        rows = rows.to(device)
        ours, library = block_mask(rows, attention, window), library_block_mask(rows, attention, window)
        for field in BLOCK_MASK_FIELDS:
            assert torch.equal(torch.as_tensor(getattr(ours, field)), torch.as_tensor(getattr(library, field))), (length, field)
        assert ours.BLOCK_SIZE == library.BLOCK_SIZE
        positions = torch.arange(length, device=device)
        batch, query, key = torch.arange(3, device=device)[:, None, None], positions[:, None], positions[None, :]
        mask = ours.mask_mod(batch, 0, query, key)  # what the kernel applies inside partial tiles
        assert torch.equal(mask, dense_mask(rows, attention, window)[:, 0])


def test_rows_not_a_whole_number_of_tiles_fall_back_to_the_library():
    rows = packed_position_ids([100, 60, 40])[None]  # 200 tokens: a ragged last tile
    ours, library = block_mask(rows, "causal", 64), library_block_mask(rows, "causal", 64)
    for field in BLOCK_MASK_FIELDS:
        assert torch.equal(torch.as_tensor(getattr(ours, field)), torch.as_tensor(getattr(library, field))), field


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks a GPU kernel here")
def test_auto_picks_sdpa_without_a_gpu(tokenizer_dir):
    assert resolve_implementation("auto") == "sdpa"
    module = tiny_module(tokenizer_dir, attn_implementation="auto")
    assert module.model.config._attn_implementation == module.hparams.attn_implementation == "sdpa"


@pytest.mark.parametrize("flash", [True, False])
def test_auto_on_a_gpu_machine_picks_flash_attention_where_it_is_installed_else_flex(monkeypatch, flash):
    import cpt_lightning.attention as attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: flash)
    assert resolve_implementation("auto") == ("flash_attention_2" if flash else "flex_attention")


def test_flash_attention_installed_without_a_gpu_is_not_picked_and_named_is_refused(monkeypatch):
    """A CPU login node with the [gpu] extra installed."""
    import cpt_lightning.attention as attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert resolve_implementation("auto") == "sdpa"
    with pytest.raises(UserError, match="attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn"):
        resolve_implementation("flash_attention_2")


def test_a_gpu_machines_auto_steps_down_to_a_kernel_the_run_can_use_and_a_named_one_is_refused():
    """``auto`` is resolved from the machine before the trainer is known: on a GPU node a CPU run, an fp32 run or a
    model with attention dropout got a kernel that refused it (while its message said "use auto") or crashed at the
    first step inside the kernel."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert kernel_for_run("auto", "flash_attention_2", "cuda", bf16, 0.0, training=True) == "flash_attention_2"
    assert kernel_for_run("auto", "flash_attention_2", "cuda", torch.float16, 0.0, training=True) == "flash_attention_2"
    assert kernel_for_run("auto", "flex_attention", "mps", fp32, 0.0, training=True) == "sdpa"
    assert kernel_for_run("auto", "flash_attention_2", "cuda", fp32, 0.0, training=True) == "flex_attention"
    assert kernel_for_run("auto", "flash_attention_2", "cuda", fp32, 0.1, training=True) == "sdpa"
    assert kernel_for_run("auto", "flash_attention_2", "cuda", fp32, 0.1, training=False) == "flex_attention"
    assert kernel_for_run("auto", "flash_attention_2", "cpu", bf16, 0.0, training=True) == "sdpa"
    assert kernel_for_run("auto", "flex_attention", "cpu", bf16, 0.0, training=True) == "sdpa"
    assert kernel_for_run("auto", "flex_attention", "cuda", bf16, 0.1, training=True) == "sdpa"
    assert kernel_for_run("flex_attention", "flex_attention", "cpu", fp32, 0.0, training=False) == "flex_attention"
    assert kernel_for_run("eager", "eager", "cpu", fp32, 0.1, training=True) == "eager"
    for kernel, device, dtype, dropout, refusal in [
        ("flash_attention_2", "cuda", fp32, 0.0, r"computes in bf16 or fp16 only \(this run computes in float32\)"),
        ("flash_attention_2", "cpu", bf16, 0.0, r"needs a CUDA device \(this run is on cpu\)"),
        ("flex_attention", "cuda", bf16, 0.1, r"cannot train with attention dropout \(model config attention_dropout"),
        ("flex_attention", "cpu", bf16, 0.0, r"cannot train on CPU \(PyTorch's FlexAttention has no backward there"),
        ("flex_attention", "mps", fp32, 0.0, r"cannot train on MPS"),
    ]:
        with pytest.raises(UserError, match=rf"^attn_implementation={kernel} {refusal}.*: use auto or sdpa$"):
            kernel_for_run(kernel, kernel, device, dtype, dropout, training=True)


def test_a_gpu_machines_auto_trains_on_cpu_with_sdpa(tokenizer_dir, monkeypatch):
    import lightning as L

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = tiny_module(tokenizer_dir, attn_implementation="auto")
    assert module.model.config._attn_implementation == "flex_attention"
    monkeypatch.undo()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    module.setup("fit")
    assert module.model.config._attn_implementation == module.hparams.attn_implementation == "sdpa"
    ids = torch.randint(5, 1000, (1, ROW))
    module(ids, packed_position_ids([ROW // 2, ROW // 2])[None], "causal").logits.sum().backward()


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
    ids = random_row(sdpa, length=2 * FLEX_BLOCK)  # whole tiles: the tile-level BlockMask path
    pos = packed_position_ids([15, 25, 150, 66])[None]
    torch.testing.assert_close(logits(eager, ids, pos, attention), logits(sdpa, ids, pos, attention), rtol=1e-5, atol=1e-5)


def test_each_objective_trains_with_the_attention_it_needs(tokenizer_dir):
    """Through ``objective.attention``, as ``objective_step`` runs it: CLM logits never see a later token (a
    bidirectional CLM reads the very token it predicts), MLM logits do (a causal MLM cannot use right context)."""
    module = tiny_module(tokenizer_dir, attn_implementation="sdpa").eval()
    ids = random_row(module)
    pos = packed_position_ids([ROW])[None]
    changed = ids.clone()
    changed[0, 21:] = (ids[0, 21:] + 1) % 50000
    clm, mlm = CausalLM(), MaskedLM()
    before, after = (logits(module, row, pos, clm.attention)[0, :21] for row in (ids, changed))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    before, after = (logits(module, row, pos, mlm.attention)[0, 20] for row in (ids, changed))
    assert not torch.allclose(after, before, atol=1e-4)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_tile_level_block_masks_at_the_window_edges(attention):
    """Windows that put a tile's closest or farthest pair exactly on the edge (|q - k| = window, window + 1):
    an off-by-one there hides a visible tile or marks a partly hidden one full (then the kernel skips mask_mod)."""
    length = 4 * FLEX_BLOCK
    rows = torch.stack([torch.arange(length), random_packing(length, torch.Generator().manual_seed(1))])
    for window in (0, 1, 2, FLEX_BLOCK - 2, FLEX_BLOCK - 1, FLEX_BLOCK, FLEX_BLOCK + 1,
                   2 * FLEX_BLOCK - 2, 2 * FLEX_BLOCK - 1, 2 * FLEX_BLOCK + 1):
        ours, library = block_mask(rows, attention, window), library_block_mask(rows, attention, window)
        for field in BLOCK_MASK_FIELDS:
            assert torch.equal(torch.as_tensor(getattr(ours, field)), torch.as_tensor(getattr(library, field))), (window, field)
