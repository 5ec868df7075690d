"""Exported folders carry the keys transformers 4.x reads (cpt_lightning/hf_compat.py).

Without them 4.x builds a ModernBERT with its default RoPE thetas and layer pattern, silently, and
its AutoTokenizer refuses the folder. The last test loads a folder in a real 4.x install when
CPT_TEST_TRANSFORMERS4_PYTHON names its python (docs/export.md says how to make one).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

from cpt_lightning.hf_compat import add_config_keys, add_tokenizer_keys, gaps_in_4x, global_every_n, save_model

# Every architecture field away from 4.x's defaults, so a key 4.x did not read changes the logits.
ODD = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=3, max_position_embeddings=512,
    global_attn_every_n_layers=4, local_attention=10, global_rope_theta=1234.0, local_rope_theta=77.0,
    norm_eps=0.3, hidden_activation="silu",
)
TEXTS = [
    "Metformin lowered fasting glucose in adults with type 2 diabetes.",
    "In a randomized trial of 412 patients with chronic kidney disease, the angiotensin receptor blocker "
    "reduced proteinuria by 38% relative to placebo, while serum potassium rose modestly.",  # far beyond the window
    "left . It 's",  # 4.x's clean-up of tokenization spaces would change its decoding
]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, tokenizer_dir):
    """A random ModernBERT with the ODD architecture and the real tokenizer, saved by 5.x plus the 4.x keys."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig(vocab_size=len(tokenizer), **ODD)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from 1 and 0 too
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("odd")
    save_model(model, folder)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.save_pretrained(folder)
    add_tokenizer_keys(folder, tokenizer)
    return folder


# Run by each transformers install's python: the folder's ids, decoding and logits on TEXTS.
PROBE = f"""
import sys, torch, transformers
from transformers import AutoModelForMaskedLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
encoded = [tokenizer(text, return_tensors="pt") for text in {TEXTS!r}]
with torch.no_grad():
    logits = [model(**e).logits for e in encoded]
torch.save({{"version": transformers.__version__, "ids": [e["input_ids"] for e in encoded],
            "keys": [sorted(e) for e in encoded], "logits": logits,
            "decoded": [tokenizer.decode(e["input_ids"][0], skip_special_tokens=True) for e in encoded]}}, sys.argv[2])
"""


def probe(python: str, folder, out):
    subprocess.run([python, "-c", PROBE, str(folder), str(out)], check=True)
    return torch.load(out)


def test_config_json_names_the_layer_pattern_and_thetas_in_4x_keys(odd_folder):
    saved = json.loads((odd_folder / "config.json").read_text())
    assert (saved["global_attn_every_n_layers"], saved["global_rope_theta"], saved["local_rope_theta"]) == (4, 1234.0, 77.0)
    assert saved["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert "rope_scaling" not in saved  # plain RoPE: nothing to scale

    reloaded = ModernBertConfig.from_pretrained(odd_folder)  # 5.x still builds the model from its own keys
    assert reloaded.layer_types == saved["layer_types"]
    assert reloaded.rope_parameters["full_attention"]["rope_theta"] == 1234.0
    assert reloaded.rope_parameters["sliding_attention"]["rope_theta"] == 77.0


def test_save_model_draws_no_progress_bar_and_leaves_transformers_bars_as_they_were(tmp_path, capfd):
    """transformers' one-shard "Writing model shards" bar broke into the training progress bar at each phase end."""
    from transformers.utils import logging as hf_logging

    model = ModernBertForMaskedLM(ModernBertConfig(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **ODD))
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        save_model(model, tmp_path / str(enabled))
        assert hf_logging.is_progress_bar_enabled() is enabled
    hf_logging.enable_progress_bar()
    assert "Writing model shards" not in capfd.readouterr().err
    assert json.loads((tmp_path / "True/config.json").read_text())["global_attn_every_n_layers"] == 4  # 4.x's keys added


def test_a_pattern_given_as_layer_types_gets_its_4x_key(tmp_path):
    """5.x writes no ``global_attn_every_n_layers`` for a config built from ``layer_types``: 4.x would build
    its default, a global layer every third."""
    full, sliding = "full_attention", "sliding_attention"
    config = ModernBertConfig(num_hidden_layers=5, layer_types=[full, sliding, sliding, sliding, full])
    config.save_pretrained(tmp_path)
    add_config_keys(tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text())["global_attn_every_n_layers"] == 4


@pytest.mark.parametrize("every_n", [None, 3], ids=["layer-types-alone", "beside-a-stale-every-n"])
def test_a_layer_pattern_4x_cannot_express_is_a_warning(tmp_path, every_n):
    """Nor does config.json keep a ``global_attn_every_n_layers`` the model_config set beside its layer_types (5.x
    saves it as given): 4.x read it and built that pattern, not the model's."""
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    config = ModernBertConfig(num_hidden_layers=3, layer_types=layer_types,
                              **({"global_attn_every_n_layers": every_n} if every_n else {}))
    config.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="not one global layer every n"):
        add_config_keys(tmp_path, config)
    assert "global_attn_every_n_layers" not in json.loads((tmp_path / "config.json").read_text())


def test_the_card_of_a_model_4x_cannot_build_says_it_loads_in_5x_only(tmp_path):
    """The card promised 4.x parity the export had just warned it could not give."""
    from transformers import ModernBertForMaskedLM

    from cpt_lightning.model_card import write_model_card

    def versions_line(layer_types):
        config = ModernBertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                                  layer_types=layer_types)
        card = write_model_card(tmp_path, {}, ModernBertForMaskedLM(config), None, None, "org/model", "en", "mit")
        return next(line for line in card.read_text().splitlines() if line.startswith("Loads with"))

    assert versions_line(["full_attention", "sliding_attention", "sliding_attention"]).startswith(
        "Loads with transformers 4.48 or later (5.x included)")
    assert versions_line(["sliding_attention", "sliding_attention", "full_attention"]).startswith(
        "Loads with transformers 5.x: transformers 4.x cannot build its layer pattern or RoPE scaling")


