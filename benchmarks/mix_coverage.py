"""How much of each source the training mix reads, against how often: passes and the share read at least once.

    make demo-data && .venv/bin/python benchmarks/mix_coverage.py [--prepared data/sample/prepared] [--workers 2]

Reads ``PackedDataModule``'s training loader over the sample's three prepared sources (PubMed 0.6 / medical QA
0.2 / case reports 0.2) and prints, at the rows two, four and six epochs of litdata's own weighted mix would
hold (an epoch there ended when the source with the fewest rows for its weight ran out), each source's passes
and the share of its rows read at least once. Each source is read whole before any of it repeats, so a source
under one pass should show its passes as its share read. Figures go to docs/data.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SOURCES = {"pubmed": 0.6, "medical_qa": 0.2, "case_reports": 0.2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="data/sample/prepared", help="folder of the prepared sources")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()

    from cpt_lightning.data import PackedDataModule, Source

    dm = PackedDataModule([Source(n, str(Path(args.prepared) / n), w) for n, w in SOURCES.items()],
                          micro_batch_size=args.micro_batch, num_workers=args.workers)
    owner = rows_by_source(dm)
    size = {name: sum(source == name for source in owner.values()) for name in SOURCES}
    epoch = min(size[name] / weight for name, weight in SOURCES.items())
    seen, reads, drawn = {name: set() for name in SOURCES}, dict.fromkeys(SOURCES, 0), 0
    batches = iter(dm.train_dataloader())  # endless
    for epochs in (2, 4, 6):
        while drawn < epochs * epoch:
            for row in next(batches)["input_ids"].numpy():
                name = owner[row.tobytes()]
                seen[name].add(row.tobytes())
                reads[name] += 1
                drawn += 1
        print(f"after {drawn:,} rows (litdata's epoch {epochs}): " + "; ".join(
            f"{name} {reads[name] / size[name]:.3f} passes, {len(seen[name]) / size[name]:.1%} read" for name in SOURCES))
    return 0


def rows_by_source(dm) -> dict[bytes, str]:
    """Every stored row's source (rows are long enough to be unique)."""
    import numpy as np
    from litdata import StreamingDataset, TokensLoader

    owner = {}
    for source in dm.sources:
        dataset = StreamingDataset(source.path, item_loader=TokensLoader(dm.block_size))
        for i in range(len(dataset)):
            owner[dataset[i].astype(np.int64).tobytes()] = source.name
    return owner


if __name__ == "__main__":
    raise SystemExit(main())
