"""A CamemBERT/RoBERTa-style tokenizer (``<s> … </s>``, ``<pad>`` id 1, ``<mask>`` the last id, a
SentencePiece-like Unigram model) through prepare → train → export, as the French recipe needs."""

import json
import re
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from callbacks import ObjectiveSchedule, Phase
from cpt_lightning.data.encoding import load_tokenizer, unmatchable_special_pieces
from cpt_lightning.data.prepare import prepare
from cpt_lightning.export import main as export_main
from cpt_lightning.objectives import MaskedLM
from helpers import packed_position_ids, tiny_module

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in CamemBERT's converted vocabulary
CAMEMBERT_IDS = dict(cls_token_id=0, pad_token_id=1, sep_token_id=2, bos_token_id=0, eos_token_id=2)  # a config's
WORDS = "the patient was diagnosed with and started on antibiotics a second document about tokens here".split()


def unigram_backend(frame_with_specials: bool = True, mask_first: bool = False, words=WORDS) -> Tokenizer:
    """A hand-made SentencePiece-style Unigram: special pieces scored 0 (as a trained Unigram keeps them);
    ``frame_with_specials``: its post-processor gives ``<s> … </s>`` (else it adds no special token); ``mask_first``:
    ``<mask>`` is id 4, after the other special pieces (else the last id)."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]<>/-_ "))
    vocab = [(t, 0.0) for t in SPECIALS + ["<mask>"] * mask_first] + [("▁", -2.0)]
    vocab += [(c, -5.0) for c in chars if c != " "] + [(f"▁{w}", -3.0) for w in words]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    backend.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])  # the last id
    if frame_with_specials:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return backend


def save_camembert_style(folder, **backend):
    PreTrainedTokenizerFast(
        tokenizer_object=unigram_backend(**backend), bos_token="<s>", eos_token="</s>", cls_token="<s>",
        sep_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True, special=True), model_max_length=512,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def camembert_dir(tmp_path_factory):
    return save_camembert_style(tmp_path_factory.mktemp("camembert_style"))


def test_the_tokenizer_is_camembert_style(camembert_dir):
    tok = AutoTokenizer.from_pretrained(camembert_dir)
    assert (tok.pad_token_id, tok.sep_token_id, tok.mask_token_id) == (1, 2, len(tok) - 1)
    ids = tok("the patient")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2


def test_special_token_text_in_a_document_never_becomes_a_separator(tmp_path, camembert_dir):
    """The Unigram lattice held "</s>" (score 0): a document quoting it was cut in two at that point."""
    docs = ["the patient </s> was <s> diagnosed <pad> with <unk> antibiotics", "a second document"]
    raw = tmp_path / "docs.jsonl"
    raw.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 8))
    manifest, _ = prepare([str(raw)], str(tmp_path / "out"), str(camembert_dir), 16, num_workers=1,
                          holdout_tokens=0, progress=False)
    assert manifest.separator_id == 2
    from litdata import StreamingDataset, TokensLoader

    dataset = StreamingDataset(str(tmp_path / "out"), item_loader=TokensLoader(16), shuffle=False)
    got = np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)
    tok = AutoTokenizer.from_pretrained(camembert_dir)
    first = got[: list(got).index(2) + 1]
    assert tok.convert_ids_to_tokens(first[-2:].tolist()) == ["▁antibiotics", "</s>"]  # the whole first document
    assert first[0] == 0 and not np.isin(first[1:-1], [0, 1, 2, 3]).any(), tok.convert_ids_to_tokens(first)
    assert (got == 2).sum() <= manifest.num_documents  # at most one separator per document


def test_a_tokenizer_that_adds_no_separator_gets_one_after_every_document(tmp_path):
    """Without it the documents of a row would run into each other: one position sequence, attention and
    CLM labels across them."""
    folder = tmp_path / "no_post_processor"
    PreTrainedTokenizerFast(tokenizer_object=unigram_backend(frame_with_specials=False), eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    docs = ["the patient was diagnosed", "a second document about tokens", "antibiotics"]
    raw = tmp_path / "docs.jsonl"
    raw.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest, _ = prepare([str(raw)], str(tmp_path / "out"), str(folder), 4, num_workers=1, holdout_tokens=0,
                          progress=False)
    from litdata import StreamingDataset, TokensLoader

    dataset = StreamingDataset(str(tmp_path / "out"), item_loader=TokensLoader(4), shuffle=False)
    got = np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64).tolist()
    tok = AutoTokenizer.from_pretrained(folder)
    expected = [i for d in docs for i in tok(d)["input_ids"] + [2]]  # </s> ends each document
    assert manifest.separator_id == 2 and got == expected[: len(got)] and len(expected) - len(got) < 4


def test_a_folder_whose_class_names_the_separator(tmp_path, camembert_dir):
    """A CamemBERT snapshot whose tokenizer_config.json names only its class: transformers supplies `</s>`."""
    (tmp_path / "tokenizer.json").write_text((camembert_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CamembertTokenizer"}))
    assert load_tokenizer(str(tmp_path)).separator_id == 2


def test_mlm_and_export_with_mask_at_the_last_id(tmp_path, camembert_dir):
    module = tiny_module(camembert_dir, learning_rate=1e-2)
    assert module.model.config.vocab_size == len(module.tokenizer)  # not ModernBertConfig's 50,368: 97% unused rows
    facts = module.tokens
    assert facts.mask_id == len(module.tokenizer) - 1 and {0, 1, 2, 3, facts.mask_id} <= set(facts.special_ids)

    rows = torch.tensor([[0] + list(range(5, 20)) + [2] + [0] + list(range(20, 33)) + [2]] * 2)
    position_ids = packed_position_ids([17, 15]).expand(2, -1)
    inputs, labels = module.objective.build_inputs(rows, position_ids, torch.Generator().manual_seed(0))
    assert not (labels[torch.isin(rows, torch.tensor([0, 2]))] != -100).any()  # <s> and </s> never masked
    draws = module.objective.random_ordinary_ids((20000,), torch.Generator().manual_seed(1), "cpu")
    assert not torch.isin(draws, torch.tensor(facts.special_ids)).any() and draws.max() < facts.mask_id

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield {"input_ids": rows[0], "position_ids": position_ids[0]}

    trainer = L.Trainer(max_steps=-1, max_epochs=-1, callbacks=[ObjectiveSchedule([Phase(MaskedLM(), tokens=2 * 32)])],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(Rows(), batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "[MASK]" not in card and "<mask>" in card  # the training section said "80% [MASK]" too
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    for code in blocks[:2]:  # the fill-mask snippets: they looked for [MASK], which this vocabulary has not
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.parametrize("other, differs", [
    ({"mask_first": True}, r"mask 4 vs \d+"),
    ({"words": WORDS[::-1]}, r"\d+ of the \d+ tokens of the model's own tokenizer have another id or none, e.g. "
                             r"'▁\w+' \d+ vs \d+"),
], ids=["another-mask-id", "another-vocabulary"])
def test_another_tokenizer_than_the_models_own_must_give_every_token_its_id(tmp_path, camembert_dir, other, differs):
    """Only cls, sep and pad were compared, with the model's config (which holds no mask id): a tokenizer with the
    same three fed its mask as an ordinary token's pretrained row, and every other token another token's row."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from cpt_lightning.errors import UserError
    from cpt_lightning.module import EncoderPretraining
    from helpers import TINY

    model = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(camembert_dir)
    ModernBertForMaskedLM(ModernBertConfig(**TINY, vocab_size=len(tokenizer), **CAMEMBERT_IDS)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    shutil.copytree(model, tmp_path / "copy")  # the same tokenizer elsewhere: loads
    EncoderPretraining(model=str(model), tokenizer=str(tmp_path / "copy"))
    save_camembert_style(tmp_path / "other", **other)
    with pytest.raises(UserError, match=rf"^model.init_args.tokenizer '{tmp_path / 'other'}' is not the tokenizer of "
                                        rf"'{model}': its ids differ from the model's \({differs}\); leave "
                                        "model.init_args.tokenizer unset to use the model's own$"):
        EncoderPretraining(model=str(model), tokenizer=str(tmp_path / "other"))


def test_a_folder_whose_config_lacks_cls_and_sep_ids_trains_and_exports_the_tokenizers(tmp_path, camembert_dir):
    """transformers fills a config.json without them with ModernBERT's English ids (50281, 50282), outside this
    vocabulary: the run trained without a word, and cpt evaluate refused its export as another tokenizer's."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from cpt_lightning.module import EncoderPretraining
    from helpers import TINY

    tokenizer = AutoTokenizer.from_pretrained(camembert_dir)
    ModernBertForMaskedLM(ModernBertConfig(**TINY, vocab_size=len(tokenizer), **CAMEMBERT_IDS)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    unset = ("cls_token_id", "sep_token_id")
    (tmp_path / "config.json").write_text(json.dumps({key: value for key, value in saved.items() if key not in unset}))
    with pytest.warns(UserWarning, match=r"its config's cls_token_id 50281 → 0, sep_token_id 50282 → 2: outside its "
                                         rf"vocabulary of {len(tokenizer)}, so the tokenizer's is taken"):
        module = EncoderPretraining(model=str(tmp_path))
    config = module.model.config
    assert (config.cls_token_id, config.sep_token_id, config.pad_token_id) == (0, 2, 1)

def test_a_folder_whose_own_tokenizer_outgrows_its_embeddings_is_told_so(tmp_path, camembert_dir):
    """The refusal advised using the model's own tokenizer, which it was (an added <mask> past vocab_size)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from cpt_lightning.errors import UserError
    from cpt_lightning.module import EncoderPretraining
    from helpers import TINY

    tokenizer = AutoTokenizer.from_pretrained(camembert_dir)
    config = ModernBertConfig(**TINY, vocab_size=len(tokenizer) - 1, **CAMEMBERT_IDS)
    ModernBertForMaskedLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=rf"has ids up to {len(tokenizer) - 1} but the model's embeddings hold "
                                        rf"{len(tokenizer) - 1}: the folder's own tokenizer has tokens its config's "
                                        r"vocab_size leaves out: resize the model's embeddings first"):
        EncoderPretraining(model=str(tmp_path))


