"""Loading the models to compare (HF folders or training checkpoints), and their per-layer features."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from cpt_lightning.attention import attention_masks
from cpt_lightning.errors import UserError, holds_no_tokenizer, one_line, tokenizer_load_reason
from cpt_lightning.model_names import is_local_path
from cpt_lightning.pretrained import MLM_HEAD, from_pretrained_checked


def require_model(path: str) -> None:
    """Fail before any loading unless ``path`` is a ModernBERT model: a cpt fit checkpoint, an HF folder, or
    a name ``from_pretrained`` finds (``answerdotai/ModernBERT-base``, on the hub or in its cache)."""
    from cpt_lightning.export import is_training_checkpoint  # imports Lightning: not at `cpt analyze --help`

    if is_training_checkpoint(path):
        return
    if is_local_path(path):
        if not Path(path).exists():
            raise UserError(f"{path}: no such folder or checkpoint")
        if not Path(path, "config.json").is_file():
            raise UserError(f"{path} is neither a Hugging Face model folder (no config.json) nor a cpt fit checkpoint")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a model folder, checkpoint or name from_pretrained can load ({one_line(err)})") from None
    if config.model_type != "modernbert":
        raise UserError(f"{path} is a {config.model_type!r} model; cpt analyze compares ModernBERT encoders layer by layer")


def load_masked_lm(path: str, head_needed: bool = False, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The MLM model of an HF folder, or rebuilt from a checkpoint exactly as ``cpt export`` does; in ``dtype``,
    else in the precision it was stored in.

    A folder saved as ``ModernBertModel`` has no MLM head: fine where only the layers are read,
    refused where the head is kept (a transplant's target would carry a random one)."""
    from cpt_lightning.export import is_training_checkpoint, load_tokenizer, read_checkpoint, rebuild_model

    if is_training_checkpoint(path):
        checkpoint = read_checkpoint(path)
        return rebuild_model(checkpoint, load_tokenizer(checkpoint, None), dtype)  # sdpa, whatever kernel trained it
    if head_needed:
        may_lack, consequence = (), ("they would be random in the transplant (a folder saved as ModernBertModel has no "
                                     "MLM head); give TARGET as `cpt export` writes it, with its head")
    else:
        may_lack, consequence = MLM_HEAD, "its layers would be random; export the checkpoint again with `cpt export`"
    try:
        return from_pretrained_checked(AutoModelForMaskedLM, path, consequence, may_lack, attn_implementation="sdpa",
                                       **({"dtype": dtype} if dtype else {}))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load {path}: {err}") from None


def load_model_tokenizer(path: str):
    """The tokenizer saved with an HF folder, or the one a checkpoint's run recorded."""
    from cpt_lightning.export import is_training_checkpoint, load_tokenizer, read_checkpoint

    if is_training_checkpoint(path):
        return load_tokenizer(read_checkpoint(path, weights=False), None)  # only its hyperparameters are needed
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot load its tokenizer ({tokenizer_load_reason(path, err)}); pass --tokenizer") \
            from None


def check_same_tokenizer(paths: dict[str, str], tokenizer) -> None:
    """Every model that carries a tokenizer must read the probe's ids as the same words: only the id
    range was checked, so a model with another vocabulary was fed other words, silently."""
    from cpt_lightning.export import is_training_checkpoint
    from cpt_lightning.pretrained import vocabulary_sha256

    expected = vocabulary_sha256(tokenizer)
    for name, path in paths.items():
        if holds_no_tokenizer(path) and not is_training_checkpoint(path):  # a sharded one records its run's
            continue  # none saved with it: the id range check is all there is (a damaged one is an error)
        own = load_model_tokenizer(path)
        if vocabulary_sha256(own) != expected:
            raise UserError(
                f"{name} ({path}) has another tokenizer than the probe's ({tokenizer.name_or_path}): its ids stand "
                "for other words; compare models that share one tokenizer"
            )


def load_encoder(path: str, device: torch.device) -> torch.nn.Module:
    """The bare encoder (embeddings, layers, final norm) of an HF folder or checkpoint, in fp32 whatever it was
    stored in: a bf16 forward pass moved CKA by about as much as seed noise does (up to 1.6× its measure in the
    deeper layers of a tiny model), and bf16 rotary frequencies turn position 511 by up to 0.5 rad."""
    return load_masked_lm(path, dtype=torch.float32).model.to(device).eval()


def check_same_depth(models: dict[str, torch.nn.Module]) -> int:
    """Matching layers need the same number of layers in every model; returns it."""
    depths = {name: model.config.num_hidden_layers for name, model in models.items()}
    if len(set(depths.values())) != 1:
        raise UserError(f"models have different numbers of layers: {depths}")
    return next(iter(depths.values()))


def check_probe_fits(models: dict[str, torch.nn.Module], rows: torch.Tensor) -> None:
    """Probe ids must exist in every model's embeddings (same tokenizer family), and its rows fit every model's
    positions: longer ones ran on positions the model never trained, without a word."""
    largest = int(rows.max())
    for name, model in models.items():
        if largest >= model.config.vocab_size:
            raise UserError(
                f"probe token id {largest} is outside {name}'s vocabulary ({model.config.vocab_size}): "
                "use the models' own tokenizer (--tokenizer)"
            )
        if rows.shape[1] > model.config.max_position_embeddings:
            raise UserError(f"--seq-len {rows.shape[1]} exceeds {name}'s {model.config.max_position_embeddings} "
                            "positions: lower --seq-len")


@torch.inference_mode()
def layer_features(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor
) -> list[torch.Tensor]:
    """``[n_kept, d]`` hidden states of the kept tokens: embeddings output, then every layer's output.

    Attention is bidirectional within each packed document. The last entry is after ``final_norm``,
    as transformers reports it.
    """
    masks = attention_masks(model.config, position_ids, "bidirectional", dtype=model.dtype)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=masks, output_hidden_states=True)
    return [hidden[keep] for hidden in out.hidden_states]
