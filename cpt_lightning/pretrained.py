"""``from_pretrained`` where only a head may be missing from the files, and with no Hub kernels swapped in.

transformers initialises any weight a folder lacks at random and says so in a load report that
reads like noise (it is printed for every head meant to be new). Here the report is hidden and a
missing weight outside the expected head is an error: a random encoder evaluates or compares silently.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Mapping

import torch
import transformers
from safetensors import SafetensorError

from cpt_lightning.errors import UserError, one_line

MLM_HEAD = ("head.", "decoder.")  # ModernBertForMaskedLM's weights beyond the encoder: what a ModernBertModel folder lacks
# From transformers 5.25, ``from_pretrained`` swaps layers (ModernBERT's rotary embedding on CUDA) for kernels it
# downloads from the Hub whenever the ``kernels`` package is installed, which 5.25 requires. The kernels a run trains
# and evaluates with are its config's (attn_implementation, compile): the same code on any version and no download
# at load, where a compute node may have no internet (5.24 and earlier never swap unless asked).
NO_HUB_KERNELS = {"use_kernels": False}


# tokenizer → (its size when read, its vocabulary, its digest once asked for); dropped with the tokenizer
_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocabulary_entry(tokenizer) -> dict:
    entry = _VOCABULARIES.get(tokenizer)
    if entry is None or entry["size"] != len(tokenizer):  # add_tokens changes the size: read it again
        entry = _VOCABULARIES[tokenizer] = {"size": len(tokenizer),
                                            "ids": types.MappingProxyType(tokenizer.get_vocab())}
    return entry


def vocabulary(tokenizer) -> Mapping[str, int]:
    """``tokenizer.get_vocab()``, read-only, read once per tokenizer: each call builds a dict of every token (20 ms
    for ModernBERT's 50,368), and building one module asked for it five times."""
    return _vocabulary_entry(tokenizer)["ids"]


def vocabulary_sha256(tokenizer) -> str:
    """``vocab_sha256`` of the tokenizer's vocabulary, hashed once per tokenizer (0.1 s: the data's check and every
    checkpoint save ask for it)."""
    from cpt_lightning.data.encoding import vocab_sha256

    entry = _vocabulary_entry(tokenizer)
    if "sha256" not in entry:
        entry["sha256"] = vocab_sha256(entry["ids"])
    return entry["sha256"]


def tokenizer_size(tokenizer) -> int:
    """The embedding rows a tokenizer's ids need: its highest id + 1, which exceeds ``len(tokenizer)`` when ids
    skip numbers (a vocabulary with gaps would otherwise get a model whose highest ids index past the embeddings)."""
    return max(len(tokenizer), max(vocabulary(tokenizer).values(), default=-1) + 1)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' load report and download bars (restored afterwards)."""
    level, bar = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bar:
            transformers.utils.logging.enable_progress_bar()


def mlm_head(config) -> tuple[str, ...]:
    """The weights a family's masked-LM class adds to its encoder, as ``from_pretrained_missing``'s ``may_lack``
    (ModernBERT: ``head.``, ``decoder.``; BERT: ``cls.``; RoBERTa: ``lm_head.``): a folder saved from the bare
    encoder lacks them."""
    return added_weights(transformers.AutoModelForMaskedLM, config)


def added_weights(auto_class, config) -> tuple[str, ...]:
    """The weights ``auto_class`` adds to the family's encoder (a task class: ``classifier.``, DistilBERT's
    ``pre_classifier.``, ModernBERT's ``head.``), and the encoder's pooler, which a folder saved from the masked-LM
    class lacks (BERT's, ALBERT's): the prefixes a folder may lack when loaded as ``auto_class``. Built on the meta
    device: no memory, no initialisation."""
    with torch.device("meta"):
        model = auto_class.from_config(config)
    prefix = model.base_model_prefix
    return tuple(f"{child}." for child, _ in model.named_children() if child != prefix) + (f"{prefix}.pooler.",)


def from_pretrained_checked(auto_class, name: str, consequence: str, may_lack: tuple[str, ...] = (), **kwargs):
    """``auto_class.from_pretrained(name, **kwargs)``, refusing files that lack any weight whose name does not
    start with one of ``may_lack``; ``consequence`` says what random weights would do there."""
    return from_pretrained_missing(auto_class, name, consequence, may_lack, **kwargs)[0]


def from_pretrained_missing(auto_class, name: str, consequence: str, may_lack: tuple[str, ...] = (), **kwargs):
    """:func:`from_pretrained_checked`, also returning the weights it lacked that ``may_lack`` allows."""
    with quiet_transformers():
        try:
            model, info = auto_class.from_pretrained(name, output_loading_info=True, **NO_HUB_KERNELS, **kwargs)
        except SafetensorError as err:  # a copy cut short, or an empty file: a traceback in fit, evaluate and analyze
            raise UserError(f"model {name!r}: its weights file cannot be read ({err}): it is damaged or incomplete; "
                            "copy or export it again") from None
        except (OSError, RuntimeError) as err:
            if "ignore_mismatched_sizes" not in str(err):  # no weights file, a shard missing, a .bin cut short
                raise UserError(f"model {name!r}: its weights cannot be read ({type(err).__name__}: {one_line(err)}): "
                                "the folder is incomplete or damaged; copy, download or export it again") from None
            # a weight whose shape is not the config's (vocab_size edited, files mixed)
            _, info = auto_class.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True,
                                                 **NO_HUB_KERNELS, **kwargs)
            key, *shapes = next(iter(info.get("mismatched_keys") or [("a weight", "?", "?")]))
            raise UserError(f"model {name!r}: its weights do not fit its config.json ({key!r} has shape "
                            f"{tuple(shapes[0])} in the files, the config builds {tuple(shapes[1])}): use the "
                            "config.json saved with these weights, or export the model again") from None
    missing = [key for key in info["missing_keys"] if not key.startswith(may_lack)]
    if missing:
        raise UserError(f"model {name!r}: {len(missing)} weights are missing from its files (e.g. {missing[0]!r}): {consequence}")
    return model, sorted(set(info["missing_keys"]) - set(missing))