def test_an_older_checkpoint_of_a_random_model_exports_with_the_vocabulary_it_trained(tmp_path, camembert_dir):
    """Random models took ModernBertConfig's vocab_size (50,368) before it defaulted to the tokenizer's; a checkpoint of
    then that holds no copy of its config is rebuilt with it, not with this 100-token tokenizer's size."""
    module = tiny_module(camembert_dir, model_config={"vocab_size": 50368})
    rows = torch.tensor([[0] + list(range(5, 20)) + [2]] * 2)

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield {"input_ids": rows[0], "position_ids": torch.arange(17)}

    trainer = L.Trainer(max_steps=1, callbacks=[ObjectiveSchedule([Phase(MaskedLM(), tokens=2 * 17)])], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(Rows(), batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    del checkpoint["hf_config"], checkpoint["hyper_parameters"]["model_config"]["vocab_size"]  # as saved then
    torch.save(checkpoint, tmp_path / "older.ckpt")
    assert export_main([str(tmp_path / "older.ckpt"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 50368
    tokens = len(AutoTokenizer.from_pretrained(camembert_dir))
    assert f"| Vocabulary | {tokens} tokens (50,368 embedding rows, the rest unused) |" in (tmp_path / "hf" / "README.md").read_text()


def test_eos_only_tokenizer_names_bos_and_eos_in_the_model_config(tmp_path):
    folder = tmp_path / "eos_only"
    PreTrainedTokenizerFast(
        tokenizer_object=unigram_backend(), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True, special=True), model_max_length=512,
    ).save_pretrained(folder)
    assert load_tokenizer(str(folder)).separator_id == 2
    config = tiny_module(folder).model.config
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 0, 2)


def test_a_unigram_whose_special_tokens_are_outside_its_pieces_is_left_as_it_is():
    """Nothing to rename: the JSON was rewritten anyway (another spacing), so prepare's fingerprint
    called data prepared with that tokenizer out of date."""
    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁", -2.0), ("a", -5.0)], unk_id=0, byte_fallback=False))
    backend.add_special_tokens([AddedToken("<mask>", special=True)])
    assert unmatchable_special_pieces(backend) == backend.to_str()


def test_a_vocabulary_whose_ids_skip_numbers_gets_a_row_for_its_highest_id(tmp_path):
    """``len(tokenizer)`` counts tokens, not ids: a vocabulary with gaps (11 tokens, ids up to 15) got an 11-row
    embedding under the tokenizer-size default, and its highest ids indexed past it."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab |= {word: 10 + i for i, word in enumerate(WORDS[:6])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(tmp_path / "gaps")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "gaps")) == 11
    module = tiny_module(tmp_path / "gaps")
    assert module.model.config.vocab_size == 16
    ids = torch.tensor([[2, 10, 15, 3]])
    assert module.model(input_ids=ids).logits.shape == (1, 4, 16)
    with pytest.raises(ValueError, match="has ids up to 15 but the model's embeddings hold 11: leave "
                       r"model.init_args.model_config.vocab_size unset \(the tokenizer's size\) or set it to at least 16"):
        tiny_module(tmp_path / "gaps", model_config={"vocab_size": 11})
    mlm = MaskedLM()  # its random tokens: every word, never an id no token has (5 to 9), up to the highest (15)
    mlm.bind(module.tokens)
    drawn = mlm.random_ordinary_ids((2000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(drawn.tolist()) == set(range(10, 16))
