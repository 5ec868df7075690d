"""Probe tokens: fixed-length packed rows from a JSONL/.txt file, a ``cpt prepare`` source, or a run's config.

Rows are packed the way ``cpt prepare`` packs training data (documents back to back, each ending
with the separator; positions restart after it, see ``cpt_lightning.data.packing``), so every model
sees the same tokens with document-masked attention and no padding. Prepared data is read from its
holdout (documents no training row holds) wherever there is one; a run's ``config.yaml`` gives the
holdouts of its training sources, split by the mix weights.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpt_lightning.errors import UserError, load_yaml, utf8_lines
from cpt_lightning.model_card import RunConfig

NO_PROBE = ("no --probe given and none of the models holds or sits beside a run config: pass --probe "
            "(a .jsonl/.txt file, a prepared folder, or a run's config.yaml)")


@dataclass(frozen=True)
class Probe:
    """``[rows, seq_len]`` token ids and where they came from (``read``: folder → rows; recorded in layers.json)."""

    rows: torch.Tensor
    held_out: bool | None  # None: a text file, which the models may or may not have seen
    read: dict[str, int]


def separator_id(tokenizer) -> int:
    """The id that ends each document: SEP, else EOS (the rule ``cpt prepare`` uses)."""
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if separator is None:
        raise UserError("the tokenizer has neither a SEP nor an EOS token to separate probe documents")
    return separator


def load_probe(path: str, tokenizer, seq_len: int, num_sequences: int, run_config: RunConfig | None = None) -> Probe:
    """At most ``num_sequences`` rows and never zero. ``path`` names the source; ``run_config``, when given, is
    the run config it names (the copy a checkpoint holds, which no file path reads)."""
    source = Path(path).expanduser()  # --probe=~/x: no shell expanded it
    if run_config is not None:
        probe = run_config_probe(run_config, path, tokenizer, seq_len, num_sequences)
    elif source.is_dir():
        probe = prepared_probe(source, tokenizer, seq_len, num_sequences)
    elif source.suffix in (".yaml", ".yml"):
        probe = run_config_probe(RunConfig.read(source), path, tokenizer, seq_len, num_sequences)
    elif source.suffix in (".jsonl", ".txt"):
        texts = read_texts(source)
        if (first := next(texts, None)) is None:  # "lower --seq-len" was the advice, which cannot help
            raise UserError(f"--probe {path} holds no text: every document in it is empty or blank")
        rows = pack(tokenize(itertools.chain([first], texts), tokenizer), seq_len, num_sequences)
        probe = Probe(rows, None, {str(source): len(rows)})
    else:
        raise UserError(f"--probe {path}: expected a .jsonl or .txt file, a folder written by cpt prepare, "
                        "or a run's config.yaml")
    if len(probe.rows) == 0:
        again = "" if probe.held_out is None else ", or prepare the data again with a larger --holdout-tokens"
        raise UserError(f"--probe {path} holds fewer than --seq-len={seq_len} tokens: lower --seq-len{again}")
    return probe


def default_probe(model_paths: list[str]) -> tuple[str, RunConfig]:
    """The run config of the first model that has one, and a name for it: a checkpoint's own copy (the config
    that trained it, also when its log folder's ``config.yaml`` is a later resume's, or the checkpoint moved),
    else the ``config.yaml`` of its log folder; an export's ``training_config.yaml``."""
    for path in model_paths:
        if (config := run_config_of(path)) is not None:
            return (str(config.path) if config.path else f"{path} (the run config it holds)"), config
    raise UserError(NO_PROBE)


def run_config_of(model_path: str) -> RunConfig | None:
    from cpt_lightning.export import TRAINING_CONFIG, is_training_checkpoint, read_checkpoint
    from cpt_lightning.export import run_config_of as checkpoint_run_config

    if is_training_checkpoint(model_path):
        return checkpoint_run_config(read_checkpoint(model_path, weights=False), None)
    config = Path(model_path, TRAINING_CONFIG)
    return RunConfig.read(config) if config.is_file() else None


