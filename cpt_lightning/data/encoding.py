"""Tokenizers for ``cpt prepare``: load one by name or folder, encode documents in workers.

Every document must end with the separator the model is trained with, so position ids can
restart after it: ModernBERT's post-processor already gives ``[CLS] … [SEP]``; a tokenizer that
adds no trailing special token gets its SEP (or EOS) appended here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt_lightning.errors import UserError, tokenizer_load_reason
from cpt_lightning.model_names import is_local_path

HUGE_MAX_LENGTH = 1_000_000  # transformers' "no limit" placeholder is ~1e30


@dataclass(frozen=True)
class TokenizerSpec:
    """What the workers need (``backend_json``) and what the manifest records."""

    name: str
    backend_json: str  # as the workers encode with it: a Unigram's special pieces out of reach (unmatchable_special_pieces)
    vocab_size: int
    separator_id: int
    append_separator: bool
    model_max_length: int | None
    vocab_sha256: str

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding every id: halves chunk size for 64k vocabularies."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)


def vocab_sha256(vocab: dict[str, int]) -> str:
    """Identity of a vocabulary (tokens and ids, added tokens included)."""
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def load_tokenizer(name: str) -> TokenizerSpec:
    """A fast tokenizer from a local folder (read directly: no transformers import) or a hub name.

    A folder whose JSON files name no SEP/EOS (a CamemBERT-style snapshot whose tokenizer class
    supplies ``</s>``) goes through transformers, as ``cpt fit`` does."""
    folder = Path(name)
    if (folder / "tokenizer.json").is_file() and (spec := _from_folder(name, folder)) is not None:
        return spec
    if is_local_path(name) and not folder.exists():  # not a hub id: transformers' message spoke of repo ids
        raise UserError(f"cannot load tokenizer {name!r}: no such folder")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # OSError (not found / offline), ValueError (bad config), ...
        raise UserError(f"cannot load tokenizer {name!r}: {tokenizer_load_reason(name, err)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer {name!r} has no fast (Rust) implementation; cpt prepare needs one")
    return spec_of(tokenizer, name)


def spec_of(tokenizer, name: str) -> TokenizerSpec:
    """The spec of a loaded transformers fast tokenizer (a copy of its backend: ``_spec`` turns off truncation)."""
    from tokenizers import Tokenizer

    special = {"sep": tokenizer.sep_token, "eos": tokenizer.eos_token}
    return _spec(name, Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), special, tokenizer.model_max_length)


def _from_folder(name: str, folder: Path) -> TokenizerSpec | None:
    """The spec from the folder's JSON files, or None when they name no SEP/EOS token."""
    from tokenizers import Tokenizer

    config: dict = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).is_file():
            config.update(json.loads((folder / file).read_text()))
    special = {key: _content(config.get(f"{key}_token")) for key in ("sep", "eos")}
    if all(token is None for token in special.values()):
        return None
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return _spec(name, backend, special, config.get("model_max_length"))


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _spec(name: str, backend, special: dict, max_length) -> TokenizerSpec:
    backend.no_truncation()
    backend.no_padding()
    ids = {key: backend.token_to_id(token) for key, token in special.items() if token is not None}
    separator = ids.get("sep", ids.get("eos"))
    if separator is None:
        raise UserError(f"tokenizer {name!r} has neither a SEP nor an EOS token to separate documents: name the one "
                        'its post-processor ends a text with in its tokenizer_config.json, e.g. "sep_token": "[SEP]"')
    probe = backend.encode("a", add_special_tokens=True).ids
    vocab = backend.get_vocab(with_added_tokens=True)
    return TokenizerSpec(
        name=name,
        backend_json=unmatchable_special_pieces(backend),
        vocab_size=max(vocab.values()) + 1,
        separator_id=separator,
        append_separator=probe[-1] != separator,
        model_max_length=int(max_length) if max_length and max_length < HUGE_MAX_LENGTH else None,
        vocab_sha256=vocab_sha256(vocab),
    )


def unmatchable_special_pieces(backend) -> str:
    """The tokenizer's JSON, with its special tokens out of reach of a Unigram model's segmentation.

    A Unigram model (SentencePiece: CamemBERT-style ``<s> </s> <pad> <unk>``) keeps its special tokens
    in the vocabulary it segments text with, scored 0 (the best score), so ``encode_special_tokens``
    is not enough: "</s>" written in a document would still come out as the separator and end the
    document there. Renaming those pieces to strings text does not hold (the noncharacter U+FFFF
    before the name) removes them from the lattice (SentencePiece never matches its control pieces
    either); every id stays where it was, and text without a special token's string is segmented
    exactly as before. Any other model's JSON is returned unparsed (0.13 s for ModernBERT's BPE, at every prepare).
    """
    from tokenizers.models import Unigram

    backend_json = backend.to_str()
    if not isinstance(backend.model, Unigram):
        return backend_json
    data = json.loads(backend_json)
    model = data["model"]
    special = {token["content"] for token in data.get("added_tokens") or () if token.get("special")}
    if not special:
        return backend_json
    renamed = [piece for piece in model["vocab"] if piece[0] in special]
    if not renamed:  # specials outside the vocabulary: the same tokenizer (and fingerprint) as it came
        return backend_json
    for piece in renamed:
        piece[0] = "\uffff" + piece[0]  # only a text holding U+FFFF right before "</s>" would still match
    return json.dumps(data, ensure_ascii=False)


class DocumentEncoder:
    """Encodes a batch of documents into one flat id array, each document ending with the separator.

    Special tokens written in a document ("[SEP]", "[MASK]" in a paper about BERT) are encoded as
    the text they are: read as tokens they would end the document mid-text (position ids restart
    at a separator) and feed the model mask tokens it was never asked to fill.
    """

    def __init__(self, spec: TokenizerSpec):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(spec.backend_json)
        self.tokenizer.encode_special_tokens = True  # added special tokens ([CLS] … [SEP]) still frame each document
        self.tail = [spec.separator_id] if spec.append_separator else []
        self.dtype = spec.dtype

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts)]
        if self.tail:
            ids = [doc + self.tail for doc in ids]
        count = sum(map(len, ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=count)
