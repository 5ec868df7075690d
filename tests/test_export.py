"""`cpt export`: checkpoint (file or sharded) → HF folder that loads cleanly, matches the trained
module's bidirectional logits, and carries a model card whose snippets run and whose figures are the run's."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Timer
from safetensors import safe_open
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from callbacks import ObjectiveSchedule, Phase
from cpt_lightning.errors import UserError
from cpt_lightning.export import (is_training_checkpoint, load_tokenizer, main, read_checkpoint, rebuild_model,
                                  saved_weight_shapes)
from cpt_lightning.evaluate.report import markdown_table
from cpt_lightning.weights_digest import weights_digest
from cpt_lightning.objectives import CausalLM
from helpers import packed_position_ids, tiny_module

ROWS, LENGTH = 2, 32
MLM_HEAD_ONLY = {"head.dense.weight", "head.norm.weight", "decoder.bias"}


class PackedRows(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield {"input_ids": torch.randint(0, 50000, (LENGTH,), generator=g), "position_ids": packed_position_ids([12, 20])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A tiny module after 2 CLM steps (so its attention modules are left causal) and its checkpoint."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-2)
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, callbacks=[ObjectiveSchedule([Phase(CausalLM(), tokens=2 * ROWS * LENGTH)]), Timer()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return module.eval(), path


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-bio"
    assert main([str(trained[1]), str(out)]) == 0
    return out


def write_sharded(checkpoint_path, folder):
    """What Lightning's ModelParallelStrategy writes: DCP shards of weights + optimizer, the rest in meta.pt."""
    import torch.distributed.checkpoint as dcp

    checkpoint = torch.load(checkpoint_path, weights_only=False)
    state = {"state_dict": checkpoint.pop("state_dict"), "optimizer_0": checkpoint.pop("optimizer_states")[0]}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")
    return folder


