"""How much of each source a weighted litdata mix reads: its passes overstate it for a large source."""

from __future__ import annotations


def rows_read_at_least_once(rows: list[int], shares: list[float], rows_drawn: float) -> list[float]:
    """The expected share of each source's rows read at least once when the mix draws ``rows_drawn`` rows.

    An epoch of the mix ends when the source with the fewest rows for its share runs out, and the next epoch
    reshuffles every source: a source read for a fraction f of its rows per epoch reads a new random f of them
    each epoch, not the next f, so after E epochs 1 − (1 − f)^E of it has been read. In the recipes' terms, a
    40B-token PubMed beside a 2B-token source at 20% of 55B reads "0.82 passes" of PubMed, and 59% of it."""
    epoch = min(r / share for r, share in zip(rows, shares))
    epochs, rest = divmod(rows_drawn / epoch, 1)
    return [1 - (1 - f) ** epochs * (1 - f * rest) for f in (share * epoch / r for r, share in zip(rows, shares))]
