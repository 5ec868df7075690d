"""Pretrained models load whole (a run refuses to start a random encoder) and with transformers' own layers.

From transformers 5.25 ``from_pretrained`` kernelizes by default when the ``kernels`` package is there (5.25 requires
it): ModernBERT's rotary embedding on CUDA becomes a kernel downloaded from the Hub. Every load this project makes
asks for no kernels, on any version; the spy below sees what each load asked for.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM, ModernBertModel, PreTrainedModel

from cpt_lightning import EncoderPretraining
from cpt_lightning.errors import UserError
from cpt_lightning.parallel import enable_activation_checkpointing
from cpt_lightning.data.encoding import vocab_sha256
from cpt_lightning.pretrained import from_pretrained_checked, tokenizer_size, vocabulary, vocabulary_sha256
from helpers import TINY


@pytest.fixture
def kernels_asked(monkeypatch) -> list:
    """The ``use_kernels`` of every ``from_pretrained`` call (None: left to transformers' default)."""
    asked = []
    load = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("use_kernels"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return asked


@pytest.fixture
def model_folder(tmp_path, modernbert_tokenizer):
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig(**TINY, vocab_size=len(modernbert_tokenizer)))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


def test_a_run_starting_from_a_pretrained_model_asks_for_no_hub_kernels(model_folder, tokenizer_dir, kernels_asked):
    folder, saved = model_folder
    module = EncoderPretraining(model=str(folder), tokenizer=str(tokenizer_dir))
    assert kernels_asked == [False]
    torch.testing.assert_close(module.model.model.embeddings.tok_embeddings.weight, saved.model.embeddings.tok_embeddings.weight)


def test_a_run_from_a_pretrained_model_trains_in_training_mode_and_recomputes_checkpointed_layers(model_folder,
                                                                                                 tokenizer_dir):
    """from_pretrained returns eval mode, which Lightning keeps: transformers then recomputed no layer under
    activation_checkpointing (the memory remedy did nothing) and dropout was off."""
    folder, _ = model_folder
    module = EncoderPretraining(model=str(folder), tokenizer=str(tokenizer_dir))
    assert all(part.training for part in module.model.modules())
    enable_activation_checkpointing(module.model)
    forwards = []
    module.model.model.layers[0].attn.Wqkv.register_forward_pre_hook(lambda *_: forwards.append(1))
    ids = torch.randint(0, 100, (2, 16))
    module(ids, torch.arange(16).repeat(2, 1), "causal", labels=ids).loss.backward()
    assert len(forwards) == 2  # in forward, and again in backward
    recompute = module.model.model.layers[0]._gradient_checkpointing_func
    assert recompute.keywords == {"use_reentrant": False}  # what FSDP2 supports; reentrant checkpointing is legacy


def test_a_run_from_a_bf16_folder_trains_fp32_weights(model_folder, tokenizer_dir, tmp_path):
    """transformers 5 loads a folder stored in bf16 (a bf16 export, many hub models) as bf16, and bf16-mixed keeps the
    parameters' dtype: AdamW updated bf16 weights, losing most updates under their resolution at the recipes' rates."""
    folder, saved = model_folder
    saved.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert ModernBertForMaskedLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16  # as stored
    module = EncoderPretraining(model=str(tmp_path / "bf16"), tokenizer=str(tokenizer_dir))
    assert {parameter.dtype for parameter in module.parameters()} == {torch.float32}
    assert torch.equal(module.model.model.embeddings.tok_embeddings.weight,
                       saved.model.embeddings.tok_embeddings.weight.float())  # the stored values, exactly


def test_a_random_model_whose_config_says_bf16_trains_fp32_weights(tokenizer_dir):
    """``dtype: bfloat16`` in model_config (a config.json's copied in) built bf16 weights, which AdamW then trained
    under any precision setting, as a bf16 folder's were."""
    module = EncoderPretraining(model_config={**TINY, "dtype": "bfloat16"}, tokenizer=str(tokenizer_dir))
    assert {parameter.dtype for parameter in module.parameters()} == {torch.float32}


def test_evaluation_and_analysis_load_with_no_hub_kernels(model_folder, kernels_asked):
    folder, saved = model_folder
    model = from_pretrained_checked(AutoModelForMaskedLM, str(folder), "the comparison would be of random weights")
    assert kernels_asked == [False]
    torch.testing.assert_close(model.decoder.weight, saved.decoder.weight)


def test_a_run_refuses_a_folder_whose_encoder_weights_do_not_load(model_folder, tokenizer_dir):
    """Weights saved under other names (a raw state dict with a wrapper's prefix) load as nothing: the run would
    continue pretraining a random encoder while its logs look like any other run's."""
    folder, _ = model_folder
    weights = load_file(folder / "model.safetensors")
    save_file({f"encoder.{key}": value for key, value in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    missing = r"weights are missing from its files \(e\.g\. 'model\.[^']+'\): the run would continue pretraining a random"
    with pytest.raises(UserError, match=missing):
        EncoderPretraining(model=str(folder), tokenizer=str(tokenizer_dir))


def test_a_run_may_start_from_an_encoder_saved_without_its_mlm_head(tmp_path, modernbert_tokenizer, tokenizer_dir):
    """A ModernBertModel folder is a fine start: the head is learned in the first steps, and the run says so."""
    torch.manual_seed(0)
    encoder = ModernBertModel(ModernBertConfig(**TINY, vocab_size=len(modernbert_tokenizer)))
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.warns(UserWarning, match="no MLM head"):
        module = EncoderPretraining(model=str(tmp_path / "encoder"), tokenizer=str(tokenizer_dir))
    torch.testing.assert_close(module.model.model.embeddings.tok_embeddings.weight,
                               encoder.embeddings.tok_embeddings.weight)


def test_a_run_refuses_a_folder_whose_weights_do_not_fit_its_config(model_folder, tokenizer_dir):
    folder, _ = model_folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    with pytest.raises(UserError, match=r"its weights do not fit its config\.json .*use the config\.json saved with"):
        EncoderPretraining(model=str(folder), tokenizer=str(tokenizer_dir))


@pytest.mark.parametrize("kept", [0, 1000, "half"])
def test_a_weights_file_cut_short_is_one_line_naming_the_folder(model_folder, tokenizer_dir, kept):
    """An interrupted copy or an empty file: safetensors' header error was a traceback in fit, evaluate and analyze."""
    folder, _ = model_folder
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2 if kept == "half" else kept)
    damaged = rf"model '{folder}': its weights file cannot be read \(.*\): it is damaged or incomplete; copy or export it again"
    with pytest.raises(UserError, match=damaged):
        EncoderPretraining(model=str(folder), tokenizer=str(tokenizer_dir))
    with pytest.raises(UserError, match=damaged):  # what cpt evaluate and cpt analyze load through
        from_pretrained_checked(AutoModelForMaskedLM, str(folder), "")


def test_another_tokenizer_whose_special_ids_are_not_the_models_is_refused(tmp_path, modernbert_tokenizer,
                                                                           tokenizer_dir):
    """A CamemBERT-style tokenizer (<s>=0, <pad>=1, </s>=2) named beside a ModernBERT folder trained without a word,
    reading the pretrained rows of other tokens; the export's config then contradicted its own tokenizer."""
    other_ids = dict(cls_token_id=0, pad_token_id=1, sep_token_id=2, bos_token_id=0, eos_token_id=2)
    ModernBertForMaskedLM(ModernBertConfig(**TINY, vocab_size=len(modernbert_tokenizer), **other_ids)).save_pretrained(
        tmp_path / "camembert-like")
    with pytest.raises(UserError, match=rf"^model.init_args.tokenizer '{tokenizer_dir}' is not the tokenizer of "
                                        rf"'{tmp_path / 'camembert-like'}': its ids differ from the model's "
                                        r"\(cls 50281 vs 0; sep 50282 vs 2; pad 50283 vs 1\)"):
        EncoderPretraining(model=str(tmp_path / "camembert-like"), tokenizer=str(tokenizer_dir))


def test_a_folder_without_its_weights_or_a_shard_is_one_line(model_folder, tokenizer_dir, tmp_path):
    """transformers' OSError (no weights file) or FileNotFoundError (a shard of a download missing) was a
    hundred-line traceback through jsonargparse in fit, evaluate and analyze."""
    folder, saved = model_folder
    saved.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    (folder / "model.safetensors").unlink()
    for damaged in (folder, tmp_path / "sharded"):
        with pytest.raises(UserError, match=rf"^model '{damaged}': its weights cannot be read \(.*\): the folder is "
                                            "incomplete or damaged; copy, download or export it again$"):
            EncoderPretraining(model=str(damaged), tokenizer=str(tokenizer_dir))


def test_a_relative_or_home_model_folder_is_recorded_absolute(model_folder, tokenizer_dir, tmp_path, monkeypatch):
    """Recorded as written, `model: fx/base` was read as a hub id by cpt export run from another folder (it retried
    the network, then blamed the tokenizer), and a `~/...` folder was "no such folder"."""
    folder, _ = model_folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for written in ("model", "./model", "~/model"):
        module = EncoderPretraining(model=written, tokenizer=str(tokenizer_dir))
        assert module.hparams.model == str(folder.resolve()), written
    with pytest.raises(UserError, match=r"^model.init_args.model \(its tokenizer\): cannot load '~/gone' \(no such "
                                        r"folder\)$"):  # the setting the user wrote, not a tokenizer setting
        EncoderPretraining(model="~/gone")


def test_a_padding_id_that_is_an_ordinary_token_is_refused_or_said(tmp_path, modernbert_tokenizer, tokenizer_dir):
    """ModernBERT's embedding gives the row of config.pad_token_id no gradient: a pad id set to a real token's (an
    apostrophe, with a French tokenizer) left that token's input embedding untrained, without a word."""
    token = modernbert_tokenizer.convert_ids_to_tokens(1000)
    with pytest.raises(UserError, match=rf"^model.init_args.model_config.pad_token_id 1000 is the tokenizer's token "
                                        rf"'{token}', whose input embedding would never train .*\(50283\)$"):
        EncoderPretraining(model_config={**TINY, "pad_token_id": 1000}, tokenizer=str(tokenizer_dir))
    EncoderPretraining(model_config={**TINY, "pad_token_id": 50285}, tokenizer=str(tokenizer_dir))  # [unused0]: no text's
    for special in (50282, 50284):  # [SEP] between every two documents, MLM's [MASK]: passed as special tokens
        with pytest.raises(UserError, match=rf"^model.init_args.model_config.pad_token_id {special} is the tokenizer's "
                                            rf"token '\[(SEP|MASK)\]', whose input embedding would never train"):
            EncoderPretraining(model_config={**TINY, "pad_token_id": special}, tokenizer=str(tokenizer_dir))
    with pytest.raises(UserError, match=r"pad_token_id=-1 is outside the vocabulary"):  # not an OverflowError
        EncoderPretraining(model_config={**TINY, "pad_token_id": -1}, tokenizer=str(tokenizer_dir))
    config = ModernBertConfig(**TINY, vocab_size=len(modernbert_tokenizer), pad_token_id=1000)
    ModernBertForMaskedLM(config).save_pretrained(tmp_path / "model")
    modernbert_tokenizer.save_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match=rf"its config's pad_token_id 1000 is the tokenizer's token '{token}'"):
        EncoderPretraining(model=str(tmp_path / "model"))


def test_a_model_is_either_loaded_or_configured(tokenizer_dir):
    """Both given, the model_config would be ignored without a word; neither, nothing would say which to add."""
    from cpt_lightning.model_loading import build_model

    for model, model_config in ((str(tokenizer_dir), dict(TINY)), (None, None)):
        with pytest.raises(UserError, match="set exactly one of model.init_args.model .* and model.init_args.model_config"):
            build_model(model, model_config, "sdpa", None)


LEAST_SIZES = {"vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
               "num_attention_heads": 1, "global_attn_every_n_layers": 1, "local_attention": 2,
               "max_position_embeddings": 1}


@pytest.mark.parametrize("key", sorted(LEAST_SIZES))
def test_a_size_below_the_least_a_model_trains_with_is_refused(key):
    from cpt_lightning.model_loading import LEAST_CONFIG_SIZES, check_config_sizes

    assert LEAST_CONFIG_SIZES == LEAST_SIZES  # a size added there gets its case here
    least = LEAST_SIZES[key]
    check_config_sizes({**TINY, key: least})
    with pytest.raises(UserError, match=f"^model.init_args.model_config: {key}={least - 1}: must be at least {least}$"):
        check_config_sizes({**TINY, key: least - 1})


@pytest.mark.parametrize("token_id", [-1, 50368])
def test_a_special_token_id_outside_the_vocabulary_is_refused(token_id):
    """-1 would pass as Python's index of the last row: the embedding's padding_idx would freeze that token's row."""
    from cpt_lightning.model_loading import check_config_values

    with pytest.raises(UserError, match=f"pad_token_id={token_id} is outside the vocabulary \\(vocab_size=50368\\)"):
        check_config_values(ModernBertConfig(**TINY, pad_token_id=token_id))


def test_a_tokenizers_vocabulary_is_read_once_and_again_once_tokens_are_added(tokenizer_dir):
    """Read once per tokenizer (a module build asked five times, 20 ms each); a token added later is in the next read,
    its size and its digest, as in the identity a checkpoint records."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = vocabulary(tokenizer)
    assert first == tokenizer.get_vocab() and vocabulary(tokenizer) is first
    with pytest.raises(TypeError):
        first["<new>"] = 0  # shared by every caller: read-only
    digest = vocabulary_sha256(tokenizer)
    assert digest == vocab_sha256(first) and vocabulary_sha256(tokenizer) is digest
    tokenizer.add_tokens(["<new>"])
    assert vocabulary(tokenizer)["<new>"] == len(tokenizer) - 1 == tokenizer_size(tokenizer) - 1
    assert vocabulary_sha256(tokenizer) == vocab_sha256(tokenizer.get_vocab()) != digest
