"""Examples → model inputs for one tokenizer: label vocabularies, truncation, sub-word alignment.

NER words are joined with single spaces and tokenized as running text (the way the encoder saw
text in pretraining), then mapped back through character offsets: the first sub-token of each
word carries its tag, the others are ignored (-100). Words cut off by ``max_length`` are
predicted ``O``, so truncation costs recall instead of silently shrinking the test set. A text
task's input is cut to its first ``max_length`` tokens, and marked ``cut`` to be counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpt_lightning.evaluate.data import TaggedExample, TextExample

IGNORE = -100
CUT = -1  # a word max_length cut off
NO_TOKEN = -2  # a word the tokenizer makes no token of (BERT's normalizer drops U+FFFD, zero-width spaces)


@dataclass
class Encoded:
    input_ids: list[int]
    target: list[int] | list[float] | int  # per-token tag ids / multi-hot / class id
    first_subtoken: list[int] | None = None  # NER: position of each word's first sub-token, or CUT / NO_TOKEN
    cut: bool = False  # a text longer than max_length, of which the model sees the start


def label_vocabulary(task_type: str, examples: list) -> list[str]:
    """Sorted labels over every split; NER: ``O`` then ``B-``/``I-`` of each entity type."""
    if task_type == "ner":
        types = sorted({tag[2:] for ex in examples for tag in ex.tags if tag != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
    return sorted({label for ex in examples for label in ex.labels})


def encode_text(tokenizer, example: TextExample, label_ids: dict[str, int], max_length: int, multilabel: bool) -> Encoded:
    ids = tokenizer(example.text, truncation=True, max_length=max_length)["input_ids"]
    cut = len(ids) == max_length and len(tokenizer(example.text, verbose=False)["input_ids"]) > max_length
    if multilabel:
        target = [0.0] * len(label_ids)
        for label in example.labels:
            target[label_ids[label]] = 1.0
        return Encoded(ids, target, cut=cut)
    (label,) = example.labels
    return Encoded(ids, label_ids[label], cut=cut)


def encode_tagged(tokenizer, example: TaggedExample, label_ids: dict[str, int], max_length: int) -> Encoded:
    spans, cursor = [], 0
    for word in example.tokens:
        spans.append((cursor, cursor + len(word)))
        cursor += len(word) + 1
    text = " ".join(example.tokens)
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    first = [CUT] * len(spans)
    target = [IGNORE] * len(enc["input_ids"])
    word = 0
    for position, (start, end) in enumerate(enc["offset_mapping"]):
        if end <= start:  # special tokens
            continue
        while word < len(spans) and spans[word][1] <= start:
            word += 1
        if word < len(spans) and first[word] == CUT and start < spans[word][1] and end > spans[word][0]:
            first[word] = position
            target[position] = label_ids[example.tags[word]]
    tokened = _words_with_a_token(tokenizer, text, enc, max_length, spans)
    first = [NO_TOKEN if position == CUT and not has_token else position for position, has_token in zip(first, tokened)]
    return Encoded(enc["input_ids"], target, first)


def _words_with_a_token(tokenizer, text: str, enc, max_length: int, spans: list[tuple[int, int]]) -> list[bool]:
    """Whether any token of the whole text overlaps each word: one without was dropped by the tokenizer, before
    the cut or after it, and raising max_length would not bring it back."""
    offsets = enc["offset_mapping"]
    if len(enc["input_ids"]) >= max_length:  # maybe cut: the words past it are read from the whole text
        offsets = tokenizer(text, return_offsets_mapping=True, verbose=False)["offset_mapping"]  # no "longer than"
    tokened, word = [False] * len(spans), 0
    for start, end in ((start, end) for start, end in offsets if end > start):  # special tokens have none
        while word < len(spans) and spans[word][1] <= start:
            word += 1
        overlapped = word
        while overlapped < len(spans) and spans[overlapped][0] < end:
            tokened[overlapped] = True
            overlapped += 1
    return tokened


def collate(batch: list[Encoded], pad_id: int, task_type: str) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch."""
    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[row, : len(e.input_ids)] = 1
    if task_type == "ner":
        labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
        for row, e in enumerate(batch):
            labels[row, : len(e.target)] = torch.tensor(e.target)
    else:
        labels = torch.tensor([e.target for e in batch], dtype=torch.float if task_type == "multilabel" else torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
