"""Fine-tune one encoder on one task for one seed; score F1 on dev (model selection) and test.

A plain PyTorch loop: AdamW, linear warmup then linear decay, gradient clipping at 1.0. With a
dev split the weights of the best dev epoch are scored on test; without one, the last epoch's.
The seed fixes the classifier head's initialisation, dropout and the data order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from cpt_lightning.errors import UserError
from cpt_lightning.evaluate.data import read_splits
from cpt_lightning.evaluate.features import CUT, NO_TOKEN, Encoded, collate, encode_tagged, encode_text, label_vocabulary
from cpt_lightning.evaluate.metrics import entity_f1, entity_spans, label_set_f1
from cpt_lightning.evaluate.tasks import Task
from cpt_lightning.pretrained import added_weights, from_pretrained_checked


@dataclass
class PreparedTask:
    """A task tokenized for one model: encoded splits, gold answers, label names, the length used."""

    task: Task
    labels: list[str]
    encoded: dict[str, list[Encoded]]
    gold: dict[str, list]
    max_length: int
    pad_id: int


# Encoders that number positions from pad_token_id + 1 (RoBERTa's scheme): their 514 positions hold 512 tokens.
POSITIONS_AFTER_PADDING = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "longformer",
    "mpnet", "ibert", "luke", "xmod",
})


def model_context(model_name: str) -> int:
    """The most tokens an input may have: ``max_position_embeddings``, less the positions RoBERTa-style
    encoders never use (a 513th token of roberta-base indexed past its position table)."""
    config = AutoConfig.from_pretrained(model_name)
    if config.model_type in POSITIONS_AFTER_PADDING:
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def prepare(task: Task, model_name: str, examples: dict[str, list] | None = None) -> PreparedTask:
    """Tokenize every split (``examples`` as ``read_splits`` gives them, read here if not given);
    ``max_length`` = the task's cap, at most the model's context."""
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    max_length = min(task.max_length or math.inf, model_context(model_name))
    examples = read_splits(task) if examples is None else examples
    labels = label_vocabulary(task.type, [ex for split in examples.values() for ex in split])
    label_ids = {label: i for i, label in enumerate(labels)}
    if task.type == "ner":
        encoded = {s: [encode_tagged(tokenizer, ex, label_ids, max_length) for ex in exs] for s, exs in examples.items()}
        gold = {s: [ex.tags for ex in exs] for s, exs in examples.items()}
    else:
        multilabel = task.type == "multilabel"
        encoded = {s: [encode_text(tokenizer, ex, label_ids, max_length, multilabel) for ex in exs] for s, exs in examples.items()}
        gold = {s: [ex.labels for ex in exs] for s, exs in examples.items()}
    return PreparedTask(task, labels, encoded, gold, int(max_length), tokenizer.pad_token_id)


def truncation_note(prepared: PreparedTask) -> str | None:
    """How much of the scored splits ``max_length`` cut: a text task's inputs whose end the model never sees, or
    NER words, and those the tokenizer makes no token of, predicted ``O``. A long document, or a 512-token
    baseline, is otherwise scored on less than it was given, without a word."""
    if prepared.task.type != "ner":
        return _text_truncation_note(prepared)
    said = {CUT: [], NO_TOKEN: []}
    for split in ("dev", "test"):
        words, entities, counts = 0, 0, {CUT: [0, 0], NO_TOKEN: [0, 0]}  # per kind: words, gold entities touched
        for example, tags in zip(prepared.encoded.get(split, []), prepared.gold.get(split, [])):
            spans = entity_spans(tags)
            words, entities = words + len(tags), entities + len(spans)
            for kind, count in counts.items():
                missing = {i for i, position in enumerate(example.first_subtoken) if position == kind}
                count[0] += len(missing)
                count[1] += sum(1 for _, start, end in spans if missing.intersection(range(start, end)))
        for kind, (missing, lost) in counts.items():
            if missing:
                said[kind].append(f"{missing:,} of {words:,} {split} words ({lost:,} of {entities:,} gold entities)")
    notes = []
    if said[CUT]:
        notes.append(f"max_length {prepared.max_length:,} cuts {' and '.join(said[CUT])}, predicted O; split long "
                     "sentences, or raise the task's max_length where the model's context allows")
    if said[NO_TOKEN]:
        notes.append(f"the tokenizer makes no token of {' and '.join(said[NO_TOKEN])}, predicted O (characters its "
                     "normalizer drops, such as U+FFFD or zero-width spaces); clean them from the data")
    return f"task {prepared.task.name!r}: " + "; ".join(notes) if notes else None


def _text_truncation_note(prepared: PreparedTask) -> str | None:
    said = []
    for split in ("dev", "test"):
        encoded = prepared.encoded.get(split, [])
        if cut := sum(example.cut for example in encoded):
            said.append(f"{cut:,} of {len(encoded):,} {split} texts")
    if not said:
        return None
    return (f"task {prepared.task.name!r}: max_length {prepared.max_length:,} cuts {' and '.join(said)}, of which "
            "the model sees only the start; raise the task's max_length where the model's context allows")


RANDOM_ENCODER = ("fine-tuning would start from a random encoder; use the whole folder the model was saved to "
                  "(a checkpoint of cpt fit: export it again with `cpt export`)")


def load_model(model_name: str, prepared: PreparedTask, attn_implementation: str, classifier_pooling: str | None = None):
    """The encoder with a fresh task head, in fp32 whatever dtype the folder stores; a sequence task's head pools
    as ``classifier_pooling`` says (None: as the folder's config.json says).

    fp32: AdamW on bf16 weights rounds about 98% of the updates at lr 5e-5 away, so a bf16 export
    would barely train and compare as a worse encoder. Only what the task class adds to the encoder may
    be missing from the weights (``classifier``; ModernBERT's ``head``, the dense + norm before it, which a
    folder saved as ModernBertModel lacks: ``check_model`` notes that; DistilBERT's ``pre_classifier``; a
    pooler): anything else would mean fine-tuning a randomly initialised encoder, silently.
    """
    task = prepared.task
    kwargs = dict(
        num_labels=len(prepared.labels),
        id2label=dict(enumerate(prepared.labels)),
        label2id={label: i for i, label in enumerate(prepared.labels)},
        attn_implementation=attn_implementation,
        dtype=torch.float32,
    )
    if task.type == "ner":
        auto_class = AutoModelForTokenClassification
    else:
        auto_class = AutoModelForSequenceClassification
        kwargs["problem_type"] = "multi_label_classification" if task.type == "multilabel" else "single_label_classification"
        if classifier_pooling:
            kwargs["classifier_pooling"] = classifier_pooling
    task_head = added_weights(auto_class, AutoConfig.from_pretrained(model_name))
    return from_pretrained_checked(auto_class, model_name, RANDOM_ENCODER, task_head, **kwargs)


def finetune(model_name: str, prepared: PreparedTask, seed: int, device: torch.device, attn_implementation: str = "sdpa",
             classifier_pooling: str | None = None) -> dict:
    """Train, select on dev, score test. Returns F1 ×100 and bookkeeping for the results file."""
    task, started = prepared.task, time.perf_counter()
    torch.manual_seed(seed)
    model = load_model(model_name, prepared, attn_implementation, classifier_pooling).to(device)
    train = prepared.encoded["train"]
    steps = task.epochs * math.ceil(len(train) / task.batch_size)
    warmup = int(task.warmup_ratio * steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(steps - s, 0) / max(steps - warmup, 1)
    )
    order = torch.Generator().manual_seed(seed)
    best_dev, best_epoch, best_state = -1.0, task.epochs, None
    for epoch in range(1, task.epochs + 1):
        model.train()
        idx = torch.randperm(len(train), generator=order).tolist()
        finite = torch.ones((), dtype=torch.bool, device=device)  # read once an epoch: no host sync per step
        for start in range(0, len(train), task.batch_size):
            batch = collate([train[i] for i in idx[start : start + task.batch_size]], prepared.pad_id, task.type)
            with _autocast(device):
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            # the gradient, not the loss: a batch with no word to tag (a tokenizer that drops them) has a NaN mean
            # loss and a zero gradient
            finite &= torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        if not finite:  # NaN weights predict the first label everywhere: a plausible F1 averaged in with the others
            raise UserError(f"task {task.name!r}, model {model_name}, seed {seed}: the fine-tuning diverged in epoch "
                            f"{epoch} (a gradient that is not finite); lower the task's lr ({task.lr:g})")
        if "dev" in prepared.encoded:
            dev_f1 = score(model, prepared, "dev", device)
            if dev_f1 > best_dev:
                best_dev, best_epoch = dev_f1, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "dev_f1": 100 * best_dev if best_state is not None else None,
        "test_f1": 100 * score(model, prepared, "test", device),
        "best_epoch": best_epoch,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(model, prepared: PreparedTask, split: str, device: torch.device) -> list:
    """Predicted tag sequences (NER) or label sets (classification), in the split's order."""
    model.eval()
    encoded, task = prepared.encoded[split], prepared.task
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding
    predictions: list = [None] * len(encoded)
    for start in range(0, len(order), task.batch_size):
        rows = order[start : start + task.batch_size]
        batch = collate([encoded[i] for i in rows], prepared.pad_id, task.type)
        with _autocast(device):
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        logits = logits.float().cpu()
        for row, i in enumerate(rows):
            predictions[i] = _decode(logits[row], encoded[i], prepared)
    return predictions


def _decode(logits: torch.Tensor, example: Encoded, prepared: PreparedTask):
    labels = prepared.labels
    if prepared.task.type == "ner":
        best = logits.argmax(-1).tolist()
        return tuple(labels[best[p]] if p >= 0 else "O" for p in example.first_subtoken)
    if prepared.task.type == "multilabel":
        return frozenset(labels[j] for j in (logits > 0).nonzero().flatten().tolist())
    return frozenset([labels[int(logits.argmax())]])


def score(model, prepared: PreparedTask, split: str, device: torch.device) -> float:
    predictions, gold = predict(model, prepared, split, device), prepared.gold[split]
    if prepared.task.type == "ner":
        return entity_f1(gold, predictions)
    return label_set_f1(gold, predictions, average=prepared.task.metric.removesuffix("_f1"),
                        negative=frozenset(prepared.task.negative_labels))
