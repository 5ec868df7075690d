"""Downstream tasks declared in YAML: one task per file, checked before any model is loaded.

```yaml
name: BC5CDR            # column name in the tables
type: ner               # ner | classification | multilabel
family: BigBIO          # tasks are averaged per family, then overall
train: bc5cdr/train.conll    # relative paths: relative to this YAML file
dev: bc5cdr/dev.conll        # optional; when given, the test score is the best-dev epoch's
test: bc5cdr/test.conll
metric: entity_f1       # ner: entity_f1; classification: macro_f1 | micro_f1; multilabel: micro_f1 | macro_f1
negative_labels: []     # classification, multilabel: labels left out of the F1 ("false" in ChemProt)
max_length: 8192        # optional cap; default and upper bound: the model's context
epochs: 3
lr: 5.0e-5
```
"""

from __future__ import annotations

import codecs
import dataclasses
import filecmp
import hashlib
import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from cpt_lightning.errors import UserError, read_yaml
from cpt_lightning.weights_digest import update_with_file

METRICS = {
    "ner": ("entity_f1",),
    "classification": ("macro_f1", "micro_f1"),
    "multilabel": ("micro_f1", "macro_f1"),
}
FORMATS = ("jsonl", "conll")


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    family: str
    train: Path
    test: Path
    dev: Path | None = None
    metric: str = ""  # default: the first metric of the type
    negative_labels: tuple[str, ...] = ()  # not scored: "no relation" classes
    format: str = ""  # default: guess_format of the train file
    text_field: str = "text"
    label_field: str = ""  # default: "label" (classification), "labels" (multilabel)
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    max_length: int | None = None
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1

    @property
    def splits(self) -> dict[str, Path]:
        return {"train": self.train, **({"dev": self.dev} if self.dev else {}), "test": self.test}

    def fingerprint(self) -> str:
        """Identifies the task's settings and data files' content: stored runs are reused only for the same task,
        whatever path its files are named by (``--tasks`` relative or absolute, from any directory)."""
        settings = {k: str(v) for k, v in dataclasses.asdict(self).items()}
        settings.update({split: str(split in self.splits) for split in ("train", "dev", "test")})
        if not self.negative_labels:  # a later key: runs stored before it was added stay valid
            del settings["negative_labels"]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for path in self.splits.values():
            update_with_file(digest, path)
        return digest.hexdigest()[:16]


