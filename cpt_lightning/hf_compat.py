"""The keys transformers 4.x reads, added to a folder transformers 5.x saved, so both build the same model.

Researchers' fine-tuning stacks often still run 4.x (ModernBERT exists from 4.48). 5.x writes
``rope_parameters`` and ``layer_types``; 4.x reads neither and falls back, *silently*, to its
defaults (RoPE thetas 160,000 / 10,000, a global layer every third) — other logits for any model
that differs. 5.x names its tokenizer class ``TokenizersBackend``, which 4.x's ``AutoTokenizer``
refuses. Measured in 4.48.3 and 4.57.6 (docs/export.md): with these keys, the token ids and the
logits equal 5.x's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from transformers.utils import logging as hf_logging

FULL, SLIDING = "full_attention", "sliding_attention"
TOKENIZER_CLASS_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}  # 5.x's generic fast tokenizer, under its 4.x name
WHERE_READ_FROM = ("is_local", "local_files_only")  # 5.x records how it found the tokenizer, not how to build it


def save_model(model, folder: Path, shown_as: Path | None = None) -> None:
    """``save_pretrained`` with 4.x's config keys added, and without transformers' "Writing model shards" bar:
    one shard (up to 50 GB), so it says nothing, and at a phase end it broke into the training progress bar.
    ``shown_as``: the folder the warnings name, where ``folder`` is a staging folder renamed into place after."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    add_config_keys(folder, model.config, shown_as)


def add_config_keys(folder: Path, config, shown_as: Path | None = None) -> None:
    """Write 4.x's ``global/local_rope_theta``, ``global_attn_every_n_layers`` (and ``rope_scaling``) into ``config.json``.

    A layer pattern or RoPE scaling that 4.x's keys cannot express is a warning: the folder still
    loads in 5.x as trained.
    """
    path = folder / "config.json"
    saved = json.loads(path.read_text())
    rope = config.rope_parameters or {}
    saved["global_rope_theta"], saved["local_rope_theta"] = ((rope.get(kind) or {}).get("rope_theta")
                                                             for kind in (FULL, SLIDING))
    full_scaling, sliding_scaling = rope_scalings(config)
    if full_scaling == sliding_scaling and full_scaling.get("rope_type", "default") != "default":
        saved["rope_scaling"] = full_scaling
    if (every := global_every_n(config.layer_types or [])) is not None:
        saved["global_attn_every_n_layers"] = every
    else:  # a model_config that set it beside its layer_types: 5.x saves it as given, a pattern the model has not
        saved.pop("global_attn_every_n_layers", None)
    for gap in gaps_in_4x(config):
        warnings.warn(f"{shown_as or folder}: {gap}")
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def rope_scalings(config) -> tuple[dict, dict]:
    """The global and the local layers' RoPE scaling (their ``rope_parameters`` but the theta)."""
    rope = config.rope_parameters or {}
    return tuple({k: v for k, v in (rope.get(kind) or {}).items() if k != "rope_theta"} for kind in (FULL, SLIDING))


def gaps_in_4x(config) -> list[str]:
    """What of ``config`` transformers 4.x's keys cannot express (none: 4.x builds the model as trained)."""
    gaps = []
    full_scaling, sliding_scaling = rope_scalings(config)
    if full_scaling != sliding_scaling:
        gaps.append("global and local layers scale RoPE differently, which transformers 4.x cannot express")
    elif full_scaling.get("rope_type", "default") != "default":  # written as rope_scaling, for 4.x versions that read it
        gaps.append(f"RoPE scaling ({full_scaling['rope_type']}): transformers 4.48 cannot build it (KeyError or "
                    "ValueError in its rope functions) and 4.x's flash_attention_2 path runs it unscaled")
    if global_every_n(config.layer_types or []) is None:
        gaps.append(f"layer_types {config.layer_types} is not one global layer every n; "
                    "transformers 4.x will not build this model as trained")
    return gaps


def global_every_n(layer_types: list[str]) -> int | None:
    """The n of 4.x's pattern (layer i global when i % n == 0) that gives ``layer_types``, if there is one."""
    for n in range(1, len(layer_types) + 1):
        if layer_types == [SLIDING if i % n else FULL for i in range(len(layer_types))]:
            return n
    return None


def add_tokenizer_keys(folder: Path, tokenizer) -> None:
    """Name the tokenizer class 4.x knows, save ``model_input_names``, and decode as 5.x does.

    5.x does not save ``model_input_names``; 4.x's default adds ``token_type_ids``, which 4.48's
    ``ModernBertModel`` refuses. 5.x skips ``clean_up_tokenization_spaces`` for a BPE tokenizer while 4.x
    applies it ("left . It 's" → "left. It's"), so for BPE it is written as the false 5.x acts on.
    """
    path = folder / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    saved["tokenizer_class"] = TOKENIZER_CLASS_4X.get(saved.get("tokenizer_class"), saved.get("tokenizer_class"))
    saved["model_input_names"] = list(tokenizer.model_input_names)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # None for a slow (pure Python) tokenizer
    bpe = backend is not None and type(backend.model).__name__ == "BPE"
    if bpe and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False):
        saved["clean_up_tokenization_spaces"] = False
    for key in WHERE_READ_FROM:
        saved.pop(key, None)
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")
