"""The harness end to end on tiny random ModernBERTs, plus task files, readers and alignment."""

import codecs
import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

from cpt_lightning.errors import UserError
from cpt_lightning.evaluate import main
from cpt_lightning.evaluate.compare import comparison_table, sign_test
from cpt_lightning.evaluate.data import TaggedExample, TextExample, read_conll, read_split, read_splits
from cpt_lightning.evaluate.features import CUT, IGNORE, NO_TOKEN, Encoded, collate, encode_tagged, encode_text
from cpt_lightning.evaluate.finetune import PreparedTask, finetune, load_model, predict, prepare, score, truncation_note
from cpt_lightning.evaluate.report import legend, markdown_table, summarize
from cpt_lightning.evaluate.tasks import METRICS, Task, load_task
from cpt_lightning.weights_digest import weights_digest
from helpers import Terminal

CHEMICALS = ["aspirin", "metformin", "insulin", "ibuprofen", "warfarin", "cisplatin"]
WORDS = ["the", "patient", "received", "daily", "for", "weeks", "and", "improved", "after", "treatment"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_tasks(folder, n=24):
    """Three small tasks (classification, multilabel, NER in CoNLL) with train/dev/test splits."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n), ("dev", n // 3), ("test", n // 3)):
        cls, multi, conll = [], [], []
        for i in range(size):
            kind = ["case", "trial", "review"][i % 3]
            text = f"{kind} " + " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
            cls.append({"text": text, "label": kind})
            multi.append({"text": text, "labels": sorted({kind, "human"} if i % 2 else {kind})})
            words = rng.choices(WORDS, k=rng.randint(3, 8))
            tags = ["O"] * len(words)
            for pos in rng.sample(range(len(words)), k=min(2, len(words))):
                words[pos], tags[pos] = rng.choice(CHEMICALS), "B-Chemical"
            conll.append("\n".join(f"{w} {t}" for w, t in zip(words, tags)) + "\n")
        _write_jsonl(folder / f"cls_{split}.jsonl", cls)
        _write_jsonl(folder / f"multi_{split}.jsonl", multi)
        (folder / f"ner_{split}.conll").write_text("\n".join(conll))
    specs = {
        "pubtype": dict(type="classification", family="Docs", metric="macro_f1", prefix="cls", ext="jsonl"),
        "topics": dict(type="multilabel", family="Docs", prefix="multi", ext="jsonl"),
        "chem": dict(type="ner", family="NER", prefix="ner", ext="conll"),
    }
    for name, spec in specs.items():
        prefix, ext = spec.pop("prefix"), spec.pop("ext")
        body = dict(name=name, **spec, epochs=1, batch_size=8, lr=1e-3,
                    **{s: f"{prefix}_{s}.{ext}" for s in ("train", "dev", "test")})
        (folder / f"{name}.yaml").write_text("".join(f"{k}: {v}\n" for k, v in body.items()))
    return folder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tokenizer_dir):
    """A randomly initialised 2-layer, hidden-32 ModernBERT saved as an HF folder (context 1024)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=1024, local_attention=16, pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_encoder")
    ModernBertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return tiny_tasks(tmp_path_factory.mktemp("tasks"))


# -- end to end -------------------------------------------------------------------------------


def test_harness_end_to_end_table_matches_per_seed_runs(tiny_encoder, task_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, "--seeds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and list(results["tasks"]) == ["chem", "pubtype", "topics"]
    assert len(results["runs"]) == 3 * 2
    assert results["models"][tiny_encoder]["context"] == 1024  # the model's context, not a 512 default
    assert results["models"][tiny_encoder]["weights"] == weights_digest(tiny_encoder)  # the row cpt export finds
    for run in results["runs"]:
        assert 0.0 <= run["test_f1"] <= 100.0 and 0.0 <= run["dev_f1"] <= 100.0 and run["best_epoch"] == 1

    f1 = {(r["task"], r["seed"]): r["test_f1"] for r in results["runs"]}
    row = summarize(results)[tiny_encoder]
    for task in ("chem", "pubtype", "topics"):
        mean, std = row["tasks"][task]
        assert mean == pytest.approx(statistics.fmean([f1[task, 0], f1[task, 1]]))
        assert std == pytest.approx(statistics.stdev([f1[task, 0], f1[task, 1]]))
    docs = [statistics.fmean([f1["pubtype", s], f1["topics", s]]) for s in (0, 1)]
    assert row["families"]["Docs"] == pytest.approx((statistics.fmean(docs), statistics.stdev(docs)))
    overall = [statistics.fmean([f1[t, s] for t in ("chem", "pubtype", "topics")]) for s in (0, 1)]
    assert row["average"] == pytest.approx((statistics.fmean(overall), statistics.stdev(overall)))

    table = (out / "results.md").read_text()
    assert table.startswith(markdown_table(results))
    header, _, line = table.splitlines()[:3]
    assert header == "| Model | Context | chem | pubtype | topics | NER avg | Docs avg | Avg |"
    mean, std = row["tasks"]["pubtype"]
    assert f"| {mean:.1f} ± {std:.1f} |" in line and line.startswith(f"| `{tiny_encoder}` | 1024 |")
    assert "- **pubtype** (Docs): classification, macro F1\n" in table
    assert "- **topics** (Docs): multilabel, micro F1\n" in table and "- **chem** (NER): ner, entity-level micro F1" in table

    # a second call reuses the stored runs instead of fine-tuning again, hashing each task's files once, not per seed
    lines = (out / "runs.jsonl").read_text()
    capsys.readouterr()
    hashed = []
    fingerprint = Task.fingerprint
    monkeypatch.setattr(Task, "fingerprint", lambda task: hashed.append(task.name) or fingerprint(task))
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, "--seeds", "2", "--out", str(out)]) == 0
    assert (out / "runs.jsonl").read_text() == lines and "seed 0:" not in capsys.readouterr().out
    assert sorted(hashed) == ["chem", "pubtype", "topics"]

    # a full disk while the tables are written leaves the earlier ones whole (cpt export --eval-results reads the JSON)
    before = (out / "results.json").read_text()
    write_text = Path.write_text

    def disk_full(path, text, *args, **kwargs):
        if path.name.startswith(".results"):
            write_text(path, text[:100])
            raise OSError(28, "No space left on device")
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, "--seeds", "2", "--out", str(out)]) == 2
    assert (f"error: could not write the evaluation results.json {out / 'results.json'} (No space left on device; "
            "free space on that disk)") in capsys.readouterr().err
    assert (out / "results.json").read_text() == before and not list(out.glob(".results*"))


def test_two_models_get_a_comparison_table_and_progress_bar(tiny_encoder, task_dir, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other_encoder"
    torch.manual_seed(1)  # same architecture, other random weights: other scores
    ModernBertForMaskedLM(ModernBertConfig.from_pretrained(tiny_encoder)).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(other)
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, str(other), "--seeds", "1", "--out", str(out)]) == 0
    monkeypatch.undo()
    assert "6/6" in terminal.getvalue() and "cpt evaluate" in terminal.getvalue()  # model × task × seed runs
    lines = [line for line in capsys.readouterr().out.splitlines() if ": test F1 " in line]
    run = re.compile(r"seed 0: test F1 \d+\.\d \(\d+\.\d+s; run (\d) of 6\)$")  # how far a log without the bar is
    assert [run.search(line)[1] for line in lines] == list("123456")

    results = json.loads((out / "results.json").read_text())
    f1 = {(r["model"], r["task"]): r["test_f1"] for r in results["runs"]}
    (comparison,) = results["comparison"]
    assert comparison["model"] == str(other) and comparison["baseline"] == tiny_encoder
    diffs = {t: f1[str(other), t] - f1[tiny_encoder, t] for t in ("chem", "pubtype", "topics")}
    assert comparison["diff"] == pytest.approx(diffs)
    nonzero = [d for d in diffs.values() if d != 0]
    assert comparison["p"] == pytest.approx(sign_test(sum(d > 0 for d in nonzero), len(nonzero)))
    table = (out / "results.md").read_text()
    assert f"## Comparison with `{tiny_encoder}`" in table and comparison_table(results) in table
    assert f"{diffs['chem']:+.1f}" in table and "sign test" in table
    # one model and task again into the same --out: served from runs.jsonl; the table it replaces listed more
    assert main(["--tasks", str(task_dir / "pubtype.yaml"), "--models", str(other), "--seeds", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {out / 'results.json'} listed models {tiny_encoder} and tasks chem, topics too, which this "
            "command's table leaves out") in err
    assert "cpt evaluate:" not in err  # no bar where stderr is not a terminal
    assert list(json.loads((out / "results.json").read_text())["models"]) == [str(other)]
    # the same model by another path (as its stored runs are served): not said to be left out
    assert main(["--tasks", str(task_dir / "pubtype.yaml"), "--models", f"{other}/", "--seeds", "1", "--out",
                 str(out)]) == 0
    assert "leaves out" not in capsys.readouterr().err


def test_same_seed_same_score(tiny_encoder, task_dir):
    prepared = prepare(load_task(task_dir / "pubtype.yaml"), tiny_encoder)
    device = torch.device("cpu")
    first, again = finetune(tiny_encoder, prepared, 0, device), finetune(tiny_encoder, prepared, 0, device)
    assert first["test_f1"] == again["test_f1"] and first["dev_f1"] == again["dev_f1"]


def test_a_fine_tuning_that_diverges_is_refused_not_scored(tiny_encoder, task_dir):
    """NaN weights predicted the first label everywhere: a plausible F1, stored and averaged with the others."""
    prepared = prepare(dataclasses.replace(load_task(task_dir / "pubtype.yaml"), lr=1e6, epochs=2), tiny_encoder)
    with pytest.raises(UserError, match=r"task 'pubtype', model .*, seed 0: the fine-tuning diverged in epoch 1 \(a "
                                        r"gradient that is not finite\); lower the task's lr \(1e\+06\)$"):
        finetune(tiny_encoder, prepared, 0, torch.device("cpu"))


def test_a_batch_with_no_word_to_tag_is_not_taken_for_a_divergence(tiny_encoder, tmp_path, monkeypatch):
    """Its mean loss is NaN (no position to average over) and its gradient zero: it was refused as diverged."""
    from transformers.modeling_outputs import TokenClassifierOutput

    _write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["aspirin", "dose"], "tags": ["B-Chemical", "O"]}] * 3)
    _write_jsonl(tmp_path / "u.jsonl", [{"tokens": ["heparin"], "tags": ["B-Chemical"]}])
    (tmp_path / "t.yaml").write_text("name: t\ntype: ner\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\nbatch_size: 1\n"
                                     "epochs: 1\n")
    prepared = prepare(load_task(tmp_path / "t.yaml"), tiny_encoder)
    forward, losses = torch.nn.Module.__call__, []

    def no_word_in_the_second_batch(module, *args, **kwargs):
        output = forward(module, *args, **kwargs)
        if isinstance(output, TokenClassifierOutput) and output.loss is not None:
            if len(losses) == 1:  # the loss transformers computes when every label is ignored
                output.loss = torch.nn.functional.cross_entropy(output.logits[0], torch.full(output.logits.shape[1:2], -100))
            losses.append(output.loss.item())
        return output

    monkeypatch.setattr(torch.nn.Module, "__call__", no_word_in_the_second_batch)
    assert 0 <= finetune(tiny_encoder, prepared, 0, torch.device("cpu"))["test_f1"] <= 100
    assert len(losses) == 3 and math.isnan(losses[1])


