"""CLM labels stay inside documents; MLM corrupts 15% of real text 80/10/10 and never special tokens."""

import pytest
import torch

from cpt_lightning.objectives import IGNORE_INDEX, CausalLM, MaskedLM, TokenizerFacts
from cpt_lightning.model_loading import tokenizer_facts
from helpers import packed_position_ids


def test_clm_labels_shift_inside_documents_only():
    ids = torch.arange(100, 110)[None]
    pos = packed_position_ids([4, 6])[None]
    _, labels = CausalLM().build_inputs(ids, pos, torch.Generator())
    assert labels.tolist() == [[101, 102, 103, IGNORE_INDEX, 105, 106, 107, 108, 109, IGNORE_INDEX]]


def test_clm_leaves_inputs_untouched():
    ids = torch.arange(10)[None]
    inputs, _ = CausalLM().build_inputs(ids, packed_position_ids([10])[None], torch.Generator())
    assert torch.equal(inputs, ids)


@pytest.fixture(scope="module")
def real_rows(modernbert_tokenizer, sample_texts):
    """Real abstracts packed as the data pipeline does: [CLS] doc [SEP] back to back, 64 rows of 256."""
    stream = [t for text in sample_texts for t in modernbert_tokenizer(text)["input_ids"]]
    rows = torch.tensor(stream[: 64 * 256]).view(64, 256)
    return rows


def test_mlm_statistics_on_real_text(modernbert_tokenizer, real_rows):
    facts = tokenizer_facts(modernbert_tokenizer)
    objective = MaskedLM(mask_rate=0.15)
    objective.bind(facts)
    corrupted, labels = objective.build_inputs(real_rows, torch.zeros_like(real_rows), torch.Generator().manual_seed(3))
    special = torch.isin(real_rows, torch.tensor(facts.special_ids))
    masked = labels != IGNORE_INDEX
    assert special.any(), "the packed rows must contain [CLS]/[SEP] for this test to mean anything"
    assert not (masked & special).any()
    assert torch.equal(labels[masked], real_rows[masked])
    assert torch.equal(corrupted[~masked], real_rows[~masked])

    rate = masked.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.01
    n = masked.sum().item()
    to_mask = (corrupted == facts.mask_id) & masked
    kept = (corrupted == real_rows) & masked
    replaced = masked & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    # a random draw can hit the original token (rarely): kept ≈ 10% + ε, replaced ≈ 10% − ε
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert abs(replaced.sum().item() / n - 0.1) < 0.02


def test_no_special_token_is_ever_masked_or_replaced(modernbert_tokenizer):
    """Real rows hold only [CLS] and [SEP]: a special left out of the maskable check ([PAD], [MASK], an [unused]
    slot, <|endoftext|>) went unseen there."""
    facts = tokenizer_facts(modernbert_tokenizer)
    specials = torch.tensor(facts.special_ids)
    ordinary = torch.arange(1000, 1000 + len(specials))
    assert not torch.isin(ordinary, specials).any()
    rows = torch.cat([specials, ordinary]).repeat(4, 1)
    special = torch.isin(rows, specials)
    objective = MaskedLM(mask_rate=0.9)
    objective.bind(facts)
    for seed in range(4):
        corrupted, labels = objective.build_inputs(rows, None, torch.Generator().manual_seed(seed))
        assert (labels[special] == IGNORE_INDEX).all() and torch.equal(corrupted[special], rows[special])
        assert (labels[~special] != IGNORE_INDEX).float().mean() > 0.8  # the rate applies to the ordinary ones


def test_mlm_defaults_are_berts_15_percent_80_10_10():
    """MaskedLM() is the module's default objective and the recipe's MLM: 15% of the ordinary tokens, 80% of
    them [MASK], 10% random, 10% kept. The statistics test names its rate, so a changed default went unseen."""
    objective = MaskedLM()
    assert (objective.mask_rate, objective.mask_token_ratio, objective.random_token_ratio) == (0.15, 0.8, 0.1)