def test_folder_loads_without_missing_or_unexpected_keys(exported):
    assert {p.name for p in exported.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert not (exported / "training_config.yaml").exists()  # no run config beside this checkpoint: none copied
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["ModernBertForMaskedLM"]  # not the training subclass
    assert config["global_attn_every_n_layers"] == 2 and "global_rope_theta" in config  # what transformers 4.x reads
    assert json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    # the model's context, not the source tokenizer's 8192: longer inputs would index past the position table
    assert AutoTokenizer.from_pretrained(exported).model_max_length == config["max_position_embeddings"] == 512
    with safe_open(exported / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "decoder.weight" not in stored and "model.embeddings.tok_embeddings.weight" in stored  # tied: stored once

    mlm, info = AutoModelForMaskedLM.from_pretrained(exported, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert mlm.decoder.weight.data_ptr() == mlm.model.embeddings.tok_embeddings.weight.data_ptr()

    encoder, info = AutoModel.from_pretrained(exported, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert info["unexpected_keys"] == MLM_HEAD_ONLY  # the MLM head, which AutoModel has no place for


def test_exported_logits_equal_the_modules_bidirectional_logits(trained, exported, tokenizer_dir):
    module, _ = trained
    assert module.objective.attention == "causal"  # the run ended in its CLM phase
    tokenizer = AutoTokenizer.from_pretrained(exported)
    inputs = tokenizer("Metformin lowered [MASK] glucose in adults with type 2 diabetes.", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}  # no token_type_ids
    ids = inputs["input_ids"]
    with torch.no_grad():
        expected = module(ids, torch.arange(ids.shape[1])[None], "bidirectional").logits
        got = AutoModelForMaskedLM.from_pretrained(exported)(**inputs).logits
    assert got.shape == expected.shape == (1, ids.shape[1], module.model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        causal = module(ids, torch.arange(ids.shape[1])[None], "causal").logits
    assert not torch.allclose(got, causal, atol=1e-3)  # the comparison can tell the two apart


def test_a_bf16_checkpoint_exports_bf16_weights(trained, tmp_path):
    """The precision the run stored is kept (the same values at half the size of an fp32 copy), from either layout."""
    checkpoint = torch.load(trained[1], weights_only=False)
    checkpoint["state_dict"] = {k: v.to(torch.bfloat16) for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "bf16.ckpt")
    sharded = write_sharded(tmp_path / "bf16.ckpt", tmp_path / "bf16-sharded")
    for source, out in ((tmp_path / "bf16.ckpt", tmp_path / "hf"), (sharded, tmp_path / "hf-sharded")):
        assert main([str(source), str(out)]) == 0
        with safe_open(out / "model.safetensors", "pt") as f:
            assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}, source


def test_a_run_from_a_pretrained_model_exports_its_trained_weights_under_the_base_models_config(trained, exported, tmp_path):
    """Continued pretraining (the recipes' runs) records `model`, not `model_config`: the architecture and the
    tokenizer are the base model's, the weights the checkpoint's, and the card names the base model."""
    checkpoint = torch.load(trained[1], weights_only=False)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "model": str(exported), "model_config": None,
                                      "tokenizer": None}
    trained_past_the_base = checkpoint["state_dict"]["model.model.final_norm.weight"] + 1
    checkpoint["state_dict"]["model.model.final_norm.weight"] = trained_past_the_base
    torch.save(checkpoint, tmp_path / "continued.ckpt")
    assert main([str(tmp_path / "continued.ckpt"), str(tmp_path / "hf")]) == 0
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.final_norm.weight"), trained_past_the_base)
    card = (tmp_path / "hf" / "README.md").read_text()
    # a folder is named in the text; the front matter's base_model is for Hub ids, which the Hub checks on a push
    assert "base_model:" not in card.split("---")[1]
    assert f"by continued pretraining of `{exported}`" in card and f"| Base model | `{exported}` |" in card
    from cpt_lightning.model_card import front_matter
    assert "base_model:\n- answerdotai/ModernBERT-base\n" in front_matter("answerdotai/ModernBERT-base", "en", "x", False)


def test_the_export_builds_the_config_the_checkpoint_holds_without_reading_the_base_model(
    trained, tokenizer_dir, tmp_path, capsys, monkeypatch
):
    """The architecture came from `from_pretrained(hparams["model"])` again: an export offline (a compute
    node, an empty cache) ended in a traceback, and one after the Hub's files changed got their new config."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, not from the environment
    checkpoint = torch.load(trained[1], weights_only=False)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "model": "no-such-org/ModernBERT-base",
                                      "model_config": None, "tokenizer": None}
    assert checkpoint["hf_config"]["local_attention"] != 6
    checkpoint["hf_config"]["local_attention"] = 6  # a config no base model or hyperparameter gives
    torch.save(checkpoint, tmp_path / "hub_run.ckpt")
    assert main([str(tmp_path / "hub_run.ckpt"), str(tmp_path / "hf"), "--tokenizer", str(tokenizer_dir)]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["local_attention"] == 6
    capsys.readouterr()
    del checkpoint["hf_config"]  # a checkpoint saved before it held one
    torch.save(checkpoint, tmp_path / "older.ckpt")
    assert main([str(tmp_path / "older.ckpt"), str(tmp_path / "hf2"), "--tokenizer", str(tokenizer_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "holds no copy of its model config" in err and "'no-such-org/ModernBERT-base' it names cannot be read" in err
    assert not (tmp_path / "hf2").exists()


def test_sharded_checkpoint_exports_the_same_weights(trained, exported, tmp_path, recwarn):
    """Read in this process: without torch's warning that it assumes one process (said at every phase-end export of
    a multi-process run, as if something were wrong)."""
    sharded = write_sharded(trained[1], tmp_path / "sharded")
    assert main([str(sharded), str(tmp_path / "from-sharded")]) == 0
    assert not [w for w in recwarn if "load in a single process" in str(w.message)]
    with safe_open(exported / "model.safetensors", "pt") as a, safe_open(tmp_path / "from-sharded" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert read_checkpoint(sharded).records["global_step"] == 2
    records_only = read_checkpoint(sharded, weights=False)  # what cpt analyze reads for a checkpoint's tokenizer
    assert records_only.weights == {} and records_only.hparams == read_checkpoint(trained[1]).hparams
    assert is_training_checkpoint(sharded) and is_training_checkpoint(trained[1]) and not is_training_checkpoint(exported)
    checkpoint = read_checkpoint(sharded)
    assert not rebuild_model(checkpoint, load_tokenizer(checkpoint, None)).training  # cpt analyze runs it as returned
    trained_shapes = {key: value.shape for key, value in torch.load(trained[1], weights_only=False)["state_dict"].items()}
    assert saved_weight_shapes(sharded) == saved_weight_shapes(trained[1]) == trained_shapes  # a resume checks them


def test_a_tokenizer_that_makes_token_type_ids_exports_without_them(trained, tokenizer_dir, tmp_path):
    """ModernBERT takes no token_type_ids: a tokenizer whose config asks for them (as BERT's do) is exported
    without, or the card's `model(**tokenizer(text))` fails with an unexpected argument."""
    import shutil

    bert_style = shutil.copytree(tokenizer_dir, tmp_path / "bert_style")
    config = json.loads((bert_style / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (bert_style / "tokenizer_config.json").write_text(json.dumps(config))
    assert "token_type_ids" in AutoTokenizer.from_pretrained(bert_style)("text")
    assert main([str(trained[1]), str(tmp_path / "hf"), "--tokenizer", str(bert_style)]) == 0
    assert set(AutoTokenizer.from_pretrained(tmp_path / "hf")("text")) == {"input_ids", "attention_mask"}


def test_card_snippets_run_unchanged(exported):
    card = (exported / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 3
    outputs = []
    for code in blocks:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, "README.md", "exec"), {})
        outputs.append(stdout.getvalue())
    assert outputs[0].startswith("Predicted token:")
    assert "'token_str'" in outputs[1]
    assert re.fullmatch(r"torch\.Size\(\[2, \d+, 32\]\)\n", outputs[2])


@pytest.mark.skipif(not os.environ.get("CPT_TEST_TRANSFORMERS4_PYTHON"), reason="set CPT_TEST_TRANSFORMERS4_PYTHON to a 4.x install's python")
def test_card_snippets_run_in_transformers_4(exported):
    """The card says the folder loads in transformers 4.48+; its snippets are what a reader runs there."""
    card = (exported / "README.md").read_text()
    for code in re.findall(r"```python\n(.*?)```", card, flags=re.S):
        subprocess.run([os.environ["CPT_TEST_TRANSFORMERS4_PYTHON"], "-c", code], check=True, cwd=exported.parent)


def test_card_front_matter_and_figures_from_the_checkpoint(exported, trained):
    card = (exported / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: apache-2.0" in front and "library_name: transformers" in front and "pipeline_tag: fill-mask" in front
    assert "base_model" not in front  # random initialisation: no base model to name
    checkpoint = torch.load(trained[1], weights_only=False)
    tokens_per_step, steps = checkpoint["tokens_per_step"], checkpoint["global_step"]
    assert f"{tokens_per_step:,} tokens per optimizer step" in card
    assert f"Optimizer steps: {steps}; tokens seen: {steps * tokens_per_step:,}" in card
    assert f"peak learning rate {checkpoint['hyper_parameters']['learning_rate']}" in card
    params = sum(p.numel() for p in trained[0].model.parameters())
    assert f"| Parameters | {params:,} |" in card
    seconds = round(checkpoint["callbacks"]["Timer"]["time_elapsed"]["train"])
    assert f"Wall-clock: 0:00:{seconds:02d}" in card
    assert "Phase schedule: not recorded" in card  # no run config.yaml beside this checkpoint: said, not guessed
    assert "| Architecture | ModernBERT (3 layers: 2 global attention, 1 local with a 16-token window) |" in card
    assert "| Context length | 512 tokens |" in card and "| Hidden size | 32 |" in card


def test_run_config_is_copied_as_training_config(trained, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  init_args:\n    sources:\n    - {name: pubmed, path: data/pubmed, weight: 1.0}\n")
    assert main([str(trained[1]), str(tmp_path / "out"), "--run-config", str(config)]) == 0
    assert (tmp_path / "out" / "training_config.yaml").read_bytes() == config.read_bytes()
    _, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]  # written inside the staging folder


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_the_config_a_checkpoint_holds_wins_over_the_log_folders(trained, tmp_path, layout, capsys):
    """The log folder's config.yaml is the latest resume's (a longer decay, a branch under the run's name):
    a checkpoint of the steps before it was exported with that config's card; one set aside, or moved to
    another machine, had none beside it. Each checkpoint now holds the config that trained it."""
    trained_under = "model:\n  init_args: {learning_rate: 0.01}\ntrainer:\n  max_steps: 2\n"
    checkpoint = torch.load(trained[1], weights_only=False)
    checkpoint["run_config"] = trained_under
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("trainer:\n  max_steps: 9\n")  # a later resume's
    torch.save(checkpoint, folder / "step2.ckpt")
    saved = write_sharded(folder / "step2.ckpt", folder / "step2") if layout == "sharded" else folder / "step2.ckpt"

    assert main([str(saved), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "training_config.yaml").read_text() == trained_under
    assert "the run's configuration (the copy saved in the checkpoint)" in (tmp_path / "out" / "README.md").read_text()

    given = tmp_path / "given.yaml"  # --run-config still names the config to use, said when it is not the copy
    given.write_text("trainer:\n  max_steps: 3\n")
    assert main([str(saved), str(tmp_path / "given"), "--run-config", str(given)]) == 0
    assert f"warning: --run-config {given} is not the config the checkpoint holds" in capsys.readouterr().err
    requeued = tmp_path / "requeued.yaml"  # the same run's config.yaml after a requeue's --ckpt_path last: the same
    requeued.write_text(yaml.safe_dump({**yaml.safe_load(trained_under), "ckpt_path": "last"}))
    assert main([str(saved), str(tmp_path / "requeued"), "--run-config", str(requeued)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert (tmp_path / "given" / "training_config.yaml").read_text() == given.read_text()
    assert f"(`{given}`)" in (tmp_path / "given" / "README.md").read_text()

    del checkpoint["run_config"]  # a checkpoint saved before they held one: the log folder's file, as before
    torch.save(checkpoint, folder / "older.ckpt")
    assert main([str(folder / "older.ckpt"), str(tmp_path / "older")]) == 0
    assert (tmp_path / "older" / "training_config.yaml").read_text() == "trainer:\n  max_steps: 9\n"


def test_a_config_yaml_beside_the_checkpoint_is_the_runs(tmp_path):
    """LightningCLI writes config.yaml in the log folder: a checkpoint is in its checkpoints/ or beside it."""
    from cpt_lightning.export import find_run_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert find_run_config(run / "checkpoints" / "last.ckpt") is None
    (run / "config.yaml").write_text("trainer: {}\n")
    assert find_run_config(run / "checkpoints" / "last.ckpt") == find_run_config(run / "last.ckpt") == run / "config.yaml"
    (run / "checkpoints" / "config.yaml").write_text("trainer: {}\n")
    assert find_run_config(run / "checkpoints" / "last.ckpt") == run / "checkpoints" / "config.yaml"  # the nearer one


def test_card_options_name_the_model_its_language_and_license(trained, tmp_path):
    """--model-id is what readers paste into from_pretrained; the title is its last part (not prefixed with the
    run's name, as a phase-end export's folder name is)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"logger": {"class_path": "TensorBoardLogger",
                                                             "init_args": {"name": "arm_a"}}}}))
    assert main([str(trained[1]), str(tmp_path / "out"), "--model-id", "org/tiny-bio-fr", "--language", "fr",
                 "--license", "mit", "--run-config", str(config)]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "language:\n- fr\n" in front and "license: mit\n" in front
    assert card.count('model_id = "org/tiny-bio-fr"') == 2 and 'pipeline("fill-mask", model="org/tiny-bio-fr")' in card
    assert "\n# tiny-bio-fr\n" in card and "Le patient" in card and card.endswith("## License\n\nmit\n")
    assert '"Un second texte, plus court."' in card and "A second, shorter text." not in card  # one language a batch


def test_the_card_is_in_the_language_of_the_runs_phase_end_exports(trained, tmp_path):
    """The French recipe's PhaseEndExport writes French cards; a `cpt export` of its checkpoint (to add evaluation
    results, as docs/evaluation.md says) wrote an English one."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "callbacks.PhaseEndExport", "init_args": {"language": "fr"}}]}}))
    for args, language in (([], "fr"), (["--language", "de"], "de")):
        out = tmp_path / f"out_{language}"
        assert main([str(trained[1]), str(out), "--run-config", str(config), *args]) == 0
        assert f"language:\n- {language}\n" in (out / "README.md").read_text()
    assert "Le patient" in (tmp_path / "out_fr" / "README.md").read_text()


def eval_results(weights: dict[str, str | None]) -> dict:
    """What cpt evaluate writes for models named with their weights' digests; F1 = 80 + 2·seed (+ 10 for the second
    model) on a NER task, 60 + 4·seed on a classification task."""
    return {
        "seeds": [0, 1],
        "tasks": {"BC5CDR": {"type": "ner", "family": "BigBIO", "metric": "entity_f1"},
                  "HoC": {"type": "multilabel", "family": "BigBIO", "metric": "micro_f1"}},
        "models": {model: {"context": 512, "weights": digest} for model, digest in weights.items()},
        "runs": [{"model": model, "task": t, "seed": s, "test_f1": f + 10 * rank}
                 for rank, model in enumerate(weights)
                 for t, s, f in [("BC5CDR", 0, 80.0), ("BC5CDR", 1, 82.0), ("HoC", 0, 60.0), ("HoC", 1, 64.0)]],
    }


def test_eval_results_become_the_card_table_naming_this_models_row(trained, exported, tmp_path):
    """The row is told by the weights' content: the folder evaluated is an earlier export, under another name."""
    results = eval_results({"base-model": "0" * 64, "runs/eval-copy": weights_digest(exported)})
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main([str(trained[1]), str(tmp_path / "out"), "--eval-results", str(tmp_path / "results.json")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert markdown_table(results) in card
    assert "| 81.0 ± 1.4 | 62.0 ± 2.8 | 71.5 ± 2.1 | 71.5 ± 2.1 |" in card
    assert ("This model is the row `runs/eval-copy` (the folder evaluated, with the same weights), the other rows the "
            "models it was compared with.") in card


def test_eval_results_without_this_models_weights_are_refused(trained, exported, tmp_path, capsys):
    """The card showed any results.json's rows, another model's scores read as this one's."""
    for weights, refusal in [({"base-model": "0" * 64}, "none of its models (base-model) has this checkpoint's weights"),
                             ({"tiny-bio": None}, "it names no model's weights")]:
        (tmp_path / "results.json").write_text(json.dumps(eval_results(weights)))
        assert refusal in _error([trained[1], tmp_path / "out", "--eval-results", tmp_path / "results.json"], capsys)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_eval_results_of_another_shape_are_one_line(trained, tmp_path, capsys):
    """Well-formed JSON that is not a cpt evaluate results.json ended in a KeyError traceback."""
    (tmp_path / "results.json").write_text(json.dumps({"runs": []}))
    err = _error([trained[1], tmp_path / "out", "--eval-results", tmp_path / "results.json"], capsys)
    assert "not the results.json of cpt evaluate (missing: models, seeds, tasks)" in err
    (tmp_path / "results.json").write_text(json.dumps({"seeds": [0], "tasks": {}, "models": {}}))
    err = _error([trained[1], tmp_path / "out", "--eval-results", tmp_path / "results.json"], capsys)
    assert "not the results.json of cpt evaluate (missing: runs)" in err
    (tmp_path / "results.json").write_text('{"seeds": [0], "tasks": ')  # cut short
    err = _error([trained[1], tmp_path / "out", "--eval-results", tmp_path / "results.json"], capsys)
    assert err.startswith(f"error: --eval-results {tmp_path / 'results.json'}: Expecting value")
    assert not (tmp_path / "out").exists()


def _error(argv, capsys):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_bad_checkpoints_are_one_line_errors(trained, exported, tmp_path, capsys):
    assert "no such checkpoint" in _error([tmp_path / "missing.ckpt", tmp_path / "o"], capsys)
    assert "already a Hugging Face model folder" in _error([exported, tmp_path / "o"], capsys)
    (tmp_path / "folder").mkdir()
    assert "not a sharded (torch.distributed.checkpoint) checkpoint\n" in _error([tmp_path / "folder", tmp_path / "o"], capsys)
    run = tmp_path / "run"  # the run folder given for one of its checkpoints
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "step000000002.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    assert _error([run, tmp_path / "o"], capsys).endswith(
        f"checkpoint; it holds {run / 'checkpoints' / 'last.ckpt'}, {run / 'checkpoints' / 'step000000002.ckpt'}: give "
        "one of those\n")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")  # torch's words advised saving it again otherwise
    (tmp_path / "torn.ckpt").write_bytes(Path(trained[1]).read_bytes()[:-100])
    for junk in ("junk.ckpt", "torn.ckpt"):
        assert _error([tmp_path / junk, tmp_path / "o"], capsys).startswith(
            f"error: {tmp_path / junk}: not a zip-format checkpoint, as cpt fit writes a .ckpt (another format, or one "
            "cut short)")
    torch.save({"weights": {}}, tmp_path / "plain.pt")
    assert "no 'state_dict'" in _error([tmp_path / "plain.pt", tmp_path / "o"], capsys)

    checkpoint = torch.load(trained[1], weights_only=False)
    untied = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
    untied["state_dict"]["model.decoder.weight"] = untied["state_dict"]["model.decoder.weight"] + 1
    torch.save(untied, tmp_path / "untied.ckpt")
    assert "untied during training" in _error([tmp_path / "untied.ckpt", tmp_path / "o"], capsys)
    partial = {**checkpoint, "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if "final_norm" not in k}}
    torch.save(partial, tmp_path / "partial.ckpt")
    assert "(the checkpoint has no 'model.final_norm.weight')" in _error([tmp_path / "partial.ckpt", tmp_path / "o"], capsys)
    nowhere = tmp_path / "nowhere"  # a tokenizer folder moved away: transformers' words were on hub repo ids
    assert f"cannot load the tokenizer '{nowhere}' (no such folder)" in _error([trained[1], tmp_path / "o", "--tokenizer", nowhere], capsys)


def test_a_damaged_sharded_checkpoint_is_one_line_and_an_earlier_export_is_kept(trained, exported, tmp_path, capsys):
    """A shard missing or cut short, or garbled metadata, ended in torch's traceback (a CheckpointException, a
    BaseException, also escaped the phase-end export's guard and left the other ranks at its barrier)."""
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    damages = {
        "missing": lambda folder: next(folder.glob("*.distcp")).unlink(),
        "cut": lambda folder: [shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 20])
                               for shard in folder.glob("*.distcp")],
        "metadata": lambda folder: (folder / ".metadata").write_bytes(b"garbage"),
    }
    records_lost = write_sharded(trained[1], tmp_path / "no-meta")
    (records_lost / "meta.pt").unlink()  # it asked for --tokenizer, then for hyper_parameters
    assert _error([records_lost, out, "--overwrite"], capsys).startswith(
        f"error: {records_lost}: the sharded checkpoint has no meta.pt (Lightning's records")
    for damage, apply in damages.items():
        sharded = write_sharded(trained[1], tmp_path / damage)
        apply(sharded)
        err = _error([sharded, out, "--overwrite"], capsys)
        assert f"{sharded}: the sharded checkpoint cannot be read (" in err and "export another checkpoint" in err
        assert "Traceback" not in err and (damage != "missing" or "(FileNotFoundError: " in err)  # the cause, not torch's
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(UserError, match="the sharded checkpoint cannot be read"):
        saved_weight_shapes(tmp_path / "metadata")


def test_an_export_written_to_its_folder_meanwhile_is_kept_unless_overwrite(trained, exported, tmp_path, capsys,
                                                                             monkeypatch):
    """Two exports to one new folder both exited 0, the slower silently replacing the other's export."""
    import cpt_lightning.export

    out = tmp_path / "out"
    save_model = cpt_lightning.export.save_model

    def save_while_another_export_lands(model, folder, shown_as=None):
        save_model(model, folder, shown_as)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(exported, out)
        (out / "the_other_export").write_text("")

    monkeypatch.setattr(cpt_lightning.export, "save_model", save_while_another_export_lands)
    assert _error([trained[1], out], capsys) == (f"error: {out} was written by another command while this export was "
                                                 "made: that is kept, and nothing of this export is left behind\n")
    assert (out / "the_other_export").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert main([str(trained[1]), str(out), "--overwrite"]) == 0  # replacing it was asked for
    assert not (out / "the_other_export").exists() and (out / "config.json").exists()


def test_checkpoints_that_do_not_fit_the_model_are_one_line_errors(trained, tmp_path, capsys):
    """Each of these ended in a traceback (or an export under a misleading message) before its check."""
    import torch.distributed.checkpoint as dcp

    checkpoint = torch.load(trained[1], weights_only=False)
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
    assert "no 'model.*' weights; was it written by cpt fit" in _error([tmp_path / "foreign.ckpt", tmp_path / "o"], capsys)
    dcp.save({"optimizer": {"step": torch.zeros(1)}}, checkpoint_id=tmp_path / "no-weights", no_dist=True)
    assert "the sharded checkpoint holds no 'state_dict' tensors" in _error([tmp_path / "no-weights", tmp_path / "o"], capsys)

    extra = {**checkpoint, "state_dict": {**checkpoint["state_dict"], "model.pooler.weight": torch.zeros(2)}}
    torch.save(extra, tmp_path / "extra.ckpt")
    assert "(the model has no 'pooler.weight')" in _error([tmp_path / "extra.ckpt", tmp_path / "o"], capsys)
    resized = {**checkpoint, "state_dict": {**checkpoint["state_dict"], "model.model.final_norm.weight": torch.ones(64)}}
    torch.save(resized, tmp_path / "resized.ckpt")
    assert "'model.final_norm.weight' has shape (64,), the model expects (32,)" in _error([tmp_path / "resized.ckpt", tmp_path / "o"], capsys)
    anonymous = {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "tokenizer": None}}
    torch.save(anonymous, tmp_path / "anonymous.ckpt")
    assert "no tokenizer recorded; pass --tokenizer PATH" in _error([tmp_path / "anonymous.ckpt", tmp_path / "o"], capsys)
    assert not (tmp_path / "o").exists()


def test_a_model_configured_untied_exports_its_own_decoder(trained, tmp_path):
    """`model_config: {tie_word_embeddings: false}` trains a decoder of its own: the export refused it as
    "untied during training" (the class's tie list, not the model's), so neither cpt export nor PhaseEndExport wrote it."""
    checkpoint = torch.load(trained[1], weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    checkpoint["hyper_parameters"] = {**hparams, "model_config": {**hparams["model_config"], "tie_word_embeddings": False}}
    checkpoint["hf_config"]["tie_word_embeddings"] = False  # what such a run's checkpoint records
    decoder = checkpoint["state_dict"]["model.decoder.weight"] + 1
    checkpoint["state_dict"]["model.decoder.weight"] = decoder
    torch.save(checkpoint, tmp_path / "untied.ckpt")
    assert main([str(tmp_path / "untied.ckpt"), str(tmp_path / "hf")]) == 0
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(mlm.decoder.weight, decoder)
    assert torch.equal(mlm.model.embeddings.tok_embeddings.weight, checkpoint["state_dict"]["model.model.embeddings.tok_embeddings.weight"])


def test_a_layer_pattern_4x_cannot_build_is_warned_of_under_the_exports_own_name(trained, tmp_path):
    """The warning named the hidden staging folder (.hf.tmp-…) that is renamed away right after it."""
    checkpoint = torch.load(trained[1], weights_only=False)
    layer_types = ["sliding_attention", "full_attention", "full_attention"]  # not one global layer every n
    hparams = checkpoint["hyper_parameters"]
    checkpoint["hyper_parameters"] = {**hparams, "model_config": {**hparams["model_config"], "layer_types": layer_types}}
    checkpoint["hf_config"]["layer_types"] = layer_types
    torch.save(checkpoint, tmp_path / "pattern.ckpt")
    with pytest.warns(UserWarning, match="transformers 4.x will not build this model as trained") as caught:
        assert main([str(tmp_path / "pattern.ckpt"), str(tmp_path / "hf")]) == 0
    (warned,) = [str(w.message) for w in caught if "4.x will not build" in str(w.message)]
    assert warned.startswith(f"{tmp_path / 'hf'}: layer_types ")


def test_a_checkpoint_that_stores_the_tied_decoder_once_is_read(trained, tokenizer_dir):
    """A writer may keep one copy of the decoder tied to the embeddings: the export fills in the other."""
    from cpt_lightning.export import rebuild_model

    checkpoint = read_checkpoint(trained[1])
    embeddings = checkpoint.weights.pop("decoder.weight")
    model = rebuild_model(checkpoint, AutoTokenizer.from_pretrained(tokenizer_dir))
    assert torch.equal(model.decoder.weight, embeddings) and torch.equal(model.model.embeddings.tok_embeddings.weight, embeddings)


def _digest(folder):
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o033])
def test_the_export_is_readable_as_the_umask_allows(trained, tmp_path, umask):
    """mkdtemp made the folder 0700 and safetensors wrote 0600: colleagues could not read the model."""
    previous = os.umask(umask)
    try:
        assert main([str(trained[1]), str(tmp_path / "tiny-bio")]) == 0
    finally:
        os.umask(previous)
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    assert (tmp_path / "tiny-bio").stat().st_mode & 0o777 == folder_mode
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "tiny-bio").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {file_mode}, modes


def test_an_out_dir_that_holds_the_checkpoint_is_refused_and_the_run_kept(trained, tmp_path, capsys):
    """`cpt export RUN/checkpoints/last.ckpt RUN/checkpoints --overwrite` (or RUN) replaced the folder with the
    export: every checkpoint of the run, the one exported included, was deleted."""
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained[1], run / "checkpoints" / "step000000002.ckpt")
    (run / "checkpoints" / "last.ckpt").symlink_to("step000000002.ckpt")
    (run / "config.yaml").write_text("seed_everything: 0\n")
    before = _digest(run)
    for ckpt in ("last.ckpt", "step000000002.ckpt"):
        for out in (run / "checkpoints", run):
            err = _error([run / "checkpoints" / ckpt, out, "--overwrite"], capsys)
            assert "which replacing it would delete" in err, err
    assert _digest(run) == before and (run / "checkpoints" / "last.ckpt").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left


def test_an_out_dir_that_holds_the_eval_results_is_refused_and_one_giving_its_tokenizer_is_replaced(
        trained, exported, tmp_path, capsys):
    """`--eval-results OUT/results.json --overwrite` deleted the results the card was made from. The tokenizer is
    saved into the export: re-exporting over an earlier export with its own tokenizer works, as it did."""
    import json
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / "results.json").write_text(json.dumps({"seeds": [], "tasks": {}, "models": {}, "runs": []}))
    before = _digest(out)
    err = _error([trained[1], out, "--eval-results", out / "results.json", "--overwrite"], capsys)
    assert "which replacing it would delete" in err and str(out / "results.json") in err, err
    assert _digest(out) == before
    vocab = (out / "tokenizer.json").read_text()
    assert main([str(trained[1]), str(out), "--tokenizer", str(out), "--overwrite"]) == 0
    assert (out / "tokenizer.json").read_text() == vocab and not (out / "results.json").exists()


def test_the_current_folder_is_refused_as_out_dir(trained, tmp_path, capsys, monkeypatch):
    """``cpt export CKPT . --overwrite`` exported everything, then failed with a traceback in the rename (the
    current folder has no name to move aside)."""
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", ".."):
        err = _error([trained[1], out, "--overwrite"], capsys)
        assert err.startswith(f"error: OUT_DIR {out} is the current folder or holds it"), err
    assert [p.name for p in (tmp_path / "here").iterdir()] == ["notes.txt"]


def test_a_tokenizer_of_more_ids_than_the_embeddings_or_a_file_on_the_out_path_is_one_line(
        trained, tokenizer_dir, tmp_path, capsys):
    """A --tokenizer with ids past the embeddings was exported without a word (cpt evaluate then refused the folder);
    an OUT_DIR under a file was a FileExistsError traceback; a folder without tokenizer files a five-line error."""
    grown = AutoTokenizer.from_pretrained(tokenizer_dir)
    grown.add_tokens([f"newword{i}" for i in range(200)])
    grown.save_pretrained(tmp_path / "grown")
    err = _error([trained[1], tmp_path / "out", "--tokenizer", tmp_path / "grown"], capsys)
    assert "is not the one the run trained with: it differs in its vocabulary; pass --tokenizer" in err
    unrecorded = torch.load(trained[1], weights_only=False)
    del unrecorded["tokenizer_identity"]  # a checkpoint of a run that did not record its tokenizer
    torch.save(unrecorded, tmp_path / "unrecorded.ckpt")
    err = _error([tmp_path / "unrecorded.ckpt", tmp_path / "out", "--tokenizer", tmp_path / "grown"], capsys)
    assert f"has ids up to {len(grown) - 1} but the model's embeddings hold" in err
    (tmp_path / "file").write_text("keep")
    assert "is a file, not a folder" in _error([trained[1], tmp_path / "file" / "out"], capsys)
    (tmp_path / "empty").mkdir()
    assert "cannot load the tokenizer" in _error([trained[1], tmp_path / "out", "--tokenizer", tmp_path / "empty"], capsys)
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "keep"


def test_a_tokenizer_other_than_the_one_the_run_trained_with_is_refused(trained, tokenizer_dir, tmp_path, capsys):
    """The checkpoint names its tokenizer by path: a post-processor dropped from that folder after training (or
    another snapshot of a hub name, or another model's --tokenizer) exported a model whose inputs lack the CLS/SEP
    it trained with, exit 0."""
    import shutil

    unwrapped = shutil.copytree(tokenizer_dir, tmp_path / "unwrapped")
    spec = json.loads((unwrapped / "tokenizer.json").read_text())
    (unwrapped / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    err = _error([trained[1], tmp_path / "out", "--tokenizer", unwrapped], capsys)
    trained_ids = AutoTokenizer.from_pretrained(tokenizer_dir)("a b")["input_ids"]
    assert f"is not the one the run trained with: it differs in how it wraps a text ('a b' → {trained_ids[1:-1]}, trained on {trained_ids})" in err
    remasked = shutil.copytree(tokenizer_dir, tmp_path / "remasked")
    config = json.loads((remasked / "tokenizer_config.json").read_text())
    (remasked / "tokenizer_config.json").write_text(json.dumps({**config, "mask_token": "[UNK]"}))
    err = _error([trained[1], tmp_path / "out", "--tokenizer", remasked], capsys)
    mask, unk = AutoTokenizer.from_pretrained(tokenizer_dir).mask_token_id, AutoTokenizer.from_pretrained(remasked).mask_token_id
    assert f"its special-token ids (mask {mask} → {unk})" in err
    assert not (tmp_path / "out").exists()
    assert main([str(trained[1]), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]) == 0  # the training one


def test_eval_results_with_fields_of_another_type_are_one_line(trained, tmp_path, capsys):
    """`"tasks": 5` passed the key check and ended in an AttributeError traceback while writing the card."""
    for results in ({"seeds": [0], "tasks": 5, "models": {}, "runs": []},
                    {"seeds": [0], "tasks": {}, "models": {}, "runs": ["x"]}):
        (tmp_path / "results.json").write_text(json.dumps(results))
        err = _error([trained[1], tmp_path / "out", "--eval-results", tmp_path / "results.json"], capsys)
        assert "not the results.json of cpt evaluate" in err
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_needs_overwrite_and_is_replaced_whole(trained, exported, tmp_path, capsys, monkeypatch):
    import shutil

    import cpt_lightning.export as export

    out = tmp_path / "tiny-bio"
    shutil.copytree(exported, out)
    (out / "stale.txt").write_text("from an earlier export")
    before = _digest(out)
    assert _error([trained[1], out], capsys) == f"error: {out}: holds an earlier export; pass --overwrite to replace it\n"
    assert _digest(out) == before

    # a failure while writing leaves the earlier folder as it was and no temporary sibling
    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        main([str(trained[1]), str(out), "--overwrite"])
    assert _digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-bio"]
    monkeypatch.undo()

    assert main([str(trained[1]), str(out), "--overwrite"]) == 0
    after, fresh = _digest(out), _digest(exported)
    assert after.keys() == fresh.keys()  # the stale file is gone
    assert {k: v for k, v in after.items() if k != "README.md"} == {k: v for k, v in fresh.items() if k != "README.md"}
    assert str(out) in (out / "README.md").read_text()  # the card names the folder it was renamed to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-bio"]

    evaluation = tmp_path / "eval"  # --overwrite deleted any folder: an evaluation's runs.jsonl and results went
    evaluation.mkdir()
    for name in ("results.json", "results.md", "runs.jsonl"):
        (evaluation / name).write_text("kept")
    for overwrite in ([], ["--overwrite"]):  # not offered --overwrite first, to be refused it then
        assert _error([trained[1], evaluation, *overwrite], capsys).startswith(
            f"error: {evaluation}: holds no exported model (no config.json) but results.json, results.md, runs.jsonl; "
            "--overwrite replaces only an earlier export")
    assert [(evaluation / name).read_text() for name in ("results.json", "results.md", "runs.jsonl")] == ["kept"] * 3
    (tmp_path / "empty").mkdir()  # an empty folder is not an earlier export
    assert main([str(trained[1]), str(tmp_path / "empty")]) == 0 and (tmp_path / "empty" / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert "not a folder" in _error([trained[1], tmp_path / "file", "--overwrite"], capsys)


def test_phase_end_export_re_exports_over_an_earlier_phase_folder(trained, tmp_path, caplog):
    import logging
    import shutil
    from types import SimpleNamespace

    from callbacks import PhaseEndExport

    caplog.set_level(logging.INFO)
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path / "logs"), global_step=5,
                              save_checkpoint=lambda path, weights_only: shutil.copy(trained[1], path),
                              strategy=SimpleNamespace(barrier=lambda name: None), callbacks=[])
    callback = PhaseEndExport(str(tmp_path), language="fr")
    callback._save(trainer, "phase0-clm")
    (tmp_path / "phase0-clm" / "stale.txt").write_text("x")
    callback._save(trainer, "phase0-clm")  # e.g. a run restarted before the phase end: exported again
    assert not (tmp_path / "phase0-clm" / "stale.txt").exists()
    card = (tmp_path / "phase0-clm" / "README.md").read_text()
    assert "language:\n- fr" in card and "Le patient" in card  # the French recipe's card was English
    PhaseEndExport(str(tmp_path), export=False)._save(trainer, "phase1-mlm")
    # a log names what each phase end saved
    assert [r.getMessage() for r in caplog.records if "[PhaseEndExport]" in r.getMessage()] == [
        f"[PhaseEndExport] phase0-clm ended at step 5: saved {tmp_path}/phase0-clm.ckpt, exported {tmp_path}/phase0-clm",
    ] * 2 + [f"[PhaseEndExport] phase1-mlm ended at step 5: saved {tmp_path}/phase1-mlm.ckpt"]


def test_a_fresh_run_into_another_runs_export_folder_is_refused(trained, tmp_path):
    """A second seed that changed only the run name wrote into the first run's export/ (the recipes
    pinned it): its phase-end models were replaced, or mislabelled when the save failed."""
    from types import SimpleNamespace

    from callbacks import PhaseEndExport

    def start(callback, ckpt_path, name, version=""):
        """A TensorBoard logger's run folder is save_dir/name/version, a Wandb logger's log_dir is save_dir
        alone (shared by every run): the export goes beside checkpoints/, in the former."""
        module = SimpleNamespace(tokens_seen=0)
        logger = SimpleNamespace(save_dir=str(tmp_path / "runs"), name=name, version=version)
        trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path / "runs"), loggers=[logger], global_step=0,
                                  default_root_dir=str(tmp_path), ckpt_path=ckpt_path, fast_dev_run=0, checkpoint_callbacks=[],
                                  strategy=SimpleNamespace(broadcast=lambda value: value))
        callback.on_train_start(trainer, module)
        return callback

    first = start(PhaseEndExport(), None, "seed1")
    assert first.dirpath == tmp_path / "runs" / "seed1" / "export"  # the run folder's own
    first.dirpath.mkdir(parents=True)
    (first.dirpath / "phase0-clm.ckpt").write_text("the first run's")
    with pytest.raises(UserError, match=r"export folder .*seed1/export holds an earlier run's phase-end models "
                                        r"\(phase0-clm.ckpt\): resume that run \(--ckpt_path last"):
        start(PhaseEndExport(str(first.dirpath)), None, "seed2")
    start(PhaseEndExport(str(first.dirpath)), "runs/seed1/checkpoints/last.ckpt", "seed1")  # a resume
    assert start(PhaseEndExport(), None, "seed2").dirpath == tmp_path / "runs" / "seed2" / "export"
    assert start(PhaseEndExport(), None, "seed1", version=3).dirpath == tmp_path / "runs" / "seed1" / "version_3" / "export"
    assert (first.dirpath / "phase0-clm.ckpt").read_text() == "the first run's"
    kept = tmp_path / "kept"
    (kept / "phase1-mlm").mkdir(parents=True)  # an exported model kept, its checkpoint deleted for space
    with pytest.raises(UserError, match=r"holds an earlier run's phase-end models \(phase1-mlm\)"):
        start(PhaseEndExport(str(kept)), None, "seed3")