def read_texts(path: Path) -> Iterator[str]:
    """Documents of a JSONL file (``text`` field) or of a text file (one per line), read as ``cpt prepare`` reads
    them: line ends (``\\r\\n`` too) are not text, and empty or blank documents are skipped."""
    if not path.is_file():
        raise UserError(f"--probe {path} does not exist")
    for number, line in utf8_lines(path):
        text = _json_text(line, path, number) if path.suffix == ".jsonl" and line.strip() else line.rstrip("\r\n")
        if text and not text.isspace():
            yield text


def _json_text(line: str, path: Path, number: int) -> str:
    try:
        text = json.loads(line)["text"]
    except (ValueError, RecursionError, KeyError, TypeError):  # ValueError: JSONDecodeError, a 5,000-digit number
        raise UserError(f"--probe {path}:{number} is not a JSON object with a 'text' field; give the text another "
                        "way: a .txt with one document per line, or the folder `cpt prepare --text-field` wrote") from None
    if text is not None and not isinstance(text, str):
        raise UserError(f"--probe {path}:{number}: 'text' is a {type(text).__name__}, expected a string")
    return text or ""


def tokenize(texts: Iterator[str], tokenizer) -> Iterator[int]:
    """One token stream, each document encoded as ``cpt prepare`` encodes it (``DocumentEncoder``: a "[SEP]" or
    "[MASK]" written in a text stays text) and ending with the separator."""
    from cpt_lightning.data.encoding import DocumentEncoder, spec_of

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("a .jsonl/.txt probe is encoded as cpt prepare encodes, which needs a fast tokenizer: "
                        "save the models with one, or give --probe a folder cpt prepare wrote")
    encode = DocumentEncoder(spec_of(tokenizer, "the models' tokenizer"))
    texts = iter(texts)
    while batch := list(itertools.islice(texts, 64)):
        yield from encode(batch).tolist()


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


def prepared_probe(folder: Path, tokenizer, seq_len: int, num_sequences: int) -> Probe:
    """A prepared source's holdout (its first rows); without one, the source's own last rows, with a note."""
    from cpt_lightning.data.manifest import holdout_folder

    if (holdout := holdout_folder(folder)) is not None:
        rows = prepared_rows(holdout, tokenizer, seq_len, num_sequences)
        return Probe(rows, True, {str(holdout): len(rows)})
    if read_manifest(folder, tokenizer).is_holdout:
        rows = prepared_rows(folder, tokenizer, seq_len, num_sequences)
        return Probe(rows, True, {str(folder): len(rows)})
    print(f"note: {folder} has no holdout/, so its last rows are the probe and the models may have trained on them; "
          "prepare it with --holdout-tokens for held-out rows", file=sys.stderr)
    rows = prepared_rows(folder, tokenizer, seq_len, num_sequences, from_end=True)
    return Probe(rows, False, {str(folder): len(rows)})