def test_every_layer_global_and_only_the_first_global_are_4x_patterns():
    full, sliding = "full_attention", "sliding_attention"
    assert global_every_n([full, full, full]) == 1
    assert global_every_n([full, sliding, sliding]) == 3  # n = the depth: layer 0 alone is global
    assert global_every_n([full]) == 1


def test_rope_scaling_shared_by_both_layer_kinds_is_written_for_4x(tmp_path):
    """4.x reads one ``rope_scaling`` for every layer: without it a context-extended model would run unscaled (4.57
    reads it; 4.48 cannot build such a model, which the export warns)."""
    linear = {"rope_type": "linear", "factor": 2.0}
    config = ModernBertConfig(num_hidden_layers=3, rope_parameters={
        "full_attention": {**linear, "rope_theta": 1234.0}, "sliding_attention": {**linear, "rope_theta": 77.0}})
    config.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"RoPE scaling \(linear\): transformers 4.48 cannot build it"):
        add_config_keys(tmp_path, config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"] == linear and (saved["global_rope_theta"], saved["local_rope_theta"]) == (1234.0, 77.0)


def test_a_scaled_rope_is_not_said_to_load_in_4x(tmp_path):
    """4.48 builds no scaled ModernBERT (its rope functions get a KeyError or ValueError) and 4.x's flash_attention_2
    path runs it unscaled: the card promised 4.48+ with the same outputs."""
    from transformers import ModernBertForMaskedLM

    from cpt_lightning.model_card import write_model_card

    linear = {"rope_type": "linear", "factor": 2.0}
    config = ModernBertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                              rope_parameters={"full_attention": {**linear, "rope_theta": 1234.0},
                                               "sliding_attention": {**linear, "rope_theta": 77.0}})
    assert gaps_in_4x(config) == ["RoPE scaling (linear): transformers 4.48 cannot build it (KeyError or ValueError in "
                                  "its rope functions) and 4.x's flash_attention_2 path runs it unscaled"]
    card = write_model_card(tmp_path, {}, ModernBertForMaskedLM(config), None, None, "org/model", "en", "mit")
    assert "Loads with transformers 5.x: transformers 4.x cannot build its layer pattern or RoPE scaling" in card.read_text()


def test_rope_scaling_that_differs_between_layer_kinds_is_a_warning(tmp_path):
    config = ModernBertConfig(num_hidden_layers=3, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 77.0}})
    config.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="global and local layers scale RoPE differently"):
        add_config_keys(tmp_path, config)
    assert "rope_scaling" not in json.loads((tmp_path / "config.json").read_text())


def test_tokenizers_that_5x_cleans_up_keep_their_clean_up(tmp_path, tokenizer_dir):
    """5.x skips the clean-up for BPE only, unless the tokenizer opts in: where 5.x applies it, 4.x must too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "left": 1, ".": 2, "It": 3, "'s": 4}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizers = {
        "bpe_opted_in": AutoTokenizer.from_pretrained(
            tokenizer_dir, clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True),
        "word_level": PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", clean_up_tokenization_spaces=True),
    }
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(tmp_path / name)
        add_tokenizer_keys(tmp_path / name, tokenizer)
        assert json.loads((tmp_path / name / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is True, name
        ids = tokenizer(TEXTS[2])["input_ids"]
        assert AutoTokenizer.from_pretrained(tmp_path / name).decode(ids, skip_special_tokens=True) == "left. It's", name


def test_tokenizer_config_names_a_class_4x_knows_and_decodes_as_5x(odd_folder, tokenizer_dir):
    saved = json.loads((odd_folder / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x's AutoTokenizer refuses "TokenizersBackend"
    assert saved["model_input_names"] == ["input_ids", "attention_mask"]  # 4.x's default adds token_type_ids
    assert saved["clean_up_tokenization_spaces"] is False
    assert "is_local" not in saved and "local_files_only" not in saved

    original, written = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(odd_folder)
    for text in TEXTS:
        ids = original(text)["input_ids"]
        assert written(text)["input_ids"] == ids
        assert written.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_class_4x_knows_already_is_kept(tmp_path):
    from types import SimpleNamespace

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast"}))
    add_tokenizer_keys(tmp_path, SimpleNamespace(model_input_names=["input_ids", "attention_mask"]))
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizerFast"


@pytest.mark.skipif(not os.environ.get("CPT_TEST_TRANSFORMERS4_PYTHON"), reason="set CPT_TEST_TRANSFORMERS4_PYTHON to a 4.x install's python")
def test_transformers_4_builds_the_same_model_and_tokenizer(odd_folder, tmp_path):
    v4 = probe(os.environ["CPT_TEST_TRANSFORMERS4_PYTHON"], odd_folder, tmp_path / "v4.pt")
    v5 = probe(sys.executable, odd_folder, tmp_path / "v5.pt")
    assert v4["version"].startswith("4.") and v5["version"].startswith("5."), (v4["version"], v5["version"])
    assert v4["keys"] == v5["keys"] and v4["decoded"] == v5["decoded"]
    for ids4, ids5, logits4, logits5 in zip(v4["ids"], v5["ids"], v4["logits"], v5["logits"]):
        assert torch.equal(ids4, ids5)
        torch.testing.assert_close(logits4, logits5, rtol=0, atol=1e-5)