def test_the_run_folder_of_a_logger_that_saves_nothing_locally_is_under_default_root_dir(tmp_path):
    """MLflow logging to a server has no save_dir: Lightning puts checkpoints/ in default_root_dir/name/version."""
    from types import SimpleNamespace

    from callbacks.phase_end_export import run_folder

    remote = SimpleNamespace(save_dir=None, name="cpt", version="3f2a")
    assert run_folder(SimpleNamespace(loggers=[remote], default_root_dir=str(tmp_path))) == tmp_path / "cpt" / "3f2a"
    assert run_folder(SimpleNamespace(loggers=[], default_root_dir=str(tmp_path))) == tmp_path


def test_a_failed_phase_end_export_warns_and_lets_every_rank_go_on(trained, tmp_path):
    """Rank 0 raising alone left the other ranks at the barrier; the checkpoint is what must not fail."""
    import shutil
    from types import SimpleNamespace

    from callbacks import PhaseEndExport

    barriers = []
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path / "logs"), global_step=5,
                              save_checkpoint=lambda path, weights_only: shutil.copy(trained[1], path),
                              strategy=SimpleNamespace(barrier=barriers.append), callbacks=[])
    (tmp_path / "phase0-clm").write_text("a file where the folder goes")
    with pytest.warns(UserWarning, match=r"export of phase0-clm failed \(UserError: .*is a file, not a folder.*\); training goes on. "
                                         r"The checkpoint is saved: cpt export .*phase0-clm.ckpt .*phase0-clm --overwrite"):
        PhaseEndExport(str(tmp_path))._save(trainer, "phase0-clm")
    assert barriers == ["phase_end_export"] and read_checkpoint(tmp_path / "phase0-clm.ckpt").records["global_step"] > 0

    import callbacks.phase_end_export as phase_end_export

    def disk_full(*args, **kwargs):  # not only cpt's own errors: any failure of the export
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning, match=r"export of phase1-mlm failed \(OSError: "):
        patch.setattr(phase_end_export, "export_checkpoint", disk_full)
        PhaseEndExport(str(tmp_path))._save(trainer, "phase1-mlm")
    assert barriers == ["phase_end_export"] * 2 and (tmp_path / "phase1-mlm.ckpt").is_file()