def run_config_probe(config: RunConfig, where: str, tokenizer, seq_len: int, num_sequences: int) -> Probe:
    """Rows from the holdout of each training source of a run, split across them by the mix weights."""
    from cpt_lightning.data.manifest import holdout_folder

    sources = config_sources(config, where)
    holdouts = []
    for name, path, _ in sources:
        if (holdout := holdout_folder(path)) is None:
            found = "no holdout/" if Path(path).is_dir() else "not found (relative paths are read from the current folder)"
            raise UserError(f"source {name!r} of {where} ({path}): {found}; prepare it again with "
                            "cpt prepare --holdout-tokens N (N > 0), or pass --probe")
        holdouts.append(holdout)
    weights = [weight for _, _, weight in sources]
    shares = split_rows(num_sequences, weights)
    reads = [prepared_rows(h, tokenizer, seq_len, share) for h, share in zip(holdouts, shares)]
    if short := [(str(h), len(rows), share) for h, rows, share in zip(holdouts, reads, shares) if len(rows) < share]:
        # a small source's holdout (prepare holds out at most 2% of it) shrank its share of the probe, silently
        kept = min(num_sequences * got // share for _, got, share in short)
        while kept and any(share > len(rows) for share, rows in zip(split_rows(kept, weights), reads)):
            kept -= 1  # rounding can give a short source a share past what it holds: the mix would drift
        said = ", ".join(f"{folder} holds {got} rows of {seq_len} tokens, short of its share of {share}"
                         for folder, got, share in short)
        if kept == 0:
            raise UserError(f"probe {where}: {said}; lower --seq-len, or pass --probe")
        shares = split_rows(kept, weights)
        reads = [rows[:share] for rows, share in zip(reads, shares)]
        taken = ", ".join(f"{len(rows)} from {name}" for (name, _, _), rows in zip(sources, reads))
        print(f"note: {said}; the probe keeps the run's mix with {sum(map(len, reads))} of the {num_sequences} "
              f"sequences asked for ({taken}; a lower --seq-len gives more)", file=sys.stderr)
    parts = {str(h): rows for h, rows, share in zip(holdouts, reads, shares) if share}
    return Probe(torch.cat(list(parts.values())), True, {folder: len(rows) for folder, rows in parts.items()})


def config_sources(config: RunConfig, where: str) -> list[tuple[str, str, float]]:
    """``(name, path, weight)`` of ``data.init_args.sources`` in a saved LightningCLI config."""
    loaded = load_yaml(config.text, f"probe {where}: not a readable run config")
    data = loaded.get("data") if isinstance(loaded, dict) else None
    init_args = data.get("init_args", data) if isinstance(data, dict) else None
    sources = init_args.get("sources") if isinstance(init_args, dict) else None
    if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) and "path" in s for s in sources):
        raise UserError(f"probe {where}: no data.init_args.sources list of {{name, path, weight}}; "
                        "pass the config.yaml that cpt fit saved in the run's log folder")
    # ~ expanded as cpt fit's Source does: the saved config keeps it as written
    return [(s.get("name") or Path(s["path"]).name, os.path.expanduser(str(s["path"])), float(s.get("weight", 1.0)))
            for s in sources]


def split_rows(total: int, weights: list[float]) -> list[int]:
    """``total`` rows in proportion to ``weights``, rounded by largest remainder (they sum to ``total``)."""
    exact = [total * weight / sum(weights) for weight in weights]
    shares = [int(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def read_manifest(folder: Path, tokenizer):
    """The manifest of a prepared folder, refused if another tokenizer made it."""
    from cpt_lightning.data.manifest import Manifest
    from cpt_lightning.pretrained import vocabulary_sha256

    manifest = Manifest.read(folder)
    if manifest.vocab_sha256 != vocabulary_sha256(tokenizer) or manifest.separator_id != separator_id(tokenizer):
        raise UserError(
            f"--probe {folder} was prepared with the tokenizer {manifest.tokenizer!r}, not the models' one: "
            "pass --tokenizer or prepare the probe with the models' tokenizer"
        )
    return manifest


def prepared_rows(folder: Path, tokenizer, seq_len: int, count: int, from_end: bool = False) -> torch.Tensor:
    """The first (or last) ``count`` rows of ``seq_len`` tokens of a prepared folder."""
    from litdata import StreamingDataset, TokensLoader

    from cpt_lightning.data.loader import prepared_folder

    read_manifest(folder, tokenizer)
    dataset = StreamingDataset(prepared_folder(str(folder)), item_loader=TokensLoader(block_size=seq_len))
    start = max(len(dataset) - count, 0) if from_end else 0
    blocks = [np.asarray(dataset[i]) for i in range(start, min(start + count, len(dataset)))]
    if not blocks:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.from_numpy(np.stack(blocks).astype(np.int64))  # chunks hold uint16/uint32 ids