def test_test_is_scored_once_with_the_weights_of_the_best_dev_epoch(tiny_encoder, task_dir, monkeypatch):
    """Selecting on test would leak it into the table; scoring the last epoch's weights would ignore the selection."""
    from cpt_lightning.evaluate import finetune as finetune_module

    prepared = prepare(dataclasses.replace(load_task(task_dir / "pubtype.yaml"), epochs=3), tiny_encoder)
    dev_scores, scored = iter([0.2, 0.9, 0.5]), []  # epoch 2 is the best on dev

    def scripted_score(model, prepared, split, device):
        scored.append((split, model.classifier.weight.detach().clone()))
        return next(dev_scores) if split == "dev" else 0.0

    monkeypatch.setattr(finetune_module, "score", scripted_score)
    result = finetune(tiny_encoder, prepared, 0, torch.device("cpu"))
    assert [split for split, _ in scored] == ["dev", "dev", "dev", "test"]
    assert (result["best_epoch"], result["dev_f1"]) == (2, 90.0)
    weights = [w for _, w in scored]
    assert torch.equal(weights[3], weights[1]) and not torch.equal(weights[3], weights[2])


def test_a_bf16_folder_is_fine_tuned_in_fp32(tiny_encoder, task_dir, tmp_path):
    """cpt export keeps a bf16 run's dtype; AdamW on bf16 weights would round most updates away."""
    folder = tmp_path / "bf16"
    ModernBertForMaskedLM.from_pretrained(tiny_encoder).to(torch.bfloat16).save_pretrained(folder)
    shutil.copy(Path(tiny_encoder) / "tokenizer.json", folder)
    shutil.copy(Path(tiny_encoder) / "tokenizer_config.json", folder)
    prepared = prepare(load_task(task_dir / "pubtype.yaml"), str(folder))
    assert {p.dtype for p in load_model(str(folder), prepared, "sdpa").parameters()} == {torch.float32}


def test_a_folder_whose_encoder_weights_do_not_load_is_refused(tiny_encoder, task_dir, tmp_path):
    """E.g. keys saved with torch.compile's '_orig_mod.' prefix: transformers would fine-tune a random encoder."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_encoder, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({f"_orig_mod.{k}": v for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    prepared = prepare(load_task(task_dir / "pubtype.yaml"), str(folder))
    with pytest.raises(UserError, match=r"weights are missing from its files .* start from a random encoder"):
        load_model(str(folder), prepared, "sdpa")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")}, folder / "model.safetensors",
              metadata={"format": "pt"})  # one layer lacking: it alone would be random
    with pytest.raises(UserError, match=r"weights are missing from its files \(e\.g\. 'model\.layers\.1\."):
        load_model(str(folder), prepared, "sdpa")


def test_models_are_checked_whole_before_any_fine_tuning_and_a_bare_encoder_is_noted(
    tiny_encoder, task_dir, tmp_path, capsys
):
    """A folder lacking encoder weights was found when its first run loaded it (after the models before it were
    fine-tuned); one saved as ModernBertModel was refused as "a random encoder" though only the MLM head's dense
    + norm were missing: it is evaluated, with a note that those start random."""
    from transformers import AutoModel
    from safetensors.torch import load_file, save_file

    from cpt_lightning.evaluate.cli import check_model

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(tiny_encoder).save_pretrained(bare)  # ModernBertModel: no head, no decoder
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_encoder) / name, bare)
    check_model(str(bare))
    assert "has no MLM head" in capsys.readouterr().err
    check_model(tiny_encoder)
    assert "has no MLM head" not in capsys.readouterr().err
    prepared = prepare(load_task(task_dir / "pubtype.yaml"), str(bare))
    assert torch.equal(load_model(str(bare), prepared, "sdpa").model.embeddings.tok_embeddings.weight,
                       AutoModel.from_pretrained(bare).embeddings.tok_embeddings.weight)

    lacking = shutil.copytree(tiny_encoder, tmp_path / "lacking")
    weights = load_file(lacking / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")}, lacking / "model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, str(lacking), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "weights are missing from its files (e.g. 'model.layers.1." in err and err.count("\n") == 1, err
    assert not (out / "runs.jsonl").exists()  # the first model was not fine-tuned either


# -- prediction, scoring and the training loop, with a stand-in model ------------------------------


class TableModel(torch.nn.Module):
    """Stand-in for a fine-tuned model: the logits are rows of ``table`` looked up by input id, so each
    test states what the "model" predicts. Token classification: one row per position; sequence
    classification: the row of the first id. Its one weight is what fine-tuning moves."""

    def __init__(self, table, token_level):
        super().__init__()
        self.table, self.token_level = torch.tensor(table, dtype=torch.float), token_level
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.trained_on = []  # first id of every training row, batch by batch
        self.calls = []  # (in training mode, given labels, its weight without a gradient yet) of every call

    def forward(self, input_ids, attention_mask, labels=None):
        self.calls.append((self.training, labels is not None, self.weight.grad is None))
        if labels is not None:
            self.trained_on.append(input_ids[:, 0].tolist())
        logits = self.table[input_ids if self.token_level else input_ids[:, 0]]
        return SimpleNamespace(logits=logits, loss=(self.weight - 1.0) ** 2)


def _prepared(kind, labels, splits, metric=None, **task):
    """A PreparedTask over hand-made encodings: ``splits`` maps a split to (encoded, gold) pairs."""
    task = Task(name="t", type=kind, family="F", train=Path("train.jsonl"), test=Path("test.jsonl"),
                metric=metric or METRICS[kind][0], **{"batch_size": 2, **task})
    encoded = {s: [e for e, _ in pairs] for s, pairs in splits.items()}
    gold = {s: [g for _, g in pairs] for s, pairs in splits.items()}
    return PreparedTask(task, labels, encoded, gold, max_length=64, pad_id=0)


CPU = torch.device("cpu")
ONE_HOT = [[10.0 if j == i else -10.0 for j in range(3)] for i in range(3)]  # id i → label i


def test_predictions_are_the_argmax_in_the_split_order():
    """predict() batches the examples shortest first: each prediction must return to its example's place."""
    lengths_and_labels = [(3, 2), (1, 0), (2, 1), (1, 2), (4, 0)]  # input ids repeat the label id
    pairs = [(Encoded([y] * n, y), frozenset("abc"[y])) for n, y in lengths_and_labels]
    prepared = _prepared("classification", ["a", "b", "c"], {"test": pairs})
    predictions = predict(TableModel(ONE_HOT, token_level=False), prepared, "test", CPU)
    assert predictions == [frozenset("c"), frozenset("a"), frozenset("b"), frozenset("c"), frozenset("a")]


def test_multilabel_predicts_the_labels_with_a_positive_logit():
    table = [[0.3, -0.2, 2.0], [-0.1, 0.0, -3.0]]  # p > 0.5 exactly where the logit is > 0
    pairs = [(Encoded([0], [1.0, 0.0, 1.0]), frozenset("ac")), (Encoded([1], [0.0, 0.0, 0.0]), frozenset())]
    prepared = _prepared("multilabel", ["a", "b", "c"], {"test": pairs})
    assert predict(TableModel(table, token_level=False), prepared, "test", CPU) == [frozenset("ac"), frozenset()]


def test_words_cut_off_by_max_length_are_predicted_o_and_count_as_misses():
    # ids: 0 [CLS] → O, 1 → B-X, 2 → I-X, 3 [SEP] → B-X (what the model says at the last position)
    table = ONE_HOT + [[-10.0, 10.0, -10.0]]
    # three words; the first has two sub-tokens (positions 1, 2), the second starts at 3, the third was cut off
    cut = Encoded([0, 1, 2, 2, 3], [IGNORE, 1, IGNORE, 2, IGNORE], first_subtoken=[1, 3, -1])
    prepared = _prepared("ner", ["O", "B-X", "I-X"], {"test": [(cut, ("B-X", "I-X", "B-X"))]})
    model = TableModel(table, token_level=True)
    assert predict(model, prepared, "test", CPU) == [("B-X", "I-X", "O")]
    # gold X[0:2] and X[2:3], predicted X[0:2]: tp 1, predicted 1, gold 2 → F1 = 2/3
    assert score(model, prepared, "test", CPU) == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric, f1", [("macro_f1", 7 / 18), ("micro_f1", 1 / 2)])
def test_score_uses_the_tasks_metric(metric, f1):
    # gold a a b c, predicted a b b a: per label a 1/2, b 2/3, c 0 → macro 7/18; micro = accuracy 1/2
    pairs = [(Encoded([p], 0), frozenset(g)) for p, g in ((0, "a"), (1, "a"), (1, "b"), (0, "c"))]
    prepared = _prepared("classification", ["a", "b", "c"], {"test": pairs}, metric=metric)
    assert score(TableModel(ONE_HOT, token_level=False), prepared, "test", CPU) == pytest.approx(f1)


def test_negative_labels_are_read_as_the_data_labels_are_and_checked_against_them(tmp_path):
    """Labels are strings as the data's are read (GAD's 0/1 are numbers in its files); a negative label the data
    does not have (a misspelling) would score the negative class after all, one that leaves nothing to score 0."""
    _write_jsonl(tmp_path / "gad.jsonl", [{"text": "a b", "label": 0}, {"text": "c d", "label": 1}])
    _write_jsonl(tmp_path / "gad_test.jsonl", [{"text": "e f", "label": 0}, {"text": "g h", "label": 1}])
    body = "name: t\ntype: classification\nfamily: F\ntrain: gad.jsonl\ntest: gad_test.jsonl\nmetric: micro_f1\n"
    (tmp_path / "plain.yaml").write_text(body)
    for negative, message in (("['false']", r"negative_labels \['false'\] are not labels of its data"),
                              ("[0, 1]", "leave no label to score")):
        (tmp_path / "bad.yaml").write_text(body + f"negative_labels: {negative}\n")
        with pytest.raises(UserError, match=message):
            read_splits(load_task(tmp_path / "bad.yaml"))
    (tmp_path / "gad.yaml").write_text(body + "negative_labels: [0]\n")
    task = load_task(tmp_path / "gad.yaml")
    assert task.negative_labels == ("0",) and task.fingerprint() != load_task(tmp_path / "plain.yaml").fingerprint()
    assert read_splits(task)["test"][0].labels == frozenset(["0"])


def test_score_leaves_the_negative_labels_out():
    # gold a a b c, predicted a b b a, "a" negative: b 2/3, c 0 → micro over b, c: tp 1, predicted 2, gold 2 → 1/2
    pairs = [(Encoded([p], 0), frozenset(g)) for p, g in ((0, "a"), (1, "a"), (1, "b"), (0, "c"))]
    prepared = _prepared("classification", ["a", "b", "c"], {"test": pairs}, metric="macro_f1", negative_labels=("a",))
    assert score(TableModel(ONE_HOT, token_level=False), prepared, "test", CPU) == pytest.approx((2 / 3 + 0) / 2)


def test_the_legend_names_the_labels_a_score_leaves_out_and_a_tasks_own_max_length():
    results = {"seeds": [0], "tasks": {
        "ChemProt": {"type": "classification", "family": "Clinical", "metric": "micro_f1", "negative_labels": ["false"]},
        "HoC": {"type": "multilabel", "family": "BigBIO", "metric": "micro_f1", "max_length": 512}}}
    lines = legend(results).splitlines()
    assert "- **ChemProt** (Clinical): classification, micro F1 over the labels other than 'false'" in lines
    assert "- **HoC** (BigBIO): multilabel, micro F1, inputs cut at max_length 512 (or a shorter model context)" in lines