def test_mlm_random_tokens_are_ordinary_tokens(modernbert_tokenizer, real_rows):
    """Never [MASK]/[SEP]/[CLS] nor one of the 83 [unused] slots, and every ordinary id is as likely."""
    facts = tokenizer_facts(modernbert_tokenizer)
    # [UNK] [CLS] [SEP] [PAD] [MASK], [unused0..82], and the base BPE's <|padding|> and <|endoftext|>
    assert len(facts.special_ids) == 5 + 83 + 2 and modernbert_tokenizer.convert_tokens_to_ids("[unused82]") in facts.special_ids
    objective = MaskedLM(mask_rate=0.5, mask_token_ratio=0.0, random_token_ratio=1.0)  # every masked token random
    objective.bind(facts)
    replaced = []
    for seed in range(6):
        corrupted, labels = objective.build_inputs(real_rows, None, torch.Generator().manual_seed(seed))
        replaced.append(corrupted[labels != IGNORE_INDEX])
    replaced = torch.cat(replaced)
    assert len(replaced) > 20_000
    assert not torch.isin(replaced, torch.tensor(facts.special_ids)).any()
    assert replaced.min() < 100 and 50180 < replaced.max() < 50280  # the whole ordinary range, nothing past it
    halves = torch.bincount((replaced >= 50280 // 2).long(), minlength=2)
    assert abs(halves[0] - halves[1]) < 4 * len(replaced) ** 0.5


def test_mlm_same_generator_seed_same_masks(modernbert_tokenizer, real_rows):
    objective = MaskedLM()
    objective.bind(tokenizer_facts(modernbert_tokenizer))
    a = objective.build_inputs(real_rows, None, torch.Generator().manual_seed(7))
    b = objective.build_inputs(real_rows, None, torch.Generator().manual_seed(7))
    c = objective.build_inputs(real_rows, None, torch.Generator().manual_seed(8))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize("kwargs", [{"mask_rate": 0.0}, {"mask_rate": 1.5}, {"mask_token_ratio": 0.95, "random_token_ratio": 0.1}])
def test_mlm_rejects_impossible_rates(kwargs):
    with pytest.raises(ValueError, match="MaskedLM"):
        MaskedLM(**kwargs)


def test_mlm_needs_a_mask_token():
    with pytest.raises(ValueError, match=r"set mask_token \(\[MASK\], <mask>\) in its tokenizer_config.json; a run "
                                         "with no MLM phase also sets model.init_args.objective"):
        MaskedLM().bind(TokenizerFacts(mask_id=None, special_ids=(0,), vocab_size=10))


def test_random_replacements_are_exactly_the_ordinary_ids_each_as_likely():
    """The r-th ordinary id for every draw r: none skipped, none special, none past the vocabulary, even where
    the special ids are not in a set's iteration order ({3, 8, 9, 17} iterates as 8, 9, 3, 17)."""
    objective = MaskedLM()
    objective.bind(TokenizerFacts(mask_id=9, special_ids=(3, 8, 9, 17), vocab_size=20))
    draws = objective.random_ordinary_ids((32_000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    counts = torch.bincount(draws, minlength=20)
    ordinary = [i for i in range(20) if i not in (3, 8, 9, 17)]
    assert torch.nonzero(counts).flatten().tolist() == ordinary and len(counts) == 20
    expected = len(draws) / len(ordinary)  # 2000 each, standard deviation ~43
    assert (counts[ordinary] - expected).abs().max() < 6 * expected ** 0.5


def test_the_default_loss_is_fp32_whatever_the_logits_dtype():
    """A custom objective's dense loss on bf16 logits (bf16 weights, no autocast) is still computed in fp32."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 5000, generator=g).bfloat16(), torch.randint(5000, (300,), generator=g)
    loss = MaskedLM().loss(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.float(), labels))
