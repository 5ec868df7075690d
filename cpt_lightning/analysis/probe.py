"""Probe tokens: fixed-length packed rows from a JSONL/.txt file or the tail of a ``cpt prepare`` source.

Rows are packed the way ``cpt prepare`` packs training data (documents back to back, each ending
with the separator; positions restart after it, see ``cpt_lightning.data.packing``), so every model
sees the same tokens with document-masked attention and no padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cpt_lightning.errors import UserError


def separator_id(tokenizer) -> int:
    """The id that ends each document: SEP, else EOS (the rule ``cpt prepare`` uses)."""
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if separator is None:
        raise UserError("the tokenizer has neither a SEP nor an EOS token to separate probe documents")
    return separator


def load_probe(path: str, tokenizer, seq_len: int, num_sequences: int) -> torch.Tensor:
    """``[rows, seq_len]`` token ids, at most ``num_sequences`` rows and never zero."""
    source = Path(path)
    if source.is_dir():
        rows = prepared_tail(source, tokenizer, seq_len, num_sequences)
    elif source.suffix in (".jsonl", ".txt"):
        rows = pack(tokenize(read_texts(source), tokenizer), seq_len, num_sequences)
    else:
        raise UserError(f"--probe {path}: expected a .jsonl file, a .txt file or a folder written by cpt prepare")
    if len(rows) == 0:
        raise UserError(f"--probe {path} holds fewer than --seq-len={seq_len} tokens")
    return rows


def read_texts(path: Path) -> Iterator[str]:
    """Documents of a JSONL file (``text`` field) or of a text file (one per non-empty line)."""
    if not path.is_file():
        raise UserError(f"--probe {path} does not exist")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield _json_text(line, path, number) if path.suffix == ".jsonl" else line.rstrip("\n")


def _json_text(line: str, path: Path, number: int) -> str:
    try:
        return json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--probe {path}:{number} is not a JSON object with a 'text' field") from None


def tokenize(texts: Iterator[str], tokenizer) -> Iterator[int]:
    """One token stream; each document with the tokenizer's special tokens and ending with the separator."""
    separator = separator_id(tokenizer)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        yield from ids
        if not ids or ids[-1] != separator:
            yield separator


def pack(stream: Iterator[int], seq_len: int, num_sequences: int) -> torch.Tensor:
    """The first ``num_sequences`` full rows of the stream (reads no further than it needs)."""
    wanted = seq_len * num_sequences
    ids = []
    for token in stream:
        ids.append(token)
        if len(ids) == wanted:
            break
    usable = len(ids) - len(ids) % seq_len
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len)


def prepared_tail(folder: Path, tokenizer, seq_len: int, num_sequences: int) -> torch.Tensor:
    """The last ``num_sequences`` blocks of a prepared source, refused if another tokenizer made it."""
    from litdata import StreamingDataset, TokensLoader

    from cpt_lightning.data.encoding import vocab_sha256
    from cpt_lightning.data.manifest import Manifest

    manifest = Manifest.read(folder)
    if manifest.vocab_sha256 != vocab_sha256(tokenizer.get_vocab()) or manifest.separator_id != separator_id(tokenizer):
        raise UserError(
            f"--probe {folder} was prepared with the tokenizer {manifest.tokenizer!r}, not the models' one: "
            "pass --tokenizer or prepare the probe with the models' tokenizer"
        )
    dataset = StreamingDataset(str(folder), item_loader=TokensLoader(block_size=seq_len))
    blocks = [np.asarray(dataset[i]) for i in range(max(len(dataset) - num_sequences, 0), len(dataset))]
    if not blocks:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.from_numpy(np.stack(blocks).astype(np.int64))  # chunks hold uint16/uint32 ids