def label_text(value, where: str) -> str:
    """A label as the tables name it. A whole number is one class however written: a split saved by pandas holds
    1.0 where another holds 1, and "1.0" was a class apart ("0.0" scored as positive beside negative_labels [0]).
    A fraction is a regression's target: each value was a class of its own, scored F1 0 with only a warning."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{where}: label {value} is not a class; give every example its label")
        if not value.is_integer():
            raise UserError(f"{where}: label {value} is a fraction, not a class: cpt evaluate classifies (regression "
                            "is not supported); give class labels, as strings or whole numbers")
        value = int(value)
    text = str(value)
    if not text.strip():
        raise UserError(f"{where}: an empty label {value!r}; give every example its label")
    return text


def load_task(path: str | Path) -> Task:
    path = Path(path)
    raw = read_yaml(path, f"{path}: cannot read task YAML")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a task YAML is a mapping (name, type, family, train, test, ...)")
    known = {f.name for f in dataclasses.fields(Task)}
    if unknown := sorted(map(str, raw.keys() - known)):
        raise UserError(f"{path}: unknown keys {unknown}; allowed: {sorted(known)}")
    if missing := [k for k in ("name", "type", "family", "train", "test") if k not in raw]:
        raise UserError(f"{path}: missing required keys {missing}")
    for split in ("train", "test"):
        if raw[split] is None:
            raise UserError(f"{path}: {split} must name a file, got null")
    for key in ("name", "type", "family", "metric", "format", "text_field", "label_field", "tokens_field", "tags_field"):
        if key in raw and not isinstance(raw[key], str):  # a list type, a null or numeric name: tracebacks later
            raise UserError(f"{path}: {key} must be a string, got {raw[key]!r}")
    kind = raw["type"]
    if kind not in METRICS:
        raise UserError(f"{path}: type {kind!r}; choose one of {list(METRICS)}")
    raw.setdefault("metric", METRICS[kind][0])
    if raw["metric"] not in METRICS[kind]:
        raise UserError(f"{path}: metric {raw['metric']!r} is not available for {kind}; choose one of {METRICS[kind]}")
    raw.setdefault("label_field", "labels" if kind == "multilabel" else "label")
    if "negative_labels" in raw:
        negative = raw["negative_labels"]
        if (kind == "ner" and negative) or not isinstance(negative, list) \
                or any(isinstance(v, (list, dict)) or v is None for v in negative):
            raise UserError(f"{path}: negative_labels is a list of labels of a classification or multilabel task, "
                            f"got {negative!r}")
        raw["negative_labels"] = tuple(sorted({label_text(v, f"{path}: negative_labels") for v in negative}))
    for split in ("train", "dev", "test"):
        if raw.get(split) is not None:
            raw[split] = _resolve(path, raw[split], split)
    _check_distinct_splits(path, {split: raw[split] for split in ("train", "dev", "test") if raw.get(split)})
    fmt = raw.get("format") or guess_format(raw["train"])
    if fmt not in FORMATS:
        raise UserError(f"{path}: format {fmt!r}; choose one of {FORMATS}")
    if fmt == "conll" and kind != "ner":
        if raw.get("format") is None and raw["train"].suffix.lower() not in CONLL_SUFFIXES:  # guessed, not said
            raise UserError(f"{path}: {raw['train']} is not JSON lines (its first line is no JSON object), which "
                            f'type: {kind} reads: one object per line (docs/evaluation.md, "Input formats")')
        raise UserError(f"{path}: CoNLL files hold BIO tags, so only type: ner reads them; use JSONL for {kind}")
    if raw.get("format") is None:
        _check_one_format(path, raw, fmt)
    raw["format"] = fmt
    for key, low in (("epochs", 1), ("batch_size", 1), ("max_length", 8)):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise UserError(f"{path}: {key} must be an integer >= {low}, got {raw[key]!r}")
    for key in ("lr", "weight_decay", "warmup_ratio"):  # YAML reads 5e-5 (no dot) as a string
        if key in raw:
            try:
                raw[key] = float(raw[key])
            except (TypeError, ValueError):
                raise UserError(f"{path}: {key} must be a number, got {raw[key]!r}") from None
            if not math.isfinite(raw[key]):  # .nan / .inf: AdamW refuses a NaN mid-run, an inf lr trains to NaN
                raise UserError(f"{path}: {key} must be a finite number, got {raw[key]}")
    if raw.get("lr", 1.0) <= 0:
        raise UserError(f"{path}: lr must be positive, got {raw['lr']}")
    if raw.get("weight_decay", 0.0) < 0:  # torch's AdamW would refuse it only when the task is fine-tuned
        raise UserError(f"{path}: weight_decay must be >= 0, got {raw['weight_decay']}")
    if not 0 <= raw.get("warmup_ratio", 0.0) <= 1:
        raise UserError(f"{path}: warmup_ratio must lie in [0, 1] (a share of the steps), got {raw['warmup_ratio']}")
    return Task(**raw)


CONLL_SUFFIXES = (".conll", ".iob", ".iob2", ".bio")


def _check_one_format(path: Path, raw: dict, fmt: str) -> None:
    """Every split in the format guessed from the train file: a JSONL test split beside CoNLL train was read as CoNLL
    and refused for a "tag" '"O"]}'."""
    for split in ("dev", "test"):
        if raw.get(split) is not None and (other := guess_format(raw[split])) != fmt:
            raise UserError(f"{path}: train {raw['train']} is {fmt}, {split} {raw[split]} is {other}: give every split "
                            "in one format")


def guess_format(train: Path) -> str:
    """By the suffix where it says (``.jsonl``, or CoNLL's: a token ``{`` opening one is not JSON), else jsonl for
    a file whose first line is a JSON object (``.json``, ``.ndjson``: read as CoNLL, they failed on a "tag"
    '"O"]}'), byte-order mark or not, and conll otherwise. A CSV file, or a ``.json`` file holding one array (as
    many datasets ship), is neither: refused with what to convert it to, not read as CoNLL and refused by line."""
    if (suffix := train.suffix.lower()) == ".jsonl":
        return "jsonl"
    if suffix in CONLL_SUFFIXES:
        return "conll"
    if suffix == ".csv":
        raise UserError(f"{train}: CSV is not read; convert it to JSON lines (one object per line), or NER data to "
                        'CoNLL (docs/evaluation.md, "Input formats")')
    with open(train, "rb") as f:
        first = next((line for line in f if line.strip()), b"").removeprefix(codecs.BOM_UTF8).lstrip()
    if suffix == ".json" and first.startswith(b"["):
        raise UserError(f"{train}: one JSON array, not JSON lines (one object per line); convert it: python -c "
                        "\"import json, sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1], encoding='utf-8-sig'))]\" "
                        f"{shlex.quote(str(train))} > {shlex.quote(str(train.with_suffix('.jsonl')))}")
    return "jsonl" if first.startswith(b"{") else "conll"


def _resolve(task_file: Path, value, split: str) -> Path:
    if not str(value).strip():  # '' named the YAML's own folder as the missing file
        raise UserError(f"{task_file}: {split} is empty; name its file")
    file = Path(str(value))
    file = file if file.is_absolute() else Path(os.path.normpath(task_file.parent / file))
    if file.is_dir():  # said not to exist
        raise UserError(f"{task_file}: {split} {file} is a folder, not a file; name a JSONL or CoNLL file (a dataset "
                        'saved by the datasets library is not read: docs/evaluation.md, "Input formats")')
    if not file.is_file():
        raise UserError(
            f"{task_file}: {split} file {file} does not exist "
            "(public benchmarks are user-supplied; docs/evaluation.md gives the expected layout)"
        )
    return file


SHARED_SPLIT = {  # what a split that is another's file would score
    ("train", "dev"): "the best epoch would be chosen on training examples",
    ("train", "test"): "the score would be on training examples",
    ("dev", "test"): "the best epoch would be chosen on the test examples",
}


def _check_distinct_splits(task_file: Path, splits: dict[str, Path]) -> None:
    """Also a copy: a dataset without a dev split is often given its test file again under another name."""
    for (first, second), why in SHARED_SPLIT.items():
        if first not in splits or second not in splits:
            continue
        if splits[first].resolve() == splits[second].resolve():
            same = f"name the same file {splits[second]}"
        elif splits[first].stat().st_size and filecmp.cmp(splits[first], splits[second], shallow=False):
            same = f"hold the same examples ({splits[first]} is a copy of {splits[second]})"
        else:
            continue
        raise UserError(f"{task_file}: {first} and {second} {same}: {why}; give each split its own examples "
                        "(without a dev split, the last epoch is scored)")


def find_task_files(paths: list[str]) -> list[Path]:
    """YAML files named directly, plus every ``*.yaml`` and ``*.yml`` in named folders (sorted): a ``.yml`` task was
    left out, and the averages computed without it."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                raise UserError(f"{path}: no task *.yaml files in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such task file or folder")
    return files