def test_phase_end_checkpoint_alone_with_export_off_and_on_other_ranks(trained, tmp_path):
    """Rank 0 alone writes the HF folder (every rank would write the same folder at once)."""
    import shutil
    from types import SimpleNamespace

    from callbacks import PhaseEndExport

    def trainer(rank):
        return SimpleNamespace(is_global_zero=rank == 0, global_step=5,
                               save_checkpoint=lambda path, weights_only: shutil.copy(trained[1], path),
                               strategy=SimpleNamespace(barrier=lambda name: None), callbacks=[])

    PhaseEndExport(str(tmp_path), export=False)._save(trainer(0), "phase0-clm")
    PhaseEndExport(str(tmp_path))._save(trainer(1), "phase1-mlm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase0-clm.ckpt", "phase1-mlm.ckpt"]


def test_phase_end_export_looks_for_later_phases_models_once_per_start(tmp_path, monkeypatch):
    """Every look is a broadcast from rank 0: once at the start, not a host sync after every micro-batch."""
    from types import SimpleNamespace

    import callbacks.phase_end_export as phase_end_export
    from callbacks import PhaseEndExport

    monkeypatch.setattr(phase_end_export, "_phase_ends", lambda trainer: [(100, "phase0-clm"), (200, "phase1-mlm")])
    broadcasts = []
    trainer = SimpleNamespace(is_global_zero=True, ckpt_path=str(tmp_path / "last.ckpt"), global_step=3, fast_dev_run=0,
                              strategy=SimpleNamespace(broadcast=lambda value: broadcasts.append(value) or value))
    callback, module = PhaseEndExport(str(tmp_path)), SimpleNamespace(tokens_seen=30)
    callback.on_train_start(trainer, module)
    for tokens in (40, 50, 60):
        module.tokens_seen = tokens
        callback.on_train_batch_end(trainer, module, None, None, 0)
    assert broadcasts == [None, None]  # the start's refusal check, then the first micro-batch's look


