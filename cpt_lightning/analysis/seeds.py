"""Seed-noise reference: how far apart two training arms are, in units of seed-to-seed variation.

Per layer, with CKA over matching layers:

    divergence(A, B) = mean over a ∈ A, b ∈ B of 1 − CKA(a, b)
    seed_noise(A)    = mean over seed pairs a ≠ a' of A of 1 − CKA(a, a')
    noise            = mean of 1 − CKA over the seed pairs of every arm (pooled)
    noise_ratio(A, B) = divergence(A, B) / noise

A ratio near 1 means the arms differ no more than reruns with another seed do.
"""

from __future__ import annotations

from itertools import combinations

import torch

Pair = tuple[str, str]
PAIR_JOIN = "_vs_"  # no model name holds it (cli.collect_models): each pair's series name is its own


def pair_name(pair: Pair) -> str:
    return f"{pair[0]}{PAIR_JOIN}{pair[1]}"


def within_pairs(members: list[str]) -> list[Pair]:
    return list(combinations(members, 2))


def across_pairs(arms: dict[str, list[str]]) -> dict[Pair, list[Pair]]:
    """Member pairs between every two arms, keyed by the arm pair."""
    return {
        (a, b): [(x, y) for x in arms[a] for y in arms[b]]
        for a, b in combinations(arms, 2)
    }


def seed_pairs(arms: dict[str, list[str]]) -> list[Pair]:
    """Every member pair whose CKA the seed summary needs."""
    pairs = [pair for members in arms.values() for pair in within_pairs(members)]
    return pairs + [pair for between in across_pairs(arms).values() for pair in between]


def mean_dissimilarity(cka: dict[Pair, list[float]], pairs: list[Pair]) -> torch.Tensor:
    """Per-layer mean of 1 − CKA over the given pairs."""
    return 1 - torch.tensor([cka[pair] for pair in pairs], dtype=torch.float64).mean(dim=0)


def seed_metrics(cka: dict[Pair, list[float]], arms: dict[str, list[str]]) -> dict[str, dict[str, list[float]]]:
    """seed_noise per arm, divergence and noise_ratio per arm pair, and the raw member CKA."""
    noise_pairs = {arm: within_pairs(members) for arm, members in arms.items()}
    pooled = mean_dissimilarity(cka, [pair for pairs in noise_pairs.values() for pair in pairs])
    divergence = {arms_pair: mean_dissimilarity(cka, pairs) for arms_pair, pairs in across_pairs(arms).items()}
    return {
        "seed_cka": {pair_name(pair): cka[pair] for pair in seed_pairs(arms)},
        "seed_noise": {arm: mean_dissimilarity(cka, pairs).tolist() for arm, pairs in noise_pairs.items() if pairs},
        "divergence": {pair_name(pair): value.tolist() for pair, value in divergence.items()},
        "noise_ratio": {pair_name(pair): (value / pooled).tolist() for pair, value in divergence.items()},
    }
