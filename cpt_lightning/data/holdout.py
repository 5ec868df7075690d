"""The holdout of a prepared source: documents no training block contains, for probes and validation.

Each tokenizing worker diverts every ``HOLDOUT_STRIDE``-th document of its shard until the shard's
share of the holdout is met (a fixed stride: deterministic, spread over the whole shard's start,
and the documents are tokenized once). The workers append the held-out ids to side files; once
every shard is done, the parent packs them, in shard order, into ``OUTPUT/holdout``: LitData
chunks and a manifest of their own, i.e. a prepared source that ``PackedDataModule`` and
``cpt analyze --probe`` read like any other.

A held-out document whose text a training document repeats (corpora repeat abstracts, templates
and boilerplate notes) is left out of the holdout, else validation would score text the model
trained on. The workers write a 64-bit key of every training document's text (its words, whatever
the spacing) beside the held-out ones; the parent drops the held-out documents whose key is among
them, or among those of earlier held-out documents, before packing.

Another source of the mix may repeat them too (instructions built from PubMed abstracts, notes
quoting papers), which no single source's preparation can see: each prepared folder keeps its
documents' keys (``DOCUMENT_KEYS``, sorted, 8 bytes a document), which ``PackedDataModule`` compares.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from unittest.mock import patch

import numpy as np

from cpt_lightning.data.encoding import DocumentEncoder
from cpt_lightning.data.manifest import HOLDOUT, Manifest
from cpt_lightning.data.packing import BlockPacker
from cpt_lightning.errors import UserError, one_line

HOLDOUT_STRIDE = 50  # every 50th document of a shard is held out (until the shard's quota is met)
SIDE_FILES = "held-out"  # the workers' side files, in the work folder
KEY = np.dtype("<u8")
DOCUMENT_KEYS = "document-keys.npy"  # in a prepared folder and its holdout/: the text keys of its documents, sorted


def side_file(folder: Path, number: int, kind: str) -> Path:
    """A shard's side file: ``tokens``, ``lengths`` and ``keys`` of its held-out documents, ``training-keys``."""
    return folder / f"{number}.{kind}"


def text_key(text: str) -> int:
    """A 64-bit key of a document's words: texts that differ only in spacing or Unicode form share it (a clash is 1 in
    1.8e19). Keyed as written, é written as e + accent hid a repeat of a training document: NFKC tokenizers
    (CamemBERT's) give both the same ids."""
    words = " ".join(unicodedata.normalize("NFKC", text).split())
    return int.from_bytes(hashlib.blake2b(words.encode(), digest_size=8).digest(), "little")


class ShardHoldout:
    """Diverts every ``HOLDOUT_STRIDE``-th document of one shard until ``quota`` tokens are held out.

    The held-out ids (separators included), each document's length and text key are appended to
    side files in ``folder``, and the text key of every training document (also with a quota of 0: the
    holdouts of the mix's other sources are compared with them); the parent packs them into ``holdout/``
    once every shard is done.
    """

    def __init__(self, folder: Path, number: int, quota: int, encode: DocumentEncoder):
        self.folder, self.number = folder, number
        self.quota, self.encode, self.held, self.seen = quota, encode, 0, 0

    def split(self, batch: list[str]) -> list[str]:
        """The documents of ``batch`` that stay in training; the held-out ones are encoded and written aside."""
        kept = []
        for text in batch:
            self.seen += 1
            if self.quota and self.seen % HOLDOUT_STRIDE == 0 and self.held < self.quota:
                self._hold_out(text)
            else:
                kept.append(text)
        self._append("training-keys", np.array([text_key(text) for text in kept], KEY))
        return kept

    def _hold_out(self, text: str) -> None:
        ids = self.encode([text])
        self._append("tokens", ids)
        self._append("lengths", np.array([len(ids)], np.int64))
        self._append("keys", np.array([text_key(text)], KEY))
        self.held += len(ids)

    def _append(self, kind: str, values: np.ndarray) -> None:
        with open(side_file(self.folder, self.number, kind), "ab") as f:
            values.tofile(f)


@dataclass(frozen=True)
class HoldoutCounts:
    documents: int  # documents diverted from training and packed into holdout/
    blocks: int  # full blocks written to holdout/
    dropped: int  # held-out tokens that filled no block
    repeats: int = 0  # documents diverted from training but left out: a training or earlier held-out text repeats them
    repeat_tokens: int = 0


def repeated_in_training(side: Path, num_shards: int) -> list[np.ndarray]:
    """For each shard, which of its held-out documents repeat the text of a training document of any shard, or
    of a held-out document before them (the first copy stays)."""
    keys = [_read(side_file(side, number, "keys"), KEY) for number in range(num_shards)]
    every = np.concatenate(keys)
    repeated = np.ones(len(every), bool)
    repeated[np.unique(every, return_index=True)[1]] = False  # the first of equal keys
    for number in range(num_shards):
        repeated |= np.isin(every, _read(side_file(side, number, "training-keys"), KEY))
    return np.split(repeated, np.cumsum([len(k) for k in keys])[:-1])


