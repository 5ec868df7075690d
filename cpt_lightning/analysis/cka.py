"""Linear CKA between matching layers of several models, accumulated batch by batch.

Linear CKA (Kornblith et al., 2019) between features ``X`` (n × d1) and ``Y`` (n × d2) of the same
n tokens, with ``Xc``/``Yc`` the column-centred features::

    CKA(X, Y) = ‖Yc^T Xc‖_F² / (‖Xc^T Xc‖_F · ‖Yc^T Yc‖_F)

It equals the kernel form ``tr(K L) / sqrt(tr(K K) tr(L L))`` with ``K = Xc Xc^T``, but needs only
d × d statistics, so thousands of sequences stream through in O(d²) memory instead of O(n²).
Centred statistics come from running sums: ``Xc^T Yc = X^T Y − n · mean(X)^T mean(Y)``.
"""

from __future__ import annotations

import torch


class FeatureSums:
    """Running n, Σx and XᵀX of one model's features at one layer, in float64.

    Features are shifted by the first batch's mean before summing (the shifted-data trick):
    centring then subtracts a small mean, so hidden states with large constant offsets
    (ModernBERT has outlier dimensions) do not cancel away the variance in float64.
    """

    def __init__(self, first: torch.Tensor):
        self.shift = first.mean(dim=0)
        self.n = 0
        self.total = torch.zeros_like(self.shift)
        self.gram = torch.zeros(first.shape[1], first.shape[1], dtype=first.dtype, device=first.device)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.shift

    def add(self, x: torch.Tensor) -> None:
        x = self.shifted(x)
        self.n += x.shape[0]
        self.total += x.sum(dim=0)
        self.gram += x.T @ x

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def centred_gram(self) -> torch.Tensor:
        mean = self.mean()
        return self.gram - self.n * torch.outer(mean, mean)


def cka_from_stats(gram_x: torch.Tensor, gram_y: torch.Tensor, cross: torch.Tensor) -> float:
    """Linear CKA from centred XᵀX, YᵀY and XᵀY (NaN when a side has no variance)."""
    denominator = torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y)
    return (torch.linalg.matrix_norm(cross) ** 2 / denominator).item()


class StreamingCKA:
    """Per-layer linear CKA for the given model pairs, fed one probe batch at a time.

    ``update`` takes, per model, a list of ``[n, d]`` feature matrices (one per layer) for the same
    n tokens. Each model's XᵀX is kept once and shared by all its pairs; each pair keeps XᵀY.
    """

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = list(dict.fromkeys(pairs))  # a pair named twice added its cross term twice a batch: CKA above 1
        self.sums: dict[str, list[FeatureSums]] = {}
        self.cross: dict[tuple[str, str], list[torch.Tensor]] = {}

    def update(self, features: dict[str, list[torch.Tensor]]) -> None:
        features = {name: [layer.double() for layer in layers] for name, layers in features.items()}
        for name, layers in features.items():
            if name not in self.sums:
                self.sums[name] = [FeatureSums(layer) for layer in layers]
            for stat, layer in zip(self.sums[name], layers):
                stat.add(layer)
        for a, b in self.pairs:
            shifted = [
                (sa.shifted(xa).T @ sb.shifted(xb))
                for sa, sb, xa, xb in zip(self.sums[a], self.sums[b], features[a], features[b])
            ]
            if (a, b) in self.cross:
                for total, batch in zip(self.cross[(a, b)], shifted):
                    total += batch
            else:
                self.cross[(a, b)] = shifted

    def compute(self) -> dict[tuple[str, str], list[float]]:
        """CKA per layer for every pair."""
        return {pair: self._pair_cka(*pair) for pair in self.pairs}

    def _pair_cka(self, a: str, b: str) -> list[float]:
        values = []
        for sa, sb, cross in zip(self.sums[a], self.sums[b], self.cross[(a, b)]):
            centred_cross = cross - sa.n * torch.outer(sa.mean(), sb.mean())
            values.append(cka_from_stats(sa.centred_gram(), sb.centred_gram(), centred_cross))
        return values
