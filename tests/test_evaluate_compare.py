"""Comparison mode of `cpt evaluate`: the exact sign test against hand values, and the Δ table."""

import math

import pytest

from cpt_lightning.evaluate.compare import compare, comparison_table, format_p, sign_test


@pytest.mark.parametrize(
    "wins, n, p",
    [
        (10, 10, 0.001953125),  # 2 / 2^10
        (9, 10, 0.021484375),  # 2 · 11 / 1024
        (11, 12, 0.00634765625),  # 2 · 13 / 4096
        (8, 10, 0.109375),  # 2 · 56 / 1024
        (1, 10, 0.021484375),  # symmetric
        (5, 10, 1.0),  # capped at 1
        (0, 0, 1.0),  # every task tied: no evidence
        (1, 1, 1.0),
        (3, 3, 0.25),
    ],
)
def test_sign_test_matches_hand_values(wins, n, p):
    assert sign_test(wins, n) == pytest.approx(p, rel=1e-12)


def test_sign_test_is_the_chance_of_a_split_at_least_as_uneven():
    """The two-sided p as scipy's binomtest defines it at p=0.5, counted over every outcome (scipy is not a
    dependency: a comparison with it was skipped wherever the suite ran)."""
    for n in range(1, 25):
        for k in range(n + 1):
            as_uneven = sum(math.comb(n, i) for i in range(n + 1) if abs(2 * i - n) >= abs(2 * k - n)) / 2**n
            assert math.isclose(sign_test(k, n), as_uneven, rel_tol=1e-12)


def test_sign_test_rejects_impossible_counts():
    with pytest.raises(ValueError):
        sign_test(11, 10)


def test_format_p_like_the_seed_cards():
    assert format_p(0.00390625) == "p=0.004" and format_p(0.109375) == "p=0.109" and format_p(0.0004) == "p<0.001"


def _results(scores: dict[str, dict[str, list[float]]]) -> dict:
    tasks = next(iter(scores.values()))
    return {
        "seeds": [0, 1],
        "tasks": {t: {"type": "ner", "family": "NER", "metric": "entity_f1"} for t in tasks},
        "models": {m: {"context": 512} for m in scores},
        "runs": [{"model": m, "task": t, "seed": s, "test_f1": f} for m, ts in scores.items()
                 for t, fs in ts.items() for s, f in enumerate(fs)],
    }


def test_differences_are_model_minus_first_with_ties_dropped():
    tasks = [f"t{i}" for i in range(12)]
    base = {t: [50.0, 52.0] for t in tasks}  # mean 51
    better = {t: [53.0, 55.0] for t in tasks[:10]} | {"t10": [49.0, 49.0], "t11": [50.0, 52.0]}  # +3 ×10, −2, tie
    worse = {t: [40.0, 40.0] for t in tasks}
    results = _results({"A": base, "B": better, "C": worse})
    b, c = compare(results)
    assert b["model"] == "B" and b["baseline"] == "A"
    assert b["diff"]["t0"] == pytest.approx(3.0) and b["diff"]["t10"] == pytest.approx(-2.0) and b["diff"]["t11"] == 0
    assert (b["wins"], b["losses"], b["ties"]) == (10, 1, 1) and b["p"] == pytest.approx(sign_test(10, 11))
    assert (c["wins"], c["losses"], c["ties"]) == (0, 12, 0) and c["p"] == pytest.approx(2 / 4096)

    table = comparison_table(results)
    header, rule, row_b, row_c = table.splitlines()[:4]
    assert header.startswith("| Model | vs | Δ t0 |") and header.endswith("| better / worse / tied | sign test |")
    assert row_b.startswith("| `B` | `A` | +3.0 |") and "| −2.0 |".replace("−", "-") in row_b
    assert row_b.endswith("| 10 / 1 / 1 | p=0.012 |")  # 2 · 12 / 2048 = 0.01171875
    assert row_c.endswith("| 0 / 12 / 0 | p<0.001 |")


def test_a_difference_under_a_tenth_still_shows_its_sign():
    """+0.04 and -0.03 read "+0.0" and "-0.0" but were counted as a win and a loss."""
    results = _results({"A": {"x": [50.0, 50.0], "y": [50.0, 50.0], "z": [50.0, 50.0]},
                        "B": {"x": [50.04, 50.04], "y": [49.97, 49.97], "z": [50.0, 50.0]}})
    (b,) = compare(results)
    assert (b["wins"], b["losses"], b["ties"]) == (1, 1, 1)
    assert "| +0.04 | -0.03 | +0.0 | 1 / 1 / 1 |" in comparison_table(results)


def test_equal_means_are_a_tie_whatever_the_floats_rounding():
    """F1 of 2/3 and 1/3 against 1/2 twice: both means are exactly 50, but the stored floats' mean differs by 7e-15,
    which counted as a win and read "+7e-15" in the table."""
    results = _results({"A": {"x": [100 * (2 * 1 / 3), 100 * (2 * 1 / 6)], "y": [50.0, 50.0]},
                        "B": {"x": [100 * (2 * 1 / 4), 100 * (2 * 1 / 4)], "y": [60.0, 60.0]}})
    (b,) = compare(results)
    assert b["diff"]["x"] == 0 and (b["wins"], b["losses"], b["ties"]) == (1, 0, 1)
    assert "| +0.0 | +10.0 | 1 / 0 / 1 |" in comparison_table(results)


@pytest.mark.parametrize("lacking", ["A", "B"], ids=["baseline", "compared"])
def test_missing_runs_show_a_dash_and_are_left_out_of_the_test(lacking):
    """Either model without runs of a task: no difference there (a baseline's missing mean is not 0)."""
    results = _results({"A": {"x": [50.0, 50.0], "y": [50.0, 50.0]}, "B": {"x": [60.0, 60.0], "y": [60.0, 60.0]}})
    results["runs"] = [r for r in results["runs"] if not (r["model"] == lacking and r["task"] == "y")]
    (b,) = compare(results)
    assert b["diff"]["y"] is None and (b["wins"], b["losses"], b["ties"]) == (1, 0, 0) and b["p"] == 1.0
    assert "| +10.0 | — |" in comparison_table(results)


def test_differences_are_between_means_over_all_seeds():
    """Δ uses the mean over seeds: one bad seed pulls it down (the median or the last seed would not show it)."""
    results = _results({"A": {"x": [50.0, 50.0, 80.0]}, "B": {"x": [55.0, 55.0, 55.0]}})  # means 60 and 55
    (b,) = compare(results)
    assert b["diff"]["x"] == pytest.approx(-5.0) and (b["wins"], b["losses"], b["ties"]) == (0, 1, 0)


def test_a_pipe_in_a_task_name_keeps_every_table_row_its_cells():
    """A task named "PubType | v2" split its header cell in two: the header had one column more than the rows,
    and `cpt export --eval-results` copied the broken table into the model card."""
    import re

    from cpt_lightning.evaluate.report import markdown_table

    results = _results({"A": {"PubType | v2": [50.0, 52.0], "x": [50.0, 50.0]},
                        "B": {"PubType | v2": [60.0, 60.0], "x": [40.0, 40.0]}})
    for table in (markdown_table(results), comparison_table(results).split("\n\n")[0]):
        rows = table.splitlines()
        assert "PubType \\| v2" in rows[0]
        assert len({len(re.split(r"(?<!\\)\|", row)) for row in rows}) == 1, rows