@pytest.mark.parametrize("stop_after_last_phase", [True, False], ids=["stops", "trains-on"])
@pytest.mark.parametrize("last_end", [250, 256], ids=["inside-a-step", "on-a-step"])
def test_a_resume_at_the_step_that_ends_the_last_phase_saves_that_phases_model(tmp_path, monkeypatch,
                                                                             stop_after_last_phase, last_end):
    """Budgets round up to whole steps: the last phase (250 or 256 tokens, 64 a step) ends in the step that ends
    at 256. A run resumed there passes that end in no step (it stops, or trains on past it), so its model is saved
    from the resumed state; resumed a step later, nothing is. The folder's model of that phase is another step's (here
    unreadable): set aside first, its card made to load it where it now is."""
    from types import SimpleNamespace

    import callbacks.phase_end_export as phase_end_export
    from callbacks import PhaseEndExport

    monkeypatch.setattr(phase_end_export, "_phase_ends", lambda trainer: [(100, "phase0-clm"), (last_end, "phase1-mlm")])
    monkeypatch.setattr(phase_end_export, "_objective_schedule",
                        lambda trainer: SimpleNamespace(stop_after_last_phase=stop_after_last_phase,
                                                        check_resumed_history=lambda trainer, module: None))
    (tmp_path / "phase1-mlm.ckpt").write_bytes(b"cut short")
    (tmp_path / "phase1-mlm").mkdir()
    (tmp_path / "phase1-mlm" / "README.md").write_text(f'from_pretrained("{tmp_path / "phase1-mlm"}")')
    trainer = SimpleNamespace(is_global_zero=True, ckpt_path=str(tmp_path / "last.ckpt"), global_step=4,
                              strategy=SimpleNamespace(broadcast=lambda value: value))
    callback, saved = PhaseEndExport(str(tmp_path)), []
    callback._save = lambda trainer, name: saved.append(name)
    for tokens_seen in (320, 256):
        callback._save_a_resumed_phase_end(trainer, SimpleNamespace(tokens_seen=tokens_seen, tokens_per_step=64))
    assert saved == ["phase1-mlm"]
    aside = tmp_path / "after-step000000004-set-aside"
    assert sorted(p.name for p in aside.iterdir()) == ["phase1-mlm", "phase1-mlm.ckpt"]
    assert (aside / "phase1-mlm" / "README.md").read_text() == f'from_pretrained("{aside / "phase1-mlm"}")'


