"""Task files → examples: JSONL (text + label / labels, or tokens + tags) and CoNLL-style BIO files.

Every problem is reported with the file and line so the user can fix the data.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cpt_lightning.errors import UserError, json_object, utf8_lines
from cpt_lightning.evaluate.tasks import Task, label_text


@dataclass(frozen=True)
class TextExample:
    text: str
    labels: frozenset[str]  # one label for single-label classification


@dataclass(frozen=True)
class TaggedExample:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


def read_splits(task: Task) -> dict[str, list]:
    """Every split of a task, read and checked: split name → examples."""
    splits = {split: read_split(task, path) for split, path in task.splits.items()}
    if task.type == "ner":
        check_entities(task, {tag for examples in splits.values() for ex in examples for tag in ex.tags})
    else:
        labels = {label for examples in splits.values() for ex in examples for label in ex.labels}
        check_labels(task, labels)
        if task.negative_labels:
            check_negative_labels(task, labels)
    check_scored_splits(task, splits)
    if unseen := labels_not_trained(task, splits):
        print(f"warning: task {task.name!r}: {unseen}", file=sys.stderr)
    return splits


def classes(task: Task, examples: list) -> set[str]:
    """The classes the examples hold: entity types for NER, labels otherwise."""
    if task.type == "ner":
        return {tag[2:] for ex in examples for tag in ex.tags if tag != "O"}
    return {label for ex in examples for label in ex.labels}


def labels_not_trained(task: Task, splits: dict[str, list]) -> str | None:
    """The classes (entity types for NER) a dev or test split holds and train never shows: the model cannot learn
    them, and a case or spelling slip ("Chemical" / "chemical") reads as a weak model instead."""
    trained = classes(task, splits["train"])
    unseen = {split: sorted(classes(task, examples) - trained)
              for split, examples in splits.items() if split != "train"}
    said = [f"{split} holds {names[:10]}" for split, names in unseen.items() if names]
    kind = "entity types" if task.type == "ner" else "labels"
    return f"{'; '.join(said)}: {kind} train never shows, so never learnt" if said else None


def check_entities(task: Task, tags: set[str]) -> None:
    """Without an entity, every prediction is right and the entity F1 is 0: nothing is measured."""
    if tags <= {"O"}:
        raise UserError(f"task {task.name!r}: no B-/I- tag in any split, so there is no entity to score; check "
                        f"tags_field ({task.tags_field!r}) and the files")


def check_scored_splits(task: Task, splits: dict[str, list]) -> None:
    """A dev or test split without an entity (or without a label outside ``negative_labels``) scores F1 0
    whatever the model predicts: dev chose the first epoch every time, silently; test ranks every model equal."""
    for split in (name for name in ("dev", "test") if name in splits):
        if not classes(task, splits[split]) - set(task.negative_labels):  # an NER task has none
            what = "no entity" if task.type == "ner" else "no label but negative_labels"
            choice = ", so dev cannot choose the epoch" if split == "dev" else ""
            remedy = " (or leave dev out: the last epoch is scored)" if split == "dev" else ""
            raise UserError(f"task {task.name!r}: its {split} split ({task.splits[split]}) holds {what} to score: "
                            f"its F1 is 0 whatever the model predicts{choice}; give it examples that hold some{remedy}")


def check_labels(task: Task, labels: set[str]) -> None:
    """One class (a label_field naming a constant field) scores F1 100 with nothing learnt; a multilabel task
    whose examples carry no label scores nothing."""
    if task.type == "classification" and len(labels) < 2:
        raise UserError(f"task {task.name!r}: its data holds {len(labels)} label ({sorted(labels)}): a classifier "
                        f"needs two or more to be scored; check label_field ({task.label_field!r}) and the files")
    if not labels:
        raise UserError(f"task {task.name!r}: no example carries a label; check label_field ({task.label_field!r})")


def check_negative_labels(task: Task, labels: set[str]) -> None:
    """A misspelt negative label ("False" for "false") would score the negative class after all."""
    if unknown := sorted(set(task.negative_labels) - labels):
        raise UserError(f"task {task.name!r}: negative_labels {unknown} are not labels of its data "
                        f"(its labels: {sorted(labels)[:20]})")
    if labels <= set(task.negative_labels):
        raise UserError(f"task {task.name!r}: negative_labels {list(task.negative_labels)} leave no label to score")


def read_split(task: Task, path: Path) -> list[TextExample] | list[TaggedExample]:
    if task.format == "conll":
        examples = read_conll(path)
    else:
        examples = [_from_record(task, record, f"{path}:{line}") for line, record in _jsonl(path)]
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def _jsonl(path: Path):
    for line_no, line in utf8_lines(path):
        if not line.strip():
            continue
        yield line_no, json_object(line, f"{path}:{line_no}")


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise UserError(f"{where}: no field {name!r} (keys: {sorted(record)}); set the task's *_field keys")
    return record[name]


def _from_record(task: Task, record: dict, where: str) -> TextExample | TaggedExample:
    if task.type == "ner":
        tokens, tags = _field(record, task.tokens_field, where), _field(record, task.tags_field, where)
        if not (isinstance(tokens, list) and isinstance(tags, list)) or len(tokens) != len(tags):
            raise UserError(f"{where}: {task.tokens_field!r} and {task.tags_field!r} must be lists of equal length")
        if bad := [t for t in [*tokens, *tags] if not isinstance(t, (str, int, float)) or isinstance(t, bool)]:
            raise UserError(f"{where}: {task.tokens_field!r} and {task.tags_field!r} hold words and tags, got {bad[0]!r}")
        return _tagged([str(t) for t in tokens], [str(t) for t in tags], where)
    text = _field(record, task.text_field, where)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: {task.text_field!r} must be a non-empty string")
    value = _field(record, task.label_field, where)
    if task.type == "multilabel":
        if not isinstance(value, list) or any(isinstance(v, (list, dict)) or v is None for v in value):
            raise UserError(f"{where}: {task.label_field!r} must be a list of labels for a multilabel task")
        return TextExample(text, frozenset(label_text(v, where) for v in value))
    if isinstance(value, (list, dict)) or value is None:
        raise UserError(f"{where}: {task.label_field!r} must be one label for a classification task, got {value!r}")
    return TextExample(text, frozenset([label_text(value, where)]))


def _check_bio(tag: str, where: str, note: str = "") -> None:
    prefix, dash, label = tag.partition("-")
    if tag != "O" and not (prefix in ("B", "I") and dash and label):
        raise UserError(f"{where}: tag {tag!r} is not BIO (O, B-TYPE, I-TYPE){note}")


def _tagged(tokens: list[str], tags: list[str], where: str) -> TaggedExample:
    for tag in tags:
        _check_bio(tag, where)
    if any(not t or t.isspace() for t in tokens):
        raise UserError(f"{where}: empty token")
    return TaggedExample(tuple(tokens), tuple(tags))


def read_conll(path: Path) -> list[TaggedExample]:
    """Token per line, tag in the last column; blank lines end a sentence.

    Columns are split at spaces and tabs only: a token holding a no-break or thin space (``10\u00a0mg``, common in
    PubMed text) is one token, not ``10`` with ``mg`` dropped as a column. ``-DOCSTART-`` lines (CoNLL-2003
    convention) end a sentence and are not one: without a blank line after one, two documents read as one sentence
    and an entity ran across them.
    """
    examples, tokens, tags = [], [], []
    for line_no, line in [*utf8_lines(path), (None, "\n")]:
        if "\r" in line.rstrip("\r\n"):  # lines end at \n only: CR-only endings made the file one word, another's tag
            raise UserError(f"{path}:{line_no}: a carriage return inside the line (CR-only line endings, or a stray "
                            "CR); save the file with \\n or \\r\\n line endings")
        columns = re.split(r"[ \t]+", line.strip(" \t\r\n")) if line.strip() else []
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                examples.append(TaggedExample(tuple(tokens), tuple(tags)))
            tokens, tags = [], []
            continue
        if len(columns) < 2:
            raise UserError(f"{path}:{line_no}: expected 'TOKEN ... TAG', got {line.strip()!r}")
        tag = columns[-1].strip()  # a no-break space after it made another entity type
        # the bad tag's own line, not its sentence's first; an ID column after the tags is read as the tag
        _check_bio(tag, f"{path}:{line_no}", f"; the tag is a line's last column, of {len(columns)} here"
                   if len(columns) > 2 else "")
        if columns[0].isspace():
            raise UserError(f"{path}:{line_no}: empty token")  # as in JSONL: a no-break space alone is no word
        tokens.append(columns[0])
        tags.append(tag)
    return examples