def _train_split(n=20):
    """Examples whose first id tells them apart (id i has label i % 3, the row of ID_MOD_3)."""
    return [(Encoded([i, i], i % 3), frozenset("abc"[i % 3])) for i in range(n)]


ID_MOD_3 = [ONE_HOT[i % 3] for i in range(20)]


def test_training_schedule_clipping_weight_decay_and_the_seeds_data_order(monkeypatch):
    """AdamW with the task's weight decay, linear warmup over warmup_ratio of the steps then linear decay to
    0 at the end of training, clipping at 1.0, and the data order drawn from the seed (docs/evaluation.md)."""
    from cpt_lightning.evaluate import finetune as finetune_module

    seen = []  # (lr, weight decay) at each optimizer step

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
            return super().step(closure)

    clips, clip, models = [], torch.nn.utils.clip_grad_norm_, []

    def recording_clip(parameters, max_norm, **kwargs):
        clips.append(max_norm)
        return clip(parameters, max_norm, **kwargs)

    def new_model(*args):
        models.append(TableModel(ID_MOD_3, token_level=False))
        return models[-1]

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(finetune_module, "load_model", new_model)
    # 20 examples in batches of 8: 3 steps an epoch (the last batch has 4), 6 in all; warmup 0.5 → 3 steps
    prepared = _prepared("classification", ["a", "b", "c"], {"train": _train_split(), "test": _train_split(3)},
                         epochs=2, batch_size=8, lr=0.3, weight_decay=0.05, warmup_ratio=0.5)
    finetune("stand-in", prepared, 0, CPU)
    lrs = [lr for lr, _ in seen]
    assert len(lrs) == 6 and {wd for _, wd in seen} == {0.05} and clips == [1.0] * 6
    assert 0 < lrs[0] < lrs[1] < lrs[2] < lrs[3] == pytest.approx(0.3)  # warmup, linear
    assert lrs[1] - lrs[0] == pytest.approx(lrs[2] - lrs[1]) == pytest.approx(lrs[3] - lrs[2])
    assert lrs[3:] == pytest.approx([0.3, 0.2, 0.1])  # then linear decay, reaching 0 after the last step

    finetune("stand-in", prepared, 1, CPU)
    orders = [[i for batch in m.trained_on for i in batch] for m in models]
    for order in orders:  # each epoch is a permutation of the training set
        assert sorted(order[:20]) == sorted(order[20:]) == list(range(20))
    assert orders[0] != orders[1]  # another seed, another order


def test_each_step_trains_in_training_mode_on_its_own_gradient_and_dev_and_test_are_predicted_in_eval_mode(
        monkeypatch):
    """from_pretrained returns a model in eval mode: fine-tuned so, BERT's dropout (0.1) would stay off; predicted
    in training mode after an epoch, dev and test would be scored with dropout on, and the best epoch by chance.
    Each step's gradient is its own: summed over the steps, each update would take every earlier one's again."""
    from cpt_lightning.evaluate import finetune as finetune_module

    model = TableModel(ID_MOD_3, token_level=False).eval()
    monkeypatch.setattr(finetune_module, "load_model", lambda *args: model)
    prepared = _prepared("classification", ["a", "b", "c"],
                         {"train": _train_split(), "dev": _train_split(3), "test": _train_split(3)}, epochs=2, batch_size=8)
    finetune("stand-in", prepared, 0, CPU)
    trained = [(training, fresh) for training, labelled, fresh in model.calls if labelled]
    assert trained == [(True, True)] * 6  # 2 epochs of 3 steps
    assert {training for training, labelled, _ in model.calls if not labelled} == {False}  # dev each epoch, then test


@pytest.mark.parametrize("dev_scores, best", [([0.0, 0.0, 0.0], 1), ([0.5, 0.9, 0.9], 2), ([0.1, 0.2, 0.3], 3)])
def test_the_first_best_dev_epoch_is_kept_even_at_dev_f1_zero(dev_scores, best, monkeypatch):
    """A dev F1 of 0 is still a score: the first epoch is then the best (dev_f1 0, not None); of equal
    dev scores the earliest epoch is kept."""
    from cpt_lightning.evaluate import finetune as finetune_module

    model = TableModel(ID_MOD_3, token_level=False)
    monkeypatch.setattr(finetune_module, "load_model", lambda *args: model)
    scripted, weights = iter(dev_scores), []

    def scripted_score(model, prepared, split, device):
        weights.append(model.weight.item())
        return next(scripted) if split == "dev" else 0.0

    monkeypatch.setattr(finetune_module, "score", scripted_score)
    prepared = _prepared("classification", ["a", "b", "c"],
                         {"train": _train_split(4), "dev": _train_split(2), "test": _train_split(2)}, epochs=3, lr=0.1)
    result = finetune("stand-in", prepared, 0, CPU)
    assert (result["best_epoch"], result["dev_f1"]) == (best, 100 * dev_scores[best - 1])
    assert len(set(weights[:3])) == 3 and weights[3] == weights[best - 1]  # test scored with the best epoch's weights


# -- sub-word alignment and long inputs -----------------------------------------------------


def test_a_quiet_load_restores_transformers_logging_afterwards():
    """The load report is hidden during the load only: the run's later transformers warnings and bars still show."""
    import transformers

    from cpt_lightning.pretrained import quiet_transformers

    level, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.enable_progress_bar()
    try:
        with quiet_transformers():
            assert transformers.logging.get_verbosity() == transformers.logging.ERROR
            assert not transformers.utils.logging.is_progress_bar_enabled()
        assert transformers.logging.get_verbosity() == transformers.logging.WARNING
        assert transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.logging.set_verbosity(level)
        (transformers.utils.logging.enable_progress_bar if bars else transformers.utils.logging.disable_progress_bar)()


def test_a_word_at_position_0_is_predicted():
    """A tokenizer without a [CLS] (a Metaspace one) puts the first word's first sub-token at position 0: read as
    "no sub-token kept", it would be tagged O whatever the model said."""
    prepared = _prepared("ner", ["O", "B-X", "I-X"], {"test": [(Encoded([1, 2, 1], [1, 2, 1], first_subtoken=[0, NO_TOKEN, 2]),
                                                               ("B-X", "O", "B-X"))]})
    assert predict(TableModel(ONE_HOT, token_level=True), prepared, "test", CPU) == [("B-X", "O", "B-X")]


def test_first_subtoken_of_each_word_carries_its_tag(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    example = TaggedExample(("Metformin", "lowered", "glycaemia", "."), ("B-Chem", "O", "O", "O"))
    enc = encode_tagged(tokenizer, example, {"O": 0, "B-Chem": 1, "I-Chem": 2}, max_length=64)
    labelled = [i for i, t in enumerate(enc.target) if t != IGNORE]
    assert labelled == enc.first_subtoken and [enc.target[i] for i in labelled] == [1, 0, 0, 0]
    assert len(enc.input_ids) > len(example.tokens) + 2  # words really were split into sub-tokens
    bounds = [*enc.first_subtoken, len(enc.input_ids) - 1]  # last: [SEP]
    words = [tokenizer.decode(enc.input_ids[a:b]).strip() for a, b in zip(bounds, bounds[1:])]
    assert words == list(example.tokens)


def test_truncated_words_have_no_subtoken_and_long_inputs_use_the_model_context(tiny_encoder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    words = tuple(["treatment"] * 900)
    enc = encode_tagged(tokenizer, TaggedExample(words, ("O",) * 900), {"O": 0}, max_length=100)
    # " treatment" is one token: [CLS] + 98 words + [SEP]; the other 802 words are cut off
    assert len(enc.input_ids) == 100
    assert enc.first_subtoken[:98] == list(range(1, 99)) and set(enc.first_subtoken[98:]) == {-1}

    long_text = " ".join(["the patient improved"] * 500)  # 1,502 tokens
    for split in ("train", "dev", "test"):
        _write_jsonl(tmp_path / f"{split}.jsonl", [{"text": long_text, "label": "a"}, {"text": split, "label": "b"}])
    (tmp_path / "long.yaml").write_text("name: long\ntype: classification\nfamily: X\ntrain: train.jsonl\ntest: test.jsonl\n")
    prepared = prepare(load_task(tmp_path / "long.yaml"), tiny_encoder)
    assert prepared.max_length == 1024 and len(prepared.encoded["train"][0].input_ids) == 1024


def test_a_word_the_tokenizer_drops_is_told_apart_from_a_word_max_length_cuts(tmp_path, caplog):
    """BERT's normalizer deletes U+FFFD and zero-width spaces: a word of them alone has no token. It was counted as
    cut by max_length, and the warning advised raising max_length, which brings nothing back. Telling them apart
    reads the whole text, without transformers' warning that it is longer than the model takes."""
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "aspirin", "dose",
                                                    "daily"]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), model_max_length=4)
    example = TaggedExample(("aspirin", "\ufffd", "dose", "\u200b", "daily"), ("B-X", "B-X", "O", "O", "B-X"))
    ids = {"O": 0, "B-X": 1, "I-X": 2}
    assert encode_tagged(tokenizer, example, ids, max_length=64).first_subtoken == [1, NO_TOKEN, 2, NO_TOKEN, 3]
    cut = encode_tagged(tokenizer, example, ids, max_length=4)  # [CLS] aspirin dose [SEP]: "daily" is cut off
    assert cut.first_subtoken == [1, NO_TOKEN, 2, NO_TOKEN, CUT]
    assert "longer than the specified maximum" not in caplog.text
    prepared = _prepared("ner", ["O", "B-X", "I-X"], {"test": [(cut, example.tags)]})
    assert truncation_note(prepared) == (
        "task 't': max_length 64 cuts 1 of 5 test words (1 of 3 gold entities), predicted O; split long sentences, or "
        "raise the task's max_length where the model's context allows; the tokenizer makes no token of 2 of 5 test "
        "words (1 of 3 gold entities), predicted O (characters its normalizer drops, such as U+FFFD or zero-width "
        "spaces); clean them from the data")
    whole = encode_tagged(tokenizer, example, ids, max_length=5)  # every word's token fits exactly: nothing is cut
    assert whole.first_subtoken == [1, NO_TOKEN, 2, NO_TOKEN, 3]
    past_the_cut = TaggedExample(("aspirin", "dose", "daily", "\ufffd"), ("B-X", "O", "B-X", "O"))
    assert encode_tagged(tokenizer, past_the_cut, ids, max_length=4).first_subtoken == [1, 2, CUT, NO_TOKEN]
    one_entity = ("O", "O", "O", "O", "B-X")  # each split's words and entities are its own
    both = _prepared("ner", ["O", "B-X", "I-X"], {"dev": [(cut, one_entity)], "test": [(cut, example.tags)]})
    assert "cuts 1 of 5 dev words (1 of 1 gold entities) and 1 of 5 test words (1 of 3 gold entities)" in \
        truncation_note(both)


def test_labels_come_from_every_split_and_max_length_never_exceeds_the_context(tiny_encoder, tmp_path):
    """A class present only in test still counts; a task's max_length above the model's context is capped."""
    for split, label in (("train", "a"), ("dev", "a"), ("test", "b")):
        _write_jsonl(tmp_path / f"{split}.jsonl", [{"text": f"x {split}", "label": label}])
    (tmp_path / "t.yaml").write_text("name: t\ntype: classification\nfamily: X\ntrain: train.jsonl\ndev: dev.jsonl\n"
                                     "test: test.jsonl\nmax_length: 4096\n")
    prepared = prepare(load_task(tmp_path / "t.yaml"), tiny_encoder)
    assert prepared.labels == ["a", "b"] and prepared.max_length == 1024  # the tiny encoder's context
    assert [e.target for e in prepared.encoded["test"]] == [1]


