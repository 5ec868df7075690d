"""Validation figures per held-out source and over all of them (cpt_lightning.validation)."""

import math
import re

import torch

from cpt_lightning.validation import ValidationSums, scored_weights, sources_layout, validation_table


def add(sums, objective, source, loss, right, predicted):
    targets = torch.arange(predicted)
    predictions = torch.where(targets < right, targets, -1)
    sums.add(objective, source, torch.tensor(loss), predictions, targets)


def test_figures_are_per_predicted_position_over_all_sources_and_for_each():
    sums = ValidationSums(["mlm", "clm"], ["pubmed", "notes"], torch.device("cpu"))
    add(sums, "mlm", 0, 2.0, right=3, predicted=10)
    add(sums, "mlm", 0, 4.0, right=1, predicted=30)
    add(sums, "mlm", 1, 1.0, right=5, predicted=10)
    add(sums, "clm", 1, math.nan, right=0, predicted=0)  # nothing predicted (a loss over no position): adds nothing
    figures = {key: (mean, weight) for key, mean, weight in sums.figures()}
    assert figures["val/pubmed/mlm_loss"] == (3.5, 40) and figures["val/pubmed/mlm_accuracy"] == (0.1, 40)
    assert figures["val/notes/mlm_loss"] == (1.0, 10) and figures["val/notes/mlm_accuracy"] == (0.5, 10)
    assert figures["val/mlm_loss"] == (3.0, 50) and figures["val/mlm_accuracy"] == (9 / 50, 50)
    # no figure where nothing was predicted (a 0.0 read as a perfect model); every rank skips the same keys, as the
    # figures come from the sums all ranks reduced
    assert not [key for key in figures if "clm" in key] and len(figures) == 3 * 2


def test_one_source_has_only_the_figures_over_all_and_a_nan_loss_stays_nan():
    sums = ValidationSums(["mlm"], ["pubmed"], torch.device("cpu"))
    add(sums, "mlm", 0, 2.0, right=1, predicted=4)
    add(sums, "mlm", 0, math.nan, right=1, predicted=4)  # a diverged model must not look fine
    figures = {key: mean for key, mean, _ in sums.figures()}
    assert list(figures) == ["val/mlm_loss", "val/mlm_accuracy"]
    assert math.isnan(figures["val/mlm_loss"]) and figures["val/mlm_accuracy"] == 0.25


def test_the_table_has_a_row_per_figure_and_a_column_per_source():
    figures = {"val/mlm_loss": 3.0, "val/pubmed/mlm_loss": 3.5, "val/notes/mlm_loss": 1.0, "val/mlm_accuracy": 0.18,
               "val/pubmed/mlm_accuracy": 0.1, "val/notes/mlm_accuracy": 0.5, "step": 40.0}
    lines = validation_table(figures, ["pubmed", "notes"]).splitlines()
    assert lines[0].split() == ["validation", "all", "pubmed", "notes"]
    assert [line.split() for line in lines[1:]] == [["mlm_accuracy", "0.1800", "0.1000", "0.5000"],
                                                    ["mlm_loss", "3.0000", "3.5000", "1.0000"]]
    only = validation_table({"val/mlm_loss": 3.0, "step": 4.0}, ["pubmed"]).splitlines()
    assert [line.split() for line in only] == [["validation", "pubmed"], ["mlm_loss", "3.0000"]]



def test_the_line_above_the_table_names_the_weights_and_step_scored():
    assert scored_weights("runs/en/checkpoints/last.ckpt", 15_896, None) == (
        "validated runs/en/checkpoints/last.ckpt (step 15,896)")
    assert scored_weights(None, None, "answerdotai/ModernBERT-base") == (
        "validated answerdotai/ModernBERT-base as it is (no checkpoint)")

def test_the_layout_draws_each_figure_over_all_sources_and_each_in_one_chart():
    tags = ["val/clm_loss", "val/pubmed_holdout/clm_loss", "val/notes.v2/clm_loss", "val/mlm15_loss",
            "val/pubmed_holdout/mlm15_loss", "val/clm_accuracy", "train/clm_loss", "val/a/b/clm_loss"]

    def drawn(layout):
        (charts,) = layout.values()
        return {title: [tag for tag in tags if re.search(regex, tag)] for title, (kind, (regex,)) in charts.items()}

    named = drawn(sources_layout(["mlm15", "clm"]))  # val_objectives: a chart per objective and metric
    assert named["clm_loss"] == ["val/clm_loss", "val/pubmed_holdout/clm_loss", "val/notes.v2/clm_loss"]
    assert named["mlm15_loss"] == ["val/mlm15_loss", "val/pubmed_holdout/mlm15_loss"]
    assert named["clm_accuracy"] == ["val/clm_accuracy"] and len(named) == 4
    assert drawn(sources_layout([])) == {  # each phase's own objective: a chart per metric
        "loss": ["val/clm_loss", "val/pubmed_holdout/clm_loss", "val/notes.v2/clm_loss", "val/mlm15_loss",
                 "val/pubmed_holdout/mlm15_loss"],
        "accuracy": ["val/clm_accuracy"]}

