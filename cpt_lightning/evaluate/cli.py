"""``cpt evaluate``: fine-tune encoders on declared tasks over N seeds and write the F1 tables.

Outputs in ``--out``: ``runs.jsonl`` (one line per model × task × seed, appended as each run
finishes, so an interrupted evaluation resumes where it stopped), ``results.json`` (tasks,
models, seeds and every run: the input of ``cpt export --eval-results``) and ``results.md``.
With two or more models both also hold the comparison with the first model: per-task mean-F1
differences and a sign test over tasks (``cpt_lightning.evaluate.compare``). A progress bar
(stderr) counts the model × task × seed runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from cpt_lightning.atomic import check_output_folder, write_beside
from cpt_lightning.attention import flash_attn_installed
from cpt_lightning.devices import resolve_device
from cpt_lightning.errors import ArgumentParser, UserError, command, one_line, tokenizer_load_reason
from cpt_lightning.evaluate.compare import compare, comparison_table
from cpt_lightning.evaluate.data import read_splits
from cpt_lightning.evaluate.finetune import RANDOM_ENCODER, finetune, prepare, truncation_note
from cpt_lightning.evaluate.report import legend, markdown_table, mixed_pooling_note
from cpt_lightning.evaluate.tasks import Task, find_task_files, load_task
from cpt_lightning.model_loading import config_special_ids, differing_ids
from cpt_lightning.model_names import is_local_path
from cpt_lightning.pretrained import from_pretrained_missing, mlm_head, tokenizer_size
from cpt_lightning.weights_digest import update_with_file, weights_digest


WEIGHT_SUFFIXES = (".safetensors", ".bin")  # a model folder's weight files, sharded or not


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="cpt evaluate",
        description="Fine-tune HF encoders on NER / classification tasks and report F1 (mean ± std over seeds). "
        "`cpt evaluate build-pubmed-tasks --help` builds the offline PubMed tasks.",
    )
    parser.add_argument("--tasks", nargs="+", required=True, help="task YAML files or folders of them")
    parser.add_argument("--models", nargs="+", required=True, help="HF model folders or names")
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds 0..N-1 (default 5)")
    parser.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="sdpa (default), eager, flash_attention_2")
    parser.add_argument("--classifier-pooling", default="model", choices=["model", "mean", "cls"],
                        help="how a ModernBERT's classification head pools the sequence: model (default: as each "
                        "folder's config.json says; transformers' default is cls, the hub ModernBERTs say mean), "
                        "or mean or cls for every model, so that a comparison compares encoders, not heads")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


def load_tasks(paths: list[str]) -> list[Task]:
    tasks = [load_task(f) for f in find_task_files(paths)]
    names = [t.name for t in tasks]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(f"task names must be unique; repeated: {duplicates}")
    return tasks


def check_model(name: str, tags_words: bool = False) -> None:
    """What fine-tuning needs, checked before any run: a config, a tokenizer whose ids all have an
    embedding row (and character offsets where an NER task ``tags_words``), weight files holding the whole
    encoder (a model without its MLM head is noted, not refused)."""
    path = Path(name)
    if path.suffix == ".ckpt":  # a file, or a sharded checkpoint's folder
        raise UserError(f"model {name!r} is a training checkpoint: export it first (cpt export {name} OUT_DIR) "
                        "and evaluate OUT_DIR")
    if not path.exists() and is_local_path(name):
        raise UserError(f"model {name!r}: no such folder")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"model {name!r}: not a Hugging Face model folder or reachable name ({one_line(err)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"model {name!r}: cannot load its tokenizer ({tokenizer_load_reason(name, err)})") from None
    if path.is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise UserError(f"model {name!r}: no weights in the folder (model.safetensors); export it again")
    if (needed := tokenizer_size(tokenizer)) > config.vocab_size:
        raise UserError(f"model {name!r}: its tokenizer has ids up to {needed - 1} but the embeddings hold "
                        f"{config.vocab_size}: use the tokenizer the model was trained with")
    # another tokenizer saved over an export (a baseline of another family keeps its hub config as it is)
    if config.model_type == "modernbert" and (differing := differing_ids(tokenizer, config_special_ids(config))):
        raise UserError(f"model {name!r}: its tokenizer's special-token ids differ from its config.json's "
                        f"({'; '.join(differing)}): it is not the tokenizer the model trained with; export it again")
    if tags_words and not tokenizer.is_fast:  # NER aligns word tags to tokens by their character offsets
        raise UserError(f"model {name!r}: NER needs a fast tokenizer (tokenizer.json, for character offsets); "
                        "this folder's tokenizer is a slow one: save it with a fast tokenizer, or leave out the NER tasks")
    try:
        _, lacking = from_pretrained_missing(AutoModelForMaskedLM, name, RANDOM_ENCODER, mlm_head(config))
    except UserError:  # a ValueError too: it names the missing weights already
        raise
    except (OSError, ValueError) as err:
        raise UserError(f"model {name!r}: its weights do not load ({one_line(err)})") from None
    if any(key.startswith("head.") for key in lacking):
        print(f"note: model {name!r} has no MLM head (a folder saved as ModernBertModel): the dense + norm before its "
              "task heads start random, where a model saved with its MLM head starts them from it", file=sys.stderr)


def check_models_distinct(models: list[str]) -> None:
    """The same model twice (also as ``m`` and ``m/``) was fine-tuned twice and compared with itself."""
    seen: dict[str, str] = {}
    for name in models:
        key = os.path.realpath(name) if Path(name).exists() else name
        if key in seen:
            raise UserError(f"--models names {seen[key]!r} and {name!r}: the same model twice; give each model once")
        seen[key] = name


# What a fine-tuning reads of a folder besides its config and weights: a tokenizer saved over it is a new model.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "vocab.txt", "vocab.json", "merges.txt"})


def model_fingerprint(name: str, weights: str | None) -> str:
    """A local folder's config, weight and tokenizer files by content (safetensors weights by their tensors,
    ``weights``: its ``weights_digest``, which results.json records too): a folder re-exported with other weights or
    another tokenizer is a new model, a copy of a folder the same one.

    Not by size and modification time: two models of one architecture have files of equal sizes, and copied with
    equal times (an archive's fixed times) the second was served the first one's stored scores. A hub name is taken
    as it is. The card (README.md) is left out, so adding results to it changes nothing. Stored runs are found by
    it, not by the path the folder is named by (``m``, ``m/``, from another directory).
    """
    folder = Path(name)
    if not folder.is_dir():
        return name
    digest = hashlib.sha256(json.dumps(["safetensors", weights]).encode())
    files = sorted(p for p in folder.iterdir() if p.name in ("config.json", *TOKENIZER_FILES)
                   or p.suffix in (".bin", ".model"))  # .model: a SentencePiece vocabulary
    for path in files:
        digest.update(json.dumps([path.name, path.stat().st_size]).encode())
        update_with_file(digest, path)
    return digest.hexdigest()[:16]


def check_unchanged(model: str, fingerprint: str) -> None:
    """A folder written over while it is evaluated (a resumed run's phase-end export) would mix two models' runs
    under one name, and results.json would name weights the runs did not all fine-tune."""
    if model_fingerprint(model, weights_digest(model)) != fingerprint:
        raise UserError(f"{model}: its config, weight or tokenizer files changed while it was being evaluated (an "
                        "export written over it?); run cpt evaluate again once it is complete: the runs stored so far "
                        "stay with the earlier files, and the new weights are evaluated afresh")


def _stored_runs(path: Path) -> dict[tuple, dict]:
    """The runs already done. A last line cut short (a kill or a full disk while appending: a record is written with
    its newline, so a cut one has none) is dropped, and the file mended so the next record starts a line of its own;
    its run is redone. Any other line that is no run record is refused by its line number in the file."""
    if not path.is_file():
        return {}
    text = path.read_text()
    numbered = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if numbered and not text.endswith("\n"):
        try:
            json.loads(numbered[-1][1])
        except json.JSONDecodeError:
            numbered.pop()  # the last line, cut short
    runs = []
    for number, line in numbered:
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            run = None
        if not isinstance(run, dict) or not RUN_KEYS <= run.keys():  # JSON but not ours too: it was a KeyError
            raise UserError(f"{path}:{number}: not a run record; delete that line (its run is then redone)")
        runs.append(run)
    mended = "".join(line + "\n" for _, line in numbered)
    if text != mended:  # whole or as before: a kill while mending in place lost every stored run
        write_beside(path, lambda partial: partial.write_text(mended), "evaluation runs.jsonl")
    return {_run_key(r): r for r in runs}


def left_out_of(earlier: Path, results: dict) -> str | None:
    """The models and tasks an earlier ``results.json`` in the same ``--out`` listed that ``results`` does not: it is
    replaced by this command's, which dropped them from the table without a word. A model is known by its weights
    where they have a digest, as its stored runs are: one named by another path (absolute, ``m/``) is not left out."""
    try:
        before = json.loads(earlier.read_text())
        weights = {model["weights"] for model in results["models"].values()} - {None}
        gone = {"models": [name for name, model in before["models"].items()
                           if name not in results["models"] and model.get("weights") not in weights],
                "tasks": [name for name in before["tasks"] if name not in results["tasks"]]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # none, or not one cpt evaluate wrote
    said = [f"{kind} {', '.join(map(str, names))}" for kind, names in gone.items() if names]
    return " and ".join(said) or None


RUN_KEYS = {"model", "task", "seed", "fingerprint"}  # what every stored run holds (_run_key)


def _run_key(run: dict) -> tuple:
    """What a stored run must share to serve again: weights (a hub name: the name), task, seed, task settings and
    fine-tuning setup; not the path the model was named by."""
    return (run.get("model_fingerprint") or run["model"], run["task"], run["seed"], run["fingerprint"],
            json.dumps(run.get("setup"), sort_keys=True))


def run_setup(task: Task, device: torch.device, attn: str, pooling: str | None) -> dict:
    """How a run is fine-tuned besides its task and weights, stored with it: a rerun on another device kind (bf16
    autocast on CUDA), with another attention kernel or, for a sequence task, another pooling is fine-tuned afresh
    rather than served the scores stored under the first."""
    setup = {"device": device.type, "attn_implementation": attn}
    if task.type != "ner":
        setup["classifier_pooling"] = pooling or "model"
    return setup


def sequence_pooling(model: str, pooling: str | None) -> str | None:
    """How the model's sequence-classification head pools: ModernBERT reads ``classifier_pooling`` from its config
    (transformers' default cls: a model built from a ``model_config``; the hub ModernBERTs and the models continued
    from them: mean). None for a family without the setting (BERT pools through its pooler)."""
    own = getattr(AutoConfig.from_pretrained(model), "classifier_pooling", None)
    return (pooling or own) if own else None


def evaluate(tasks: list[Task], models: list[str], seeds: int, out: Path, device: torch.device, attn: str,
             pooling: str | None = None) -> dict:
    """Every model × task × seed (reusing stored runs of identical tasks, weights and setup); returns the results
    dict. ``pooling``: mean or cls for every model's sequence-classification head (None: each model's own)."""
    check_models_distinct(models)
    check_output_folder(out, "--out")
    for model in models:
        check_model(model, tags_words=any(task.type == "ner" for task in tasks))
    # every split read once, before any model is fine-tuned: a bad line anywhere is named first
    examples = {task.name: read_splits(task) for task in tasks}
    fingerprints = {task.name: task.fingerprint() for task in tasks}  # of the files as read, hashed once
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    stored = _stored_runs(log)
    runs, digests, total = [], {}, len(models) * len(tasks) * seeds
    # no bar where stderr is not a terminal (a batch job's log: its redraws piled up on one line); each run's line
    # says how far the command is
    with tqdm(total=total, desc="cpt evaluate", unit="run", file=sys.stderr, dynamic_ncols=True, disable=None) as bar:
        for model in models:
            digests[model] = weights_digest(model)  # None for a hub name or a folder of .bin files
            weights = model_fingerprint(model, digests[model])  # so the digest is of the files the runs are stored under
            for task in tasks:
                prepared, cut, warned = None, None, False
                for seed in range(seeds):
                    bar.set_postfix_str(f"{Path(model).name} · {task.name} · seed {seed}", refresh=True)
                    run = {"model": model, "model_fingerprint": weights, "task": task.name, "seed": seed,
                           "fingerprint": fingerprints[task.name], "setup": run_setup(task, device, attn, pooling)}
                    key = _run_key(run)
                    if key not in stored:
                        if prepared is None:
                            prepared = prepare(task, model, examples[task.name])
                            cut = truncation_note(prepared)
                        record = {**run, "max_length": prepared.max_length, **({"truncation": cut} if cut else {}),
                                  **finetune(model, prepared, seed, device, attn, pooling)}
                        check_unchanged(model, weights)  # the run fine-tuned those files
                        with log.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                        stored[key] = record
                        bar.write(f"[{model}] {task.name} seed {seed}: test F1 {record['test_f1']:.1f} "
                                  f"({record['seconds']}s; run {len(runs) + 1} of {total})", file=sys.stdout)
                    if not warned and (note := stored[key].get("truncation")):  # said again when runs are reused
                        bar.write(f"warning: [{model}] {note}", file=sys.stderr)
                        warned = True
                    runs.append({**stored[key], "model": model})  # as named in this command's tables
                    bar.update()
    sequence_tasks = any(task.type != "ner" for task in tasks)
    results = {
        "seeds": list(range(seeds)),
        "tasks": {t.name: {"type": t.type, "family": t.family, "metric": t.metric,
                           **({"negative_labels": list(t.negative_labels)} if t.negative_labels else {}),
                           **({"max_length": t.max_length} if t.max_length else {})} for t in tasks},
        # "weights": which row cpt export --eval-results puts on a card as the model it exports
        "models": {m: {"context": max(r["max_length"] for r in runs if r["model"] == m), "weights": digests[m],
                       **({"classifier_pooling": sequence_pooling(m, pooling)} if sequence_tasks else {})}
                   for m in models},
        "runs": runs,
    }
    if len(models) > 1:
        results["comparison"] = compare(results)
    return results


@command
def main(argv: list[str]) -> int:
    if argv and argv[0] == "build-pubmed-tasks":
        from cpt_lightning.evaluate.pubmed_tasks import main as build_pubmed_tasks

        return build_pubmed_tasks(argv[1:])
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.attn_implementation == "flash_attention_2" and not (device.type == "cuda" and flash_attn_installed()):
        raise UserError("--attn-implementation flash_attention_2 needs a CUDA device and the flash-attn package "
                        "(pip install 'cpt-lightning[gpu]'); use sdpa")  # it failed when the first fine-tuning began
    tasks = load_tasks(args.tasks)
    pooling = None if args.classifier_pooling == "model" else args.classifier_pooling
    results = evaluate(tasks, args.models, args.seeds, Path(args.out), device, args.attn_implementation, pooling)
    if mixed := mixed_pooling_note(results):
        print(f"warning: {mixed}", file=sys.stderr)
    out = Path(args.out)
    if left_out := left_out_of(out / "results.json", results):
        print(f"warning: {out / 'results.json'} listed {left_out} too, which this command's table leaves out (their runs "
              "stay in runs.jsonl: name them again, with the others, to list them all)", file=sys.stderr)
    table = markdown_table(results) + "\n\n" + legend(results) + "\n"
    if len(results["models"]) > 1:
        table += "\n## Comparison with `" + next(iter(results["models"])) + "`\n\n" + comparison_table(results) + "\n"
    # whole or as before: cpt export --eval-results reads the JSON (a full disk cut it short, and the next export
    # failed on it); runs.jsonl, which the rerun rebuilds both from, is appended a line at a time
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", table)):
        write_beside(out / name, lambda partial, text=text: partial.write_text(text), f"evaluation {name}")
    print(table)
    return 0