def test_class_ids_and_multi_hot_targets(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"Liver": 0, "Mice": 1, "Rats": 2}
    multi = encode_text(tokenizer, TextExample("a b", frozenset({"Liver", "Rats"})), ids, 64, multilabel=True)
    assert multi.target == [1.0, 0.0, 1.0]
    assert encode_text(tokenizer, TextExample("a b", frozenset()), ids, 64, multilabel=True).target == [0.0, 0.0, 0.0]
    assert encode_text(tokenizer, TextExample("a b", frozenset({"Liver"})), ids, 64, multilabel=False).target == 0
    assert encode_text(tokenizer, TextExample("a b", frozenset({"Rats"})), ids, 64, multilabel=False).target == 2


def test_collate_pads_on_the_right_and_padding_is_neither_attended_nor_a_target():
    ner = collate([Encoded([5, 6, 7], [IGNORE, 1, IGNORE]), Encoded([5, 8], [IGNORE, 2])], pad_id=0, task_type="ner")
    assert ner["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert ner["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ner["labels"].tolist() == [[IGNORE, 1, IGNORE], [IGNORE, 2, IGNORE]]  # not tag 0 ("O") on the padding
    single = collate([Encoded([5], 2), Encoded([5, 6], 0)], pad_id=0, task_type="classification")
    assert single["labels"].tolist() == [2, 0] and single["labels"].dtype == torch.long
    multi = collate([Encoded([5], [1.0, 0.0])], pad_id=0, task_type="multilabel")
    assert multi["labels"].tolist() == [[1.0, 0.0]] and multi["labels"].dtype == torch.float


# -- task files and readers: bad inputs give one clear line ---------------------------------


def _task_yaml(folder, body):
    for split in ("t", "u"):  # train, test: their own examples (a copy is refused)
        (folder / f"{split}.jsonl").write_text(f'{{"text": "{split} b", "label": "x"}}\n')
        (folder / f"{split}.conll").write_text(f"{split} B-X\nb O\n")
    (folder / "t.yaml").write_text(body)
    return folder / "t.yaml"


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nepoch: 3\n", r"unknown keys \['epoch'\]"),
        ("name: t\ntype: regression\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\n", "type 'regression'"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\n", r"missing required keys \['test'\]"),
        ("name: t\ntype: ner\nfamily: F\ntrain: null\ntest: u.conll\n", "train must name a file, got null"),  # tracebacks
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest:\n", "test must name a file, got null"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: nope.conll\n", "test file .*nope.conll does not exist"),
        # a folder (a dataset saved by the datasets library) or '' was "does not exist", '' naming the YAML's folder
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: .\n", "test .* is a folder, not a file; name a JSONL or"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: ''\n", "test is empty; name its file"),
        # YAML kept the last: trained 3 epochs, where the first said 1
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nepochs: 1\nepochs: 3\n",
         r"cannot read task YAML \(line 7, column 1: key 'epochs' given twice \(lines 6 and 7\): YAML keeps only the "
         r"last; merge the two\)"),
        # guessed from train alone: the JSONL test split was read as CoNLL, refused for a "tag" '"O"]}'
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.jsonl\n",
         r"train .*t.conll is conll, test .*u.jsonl is jsonl: give every split in one format"),
        ("name: t\ntype: classification\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\nmetric: entity_f1\n", "not available"),
        ("name: t\ntype: classification\nfamily: F\ntrain: t.conll\ntest: u.conll\n", "only type: ner reads them"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nlr: fast\n", "lr must be a number"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nepochs: 0\n", "epochs must be an integer >= 1"),
        ("- name: t\n", "a task YAML is a mapping"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nlr: 0\n", "lr must be positive"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nbatch_size: 0\n", "batch_size must be an integer >= 1"),
        # torch's AdamW refuses a negative weight decay, but only when the task is fine-tuned: a traceback after hours
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nweight_decay: -0.01\n", "weight_decay must be >= 0"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nwarmup_ratio: 1.5\n", r"warmup_ratio must lie in \[0, 1\]"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nwarmup_ratio: -0.1\n", r"warmup_ratio must lie in \[0, 1\]"),
        # these were a TypeError traceback, a ValueError from AdamW mid-run, or silently accepted (inf lr, epochs: true)
        ("name: t\ntype: [ner]\nfamily: F\ntrain: t.conll\ntest: u.conll\n", r"type must be a string, got \['ner'\]"),
        ("name: null\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\n", "name must be a string, got None"),
        ("name: 123\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\n", "name must be a string, got 123"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nlr: .nan\n", "lr must be a finite number"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nlr: .inf\n", "lr must be a finite number"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nweight_decay: .nan\n", "weight_decay must be a finite"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nepochs: true\n", "epochs must be an integer >= 1"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nmax_length: 4\n", "max_length must be an integer >= 8"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nmax_length: long\n", "max_length must be an integer"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nformat: xml\n", "format 'xml'; choose one of"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\n1: x\nfoo: y\n", r"unknown keys \['1', 'foo'\]"),
        ("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nnegative_labels: [O]\n",
         "negative_labels is a list of labels of a classification or multilabel task"),
        ("name: t\ntype: classification\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\nnegative_labels: false\n",
         "negative_labels is a list of labels .* got False"),
    ],
)
def test_bad_task_files(tmp_path, body, message):
    with pytest.raises(UserError, match=message):
        load_task(_task_yaml(tmp_path, body))


