"""The manifest of a prepared source: what produced the chunks, and what the model must match.

``manifest.json`` is written last, inside the temporary folder that is renamed into place, so a
folder holding one is complete. Training reads it to refuse data tokenized for another model.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from cpt_lightning.errors import UserError
from cpt_lightning.weights_digest import update_with_file

MANIFEST = "manifest.json"
HOLDOUT = "holdout"  # subfolder of a prepared source: documents kept out of its training blocks
FORMAT = "cpt-lightning/packed-tokens"
VERSION = 1

SOURCES_RECORD = "source_manifests"  # the checkpoint record of each source's prepared size, as the run read it


def index_digest(folder: str) -> str | None:
    """sha256 of a prepared folder's ``index.json`` without its time stamp (its chunks, their rows and sizes) and of
    its chunks' bytes as ``cpt prepare`` recorded them (``chunks_sha256``): a copy elsewhere, or the same text
    prepared again the same way, has the same; other text, the same text in another order, or other settings
    another. None where there is none to read."""
    try:
        index = json.loads((Path(folder) / "index.json").read_text())
    except (OSError, ValueError):
        return None
    layout = {key: value for key, value in index.items() if key != "updated_at"}
    try:
        content = json.loads((Path(folder) / MANIFEST).read_text()).get("chunks_sha256")
    except (OSError, ValueError, AttributeError):
        content = None
    if content:  # prepared before it was recorded: the layout alone, the digest checkpoints of then saved
        layout["chunks_sha256"] = content
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def chunks_sha256(folder: Path, workers: int = 1) -> str:
    """sha256 over the sha256 of each chunk file, in ``index.json``'s order: what the rows hold, which the index does
    not say (the same documents shuffled, or text edited to the same token count, give the same index). Chunks are
    hashed in parallel threads (hashlib releases the GIL): 18 MB in 0.03 s on one core here, where tokenizing them
    took seconds."""
    def file_sha256(name: str) -> str:
        digest = hashlib.sha256()
        update_with_file(digest, folder / name)
        return digest.hexdigest()

    names = [chunk["filename"] for chunk in json.loads((folder / "index.json").read_text())["chunks"]]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return hashlib.sha256("\n".join(pool.map(file_sha256, names)).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    source: str
    inputs: list[str]
    text_field: str
    tokenizer: str
    vocab_size: int
    vocab_sha256: str
    separator_id: int
    block_size: int
    dtype: str
    num_documents: int
    num_tokens: int
    num_blocks: int
    tokens_dropped: int
    skipped_empty: int
    skipped_invalid_utf8: int
    max_docs: int | None
    fingerprint: str
    created: str
    holdout_tokens: int = 0  # tokens in the blocks of ``<folder>/holdout`` (0: no holdout)
    holdout_documents: int = 0
    holdout_repeats: int | None = None  # held out, then left out: training repeats their text (None: not checked)
    num_ranges: int = 0  # contiguous input ranges tokenized apart (they pick the holdout); 0: not recorded
    num_workers: int = 0  # the --num-workers they were planned for: more than num_ranges for a few seek points; 0: not recorded
    chunks_sha256: str = ""  # the chunks' content (index_digest); "": prepared before it was recorded
    format: str = FORMAT
    version: int = VERSION

    def write(self, folder: Path) -> None:
        path = Path(folder) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @staticmethod
    def written_in(folder: Path) -> bool:
        """Whether ``folder`` holds a manifest of this format, of any version, readable or not as a Manifest: a
        ``manifest.json`` of something else (a web app's, a tool's) is no prepared folder."""
        try:
            data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none, unreadable, not JSON or not UTF-8
            return False
        return isinstance(data, dict) and data.get("format") == FORMAT

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            parent = Path(folder).parent
            if Path(folder).name == HOLDOUT and not Path(folder).exists() and (parent / MANIFEST).is_file():
                raise UserError(f"{folder}: {parent} was prepared without a holdout (its summary said why); prepare "
                                "it again with a --holdout-tokens that holds documents out, or validate on another source")
            hint = "no such folder" if not Path(folder).exists() else f"no {MANIFEST}"
            raise UserError(f"{folder}: not a prepared source ({hint}); run `cpt prepare` for it first")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise UserError(f"{path}: not a {FORMAT} v{VERSION} manifest; prepare the source again")
            # Fields added later have defaults, so manifests written before them still read.
            manifest = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING})
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{path}: unreadable manifest ({err}); prepare the source again") from None
        check_chunks(Path(folder))
        return manifest

    @property
    def is_holdout(self) -> bool:
        return self.source.endswith(f"/{HOLDOUT}")


def holdout_folder(folder: str | Path) -> Path | None:
    """``<folder>/holdout`` when ``cpt prepare`` wrote one (documents no training block contains)."""
    path = Path(folder) / HOLDOUT
    return path if (path / MANIFEST).is_file() else None


def check_chunks(folder: Path) -> None:
    """Every chunk litdata's index lists is present at its recorded size.

    A truncated or missing chunk would otherwise surface mid-training as a litdata wait timeout.
    """
    try:
        chunks = json.loads((folder / "index.json").read_text())["chunks"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise UserError(f"{folder}: unreadable LitData index.json ({err}); prepare the source again") from None
    for chunk in chunks:
        path = folder / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "missing" if size is None else f"{size} bytes, index says {chunk['chunk_bytes']}"
            raise UserError(f"{path}: damaged LitData chunk ({found}); prepare the source again")


def rows_of(folder: str | Path, block_size: int) -> int:
    """The rows of ``block_size`` tokens litdata reads from a prepared folder: it cuts each chunk on its own, so rows
    shorter than the prepared ones leave each chunk's tail unread (up to a row per chunk fewer than its tokens hold)."""
    chunks = json.loads((Path(folder) / "index.json").read_text())["chunks"]  # read whole by Manifest.read's check
    return sum(chunk["dim"] // block_size for chunk in chunks)


@dataclass(frozen=True)
class DataFacts:
    """What every source of a mix shares and the model is checked against."""

    tokenizer: str
    vocab_size: int
    vocab_sha256: str
    separator_id: int
    block_size: int


def mix_facts(manifests: dict[str, Manifest], block_size: int | None = None, held_out: tuple[str, ...] = ()) -> DataFacts:
    """Facts common to all sources; sources tokenized differently cannot share a batch. The rows' length comes from
    the training sources: the ``held_out`` (validation) ones are read at that length, never set it."""
    first_name, first = next(iter(manifests.items()))
    for name, manifest in manifests.items():
        for field in ("vocab_sha256", "vocab_size", "separator_id"):
            if getattr(manifest, field) != getattr(first, field):
                raise UserError(
                    f"sources {first_name!r} and {name!r} were prepared with different tokenizers "
                    f"({first.tokenizer!r} vs {manifest.tokenizer!r}: {field} differs); prepare them with the same one"
                )
    training = {name: manifest for name, manifest in manifests.items() if name not in held_out}
    shortest = min(training, key=lambda name: training[name].block_size)
    prepared = training[shortest].block_size
    if block_size is None:
        block_size = prepared
    elif block_size > prepared:
        raise UserError(
            f"data.init_args.block_size={block_size} is larger than the prepared block size {prepared} "
            f"(source {shortest!r}); choose a block_size ≤ that or prepare the sources again with a larger --block-size"
        )
    if block_size < 2:
        raise UserError(f"data.init_args.block_size={block_size}: must be at least 2")
    for name in held_out:
        if manifests[name].block_size < block_size:
            raise UserError(
                f"data.init_args.val_sources {name!r} was prepared with --block-size {manifests[name].block_size}, "
                f"shorter than the training rows ({block_size} tokens): prepare it again with --block-size "
                f"{block_size}, or set data.init_args.block_size to at most {manifests[name].block_size}"
            )
    return DataFacts(first.tokenizer, first.vocab_size, first.vocab_sha256, first.separator_id, block_size)


def check_compatible(
    facts: DataFacts, model_vocab_size: int, max_position_embeddings: int, tokenizer=None
) -> None:
    """Refuse data the model cannot read; ``tokenizer`` (a loaded HF tokenizer) also checks identity, first: data of
    another, larger tokenizer was told to raise the model's vocab_size, which the identity check then refused."""
    from cpt_lightning.pretrained import vocabulary_sha256  # imported here: cpt prepare needs no torch

    if tokenizer is not None and vocabulary_sha256(tokenizer) != facts.vocab_sha256:
        raise UserError(
            f"the data was tokenized with {facts.tokenizer!r}, whose vocabulary differs from the model's "
            "tokenizer: fix model.init_args.tokenizer or prepare the data again with the model's tokenizer"
        )
    if facts.vocab_size > model_vocab_size:
        raise UserError(
            f"the data was tokenized with {facts.tokenizer!r} ({facts.vocab_size} ids) but the model's embeddings "
            f"hold {model_vocab_size}: fix model vocab_size or prepare the data with the model's tokenizer"
        )
    if facts.block_size > max_position_embeddings:
        raise UserError(
            f"data block_size={facts.block_size} exceeds the model's max_position_embeddings="
            f"{max_position_embeddings}: lower data.init_args.block_size"
        )
    if tokenizer is None:
        return
    # as cpt prepare chose it: the SEP token, else the EOS; one with neither trained on rows framed by a [SEP] it then
    # exported without (no sep or cls id in the config, texts no longer wrapped)
    kind = "sep" if tokenizer.sep_token_id is not None else "eos"
    separator = getattr(tokenizer, f"{kind}_token_id")
    if separator != facts.separator_id:
        uses = f"uses {kind}_token_id={separator}" if separator is not None else "has neither a SEP nor an EOS token"
        raise UserError(f"the data separates documents with id {facts.separator_id} but the model's tokenizer {uses}: "
                        "prepare the data with the model's tokenizer, or fix model.init_args.tokenizer")