def test_cpt_fit_phase_end_exports_and_card_from_the_run_config(prepared_mix, tokenizer_dir, tmp_path, monkeypatch):
    """The whole path a user takes: `cpt fit` (CLM → MLM) → an HF folder per phase end → `cpt export`."""
    import yaml

    from cpt_lightning.cli import main as cpt

    rows, block, steps = 2, prepared_mix.block_size, (1, 1)  # a phase ends on the very first step
    config = {
        "seed_everything": 5,
        "model": {"class_path": "cpt_lightning.EncoderPretraining",
                  "init_args": {"tokenizer": str(tokenizer_dir), "learning_rate": 1e-3,
                                "model_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "max_position_embeddings": 512}}},
        "data": {"class_path": "cpt_lightning.data.PackedDataModule",
                 "init_args": {"sources": [{"name": s.name, "path": s.path, "weight": s.weight} for s in prepared_mix.sources],
                               "micro_batch_size": rows, "num_workers": 0}},
        "trainer": {
            "accelerator": "cpu", "devices": "auto", "max_steps": -1, "max_epochs": -1, "default_root_dir": str(tmp_path),
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {"class_path": "callbacks.ObjectiveSchedule", "init_args": {"phases": [
                    {"objective": {"class_path": "cpt_lightning.objectives.CausalLM"}, "tokens": steps[0] * rows * block},
                    {"objective": {"class_path": "cpt_lightning.objectives.MaskedLM", "init_args": {"mask_rate": 0.3}},
                     "tokens": steps[1] * rows * block, "lr": "sqrt_decay"}]}},
                {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"interval": "step"}},
                {"class_path": "callbacks.PhaseEndExport", "init_args": {"dirpath": str(tmp_path / "phases")}},
            ],
        },
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    assert cpt(["fit", "--config", str(tmp_path / "fit.yaml")]) == 0

    clm, mlm = tmp_path / "phases" / "phase0-clm", tmp_path / "phases" / "phase1-mlm"
    for folder in (clm, mlm):
        _, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    with safe_open(clm / "model.safetensors", "pt") as a, safe_open(mlm / "model.safetensors", "pt") as b:
        assert not torch.equal(a.get_tensor("model.final_norm.weight"), b.get_tensor("model.final_norm.weight"))
    assert read_checkpoint(tmp_path / "phases" / "phase0-clm.ckpt").records["global_step"] == steps[0]

    checkpoint = next((tmp_path / "lightning_logs").rglob("*.ckpt"))  # ModelCheckpoint's, next to config.yaml
    assert main([str(checkpoint), str(tmp_path / "final")]) == 0
    run_config = checkpoint.parent.parent / "config.yaml"
    for folder in (clm, mlm, tmp_path / "final"):  # the run's config travels with every export
        assert (folder / "training_config.yaml").read_bytes() == run_config.read_bytes()
    saved = yaml.safe_load(run_config.read_text())["model"]["init_args"]  # defaults included: the card reads them
    assert (saved["weight_decay"], saved["betas"], saved["warmup_tokens"]) == (1e-5, [0.9, 0.98], 100_000_000)
    # cpt evaluate of the last phase's folder is the evaluation of the run's final export (--eval-results finds the row)
    assert weights_digest(mlm) == weights_digest(tmp_path / "final") != weights_digest(clm)
    card = (tmp_path / "final" / "README.md").read_text()
    assert "the run's configuration (the copy saved in the checkpoint)" in card
    tokens = rows * block
    assert f"| 1 | CLM (CausalLM, causal attention) | {steps[0] * tokens:,} | {steps[0] * tokens:,} | constant |" in card
    assert (f"| 2 | MLM (MaskedLM, bidirectional attention, 30% of tokens masked: 80% mask token / 10% random / "
            f"10% unchanged) | {steps[1] * tokens:,} | {steps[1] * tokens:,} | 1−sqrt decay to 0.1× peak |") in card
    assert f"{tokens:,} tokens per optimizer step = {rows} rows × {block} tokens × 1 accumulation × 1 device(s)" in card
    from cpt_lightning.data.manifest import Manifest

    import cpt_lightning.model_card as model_card

    manifests = [Manifest.read(source.path) for source in prepared_mix.sources]
    shares = [source.weight / sum(s.weight for s in prepared_mix.sources) for source in prepared_mix.sources]

    def source_rows(card):
        for source, manifest, share in zip(prepared_mix.sources, manifests, shares):
            trained = share * sum(steps) * tokens  # how often the run read each source
            assert (f"| {source.name} | {share:.1%} | {manifest.num_tokens:,} | {manifest.num_documents:,} | "
                    f"{round(trained):,} | {trained / manifest.num_tokens:.2f} |") in card

    source_rows(card)
    # exported from another folder (a config's relative data paths lead nowhere) or after the data was prepared
    # again: the checkpoint's record of the sizes the run read, not "not recorded" or the new folder's
    monkeypatch.setattr(model_card, "read_manifest", lambda path: None)
    assert main([str(checkpoint), str(tmp_path / "elsewhere")]) == 0
    source_rows((tmp_path / "elsewhere" / "README.md").read_text())
    assert "1 node(s) × 1 cpu device(s)" in card and "h:mm:ss of training" in card  # the config says devices: auto
    assert "seeds: masks 17, data order 42, seed_everything 5" in card  # not "seed 17": a second seed's card
    assert "- clm-detour" in card and "objectives in order: CLM → MLM" in card
    clm_card = (clm / "README.md").read_text()
    assert "objectives in order: CLM.\n\n**This checkpoint ends in a causal phase**" in clm_card  # the MLM phase is to come
    assert "ends in a causal phase" not in card


def test_the_card_of_a_freeze_ablation_names_the_frozen_layers_of_the_phases_it_trained():
    """A published ablation's card read exactly like the detour's: nothing said which layers were held still. A freeze
    during a phase still to come is not the model's: the CLM-end export of a run freezing during MLM said it was."""
    from cpt_lightning.model_card import freeze_texts, phase_rows, training

    clm = {"objective": {"class_path": "cpt_lightning.objectives.CausalLM"}, "tokens": 100}
    mlm = {"objective": {"class_path": "cpt_lightning.objectives.MaskedLM"}, "tokens": 100}
    config = {"trainer": {"callbacks": [
        {"class_path": "callbacks.ObjectiveSchedule", "init_args": {"phases": [clm, mlm]}},
        {"class_path": "callbacks.LayerFreeze", "init_args": {"layers": "0-7", "during": "clm"}},
        {"class_path": "callbacks.LayerFreeze", "init_args": {"layers": [10, 8, 9, 14]}},
        {"class_path": "callbacks.LayerFreeze", "init_args": {"layers": "2", "during": "mlm"}},
    ]}}
    during_clm = ["encoder layers 0–7 frozen during CLM", "encoder layers 8–10, 14 frozen during CLM"]
    every = [*during_clm, "encoder layers 2 frozen during MLM"]
    assert freeze_texts(config, phase_rows(config, 200)) == every
    assert freeze_texts(config, phase_rows(config, 100)[:1]) == during_clm  # the trained phases of the CLM end
    assert freeze_texts(config, [{"name": None}]) == every  # an objective not built here: nothing left out
    card = training({}, config, None)  # no step records: every phase may have trained
    assert "- Intervention: encoder layers 0–7 frozen during CLM (LayerFreeze" in card and "during MLM" in card
    assert ("- Intervention: encoder layers 0–7 frozen during CLM (LayerFreeze: no update, gradients still flow through "
            "them; when they train again they start AdamW afresh, step 0 and zero moments)") in card  # docs/recipes.md
    # trained through CLM, frozen in the last phase: nothing restarts (its moments were said to)
    assert "- Intervention: encoder layers 2 frozen during MLM (LayerFreeze: no update, gradients still flow through " \
           "them)\n" in card
    assert "only the learning-rate shape restarts (the frozen layers' restarts: see Intervention)" in card
    clm_end = training({"global_step": 10, "tokens_per_step": 10}, config, None)
    assert "- Intervention: encoder layers 0–7 frozen during CLM (LayerFreeze" in clm_end and "during MLM" not in clm_end
    assert "afresh" not in clm_end and "restarts: see" not in clm_end  # no phase of this model trained them again
    only_mlm_frozen = {"trainer": {"callbacks": [config["trainer"]["callbacks"][0], config["trainer"]["callbacks"][3]]}}
    assert "restarts: see" not in training({}, only_mlm_frozen, None)
    assert freeze_texts({"trainer": {"callbacks": [config["trainer"]["callbacks"][0]]}}, phase_rows(config, 200)) == []


def test_the_card_says_layers_trained_before_their_freeze_keep_their_adamw_moments():
    """MLM at 30%, CLM with layers frozen, MLM again: the frozen layers' moments from the first phase wait."""
    from cpt_lightning.model_card import optimizer_after_freeze

    def rows(*names):
        return [{"name": name} for name in names]

    kept = "their AdamW moments and step count wait through the freeze and go on after it"
    assert optimizer_after_freeze("clm", rows("mlm", "clm", "mlm")) == kept
    assert optimizer_after_freeze("clm", rows("clm", "mlm")).startswith("when they train again they start AdamW afresh")
    assert optimizer_after_freeze("clm", rows("clm", "clm")) == optimizer_after_freeze("mlm", rows("clm", "mlm")) == ""
    assert optimizer_after_freeze("clm", rows(None, "clm", "mlm")) == ""  # an objective not known here: not said


def test_the_card_reads_a_callback_given_on_its_own():
    """Lightning takes one callback without a list, and the saved config.yaml keeps it so: the card read only lists,
    and lost the phases of a run whose one callback was its ObjectiveSchedule, and the layers a lone LayerFreeze held."""
    from cpt_lightning.model_card import differing_settings, freeze_texts, phase_rows

    clm = {"objective": {"class_path": "cpt_lightning.objectives.CausalLM"}, "tokens": 100}
    schedule = {"class_path": "callbacks.ObjectiveSchedule", "init_args": {"phases": [clm]}}
    assert [row["budget"] for row in phase_rows({"trainer": {"callbacks": schedule}}, 60)] == [100]
    freeze = {"class_path": "callbacks.LayerFreeze", "init_args": {"layers": "8-14"}}
    assert freeze_texts({"trainer": {"callbacks": freeze}}, phase_rows({"trainer": {"callbacks": schedule}}, 60)) == [
        "encoder layers 8–14 frozen during CLM"]
    longer = {**schedule, "init_args": {"phases": [{**clm, "tokens": 200}]}}
    assert differing_settings({"trainer": {"callbacks": schedule}}, {"trainer": {"callbacks": [longer]}}) == [
        "trainer.callbacks: ObjectiveSchedule"]


def test_the_cards_optimizer_line_says_how_the_weight_decay_was_read():
    """1e-5 read as Composer reads it and as torch reads it differ 5,000-fold at lr 2e-4: the card says which."""
    from cpt_lightning.model_card import training

    hp = {"learning_rate": 2e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 1e-5}
    decoupled = training({"hyper_parameters": {**hp, "decoupled_weight_decay": True}}, {}, None)
    assert ("weight decay 1e-05 (decoupled as Composer's DecoupledAdamW: × lr/peak per step; not on biases and norms)"
            in decoupled)
    assert "weight decay 1e-05 (not on biases and norms)" in training({"hyper_parameters": hp}, {}, None)


@pytest.mark.parametrize("trainer, said", [
    ({"gradient_clip_val": 1.0}, "the global gradient norm to 1.0 (train/grad_norm is logged before clipping)"),
    ({"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, "each gradient value to ±0.5"),
    ({"gradient_clip_val": None, "precision": "bf16-mixed"}, "none"),
    ({}, "not recorded")])
def test_the_cards_optimization_section_says_how_gradients_were_clipped(trainer, said):
    """The demo clips at 1.0: a card naming every optimizer setting but this one read as an unclipped run."""
    from cpt_lightning.model_card import training

    assert f"- Gradient clipping: {said}\n" in training({}, {"trainer": trainer} if trainer else {}, None)


def test_the_cards_phase_table_counts_what_each_phase_trained():
    """A phase ends where the run switched, at its budget rounded up to a whole step (MLM counted CLM's
    last partial step as its own); the last phase also trains its rounding."""
    from cpt_lightning.model_card import phase_rows

    clm = {"objective": {"class_path": "cpt_lightning.objectives.CausalLM"}, "tokens": 100}
    mlm = {"objective": {"class_path": "cpt_lightning.objectives.MaskedLM"}, "tokens": 50, "lr": "sqrt_decay"}
    config = {"trainer": {"callbacks": [{"class_path": "callbacks.ObjectiveSchedule", "init_args": {"phases": [clm, mlm]}}]}}

    def tokens_trained(seen, tokens_per_step):
        return [row["trained"] for row in phase_rows(config, seen, tokens_per_step)]

    assert [tokens_trained(seen, 10) for seen in (40, 130, 160, None)] == [[40, 0], [100, 30], [100, 60], [None, None]]
    assert [tokens_trained(seen, 30) for seen in (90, 120, 180)] == [[90, 0], [120, 0], [120, 60]]  # switched at 120
    assert tokens_trained(130, None) == [100, 30]  # a checkpoint without its step size: the budgets
    assert [row["budget"] for row in phase_rows(config, 180, 30)] == [100, 50]


def test_the_cards_batch_line_breaks_the_step_down_only_when_the_config_multiplies_to_it(monkeypatch):
    """The breakdown is the config's factors (block: the smallest prepared one) only when they give the recorded step;
    the mix's shares are the weights normalised."""
    from types import SimpleNamespace

    import cpt_lightning.model_card as model_card

    prepared = {"data/a": 512, "data/b": 256}
    monkeypatch.setattr(model_card, "read_manifest", lambda path: SimpleNamespace(block_size=prepared[path]))
    sources = [{"name": "a", "path": "data/a", "weight": 3}, {"name": "b", "path": "data/b"}]  # b: the default weight, 1
    config = {"data": {"init_args": {"micro_batch_size": 4, "sources": sources}},
              "trainer": {"accumulate_grad_batches": 2, "devices": 8, "num_nodes": 2}}
    assert [row["proportion"] for row in model_card.data_rows(config, {})] == [0.75, 0.25]  # weights are normalised
    tokens = 4 * 256 * 2 * 8 * 2
    assert model_card.batch_text(config, {"tokens_per_step": tokens}) == (
        f"{tokens:,} tokens per optimizer step = 4 rows × 256 tokens × 2 accumulation × 16 device(s)")
    assert model_card.batch_text(config, {"tokens_per_step": 2 * tokens}) == (
        f"{2 * tokens:,} tokens per optimizer step")  # not what the config says
    # what the run had, where the config says "auto" and GlobalBatch derived the accumulation: the checkpoint's record
    config["trainer"] = {"accumulate_grad_batches": 1, "devices": "auto", "num_nodes": 2}
    ran = {"world_size": 16, "num_nodes": 2, "accumulate_grad_batches": 2}
    assert model_card.batch_text(config, {"tokens_per_step": tokens, "hardware": ran}) == (
        f"{tokens:,} tokens per optimizer step = 4 rows × 256 tokens × 2 accumulation × 16 device(s)")


def test_the_cards_learning_rate_and_hardware_lines():
    from cpt_lightning.model_card import describe_lr, hardware_text

    assert describe_lr({"warmup_tokens": 1_000_000, "lr": "linear_decay", "final_lr_ratio": 0.05}) == (
        "linear warmup over 1,000,000 tokens, then linear decay to 0.05× peak")
    assert describe_lr({}) == "constant"
    trainer = {"devices": 4, "accelerator": "gpu", "precision": "bf16-mixed",
               "strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}}  # num_nodes left at its default
    assert hardware_text({"trainer": trainer}, {"hardware": {"device_name": "NVIDIA H100 80GB HBM3"}}) == (
        "1 node(s) × 4 gpu device(s), precision bf16-mixed, strategy FSDPStrategy; device model NVIDIA H100 80GB HBM3")
    recorded = {"device_name": "NVIDIA H100 80GB HBM3", "accelerator": "cuda", "world_size": 8, "num_nodes": 2}
    trainer.update(devices="auto", accelerator="auto")  # the config printed "auto"; the checkpoint knows
    assert hardware_text({"trainer": trainer}, {"hardware": recorded}).startswith("2 node(s) × 4 cuda device(s), ")


def test_the_card_says_what_the_validation_curves_measure():
    """A reader comparing a detour's val curves with a baseline's must know whether both were judged by the same
    objectives on the same held-out data (val_objectives), or each by its phase's own (curves that do not compare)."""
    import yaml

    from cpt_lightning.model_card import training, validation_text

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml").read_text())
    expected = ("- Validation: `val/mlm15_loss` by MLM (MaskedLM, bidirectional attention, 15% of tokens masked: 80% mask token "
                "/ 10% random / 10% unchanged); `val/clm_loss` by CLM (CausalLM, causal attention); on `pubmed_holdout`, "
                "`medical_qa_holdout`, `case_reports_holdout` (over all of them, and each under `val/<source>/`), "
                "every 40,960 training tokens, after each phase's last step and at the end")
    validated_phase_ends = {"phase_ends_validated_since_step": 0}
    assert validation_text(demo, validated_phase_ends) == expected
    assert expected in training(validated_phase_ends, demo, None)
    # a checkpoint from before TokenValidation validated phase ends (no record): the card does not claim it did; a
    # run of then resumed at step 300 validated those after it
    assert validation_text(demo, {}) == expected.replace(", after each phase's last step", "")
    assert validation_text(demo, {"phase_ends_validated_since_step": 300}) == expected.replace(
        "after each phase's last step", "after each phase's last step from step 300 on")
    del demo["model"]["init_args"]["val_objectives"]
    demo["trainer"]["callbacks"] = [c for c in demo["trainer"]["callbacks"] if "TokenValidation" not in c["class_path"]]
    demo["data"]["init_args"]["val_sources"] = demo["data"]["init_args"]["val_sources"][:1]
    assert validation_text(demo, {}) == ("- Validation: each phase's own objective (`val/<objective>_loss`); on "
                                     "`pubmed_holdout`, at Lightning's `val_check_interval`")
    del demo["data"]["init_args"]["val_sources"]
    assert validation_text(demo, {}) is None and "Validation" not in training({}, demo, None)


def test_the_card_of_a_run_without_a_clm_phase_is_not_a_detour(trained, tmp_path):
    """The clm-detour tag and the phase-switch note belong to runs that have them."""
    import yaml

    from cpt_lightning.model_card import RunConfig, write_model_card

    mlm = {"objective": {"class_path": "cpt_lightning.objectives.MaskedLM"}, "tokens": 100}
    config = {"trainer": {"callbacks": [{"class_path": "callbacks.ObjectiveSchedule", "init_args": {"phases": [mlm]}}]}}
    write_model_card(tmp_path, {"global_step": 5, "tokens_per_step": 20}, trained[0].model, RunConfig(yaml.safe_dump(config)),
                     None, "org/tiny-mlm", "en", "apache-2.0")
    card = (tmp_path / "README.md").read_text()
    assert "objectives in order: MLM." in card and "| 1 | MLM (MaskedLM, bidirectional attention" in card
    assert "clm-detour" not in card and "phase switches" not in card and "\n# tiny-mlm\n" in card
    # a phase-end export (no --model-id) names its run: every arm's card was titled by its folder, "phase1-mlm"
    config["trainer"]["logger"] = {"class_path": "TensorBoardLogger", "init_args": {"name": "en_mlm_baseline"}}
    write_model_card(tmp_path, {}, trained[0].model, RunConfig(yaml.safe_dump(config)), None,
                     "runs/en_mlm_baseline/export/phase1-mlm", "en", "apache-2.0", titled_by_run=True)
    assert "\n# en_mlm_baseline · phase1-mlm\n" in (tmp_path / "README.md").read_text()


def test_the_weights_digest_is_of_the_tensors_not_the_files(exported, tmp_path):
    """Resharded by another writer, the same weights give the same digest; one value changed gives another."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(exported)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert weights_digest(tmp_path / "sharded") == weights_digest(exported) is not None
    with torch.no_grad():
        model.model.embeddings.norm.weight[0] += 1
    model.save_pretrained(tmp_path / "changed")
    assert weights_digest(tmp_path / "changed") != weights_digest(exported)
    assert weights_digest(tmp_path) is None  # no safetensors: a hub name's row is never this model's


def test_the_weights_digest_tells_tensors_of_the_same_bytes_apart_by_name_dtype_and_shape(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    x, y = np.arange(6, dtype=np.float16).reshape(2, 3), np.ones((2, 3), dtype=np.float16)
    variants = {"base": {"a": x, "b": y}, "swapped": {"a": y, "b": x}, "reshaped": {"a": x.reshape(3, 2), "b": y},
                "int16": {"a": x.view(np.int16), "b": y}, "renamed": {"c": x, "d": y}}
    for name, tensors in variants.items():
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    assert len({weights_digest(tmp_path / name) for name in variants}) == len(variants)


def test_a_run_without_an_objective_schedule_is_one_phase_of_the_models_objective():
    """The card said "Phase schedule: not recorded" of a run whose config holds everything it trained: the model's
    objective, from start to end, under its warmup then constant learning rate."""
    from cpt_lightning.model_card import training

    clm = {"class_path": "cpt_lightning.objectives.CausalLM"}
    config = {"model": {"init_args": {"objective": clm, "warmup_tokens": 1000}}, "trainer": {"callbacks": []}}
    records = {"tokens_per_step": 100, "global_step": 30}
    card = training(records, config, None)
    assert ("| 1 | CLM (CausalLM, causal attention) | the whole run (no ObjectiveSchedule) | 3,000 | "
            "linear warmup over 1,000 tokens, then constant |") in card
    default = training(records, {"model": {"init_args": {"objective": None, "warmup_tokens": 0}}}, None)
    assert "| 1 | MLM (MaskedLM, bidirectional attention, 15% of tokens masked" in default


def test_lightnings_load_from_checkpoint_gives_the_trained_module(trained):
    """Lightning's own way to open a checkpoint for a look (analysis, a comparison with the export) calls the hooks
    with no trainer attached: it failed with "EncoderPretraining is not attached to a Trainer"."""
    from cpt_lightning import EncoderPretraining

    loaded = EncoderPretraining.load_from_checkpoint(trained[1], map_location="cpu")
    expected = trained[0].state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    assert loaded.tokens_per_step == torch.load(trained[1], weights_only=False)["tokens_per_step"]