@pytest.mark.parametrize("task_type, train, text, message", [
    ("classification", "t.csv", "text,label\nb,x\n", "t.csv: CSV is not read; convert it to JSON lines"),
    ("ner", "t.csv", "token,tag\nb,O\n", "t.csv: CSV is not read"),  # was: t.csv:1: expected 'TOKEN ... TAG'
    ("classification", "t.json", '[{"text": "b", "label": "x"}]\n', "t.json: one JSON array, not JSON lines"),
    ("ner", "t.json", '\ufeff[\n  {"tokens": ["b"], "tags": ["O"]}\n]\n', "t.json: one JSON array"),  # got '['
    ("classification", "t.tsv", "b\tx\n", r"t.tsv is not JSON lines \(its first line is no JSON object\), which "
                                           "type: classification reads"),  # was: CoNLL files hold BIO tags
])
def test_data_in_a_format_not_read_is_refused_with_what_to_convert_it_to(tmp_path, task_type, train, text, message):
    (tmp_path / train).write_text(text, encoding="utf-8")
    body = f"name: t\ntype: {task_type}\nfamily: F\ntrain: {train}\ntest: u.jsonl\n"
    with pytest.raises(UserError, match=message) as refusal:
        load_task(_task_yaml(tmp_path, body))
    if train.endswith(".json"):  # the conversion it gives works
        command = str(refusal.value).split("convert it: ")[1].replace("python", shlex.quote(sys.executable), 1)
        (tmp_path / "elsewhere").mkdir()  # pasted where cpt evaluate ran, not beside the data
        subprocess.run(command, shell=True, cwd=tmp_path / "elsewhere", check=True)
        lines = (tmp_path / "t.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == json.loads(text.lstrip("\ufeff"))


def test_the_documented_task_templates_load(tmp_path):
    """docs/evaluation.md's and tasks.py's NER templates say `negative_labels: []`, which was refused."""
    import cpt_lightning.evaluate.tasks as tasks

    docs = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text().split("## Task YAML")[1]
    for number, template in enumerate([docs.split("```yaml\n")[1].split("```")[0],
                                       tasks.__doc__.split("```yaml\n")[1].split("```")[0]]):
        folder = tmp_path / str(number) / "configs" / "tasks" / "bigbio"
        folder.mkdir(parents=True)
        (folder / "bc5cdr.yaml").write_text(template)
        for split in ("train", "dev", "test"):
            for path in (folder / "bc5cdr" / f"{split}.conll", folder.parents[2] / f"data/benchmarks/bc5cdr/{split}.conll"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"Aspirin B-Chemical\n{split} O\n")
        task = load_task(folder / "bc5cdr.yaml")
        assert (task.name, task.type, task.negative_labels, task.dev.name) == ("BC5CDR", "ner", (), "dev.conll")


@pytest.mark.parametrize("train, dev, test, why", [
    ("t.conll", "u.conll", "./u.conll", "dev and test name the same file .*u.conll: the best epoch would be chosen on "
                                        "the test examples"),
    ("t.conll", None, "../{folder}/t.conll", "train and test name the same file .*: the score would be on training"),
    ("t.conll", "link.conll", "u.conll", "train and dev name the same file .*link.conll: the best epoch would be "
                                         "chosen on training examples"),
])
def test_a_split_that_is_another_splits_file_is_refused(tmp_path, train, dev, test, why):
    """Model selection on the test set, under a legend saying "its best dev epoch", was accepted without a word."""
    (tmp_path / "link.conll").symlink_to(tmp_path / "t.conll")
    body = f"name: t\ntype: ner\nfamily: F\ntrain: {train}\ntest: {test.format(folder=tmp_path.name)}\n"
    with pytest.raises(UserError, match=why + ".*give each split its own examples"):
        load_task(_task_yaml(tmp_path, body + (f"dev: {dev}\n" if dev else "")))


def test_a_dev_split_that_is_a_copy_of_the_test_file_is_refused(tmp_path):
    """A dataset without a dev split given its test file again as dev (copied) chose the best epoch on test."""
    task_file = _task_yaml(tmp_path, "name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\ndev: dev.conll\n")
    shutil.copy(tmp_path / "u.conll", tmp_path / "dev.conll")
    with pytest.raises(UserError, match=r"dev and test hold the same examples \(.*dev.conll is a copy of .*u.conll\): "
                                        "the best epoch would be chosen on the test examples"):
        load_task(task_file)
    (tmp_path / "dev.conll").write_text("d B-X\n")
    assert load_task(task_file).dev.name == "dev.conll"


@pytest.mark.parametrize("kind, records, message", [
    # a label_field naming a field that is the same on every line: F1 100 with nothing learnt
    ("classification", [{"text": "a", "label": "pubmed"}, {"text": "b", "label": "pubmed"}],
     r"task 't': its data holds 1 label \(\['pubmed'\]\): a classifier needs two or more"),
    ("multilabel", [{"text": "a", "labels": []}, {"text": "b", "labels": []}], "no example carries a label"),
    ("ner", [{"tokens": ["a", "b"], "tags": ["O", "O"]}], "no B-/I- tag in any split, so there is no entity to score"),
])
def test_a_task_whose_data_has_nothing_to_score_is_refused(tmp_path, kind, records, message):
    for split in ("t", "u"):  # the same labels, not the same examples (a copy is refused as such)
        _write_jsonl(tmp_path / f"{split}.jsonl", [{**record, "split": split} for record in records])
    (tmp_path / "t.yaml").write_text(f"name: t\ntype: {kind}\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\n")
    with pytest.raises(UserError, match=message):
        read_splits(load_task(tmp_path / "t.yaml"))
    _write_jsonl(tmp_path / "u.jsonl", [{"text": "c", "label": "x", "labels": ["x"], "tokens": ["c"], "tags": ["B-X"]}])
    assert len(read_splits(load_task(tmp_path / "t.yaml"))["test"]) == 1  # one split holding it is enough


@pytest.mark.parametrize("kind, scored_split", [("ner", "dev"), ("classification", "test")])
def test_a_dev_or_test_split_with_nothing_to_score_is_refused(tmp_path, kind, scored_split):
    """A dev split tagged all O scored F1 0 in every epoch, so the first epoch was chosen, silently; a test split
    of negative labels alone ranks every model equal. The checks over all splits together passed both."""
    if kind == "ner":
        record = lambda i, has: {"tokens": ["aspirin", f"w{i}"], "tags": ["B-Chem" if has else "O", "O"]}  # noqa: E731
        extra = ""
    else:
        record = lambda i, has: {"text": f"t{i}", "label": "related" if has else "none"}  # noqa: E731
        extra = "negative_labels: [none]\n"
    for split in ("train", "dev", "test"):
        _write_jsonl(tmp_path / f"{split}.jsonl", [{**record(i, split != scored_split and i == 0), "split": split}
                                                   for i in range(2)])
    (tmp_path / "t.yaml").write_text(f"name: t\ntype: {kind}\nfamily: F\ntrain: train.jsonl\ndev: dev.jsonl\n"
                                     f"test: test.jsonl\n{extra}")
    what = "no entity" if kind == "ner" else "no label but negative_labels"
    with pytest.raises(UserError, match=f"its {scored_split} split .*{scored_split}.jsonl.* holds {what} to score"):
        read_splits(load_task(tmp_path / "t.yaml"))
    _write_jsonl(tmp_path / f"{scored_split}.jsonl", [record(0, True), record(1, False)])
    assert len(read_splits(load_task(tmp_path / "t.yaml"))[scored_split]) == 2


def test_yaml_float_without_dot_is_read_as_a_number(tmp_path):
    task = load_task(_task_yaml(tmp_path, "name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\nlr: 5e-5\n"))
    assert task.lr == 5e-5 and task.train == tmp_path / "t.conll" and task.metric == "entity_f1"


def test_default_metric_and_label_field_follow_the_type(tmp_path):
    for split in ("t", "u"):  # train, test
        (tmp_path / f"{split}.jsonl").write_text(f'{{"text": "{split} b", "label": "x", "labels": ["x"]}}\n')
    body = "name: t\ntype: {}\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\n"
    (tmp_path / "c.yaml").write_text(body.format("classification"))
    (tmp_path / "m.yaml").write_text(body.format("multilabel"))
    classification, multilabel = load_task(tmp_path / "c.yaml"), load_task(tmp_path / "m.yaml")
    assert (classification.metric, classification.label_field) == ("macro_f1", "label")
    assert (multilabel.metric, multilabel.label_field) == ("micro_f1", "labels")


@pytest.mark.parametrize(
    "kind, line, message",
    [
        ("classification", "{not json}", r"t\.jsonl:2: invalid JSON"),
        ("classification", '{"txt": "a"}', r"t\.jsonl:2: no field 'text'"),
        ("classification", '{"text": "a", "label": ["x", "y"]}', "must be one label"),
        ("classification", '{"text": "a", "label": null}', "must be one label"),
        ("classification", '{"text": " ", "label": "x"}', "'text' must be a non-empty string"),
        ("multilabel", '{"text": "a", "labels": "x"}', "must be a list of labels"),
        ("ner", '{"tokens": ["a", "b"], "tags": ["O"]}', "lists of equal length"),
        ("ner", '{"tokens": ["a"], "tags": ["E-X"]}', "tag 'E-X' is not BIO"),
        ("ner", '{"tokens": ["a", ""], "tags": ["O", "O"]}', r"t\.jsonl:2: empty token"),
        # a null was read as the word or label "None"
        ("ner", '{"tokens": ["a", null], "tags": ["O", "O"]}', r"t\.jsonl:2: .* hold words and tags, got None"),
        ("multilabel", '{"text": "a", "labels": ["x", null]}', r"t\.jsonl:2: .*must be a list of labels"),
    ],
)
def test_bad_jsonl_records_name_file_and_line(tmp_path, kind, line, message):
    good = {"ner": '{"tokens": ["a"], "tags": ["O"]}', "multilabel": '{"text": "a", "labels": []}'}.get(
        kind, '{"text": "a", "label": "x"}'
    )
    (tmp_path / "t.jsonl").write_text(good + "\n" + line + "\n")
    (tmp_path / "u.jsonl").write_text(good + "\n")
    (tmp_path / "t.yaml").write_text(f"name: t\ntype: {kind}\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\n")
    task = load_task(tmp_path / "t.yaml")
    with pytest.raises(UserError, match=message):
        read_split(task, task.train)


@pytest.mark.parametrize("kind, good, suffix", [("classification", b'{"text": "a", "label": "x"}', "jsonl"),
                                                 ("ner", b"a B-X", "conll")])
def test_invalid_utf8_in_a_task_file_names_file_and_line(tmp_path, kind, good, suffix):
    """It was a UnicodeDecodeError traceback."""
    (tmp_path / f"t.{suffix}").write_bytes(good + b"\n" + good.replace(b"a", b"\xff\xfe") + b"\n")
    (tmp_path / f"u.{suffix}").write_bytes(good + b"\n")
    (tmp_path / "t.yaml").write_text(f"name: t\ntype: {kind}\nfamily: F\ntrain: t.{suffix}\ntest: u.{suffix}\n")
    task = load_task(tmp_path / "t.yaml")
    with pytest.raises(UserError, match=rf"t\.{suffix}:2: invalid UTF-8 \(byte 0xff\)"):
        read_split(task, task.train)


def test_conll_reader(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O\n\nAspirin NN B-Chem\nworks VB O\n\n\nInsulin NN B-Chem\n")
    assert read_conll(path) == [
        TaggedExample(("Aspirin", "works"), ("B-Chem", "O")),
        TaggedExample(("Insulin",), ("B-Chem",)),
    ]
    path.write_text("Aspirin NN B-Chem\n-DOCSTART- -X- O\nacid NN I-Chem\n")  # no blank line: conlleval's chunks end
    assert read_conll(path) == [TaggedExample(("Aspirin",), ("B-Chem",)), TaggedExample(("acid",), ("I-Chem",))]
    path.write_text("Aspirin B-Chem\nworks\n")
    with pytest.raises(UserError, match=r"x\.conll:2: expected 'TOKEN \.\.\. TAG'"):
        read_conll(path)
    path.write_text("Aspirin B-Chem\n\nInsulin NN B-Chem\nworks VB E-Chem\n")  # its sentence starts at line 3
    with pytest.raises(UserError, match=r"x\.conll:4: tag 'E-Chem' is not BIO"):  # the line to mend
        read_conll(path)
    path.write_bytes(b"\xef\xbb\xbfAspirin B-Chem\n")  # a byte-order mark: it became part of the first word
    assert read_conll(path) == [TaggedExample(("Aspirin",), ("B-Chem",))]
    path.write_text("10\u00a0mg\tB-Dose\u00a0\nof\u2009x\tI-Dose\n\u00a0\nA O\n")  # 10 read alone, mg dropped
    assert read_conll(path) == [TaggedExample(("10\u00a0mg", "of\u2009x"), ("B-Dose", "I-Dose")),
                                TaggedExample(("A",), ("O",))]
    path.write_text("A O\n\u2009\tO\n")
    with pytest.raises(UserError, match=r"x\.conll:2: empty token"):
        read_conll(path)
    path.write_bytes(b"a O\r\nb B-X\r\n")  # Windows line endings are read
    assert read_conll(path) == [TaggedExample(("a", "b"), ("O", "B-X"))]
    for text, line in ((b"a O\rb B-X\rc O\r\rd B-X\r", 1), (b"a O\nb O\rc B-X\n", 2)):  # old Mac endings, a stray CR
        path.write_bytes(text)  # were one word with another line's tag
        with pytest.raises(UserError, match=rf"x\.conll:{line}: a carriage return inside the line \(CR-only line "
                                            r"endings, or a stray CR\); save the file with \\n or \\r\\n line endings$"):
            read_conll(path)


def test_jsonl_blank_lines_are_skipped_and_an_empty_split_is_refused(tmp_path):
    (tmp_path / "t.jsonl").write_text('\ufeff{"text": "a", "label": "x"}\n\n  \n{"text": "b", "label": "y"}\n\n')  # BOM
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "t.yaml").write_text("name: t\ntype: classification\nfamily: F\ntrain: t.jsonl\ntest: empty.jsonl\n")
    task = load_task(tmp_path / "t.yaml")
    assert [e.text for e in read_split(task, task.train)] == ["a", "b"]
    with pytest.raises(UserError, match=r"empty\.jsonl: no examples"):  # a test split of 0 examples would score F1 0
        read_split(task, task.test)


def test_cli_errors_are_one_line(tmp_path, task_dir, tiny_encoder, capsys):
    assert main(["--tasks", str(tmp_path / "none"), "--models", tiny_encoder, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such task file" in err and err.count("\n") == 1
    assert main(["--tasks", str(task_dir), str(task_dir / "chem.yaml"), "--models", tiny_encoder]) == 2
    assert "repeated: ['chem']" in capsys.readouterr().err
    assert main(["--tasks", str(task_dir), "--models", str(tmp_path / "no-model"), "--out", str(tmp_path)]) == 2
    assert "no-model': no such folder" in capsys.readouterr().err
    (tmp_path / "not-a-model").mkdir()
    assert main(["--tasks", str(task_dir), "--models", str(tmp_path / "not-a-model"), "--out", str(tmp_path)]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert main(["--tasks", str(task_dir), "--models", str(tmp_path / "last.ckpt"), "--out", str(tmp_path)]) == 2
    assert "is a training checkpoint: export it first (cpt export" in capsys.readouterr().err


def test_the_same_model_twice_or_an_out_that_is_a_file_is_one_line_before_fine_tuning(
        tmp_path, task_dir, tiny_encoder, capsys, monkeypatch):
    """The same folder twice (also as `m` and `m/`) was fine-tuned twice and compared with itself; an --out that is
    a file (or lies under one) was a FileExistsError / NotADirectoryError traceback."""
    import cpt_lightning.evaluate.cli as cli

    monkeypatch.setattr(cli, "finetune", lambda *a, **k: pytest.fail("fine-tuned before the check"))
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, tiny_encoder.rstrip("/") + "/",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "the same model twice" in err and err.count("\n") == 1, err
    (tmp_path / "file").write_text("keep")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["--tasks", str(task_dir), "--models", tiny_encoder, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "is a file, not a folder" in err and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "keep"


def test_a_config_that_does_not_fit_the_weights_is_one_line(tmp_path, task_dir, tiny_encoder, capsys):
    """A config.json whose vocab_size was edited after saving: transformers' RuntimeError ("ignore_mismatched_sizes")
    was a traceback."""
    import shutil

    edited = shutil.copytree(tiny_encoder, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    assert main(["--tasks", str(task_dir), "--models", str(edited), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "its weights do not fit its config.json" in err and err.count("\n") == 1, err


def test_seeds_must_be_positive():
    from cpt_lightning.evaluate.cli import parse_args

    with pytest.raises(UserError, match=r"--seeds must be >= 1 \(cpt evaluate --help lists the options\)"):
        parse_args(["--tasks", "t", "--models", "m", "--seeds", "0"])


def test_benchmark_task_files_load_with_the_documented_layout(tmp_path):
    """configs/tasks/*: every YAML loads once data/benchmarks/<task>/{train,dev,test}.<ext> exist."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "configs" / "tasks", tmp_path / "configs" / "tasks")
    yamls = sorted((tmp_path / "configs" / "tasks").rglob("*.yaml"))
    assert len(yamls) == 11
    for path in yamls:
        for line in path.read_text().splitlines():
            if line.startswith(("train:", "dev:", "test:")):
                file = (path.parent / line.split(":", 1)[1].strip()).resolve()
                assert file.is_relative_to(tmp_path / "data" / "benchmarks")
                file.parent.mkdir(parents=True, exist_ok=True)
                file.touch()
    tasks = [load_task(p) for p in yamls]
    assert {t.family for t in tasks} == {"BigBIO", "Clinical"}
    assert {t.name for t in tasks if t.max_length == 8192} == {"Phenotype", "COS", "Social History"}
    assert {t.name: t.negative_labels for t in tasks if t.negative_labels} == {"ChemProt": ("false",), "GAD": ("0",)}


def test_changed_data_or_settings_are_not_served_from_stored_runs(tmp_path):
    task_file = _task_yaml(tmp_path, "name: t\ntype: ner\nfamily: F\ntrain: t.conll\ntest: u.conll\n")
    before = load_task(task_file).fingerprint()
    assert load_task(task_file).fingerprint() == before
    data = (tmp_path / "t.conll").read_text()
    (tmp_path / "t.conll").write_text("a B-X\nb I-X\n")
    assert load_task(task_file).fingerprint() != before
    (tmp_path / "t.conll").write_text(data)
    task_file.write_text(task_file.read_text() + "epochs: 7\n")
    assert load_task(task_file).fingerprint() != before


def test_other_negative_labels_are_not_served_from_stored_runs(tmp_path):
    """The F1 leaves other labels out: runs scored without the old ones would be reused under the new ones."""
    import dataclasses

    body = "name: t\ntype: classification\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\nnegative_labels: [x]\n"
    task = load_task(_task_yaml(tmp_path, body))
    assert task.fingerprint() != dataclasses.replace(task, negative_labels=("y",)).fingerprint()


def test_a_re_exported_model_is_not_served_from_stored_runs(tiny_encoder, task_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_encoder, model)
    only_pubtype = tmp_path / "tasks"
    shutil.copytree(task_dir, only_pubtype, ignore=shutil.ignore_patterns("chem.yaml", "topics.yaml"))
    args = ["--tasks", str(only_pubtype), "--models", str(model), "--seeds", "1", "--out", str(tmp_path / "eval")]
    assert main(args) == 0 and "seed 0:" in capsys.readouterr().out
    (model / "README.md").write_text("# a card with results\n")  # not the weights: the stored run still serves
    assert main(args) == 0 and "seed 0:" not in capsys.readouterr().out
    weights = ModernBertForMaskedLM.from_pretrained(model)
    torch.nn.init.normal_(weights.model.embeddings.tok_embeddings.weight)
    weights.save_pretrained(model)  # cpt export --overwrite, or a PhaseEndExport after a restart
    assert main(args) == 0 and "seed 0:" in capsys.readouterr().out
    torch.nn.init.normal_(weights.model.embeddings.tok_embeddings.weight, std=2.0)  # each fine-tuning seeds alike
    weights.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", model)  # new weights alone, config.json as it was
    assert main(args) == 0 and "seed 0:" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(model, do_lower_case=True, model_max_length=77)
    tokenizer.save_pretrained(model)  # another tokenizer setup, the weights as they were: served the old scores
    assert main(args) == 0 and "seed 0:" in capsys.readouterr().out
    assert len((tmp_path / "eval" / "runs.jsonl").read_text().splitlines()) == 4


def test_stored_runs_are_found_by_the_models_content_not_its_files_times(tiny_encoder, task_dir, tmp_path, capsys):
    """Two models of one architecture whose files had equal sizes and times (copied out of an archive with fixed
    times) were one model to the stored runs: the second was served the first one's scores, never fine-tuned."""
    only_pubtype = tmp_path / "tasks"
    shutil.copytree(task_dir, only_pubtype, ignore=shutil.ignore_patterns("chem.yaml", "topics.yaml"))
    first, second, copy = tmp_path / "first", tmp_path / "second", tmp_path / "copy"
    shutil.copytree(tiny_encoder, first)
    weights = ModernBertForMaskedLM.from_pretrained(first)
    torch.nn.init.normal_(weights.model.embeddings.tok_embeddings.weight)
    weights.save_pretrained(second)
    AutoTokenizer.from_pretrained(first).save_pretrained(second)
    shutil.copytree(first, copy)
    for file in [*first.iterdir(), *second.iterdir()]:
        os.utime(file, ns=(1_767_225_600 * 10**9,) * 2)
    assert (first / "model.safetensors").stat().st_size == (second / "model.safetensors").stat().st_size
    args = ["--tasks", str(only_pubtype), "--seeds", "1", "--out", str(tmp_path / "eval")]
    assert main([*args, "--models", str(first), str(second)]) == 0
    assert capsys.readouterr().out.count("seed 0:") == 2
    assert main([*args, "--models", str(copy)]) == 0  # the same files, other times: the stored run serves
    assert "seed 0:" not in capsys.readouterr().out


def test_stored_runs_serve_the_same_tasks_and_model_named_by_another_path(tiny_encoder, task_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """A relative --tasks, or the model as m/ or from another directory, fine-tuned every run again."""
    shutil.copytree(task_dir, tmp_path / "tasks", ignore=shutil.ignore_patterns("chem.yaml", "topics.yaml"))
    shutil.copytree(tiny_encoder, tmp_path / "model")
    out = ["--seeds", "1", "--out", str(tmp_path / "eval")]
    assert main(["--tasks", str(tmp_path / "tasks"), "--models", str(tmp_path / "model"), *out]) == 0
    assert "seed 0:" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["--tasks", "tasks", "--models", "model/", *out]) == 0 and "seed 0:" not in capsys.readouterr().out
    assert len((tmp_path / "eval" / "runs.jsonl").read_text().splitlines()) == 1
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["model/"] and {run["model"] for run in results["runs"]} == {"model/"}


def test_a_stored_run_serves_only_the_same_setup_and_the_heads_pooling_is_said(tiny_encoder, task_dir, tmp_path, capsys):
    """A rerun with another attention kernel was served the sdpa scores; and a model built from a model_config pools
    its classification head by cls (transformers' default), a hub ModernBERT by mean: compared side by side, the
    classification columns differed by the head as well as the encoder, and nothing said so."""
    from cpt_lightning.evaluate.cli import run_setup

    only_pubtype = tmp_path / "tasks"
    shutil.copytree(task_dir, only_pubtype, ignore=shutil.ignore_patterns("chem.yaml", "topics.yaml"))
    out = tmp_path / "eval"
    args = ["--tasks", str(only_pubtype), "--models", tiny_encoder, "--seeds", "1", "--out", str(out)]
    assert main(args) == 0 and "seed 0:" in capsys.readouterr().out
    [run] = json.loads((out / "results.json").read_text())["runs"]
    assert run["setup"] == {"device": "cpu", "attn_implementation": "sdpa", "classifier_pooling": "model"}
    results = json.loads((out / "results.json").read_text())
    assert results["models"][tiny_encoder]["classifier_pooling"] == "cls"
    assert "Classification heads pool the encoder's output by cls" in (out / "results.md").read_text()
    assert main(args) == 0 and "seed 0:" not in capsys.readouterr().out  # the same setup is served
    assert main(args + ["--attn-implementation", "eager"]) == 0 and "seed 0:" in capsys.readouterr().out
    assert main(args + ["--classifier-pooling", "mean"]) == 0 and "seed 0:" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["models"][tiny_encoder]["classifier_pooling"] == "mean"
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3

    hub_like = tmp_path / "hub_like"  # as answerdotai/ModernBERT-base's config.json says
    shutil.copytree(tiny_encoder, hub_like)
    config = json.loads((hub_like / "config.json").read_text())
    (hub_like / "config.json").write_text(json.dumps({**config, "classifier_pooling": "mean"}))
    both = ["--tasks", str(only_pubtype), "--models", tiny_encoder, str(hub_like), "--seeds", "1", "--out", str(out)]
    assert main(both) == 0
    mixed = f"The classification heads pooled differently (`{tiny_encoder}` cls, `{hub_like}` mean)"
    assert mixed in (out / "results.md").read_text() and f"warning: {mixed}" in capsys.readouterr().err
    assert main(both + ["--classifier-pooling", "mean"]) == 0
    assert "pooled differently" not in (out / "results.md").read_text() + capsys.readouterr().err
    prepared = prepare(load_task(only_pubtype / "pubtype.yaml"), tiny_encoder)
    assert load_model(tiny_encoder, prepared, "sdpa", "mean").config.classifier_pooling == "mean"
    assert "classifier_pooling" not in run_setup(load_task(task_dir / "chem.yaml"), torch.device("cpu"), "sdpa", "mean")


def test_a_model_written_over_while_evaluated_is_refused_and_its_later_runs_not_stored(tiny_encoder, task_dir, tmp_path,
                                                                                      capsys, monkeypatch):
    """A resumed run's phase-end export written over the folder during an evaluation: the runs after it fine-tuned
    the new weights under the earlier files' key, and results.json named the new weights as those evaluated."""
    import cpt_lightning.evaluate.cli as evaluate_cli

    model = tmp_path / "model"
    shutil.copytree(tiny_encoder, model)
    fine_tune = evaluate_cli.finetune

    def fine_tune_then_export_over_it(model_name, *args):
        scores = fine_tune(model_name, *args)
        weights = ModernBertForMaskedLM.from_pretrained(model)
        torch.nn.init.normal_(weights.model.embeddings.tok_embeddings.weight)
        weights.save_pretrained(model)
        return scores

    monkeypatch.setattr(evaluate_cli, "finetune", fine_tune_then_export_over_it)
    out = tmp_path / "eval"
    assert main(["--tasks", str(task_dir), "--models", str(model), "--seeds", "2", "--out", str(out)]) == 2
    assert "changed while it was being evaluated" in capsys.readouterr().err
    assert not (out / "runs.jsonl").exists() and not (out / "results.json").exists()


def test_table_leaves_averages_blank_when_runs_are_missing():
    results = {
        "seeds": [0, 1],
        "tasks": {"a": {"type": "ner", "family": "F", "metric": "entity_f1"},
                  "b": {"type": "ner", "family": "F", "metric": "entity_f1"}},
        "models": {"m": {"context": 512}},
        "runs": [{"model": "m", "task": "a", "seed": 0, "test_f1": 50.0}, {"model": "m", "task": "a", "seed": 1, "test_f1": 70.0},
                 {"model": "m", "task": "b", "seed": 0, "test_f1": 40.0}],
    }
    row = summarize(results)["m"]
    assert row["tasks"]["a"] == pytest.approx((60.0, 14.142135623730951)) and row["tasks"]["b"] == (40.0, None)
    assert row["families"]["F"] is None and row["average"] is None
    assert markdown_table(results).splitlines()[2] == "| `m` | 512 | 60.0 ± 14.1 | 40.0 | — | — |"


def _one_score_each(seeds: list[int]) -> dict:
    tasks = {name: {"type": "ner", "family": family, "metric": "entity_f1"} for name, family in
             (("a", "F1"), ("b", "F2"), ("c", "F1"))}
    return {"seeds": seeds, "tasks": tasks, "models": {"m": {"context": 512}},
            "runs": [{"model": "m", "task": t, "seed": s, "test_f1": 50.0} for t in tasks for s in seeds]}


def test_table_columns_are_grouped_by_family_whatever_the_task_order():
    assert markdown_table(_one_score_each([0])).splitlines()[0] == "| Model | Context | a | c | b | F1 avg | F2 avg | Avg |"


def test_the_legend_names_the_seeds_and_their_count():
    assert "mean ± std over 1 fine-tuning seed (0);" in legend(_one_score_each([0]))
    assert "mean ± std over 3 fine-tuning seeds (0, 1, 2);" in legend(_one_score_each([0, 1, 2]))


def test_a_bad_line_in_any_task_stops_before_anything_is_fine_tuned(tmp_path, task_dir, tiny_encoder, capsys, monkeypatch):
    """Task data was read task by task inside the model loop: a bad line in the last task's test file
    surfaced only after the tasks before it had been fine-tuned (hours on a GPU), as the docs denied."""
    import cpt_lightning.evaluate.cli as evaluate_cli

    tasks = shutil.copytree(task_dir, tmp_path / "tasks")
    with (tasks / "multi_test.jsonl").open("a") as f:
        f.write('{"text": "a", "labels": "Mice"}\n')
    fine_tuned = []
    monkeypatch.setattr(evaluate_cli, "finetune", lambda *args, **kwargs: fine_tuned.append(args))
    assert main(["--tasks", str(tasks), "--models", tiny_encoder, "--seeds", "1", "--out", str(tmp_path / "out")]) == 2
    assert "multi_test.jsonl" in capsys.readouterr().err and fine_tuned == []


def test_a_run_record_cut_short_is_dropped_and_redone(tmp_path):
    """A kill or a full disk while appending to runs.jsonl left half a line: every later cpt evaluate
    stopped on a JSONDecodeError, so the evaluation could not resume as documented."""
    from cpt_lightning.evaluate.cli import _stored_runs

    record = {"model": "m", "model_fingerprint": "f", "task": "t", "seed": 0, "fingerprint": "x", "test_f1": 50.0}
    log = tmp_path / "runs.jsonl"
    log.write_text(json.dumps(record) + "\n" + json.dumps({**record, "seed": 1})[:30])
    assert [run["seed"] for run in _stored_runs(log).values()] == [0]
    assert log.read_text() == json.dumps(record) + "\n"  # the next run is appended on a line of its own
    log.write_text("{torn\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=r"runs.jsonl:1: not a run record"):
        _stored_runs(log)
    for other in ('{"model": "m"}', "[1]"):  # JSON, but no run: a KeyError or TypeError traceback
        log.write_text(json.dumps(record) + "\n" + other + "\n")
        with pytest.raises(UserError, match=r"runs.jsonl:2: not a run record; delete that line"):
            _stored_runs(log)
    # a whole last line (a record is written with its newline) is no cut one: it was deleted without a word; and the
    # line named is the file's, blank lines counted (it said 3 for line 5)
    for text, line in ((json.dumps(record) + "\ngarbage not json\n", 2), ("\n\n" + json.dumps(record) + "\n\n[1]\n", 5)):
        log.write_text(text)
        with pytest.raises(UserError, match=rf"runs.jsonl:{line}: not a run record; delete that line"):
            _stored_runs(log)
        assert log.read_text() == text


def test_model_folders_that_cannot_be_fine_tuned_are_one_line(tmp_path, tiny_encoder, task_dir, capsys):
    """A folder without weights, or whose tokenizer outgrew the embeddings, ended in a traceback (the
    second mid-fine-tuning, on an embedding index out of range); so did an unknown attention kernel."""
    no_weights = shutil.copytree(tiny_encoder, tmp_path / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    grown = shutil.copytree(tiny_encoder, tmp_path / "grown")
    tokenizer = AutoTokenizer.from_pretrained(grown)
    tokenizer.add_tokens([f"newword{i}" for i in range(200)])
    tokenizer.save_pretrained(grown)
    swapped = shutil.copytree(tiny_encoder, tmp_path / "swapped")  # another tokenizer saved over it: fine-tuned as is
    config = json.loads((swapped / "config.json").read_text())
    (swapped / "config.json").write_text(json.dumps({**config, "sep_token_id": 3}))  # as its ids read the rows
    for model, message in ((no_weights, "no weights"), (grown, "tokenizer has"),
                           (swapped, f"its tokenizer's special-token ids differ from its config.json's (sep "
                                     f"{config['sep_token_id']} vs 3): it is not the tokenizer the model trained with")):
        assert main(["--tasks", str(task_dir), "--models", str(model), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, "--attn-implementation", "flash_attention_2",
                 "--device", "cpu"]) == 2  # an ImportError traceback when the first fine-tuning began
    err = capsys.readouterr().err
    assert err.startswith("error: --attn-implementation flash_attention_2 needs a CUDA device") and err.count("\n") == 1
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, "--attn-implementation", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --attn-implementation: invalid choice: 'bogus'") and err.count("\n") == 1, err


def test_a_slow_tokenizer_is_refused_before_any_fine_tuning_when_a_task_is_ner(
    tmp_path, tiny_encoder, task_dir, capsys, monkeypatch
):
    """NER aligns tags by character offsets, which only a fast tokenizer gives: the check ran when the loop
    reached the NER task, after every earlier task of the model had been fine-tuned. (transformers 5 builds a
    ModernBERT folder's tokenizer fast whatever its files, so the folder's loader hands over a slow one here.)"""
    from transformers import ByT5Tokenizer  # a tokenizer transformers has only in Python

    from cpt_lightning.evaluate import cli

    monkeypatch.setattr(cli, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda name: ByT5Tokenizer()))
    monkeypatch.setattr(cli, "differing_ids", lambda tokenizer, expected: [])  # ByT5's ids are not the folder's
    cli.check_model(tiny_encoder, tags_words=False)  # classification reads no offsets
    assert main(["--tasks", str(task_dir), "--models", tiny_encoder, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "NER needs a fast tokenizer" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "runs.jsonl").exists()


def test_results_record_each_models_context_and_pooling_and_each_tasks_left_out_labels(
        tiny_encoder, task_dir, tmp_path, monkeypatch):
    """Tokenization only (fine-tuning stubbed): each run records its task's max_length, the table the longest. With
    NER beside sequence tasks, the model's classification pooling is recorded, and a task's negative labels too (the
    legend and the exported card say what its F1 leaves out)."""
    import cpt_lightning.evaluate.cli as evaluate_cli

    tasks = evaluate_cli.load_tasks([str(task_dir)])  # chem, pubtype, topics
    tasks = [dataclasses.replace(t, max_length=n) for t, n in zip(tasks, (64, 256, 128))]
    tasks[1] = dataclasses.replace(tasks[1], negative_labels=("review",))
    monkeypatch.setattr(evaluate_cli, "finetune", lambda *args: {"dev_f1": 50.0, "test_f1": 50.0, "best_epoch": 1, "seconds": 0.0})
    results = evaluate_cli.evaluate(tasks, [tiny_encoder], 1, tmp_path / "out", torch.device("cpu"), "sdpa")
    assert {r["task"]: r["max_length"] for r in results["runs"]} == {"chem": 64, "pubtype": 256, "topics": 128}
    assert results["models"][tiny_encoder]["context"] == 256
    assert results["models"][tiny_encoder]["classifier_pooling"] in ("mean", "cls")
    assert [t.get("negative_labels") for t in results["tasks"].values()] == [None, ["review"], None]
    assert "comparison" not in results  # one model: nothing to compare with


def test_bert_and_roberta_baselines_fine_tune_on_inputs_longer_than_their_context(tokenizer_dir, tmp_path, capsys):
    """Baselines of other families, saved from their masked-LM class: BERT's has no pooler, which its sequence
    classifier adds (a new head, refused as a random encoder after the models before it had run); RoBERTa's
    config says 514 positions for 512 tokens (its positions start after the padding id; 513 tokens and more
    ended in an index error mid-fine-tuning)."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2)
    torch.manual_seed(0)
    for name, model in (("bert", BertForMaskedLM(BertConfig(**sizes, max_position_embeddings=512))),
                        ("roberta", RobertaForMaskedLM(RobertaConfig(**sizes, max_position_embeddings=514,
                                                                     pad_token_id=1)))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    long_text = " ".join(["the patient improved"] * 300)  # 902 tokens
    for split in ("train", "test"):
        _write_jsonl(tmp_path / f"{split}.jsonl", [{"text": long_text, "label": "a"}, {"text": split, "label": "b"}])
    (tmp_path / "long.yaml").write_text("name: long\ntype: classification\nfamily: X\ntrain: train.jsonl\n"
                                        "test: test.jsonl\nepochs: 1\n")
    models = [str(tmp_path / "bert"), str(tmp_path / "roberta")]
    assert main(["--tasks", str(tmp_path / "long.yaml"), "--models", *models, "--seeds", "1", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {run["model"]: run["max_length"] for run in results["runs"]} == dict(zip(models, (512, 512)))


def test_a_baseline_saved_without_its_mlm_head_is_checked_by_its_own_familys_names(tokenizer_dir, tmp_path, capsys):
    """A BertModel folder lacks ``cls.*``, BERT's MLM head, which fine-tuning never uses: it was refused as
    "a random encoder" (only ModernBERT's head names were allowed missing). An encoder layer missing still is."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    from cpt_lightning.evaluate.cli import check_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    check_model(str(tmp_path / "bert"))
    assert "no MLM head" not in capsys.readouterr().err  # the ModernBERT note: BERT's task head does not use it
    weights = load_file(tmp_path / "bert" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, tmp_path / "bert" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"weights are missing from its files \(e\.g\. 'bert\.encoder\.layer\.1\."):
        check_model(str(tmp_path / "bert"))


@pytest.mark.parametrize("family", ["distilbert", "albert"])
def test_baselines_whose_task_heads_hold_more_than_a_classifier_load_for_ner_and_classification(
    family, tokenizer_dir, task_dir, tmp_path
):
    """DistilBERT's sequence classifier adds ``pre_classifier``, ALBERT's a pooler its masked-LM class lacks: a
    list of head names written for BERT and ModernBERT refused them as random encoders, after the models before
    them had been fine-tuned. The new heads come from the task class itself; the encoder is the folder's."""
    from transformers import AlbertConfig, AlbertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if family == "distilbert":
        saved = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, hidden_dim=64, n_layers=1,
                                                       n_heads=2))
    else:
        saved = AlbertForMaskedLM(AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=32,
                                               intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    saved.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    for task in ("chem", "pubtype"):
        loaded = load_model(str(tmp_path / family), prepare(load_task(task_dir / f"{task}.yaml"), str(tmp_path / family)),
                            "sdpa")
        assert torch.equal(loaded.base_model.embeddings.word_embeddings.weight,
                           saved.base_model.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("train_labels, test_labels", [([0.0, 1.0], [0, 1]), (["0", "1"], [0.0, 1.0])])
def test_a_whole_number_label_is_one_class_however_written(tmp_path, train_labels, test_labels):
    """pandas writes 1.0 where another split holds 1: "1.0" was a class of its own, and "0.0" scored as positive
    beside negative_labels ["0"]."""
    _write_jsonl(tmp_path / "t.jsonl", [{"text": f"t{i}", "label": label} for i, label in enumerate(train_labels)])
    _write_jsonl(tmp_path / "u.jsonl", [{"text": f"u{i}", "label": label} for i, label in enumerate(test_labels)])
    (tmp_path / "t.yaml").write_text("name: t\ntype: classification\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\n"
                                     "metric: micro_f1\nnegative_labels: [0.0]\n")
    task = load_task(tmp_path / "t.yaml")
    splits = read_splits(task)
    assert task.negative_labels == ("0",)
    assert [ex.labels for ex in splits["train"] + splits["test"]] == [frozenset("0"), frozenset("1")] * 2


@pytest.mark.parametrize("label, message", [(float("nan"), "label nan is not a class"), ("  ", "an empty label"),
                                            (2.7, "label 2.7 is a fraction, not a class: cpt evaluate classifies")])
def test_an_empty_nan_or_fractional_label_is_refused_by_line(tmp_path, label, message):
    """A fraction (a similarity score) made each value a class of its own, scored F1 0 with only a warning."""
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": label}])
    _write_jsonl(tmp_path / "u.jsonl", [{"text": "c", "label": "x"}])
    (tmp_path / "t.yaml").write_text("name: t\ntype: classification\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\n")
    with pytest.raises(UserError, match=f"t.jsonl:2: {message}"):
        read_splits(load_task(tmp_path / "t.yaml"))


def test_labels_train_never_shows_are_warned_of(tmp_path, capsys):
    """A test class the model never saw (often a case slip: "Chemical" / "chemical") read as a weak model."""
    (tmp_path / "t.conll").write_text("Aspirin B-Chemical\nfever B-Disease\n")
    (tmp_path / "d.conll").write_text("Heparin B-Chemical\n")
    (tmp_path / "u.conll").write_text("Insulin B-chemical\n")
    (tmp_path / "t.yaml").write_text("name: t\ntype: ner\nfamily: F\ntrain: t.conll\ndev: d.conll\ntest: u.conll\n")
    read_splits(load_task(tmp_path / "t.yaml"))
    assert capsys.readouterr().err == ("warning: task 't': test holds ['chemical']: entity types train never shows, "
                                       "so never learnt\n")
    (tmp_path / "d.conll").write_text("Heparin B-chemical\n")  # the dev split too: it selects the epoch
    read_splits(load_task(tmp_path / "t.yaml"))
    assert capsys.readouterr().err == ("warning: task 't': dev holds ['chemical']; test holds ['chemical']: entity "
                                       "types train never shows, so never learnt\n")


@pytest.mark.parametrize("suffix, mark", [(".json", b""), (".ndjson", b""), (".json", codecs.BOM_UTF8)],
                         ids=["json", "ndjson", "json-with-a-byte-order-mark"])
def test_a_jsonl_file_under_another_suffix_is_read_as_jsonl(tmp_path, suffix, mark):
    """Read as CoNLL, it failed with "tag '"O"]}' is not BIO", or "CoNLL files hold BIO tags" for a classifier."""
    for split in ("t", "u"):
        line = json.dumps({"tokens": [split, "b"], "tags": ["B-X", "O"]})
        (tmp_path / f"{split}{suffix}").write_bytes(mark + line.encode() + b"\n")
    (tmp_path / "t.yaml").write_text(f"name: t\ntype: ner\nfamily: F\ntrain: t{suffix}\ntest: u{suffix}\n")
    task = load_task(tmp_path / "t.yaml")
    assert task.format == "jsonl" and read_splits(task)["test"][0].tags == ("B-X", "O")


def test_a_conll_file_whose_first_token_is_a_brace_is_read_as_conll(tmp_path):
    """Its first line looked like JSON: "invalid JSON (Expecting property name ...)"."""
    for split in ("t", "u"):
        (tmp_path / f"{split}.CONLL").write_text(f"{{\tO\nIL-{split}\tB-Gene\n")  # the suffix in any case
    (tmp_path / "t.yaml").write_text("name: t\ntype: ner\nfamily: F\ntrain: t.CONLL\ntest: u.CONLL\n")
    assert read_splits(load_task(tmp_path / "t.yaml"))["test"][0].tokens == ("{", "IL-u")


def test_ner_words_cut_by_max_length_are_counted_in_a_warning(tiny_encoder, tmp_path):
    """Past max_length, words are predicted O: a document without sentence breaks lost most of its entities
    from the recall without a word."""
    words = ["treatment", "aspirin"] * 60
    tags = ["O", "B-Chemical"] * 60
    _write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["aspirin"], "tags": ["B-Chemical"]}])
    _write_jsonl(tmp_path / "u.jsonl", [{"tokens": words, "tags": tags}])
    (tmp_path / "t.yaml").write_text("name: t\ntype: ner\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\nmax_length: 42\n")
    prepared = prepare(load_task(tmp_path / "t.yaml"), tiny_encoder)
    cut = sum(position < 0 for position in prepared.encoded["test"][0].first_subtoken)
    assert 0 < cut < 120
    assert truncation_note(prepared) == (f"task 't': max_length 42 cuts {cut} of 120 test words ({cut // 2} of 60 gold "
                                         "entities), predicted O; split long sentences, or raise the task's max_length "
                                         "where the model's context allows")
    (tmp_path / "u.jsonl").write_text((tmp_path / "t.jsonl").read_text().replace("aspirin", "heparin"))
    assert truncation_note(prepare(load_task(tmp_path / "t.yaml"), tiny_encoder)) is None


@pytest.mark.parametrize("task_type", ["classification", "multilabel"])
def test_text_inputs_cut_by_max_length_are_counted_in_a_warning(tiny_encoder, tmp_path, task_type):
    """A classification task's long texts were cut to max_length without a word (only NER's cut was said)."""
    def text(words):  # " treatment" is one token: [CLS] + words + [SEP]
        return " ".join(["treatment"] * words)

    def row(words, name):
        return {"text": text(words), "labels": [name]} if task_type == "multilabel" else {"text": text(words), "label": name}

    _write_jsonl(tmp_path / "t.jsonl", [row(30, "a"), row(1, "b")])
    _write_jsonl(tmp_path / "d.jsonl", [row(10, "a"), row(11, "b")])
    _write_jsonl(tmp_path / "u.jsonl", [row(30, "a")] * 3 + [row(1, "b")])
    (tmp_path / "t.yaml").write_text(f"name: t\ntype: {task_type}\nfamily: F\ntrain: t.jsonl\ndev: d.jsonl\n"
                                     "test: u.jsonl\nmax_length: 12\n")
    prepared = prepare(load_task(tmp_path / "t.yaml"), tiny_encoder)
    assert [example.cut for example in prepared.encoded["dev"]] == [False, True]  # 12 tokens fit; 13 do not
    assert truncation_note(prepared) == ("task 't': max_length 12 cuts 1 of 2 dev texts and 3 of 4 test texts, of "
                                         "which the model sees only the start; raise the task's max_length where the "
                                         "model's context allows")
    (tmp_path / "t.yaml").write_text((tmp_path / "t.yaml").read_text().replace("max_length: 12", "max_length: 32"))
    assert truncation_note(prepare(load_task(tmp_path / "t.yaml"), tiny_encoder)) is None


def test_the_truncation_warning_is_said_again_when_stored_runs_are_reused(tiny_encoder, tmp_path, capsys):
    """It was said only by the command that fine-tuned: a rerun printed the same table without it."""
    _write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["aspirin"], "tags": ["B-Chemical"]}])
    _write_jsonl(tmp_path / "u.jsonl", [{"tokens": ["treatment", "aspirin"] * 60, "tags": ["O", "B-Chemical"] * 60}])
    (tmp_path / "t.yaml").write_text("name: t\ntype: ner\nfamily: F\ntrain: t.jsonl\ntest: u.jsonl\nmax_length: 42\n"
                                     "epochs: 1\n")
    said = []
    for _ in range(2):
        assert main(["--tasks", str(tmp_path / "t.yaml"), "--models", tiny_encoder, "--seeds", "2",
                     "--out", str(tmp_path / "eval")]) == 0
        said.append([line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")])
    assert len(said[0]) == 1 and "max_length 42 cuts" in said[0][0] and said[1] == said[0]
    assert "- **t** (F): ner, entity-level micro F1 (BIO), inputs cut at max_length 42 (or a shorter model context)" in \
        (tmp_path / "eval" / "results.md").read_text().splitlines()


def test_a_task_folder_reads_yml_files_too(tmp_path):
    """A ``.yml`` task in a folder was left out without a word, and the averages computed without it."""
    from cpt_lightning.evaluate.tasks import find_task_files

    for name in ("ner.yml", "cls.yaml", "notes.txt"):
        (tmp_path / name).write_text("")
    assert find_task_files([str(tmp_path)]) == [tmp_path / "cls.yaml", tmp_path / "ner.yml"]
    (tmp_path / "empty").mkdir()  # a folder of nothing to run: the averages would be over the other folders alone
    with pytest.raises(UserError, match="empty: no task"):
        find_task_files([str(tmp_path), str(tmp_path / "empty")])


def test_a_word_the_tokenizer_drops_is_predicted_o_whatever_the_logits():
    """A word no token stands for (NO_TOKEN) reads "O", not the logits of another position (index -2: padding or
    [SEP]), which made a spurious entity."""
    dropped = Encoded([0, 1, 1, 1], [IGNORE, 1, IGNORE, IGNORE], first_subtoken=[1, NO_TOKEN, CUT])
    prepared = _prepared("ner", ["O", "B-X", "I-X"], {"test": [(dropped, ("B-X", "O", "O"))]})
    model = TableModel(ONE_HOT, token_level=True)
    assert predict(model, prepared, "test", CPU) == [("B-X", "O", "O")]
    assert score(model, prepared, "test", CPU) == 1.0


def test_without_a_dev_split_the_last_epoch_is_scored_and_reported(monkeypatch):
    from cpt_lightning.evaluate import finetune as finetune_module

    monkeypatch.setattr(finetune_module, "load_model", lambda *args: TableModel(ID_MOD_3, token_level=False))
    prepared = _prepared("classification", ["a", "b", "c"], {"train": _train_split(4), "test": _train_split(2)},
                         epochs=3, lr=0.1)
    result = finetune("stand-in", prepared, 0, CPU)
    assert (result["best_epoch"], result["dev_f1"]) == (3, None)


@pytest.mark.parametrize("tag", ["B-", "I-", "B", "b-Chem"])
def test_a_tag_without_a_type_is_not_bio(tmp_path, tag):
    """"B-" passed as BIO: an entity of type "" was trained and scored."""
    path = tmp_path / "x.conll"
    path.write_text(f"Aspirin {tag}\n")
    with pytest.raises(UserError, match=rf"x\.conll:1: tag '{tag}' is not BIO \(O, B-TYPE, I-TYPE\)$"):
        read_conll(path)


def test_a_conll_line_with_a_column_after_its_tag_says_which_column_is_the_tag(tmp_path):
    """An ID column after the tags said only "tag 'MESH:D1' is not BIO", though the line shows a BIO tag."""
    path = tmp_path / "x.conll"
    path.write_text("Aspirin B-Chemical MESH:D001241\n")
    with pytest.raises(UserError, match=r"x\.conll:1: tag 'MESH:D001241' is not BIO \(O, B-TYPE, I-TYPE\); the tag "
                                        r"is a line's last column, of 3 here$"):
        read_conll(path)


def test_a_token_of_the_space_before_a_word_is_not_its_first_subtoken():
    """SentencePiece-style (Metaspace) tokenizers emit "▁" alone before a piece they cannot join to it; its offsets
    (2, 3) end where the word starts: the word's tag belongs on "cd", not on the space."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"<unk>": 0, "▁ab": 1, "▁": 2, "cd": 3}, unk_token="<unk>",
                                         continuing_subword_prefix=""))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)  # "ab cd" → ▁ab ▁ cd
    enc = encode_tagged(tokenizer, TaggedExample(("ab", "cd"), ("O", "B-X")), {"O": 0, "B-X": 1, "I-X": 2}, 64)
    assert enc.first_subtoken == [0, 2] and enc.target == [0, IGNORE, 1]
