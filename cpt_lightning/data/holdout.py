"""The holdout of a prepared source: documents no training block contains, for probes and validation.

Each tokenizing worker diverts every ``HOLDOUT_STRIDE``-th document of its shard until the shard's
share of the holdout is met (a fixed stride: deterministic, spread over the whole shard's start,
and the documents are tokenized once). The workers append the held-out ids to side files; once
every shard is done, the parent packs them, in shard order, into ``OUTPUT/holdout``: LitData
chunks and a manifest of their own, i.e. a prepared source that ``PackedDataModule`` and
``cpt analyze --probe`` read like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from unittest.mock import patch

import numpy as np

from cpt_lightning.data.encoding import DocumentEncoder
from cpt_lightning.data.manifest import HOLDOUT, Manifest
from cpt_lightning.data.packing import BlockPacker

HOLDOUT_STRIDE = 50  # every 50th document of a shard is held out (until the shard's quota is met)
SIDE_FILES = "held-out"  # the workers' side files, in the work folder


class ShardHoldout:
    """Diverts every ``HOLDOUT_STRIDE``-th document of one shard until ``quota`` tokens are held out.

    The held-out ids (separators included) and each document's length are appended to side files
    in ``folder``; the parent packs them into ``holdout/`` once every shard is done.
    """

    def __init__(self, folder: Path, number: int, quota: int, encode: DocumentEncoder):
        self.tokens, self.lengths = folder / f"{number}.tokens", folder / f"{number}.lengths"
        self.quota, self.encode, self.held, self.seen = quota, encode, 0, 0

    def split(self, batch: list[str]) -> list[str]:
        """The documents of ``batch`` that stay in training; the held-out ones are encoded and written aside."""
        if self.held >= self.quota:
            return batch
        kept = []
        for text in batch:
            self.seen += 1
            if self.seen % HOLDOUT_STRIDE == 0 and self.held < self.quota:
                self._write(self.encode([text]))
            else:
                kept.append(text)
        return kept

    def _write(self, ids: np.ndarray) -> None:
        with open(self.tokens, "ab") as f:
            ids.tofile(f)
        with open(self.lengths, "ab") as f:
            np.array([len(ids)], np.int64).tofile(f)
        self.held += len(ids)


@dataclass(frozen=True)
class HoldoutCounts:
    documents: int  # documents diverted from training
    blocks: int  # full blocks written to holdout/
    dropped: int  # held-out tokens that filled no block


def write_holdout(side: Path, num_shards: int, out: Path, block_size: int, dtype: np.dtype,
                  chunk_size: int) -> HoldoutCounts:
    """Pack the shards' held-out documents, in shard order, into full blocks of LitData chunks in ``out``.

    Nothing is written when they do not fill one block. The writer is told it is the only process:
    under torchrun/SLURM it would read their world size and wait for other ranks' indexes.
    """
    from litdata import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    packer, writer, blocks, documents = BlockPacker(block_size, dtype), None, 0, 0
    with patch.dict(os.environ, {"WORLD_SIZE": "1", "GLOBAL_RANK": "0", "NNODES": "1"}):
        for number in range(num_shards):
            if not (side / f"{number}.tokens").is_file():
                continue
            documents += len(np.fromfile(side / f"{number}.lengths", np.int64))
            for block in packer.add(np.fromfile(side / f"{number}.tokens", dtype)):
                if writer is None:
                    out.mkdir()
                    writer = BinaryWriter(str(out), chunk_size=chunk_size, item_loader=TokensLoader())
                writer.add_item(blocks, block)
                blocks += 1
        if writer is not None:
            writer.done()
            writer.merge()
    return HoldoutCounts(documents, blocks, packer.leftover)


def holdout_manifest(manifest: Manifest, held: HoldoutCounts) -> Manifest:
    """The holdout's own manifest: the source's facts, the holdout's counts."""
    return replace(
        manifest, source=f"{manifest.source}/{HOLDOUT}", num_documents=held.documents,
        num_tokens=held.blocks * manifest.block_size, num_blocks=held.blocks, tokens_dropped=held.dropped,
        skipped_empty=0, skipped_invalid_utf8=0, holdout_tokens=0, holdout_documents=0,
    )
