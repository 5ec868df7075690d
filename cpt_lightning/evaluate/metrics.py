"""F1 the way the model cards report it: entity-level micro F1 for BIO tagging, macro/micro F1 for labels.

Hand-written (no seqeval/sklearn dependency) and small enough to check against hand-computed
examples. Scores are fractions in [0, 1]; a class with no gold and no predicted item is skipped
(scikit-learn does the same for single-label data, but scores every column of a multi-label
indicator matrix, so there a label absent from a split counts 0), and a zero denominator counts
as 0, scikit-learn's default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """``(type, start, end)`` chunks of a BIO sequence, conlleval-style.

    An entity starts at ``B-X``, or at an ``I-X`` that does not continue an ``X`` entity (after
    ``O`` or another type); it runs over the following ``I-X`` tags. ``end`` is exclusive.
    """
    spans, kind, start = set(), None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans


def _f1(tp: int, n_pred: int, n_gold: int) -> float:
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0


def entity_f1(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> float:
    """Micro F1 over exact entity matches (type and boundaries), pooled over all sequences."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred, strict=True):
        g_spans, p_spans = entity_spans(g), entity_spans(p)
        tp += len(g_spans & p_spans)
        n_gold += len(g_spans)
        n_pred += len(p_spans)
    return _f1(tp, n_pred, n_gold)


def label_set_f1(gold: Sequence[frozenset[str]], pred: Sequence[frozenset[str]], average: str,
                 negative: frozenset[str] = frozenset()) -> float:
    """F1 over (example, label) decisions; single-label data passes one-element sets.

    ``micro`` pools every decision (for single-label data it equals accuracy); ``macro`` averages
    the per-label F1 over labels seen in gold or predictions. ``negative`` labels ("no relation")
    are not scored (BLURB's ChemProt and GAD): a positive item predicted negative is still a miss
    of its label, a negative item predicted positive still a false positive of that label.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold items but {len(pred)} predictions")
    labels = sorted(set().union(*gold, *pred) - negative)
    counts = {label: [0, 0, 0] for label in labels}  # tp, predicted, gold
    for g, p in zip(gold, pred):
        for label in (g & p) - negative:
            counts[label][0] += 1
        for label in p - negative:
            counts[label][1] += 1
        for label in g - negative:
            counts[label][2] += 1
    if average == "micro":
        tp, n_pred, n_gold = (sum(c[i] for c in counts.values()) for i in range(3))
        return _f1(tp, n_pred, n_gold)
    if average == "macro":
        return sum(_f1(*c) for c in counts.values()) / len(labels) if labels else 0.0
    raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")