def _read(path: Path, dtype) -> np.ndarray:
    return np.fromfile(path, dtype) if path.is_file() else np.zeros(0, dtype)


def write_holdout(side: Path, num_shards: int, out: Path, block_size: int, dtype: np.dtype,
                  chunk_size: int) -> HoldoutCounts:
    """Pack the shards' held-out documents, in shard order, into full blocks of LitData chunks in ``out``,
    less those whose text is repeated (``repeated_in_training``).

    Nothing is written when they do not fill one block. The writer is told it is the only process:
    under torchrun/SLURM it would read their world size and wait for other ranks' indexes.
    """
    from litdata import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    packer, writer, blocks, documents, repeats, repeat_tokens = BlockPacker(block_size, dtype), None, 0, 0, 0, 0
    held_keys = []
    with patch.dict(os.environ, {"WORLD_SIZE": "1", "GLOBAL_RANK": "0", "NNODES": "1"}):
        for number, repeated in enumerate(repeated_in_training(side, num_shards)):
            held_keys.append(_read(side_file(side, number, "keys"), KEY)[~repeated])
            lengths = _read(side_file(side, number, "lengths"), np.int64)
            documents += int((~repeated).sum())
            repeats, repeat_tokens = repeats + int(repeated.sum()), repeat_tokens + int(lengths[repeated].sum())
            ids = np.split(_read(side_file(side, number, "tokens"), dtype), np.cumsum(lengths)[:-1]) if len(lengths) else []
            for block in (b for document in itertools.compress(ids, ~repeated) for b in packer.add(document)):
                if writer is None:
                    out.mkdir()
                    writer = BinaryWriter(str(out), chunk_size=chunk_size, item_loader=TokensLoader())
                writer.add_item(blocks, block)
                blocks += 1
        if writer is not None:
            writer.done()
            writer.merge()
            np.save(out / DOCUMENT_KEYS, np.unique(np.concatenate(held_keys)))
    return HoldoutCounts(documents, blocks, packer.leftover, repeats, repeat_tokens)


def write_training_keys(side: Path, num_shards: int, out: Path) -> None:
    """The text keys of every shard's training documents, sorted in place, as ``out/DOCUMENT_KEYS``: 8 bytes a
    document and one shard's keys at a time in memory (a concatenation and ``np.unique`` took 9 times the keys'
    size, 13 GB for 200M documents, at the end of hours of tokenizing)."""
    files = [side_file(side, number, "training-keys") for number in range(num_shards)]
    sizes = [path.stat().st_size // KEY.itemsize if path.is_file() else 0 for path in files]
    keys, start = np.empty(sum(sizes), KEY), 0
    for path, size in zip(files, sizes):
        keys[start:start + size] = _read(path, KEY)
        start += size
    keys.sort()
    np.save(out / DOCUMENT_KEYS, keys)


def documents_shared(holdout: Path, training: Path) -> tuple[int, int] | None:
    """How many of the documents of the prepared ``holdout`` folder a prepared ``training`` folder holds too (the same
    text, whatever the spacing or Unicode form), and of how many; None for a folder prepared before the keys were
    kept. The training keys (sorted, repeats included) are read from disk where needed, not loaded: a 50B-token
    corpus has hundreds of MB."""
    if not ((holdout / DOCUMENT_KEYS).is_file() and (training / DOCUMENT_KEYS).is_file()):
        return None
    held, trained = _document_keys(holdout), _document_keys(training, mmap_mode="r")
    if not len(trained):
        return 0, len(held)
    found = np.searchsorted(trained, held).clip(max=len(trained) - 1)
    return int((trained[found] == held).sum()), len(held)


def _document_keys(folder: Path, **load) -> np.ndarray:
    try:
        return np.load(folder / DOCUMENT_KEYS, **load)
    except (ValueError, EOFError, OSError) as err:  # cut short by a disk error, or not NumPy's
        source = folder.parent if folder.name == HOLDOUT else folder
        raise UserError(f"{folder / DOCUMENT_KEYS} cannot be read ({one_line(err)}): prepare {source} again "
                        "(cpt prepare ... --overwrite)") from err


def holdout_manifest(manifest: Manifest, held: HoldoutCounts, chunks_sha256: str) -> Manifest:
    """The holdout's own manifest: the source's facts, the holdout's counts and chunks."""
    return replace(
        manifest, source=f"{manifest.source}/{HOLDOUT}", num_documents=held.documents, chunks_sha256=chunks_sha256,
        num_tokens=held.blocks * manifest.block_size, num_blocks=held.blocks, tokens_dropped=held.dropped,
        skipped_empty=0, skipped_invalid_utf8=0, holdout_tokens=0, holdout_documents=0, holdout_repeats=0,
    )
