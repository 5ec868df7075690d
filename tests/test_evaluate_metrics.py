"""F1 against hand-computed examples: BIO chunking, entity micro F1, macro/micro label F1."""

import pytest

from cpt_lightning.evaluate.metrics import entity_f1, entity_spans, label_set_f1


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 2), ("LOC", 3, 4)}),
        (["I-PER", "I-PER", "O"], {("PER", 0, 2)}),  # I- after O starts an entity (conlleval)
        (["B-PER", "I-LOC"], {("PER", 0, 1), ("LOC", 1, 2)}),  # a type change starts a new one
        (["B-PER", "B-PER", "I-PER"], {("PER", 0, 1), ("PER", 1, 3)}),
        (["O", "O"], set()),
        (["B-Gene-or-protein", "I-Gene-or-protein"], {("Gene-or-protein", 0, 2)}),
    ],
)
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_f1_counts_exact_matches_only():
    # one of two gold entities found, nothing spurious: P = 1, R = 1/2, F1 = 2/3
    assert entity_f1([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]]) == pytest.approx(2 / 3)
    # a boundary error is both a miss and a false positive
    assert entity_f1([["B-X", "I-X"]], [["B-X", "O"]]) == 0.0
    # a type error too
    assert entity_f1([["B-X"]], [["B-Y"]]) == 0.0


def test_entity_f1_is_micro_pooled_over_sentences():
    gold = [["B-A", "O", "B-B"], ["B-A", "I-A", "O"]]
    pred = [["B-A", "O", "B-B"], ["B-A", "I-A", "B-B"]]
    # tp = 3, predicted = 4, gold = 3 → F1 = 6/7 (a per-sentence average would give (1 + 2/3)/2)
    assert entity_f1(gold, pred) == pytest.approx(6 / 7)


def test_entity_f1_with_no_entities_anywhere_is_zero():
    assert entity_f1([["O"]], [["O"]]) == 0.0


def test_entity_f1_refuses_gold_and_predictions_of_different_lengths():
    """Zipped silently, the sentences past the shorter list would drop out of the score."""
    with pytest.raises(ValueError):
        entity_f1([["B-A"], ["B-A"]], [["B-A"]])


def test_single_label_macro_and_micro():
    gold = [frozenset(x) for x in ("a", "a", "b", "c")]
    pred = [frozenset(x) for x in ("a", "b", "b", "a")]
    # a: F1 2·1/(2+2) = 1/2; b: 2·1/(2+1) = 2/3; c: 0 → macro 7/18; micro = accuracy = 1/2
    assert label_set_f1(gold, pred, "macro") == pytest.approx(7 / 18)
    assert label_set_f1(gold, pred, "micro") == pytest.approx(0.5)


def test_macro_counts_a_label_only_predicted():
    """A label no gold item has but the model predicts scores 0 in the macro mean (left out, it would raise it)."""
    gold, pred = [frozenset("a"), frozenset("a")], [frozenset("a"), frozenset("z")]
    assert label_set_f1(gold, pred, "macro") == pytest.approx((2 / 3 + 0) / 2)  # a: 2·1/(1+2); z: 0


def test_multilabel_micro_and_macro():
    gold = [frozenset("ab"), frozenset("c"), frozenset()]
    pred = [frozenset("a"), frozenset("cb"), frozenset("b")]
    # micro: tp 2 (a, c), predicted 4, gold 3 → 4/7; macro: a 1, b 0, c 1 → 2/3
    assert label_set_f1(gold, pred, "micro") == pytest.approx(4 / 7)
    assert label_set_f1(gold, pred, "macro") == pytest.approx(2 / 3)


def test_negative_labels_are_not_scored_but_errors_on_them_count():
    """BLURB's ChemProt: micro F1 over the relation classes; "false" (no relation) is not a class scored."""
    gold = [frozenset([g]) for g in ("false", "false", "false", "CPR:3", "CPR:4", "CPR:3")]
    pred = [frozenset([p]) for p in ("false", "false", "CPR:3", "CPR:3", "false", "CPR:4")]
    # CPR:3: tp 1, predicted 2, gold 2; CPR:4: tp 0, predicted 1, gold 1 → micro 2·1/(3+3) = 1/3 (accuracy: 1/2)
    assert label_set_f1(gold, pred, "micro", negative=frozenset(["false"])) == pytest.approx(1 / 3)
    assert label_set_f1(gold, pred, "micro") == pytest.approx(1 / 2)
    # macro over CPR:3 (2·1/4 = 1/2) and CPR:4 (0)
    assert label_set_f1(gold, pred, "macro", negative=frozenset(["false"])) == pytest.approx(1 / 4)
    # a model that always says "no relation" scores 0, not its 3/6 accuracy
    assert label_set_f1(gold, [frozenset(["false"])] * 6, "micro", negative=frozenset(["false"])) == 0.0
    nothing = [frozenset(["false"])] * 2  # no class scored anywhere: 0 for both averages, as with no entities
    assert label_set_f1(nothing, nothing, "macro", negative=frozenset(["false"])) == 0.0


def test_label_f1_refuses_mismatched_lengths_and_unknown_average():
    with pytest.raises(ValueError, match="2 gold items but 1"):
        label_set_f1([frozenset("a")] * 2, [frozenset("a")], "micro")
    with pytest.raises(ValueError, match="average"):
        label_set_f1([frozenset("a")], [frozenset("a")], "weighted")
