"""Layer transplant: model B with encoder layers i..j taken from model A, exported as an HF folder.

Lets the evaluation harness test whether a block of layers alone carries A's gain: everything
outside the block (embeddings, other layers, final norm, MLM head) stays B's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cpt_lightning.analysis.drift import layer_of
from cpt_lightning.analysis.models import load_masked_lm, load_model_tokenizer
from cpt_lightning.atomic import check_replaceable_folder, folder_beside
from cpt_lightning.errors import UserError
from cpt_lightning.hf_compat import add_tokenizer_keys, save_model


def check_compatible(source: torch.nn.Module, target: torch.nn.Module, layers: range) -> None:
    """Refuse layers that would compute something else in the target: other parameter shapes, or the same shapes
    under other settings (attention kind, window, RoPE, heads), which load without a complaint."""
    for role, model in (("TARGET", target), ("SOURCE", source)):  # a deeper target named the shapes, not the range
        depth = model.config.num_hidden_layers
        if layers.start < 0 or layers.stop > depth:
            raise UserError(f"--transplant {layers.start}-{layers.stop - 1} is outside layers 0-{depth - 1} of {role}")
    shapes_a = {k: v.shape for k, v in source.state_dict().items() if layer_of(k) in layers}
    shapes_b = {k: v.shape for k, v in target.state_dict().items() if layer_of(k) in layers}
    if shapes_a != shapes_b:
        raise UserError("the two models' layers differ in parameter names or shapes; transplant needs one architecture")
    for layer in layers:
        settings_a, settings_b = layer_settings(source.config, layer), layer_settings(target.config, layer)
        for name, value in settings_a.items():
            if settings_b[name] != value:
                raise UserError(f"layer {layer}'s {name} is {value!r} in SOURCE but {settings_b[name]!r} in TARGET: "
                                "there it would compute something else; transplant needs one architecture")


def check_same_vocabulary(source_tokenizer, target_tokenizer, source_dir: str, target_dir: str) -> None:
    """Layers trained on the embeddings of other words compute nonsense on the target's: refused where both models
    carry a tokenizer that loads (a source's layers are all it gives, so one saved without any is taken as it is)."""
    from cpt_lightning.pretrained import vocabulary_sha256

    if source_tokenizer is None or target_tokenizer is None:
        return
    if vocabulary_sha256(source_tokenizer) != vocabulary_sha256(target_tokenizer):
        raise UserError(f"SOURCE ({source_dir}) has another tokenizer than TARGET ({target_dir}): its layers were "
                        "trained on the embeddings of other words; transplant between models that share one tokenizer")


def layer_settings(config, layer: int) -> dict:
    """What, besides its weights, decides what one ModernBERT layer computes."""
    kind = config.layer_types[layer]
    return {
        "attention": kind,
        "window": config.local_attention if kind == "sliding_attention" else None,
        "rope": (config.rope_parameters or {}).get(kind),
        "num_attention_heads": config.num_attention_heads,
        "hidden_activation": config.hidden_activation,
        "norm_eps": config.norm_eps,
    }


def transplant(source_dir: str, target_dir: str, layers: range, out: Path) -> None:
    """Copy ``layers`` of the source into the target and save the result (weights, config, tokenizer).

    ``out`` must be new or empty: written into one of the two models, or over another model's files
    (a stale ``training_config.yaml`` names the probe), the folder would no longer be what it says.
    It is written beside itself and renamed into place once complete.
    """
    check_replaceable_folder(out, "--out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; give a new folder for the transplanted model")
    tokenizer = saved_tokenizer(target_dir)
    check_same_vocabulary(saved_tokenizer(source_dir), tokenizer, source_dir, target_dir)
    source, target = load_masked_lm(source_dir), load_masked_lm(target_dir, head_needed=True)
    check_compatible(source, target, layers)
    taken = {k: v for k, v in source.state_dict().items() if layer_of(k) in layers}
    target.load_state_dict(taken, strict=False)
    with folder_beside(out, "transplanted model", replace=False) as staging:
        save_model(target, staging, shown_as=out)
        if tokenizer is not None:  # shipped with the transplant, so the folder loads like any other model
            tokenizer.save_pretrained(staging)
            add_tokenizer_keys(staging, tokenizer)
        provenance = {"layers_from": source_dir, "layers": [layers.start, layers.stop - 1], "rest_from": target_dir}
        (staging / "transplant.json").write_text(json.dumps(provenance, indent=2) + "\n")


def saved_tokenizer(model_dir: str):
    """The tokenizer saved with a model, or None where it has none that loads (a target's: the transplant has none
    either)."""
    try:
        return load_model_tokenizer(model_dir)
    except UserError:
        return None
