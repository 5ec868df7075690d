"""Building the encoder from a name or a config, and the checks that refuse what does not fit it.

A pretrained folder, a tokenizer, a random-init config or a saved checkpoint is checked here before any weight is
built or loaded, so a mistake is one line naming the setting to fix. Kept apart from the LightningModule so
``cpt export`` and the other tools check a checkpoint without importing Lightning.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, ModernBertConfig
from transformers.activations import ACT2FN

from cpt_lightning.attention import resolve_implementation
from cpt_lightning.errors import UserError, one_line, tokenizer_load_reason
from cpt_lightning.masked_lm import ModernBertForPretraining
from cpt_lightning.model_names import is_local_path
from cpt_lightning.objectives import TokenizerFacts
from cpt_lightning.pretrained import MLM_HEAD, from_pretrained_missing, tokenizer_size, vocabulary, vocabulary_sha256


def build_model(
    model: str | None, model_config: dict | None, attn_implementation: str, tokenizer
) -> nn.Module:
    """``from_pretrained(model)`` for real runs; a randomly initialised ``ModernBertConfig(**model_config)`` otherwise.

    A random model takes its special-token ids from the tokenizer unless the config sets them,
    so its saved config describes the vocabulary it was trained with. Either way the class is
    :class:`ModernBertForPretraining` (ModernBertForMaskedLM plus the fused training loss).
    """
    if (model is None) == (model_config is None):
        raise UserError(
            "set exactly one of model.init_args.model (a name or path to load) and "
            "model.init_args.model_config (a ModernBertConfig dict for a randomly initialised model)"
        )
    attn_implementation = resolve_implementation(attn_implementation)
    if model is not None:
        config = load_named(AutoConfig, model, "model.init_args.model")
        if config.model_type != "modernbert":
            raise UserError(
                f"model.init_args.model={model!r} is a {config.model_type!r} model; the trainer's packed "
                "causal/bidirectional attention is built for ModernBERT encoders"
            )
        resize = ("resize the model's embeddings first (resize_token_embeddings(N), then save_pretrained) and point "
                  "model.init_args.model at that folder")
        check_vocab_fits(tokenizer, config.vocab_size, remedy=(
            f"the folder's own tokenizer has tokens its config's vocab_size leaves out: {resize}"
            if tokenizer.name_or_path == model else f"use the model's own tokenizer, or {resize}"))
        replace_special_ids_outside_the_vocabulary(tokenizer, config, model)
        check_special_ids(tokenizer, config, model)
        if (token := untrained_padding_token(tokenizer, config)) is not None:  # as it was pretrained: said, not refused
            warnings.warn(f"model.init_args.model {model!r}: its config's pad_token_id {config.pad_token_id} is the "
                          f"tokenizer's token {token!r} (its padding token is {tokenizer.pad_token_id}), whose input "
                          "embedding the model never trains (ModernBERT's padding_idx)")
        return load_pretrained(model, config, attn_implementation)
    config = random_init_config(model_config, tokenizer)
    try:
        # fp32 weights whatever model_config's dtype (a config.json's bfloat16 copied in), as load_pretrained's
        return ModernBertForPretraining._from_config(config, attn_implementation=attn_implementation,
                                                     dtype=torch.float32)
    except ValueError as err:  # e.g. a hidden size the heads do not divide, found when the layers are built
        raise UserError(f"model.init_args.model_config is not a valid ModernBertConfig: {err}") from None


def replace_special_ids_outside_the_vocabulary(tokenizer, config, model: str) -> None:
    """A config.json without ``cls_token_id`` or ``sep_token_id`` (or bos/eos) reads transformers' ModernBERT defaults
    (50281, 50282), outside a smaller vocabulary (a CamemBERT-style one): the run trained, and the export carried them
    into a config.json that ``cpt evaluate`` refused as another tokenizer's. An id outside the vocabulary names no
    token, and these compute nothing (the padding id does, and is left to the checks), so the tokenizer's is taken."""
    taken = []
    for kind in ("cls", "sep", "bos", "eos"):
        theirs, ours = getattr(config, f"{kind}_token_id", None), getattr(tokenizer, f"{kind}_token_id", None)
        if theirs is not None and ours is not None and not 0 <= theirs < config.vocab_size:
            setattr(config, f"{kind}_token_id", ours)
            taken.append(f"{kind}_token_id {theirs} → {ours}")
    if taken:
        warnings.warn(f"model.init_args.model {model!r}: its config's {', '.join(taken)}: outside its vocabulary of "
                      f"{config.vocab_size:,}, so the tokenizer's is taken (and exported)")


def untrained_padding_token(tokenizer, config) -> str | None:
    """The token whose id ``config.pad_token_id`` is, if another than the tokenizer's padding token and one the data
    holds: the embedding gives the padding id's row no gradient (``padding_idx``), so that token's input embedding
    never trains (an apostrophe, in the French tokenizer a reviewer tried; the [SEP] between every two documents, or
    MLM's [MASK]). None for the pad's id or a special token no text holds (ModernBERT's [unused] slots)."""
    pad = config.pad_token_id
    in_the_data = {getattr(tokenizer, f"{kind}_token_id") for kind in ("cls", "sep", "mask", "unk", "bos", "eos")}
    if pad is None or pad == tokenizer.pad_token_id or not 0 <= pad < tokenizer_size(tokenizer) \
            or (pad in tokenizer_facts(tokenizer).special_ids and pad not in in_the_data):
        return None
    return tokenizer.convert_ids_to_tokens(pad)


def check_special_ids(tokenizer, config, model: str) -> None:
    """Another tokenizer than the model's own (``model.init_args.tokenizer`` set) must give its tokens the ids the
    pretrained embeddings learnt them under: a CamemBERT tokenizer on a ModernBERT folder trained without a word,
    feeding the rows of other tokens, and exported a config whose ids contradict its tokenizer. The config holds no
    mask id, so the model's own tokenizer, where one is at hand, is compared too: its mask and every token's id."""
    if tokenizer.name_or_path == model:
        return
    own = own_tokenizer(model)
    expected = config_special_ids(config)
    expected += [(kind, getattr(own, f"{kind}_token_id")) for kind in ("cls", "sep", "pad", "mask", "unk")
                 if own is not None]
    differing = differing_ids(tokenizer, expected)
    if not differing and own is not None:
        ours = vocabulary(tokenizer)
        moved = [(token, ours.get(token), i) for token, i in vocabulary(own).items() if ours.get(token) != i]
        if moved:
            token, id_here, id_there = moved[0]
            differing = [f"{len(moved):,} of the {len(own):,} tokens of the model's own tokenizer have another id or "
                         f"none, e.g. {token!r} {id_here} vs {id_there}"]
    if differing:
        raise UserError(f"model.init_args.tokenizer {tokenizer.name_or_path!r} is not the tokenizer of {model!r}: its "
                        f"ids differ from the model's ({'; '.join(differing)}); leave model.init_args.tokenizer unset "
                        "to use the model's own")


def config_special_ids(config) -> list[tuple[str, int | None]]:
    """The special-token ids a model's config records (it holds no mask id)."""
    return [(kind, getattr(config, f"{kind}_token_id", None)) for kind in ("cls", "sep", "pad")]


def differing_ids(tokenizer, expected: list[tuple[str, int | None]]) -> list[str]:
    """``kind ours vs theirs`` for each special token whose id in ``tokenizer`` differs from the expected one (where
    both are known)."""
    return list(dict.fromkeys(f"{kind} {ours} vs {theirs}" for kind, theirs in expected
                              if None not in (ours := getattr(tokenizer, f"{kind}_token_id"), theirs) and ours != theirs))


def own_tokenizer(model: str):
    """The tokenizer saved with ``model`` (its folder, or the hub cache: never a download), or None."""
    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return None


def local_absolute(name: str | None) -> str | None:
    """A local folder as its absolute path (``~`` expanded): recorded so, export and the model card find it from any
    directory (a relative ``model:`` was read as a hub id there); a hub id as given."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_named(auto_class, name: str, setting: str):
    """``auto_class.from_pretrained(name)``, or a one-line error naming ``setting``: a missing folder is said as
    such (transformers' message spoke of hub repo ids), as are an offline hub name and a folder without its files."""
    if is_local_path(name) and not Path(name).exists():
        raise UserError(f"{setting}: cannot load {name!r} (no such folder)")
    try:
        return auto_class.from_pretrained(name)
    except (OSError, ValueError) as err:
        reason = tokenizer_load_reason(name, err) if auto_class is AutoTokenizer else one_line(err)
        raise UserError(f"{setting}: cannot load {name!r} ({reason})") from None


def load_pretrained(model: str, config, attn_implementation: str) -> ModernBertForPretraining:
    """The model's weights, refusing files that lack any encoder weight: transformers would start those at random
    and the run would look like any other. A missing MLM head (a ModernBertModel folder) is learned from step 1.

    In training mode: ``from_pretrained`` returns a model in eval mode and Lightning keeps each module's mode as it
    finds it, so a run from a pretrained model trained in eval mode, where transformers recomputes no layer
    (``activation_checkpointing`` did nothing) and dropout is off.

    In fp32 whatever the folder stores: transformers 5 loads a bf16 folder (a bf16 export, many hub models) as bf16,
    and ``bf16-mixed`` and FSDP2 keep the parameters' dtype, so AdamW trained bf16 weights (at lr 2e-5, three in
    four of one step's updates were below their resolution and lost); the precision setting decides the compute."""
    loaded, lacking = from_pretrained_missing(
        ModernBertForPretraining, model, "the run would continue pretraining a randomly initialised encoder: "
        "point model.init_args.model at a folder saved with save_pretrained (or cpt export)", MLM_HEAD,
        config=config, attn_implementation=attn_implementation, dtype=torch.float32)
    if lacking:
        from lightning.pytorch.utilities import rank_zero_warn  # only training loads a folder

        rank_zero_warn(f"model {model!r} has no MLM head (a folder saved as ModernBertModel): {', '.join(lacking)} "
                       "start random and are learned in the first steps")
    return loaded.train()


def random_init_config(model_config: dict, tokenizer) -> ModernBertConfig:
    """``ModernBertConfig(**model_config)`` with the tokenizer's size and special-token ids unless the dict sets them:
    ModernBertConfig's own vocab_size (50,368, ModernBERT's tokenizer) gave a model for a 1,501-token tokenizer 97% of
    its embedding rows unused and most of its predicted probability on ids no text holds."""
    token_ids = {
        "vocab_size": tokenizer_size(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        # a tokenizer with only <s>/</s> as BOS/EOS (no CLS/SEP) still names them
        "bos_token_id": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
        "eos_token_id": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
    }
    check_config_keys(model_config)
    check_config_sizes(model_config)
    try:
        config = ModernBertConfig(**{**token_ids, **model_config})
    except (TypeError, StrictDataclassError) as err:  # e.g. a string where transformers' strict config wants an int
        raise UserError(f"model.init_args.model_config is not a valid ModernBertConfig: {err}") from None
    check_vocab_fits(tokenizer, config.vocab_size, remedy=(
        f"leave model.init_args.model_config.vocab_size unset (the tokenizer's size) or set it to at least "
        f"{tokenizer_size(tokenizer)}"))
    if (token := untrained_padding_token(tokenizer, config)) is not None:
        raise UserError(f"model.init_args.model_config.pad_token_id {config.pad_token_id} is the tokenizer's token "
                        f"{token!r}, whose input embedding would never train (ModernBERT's padding_idx): leave "
                        f"pad_token_id unset, or give the tokenizer's padding token ({tokenizer.pad_token_id})")
    check_config_values(config)
    return config


MODEL_CONFIG_RECORD = "hf_config"  # the checkpoint record holding the trained model's config.json, as a dict

# Keys of transformers 4.x ModernBERT configs that ModernBertConfig still reads, outside its signature.
LEGACY_CONFIG_KEYS = {"global_attn_every_n_layers", "global_rope_theta", "local_rope_theta", "rope_scaling"}


def check_config_keys(model_config: dict) -> None:
    """Refuse a key ModernBertConfig does not know: it would be stored and silently ignored (a typo such
    as ``num_hiden_layers`` trains the 22-layer default)."""
    fields = inspect.signature(ModernBertConfig.__init__).parameters.values()
    known = {f.name for f in fields if f.kind is not f.VAR_KEYWORD and f.name != "self"} | LEGACY_CONFIG_KEYS
    unknown = [
        f"{key} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, n=1)) else key
        for key in sorted(set(model_config) - known)
    ]
    if unknown:
        raise UserError(f"model.init_args.model_config: not ModernBertConfig fields: {', '.join(unknown)}")


# The least each size may be: 0 heads or 0 global-layer spacing divided by zero inside ModernBertConfig (a traceback),
# 0 layers was reported as a rope_parameters mismatch, and an intermediate_size or window of 0 trained a model without MLPs
# or whose sliding-window layers saw only their own token.
LEAST_CONFIG_SIZES = {"vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
                      "num_attention_heads": 1, "global_attn_every_n_layers": 1, "local_attention": 2,
                      "max_position_embeddings": 1}


def check_config_sizes(model_config: dict) -> None:
    """Refuse a size below what a model can be built and trained with (other types are the strict config's to refuse)."""
    for key, least in LEAST_CONFIG_SIZES.items():
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < least:
            raise UserError(f"model.init_args.model_config: {key}={value}: must be at least {least}")
    window = model_config.get("local_attention")
    if isinstance(window, int) and window % 2:  # transformers attends ±window // 2: 65 trained 64, the card said 65
        raise UserError(f"model.init_args.model_config: local_attention={window}: must be even (a sliding-window layer "
                        f"attends to ±local_attention/2 tokens): {window - 1} or {window + 1}")


def check_config_values(config: ModernBertConfig) -> None:
    """Values ModernBertConfig stores unchecked that fail as a bare KeyError or assert while the layers are built."""
    if config.hidden_activation not in ACT2FN:
        close = difflib.get_close_matches(str(config.hidden_activation).lower(), list(ACT2FN), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"model.init_args.model_config: hidden_activation={config.hidden_activation!r} is not an "
                        f"activation transformers knows{hint}")
    for key in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(config, key, None)
        if token_id is not None and not 0 <= token_id < config.vocab_size:
            raise UserError(f"model.init_args.model_config: {key}={token_id} is outside the vocabulary "
                            f"(vocab_size={config.vocab_size})")


def check_vocab_fits(tokenizer, model_vocab_size: int, remedy: str) -> None:
    """Every id the tokenizer can produce needs a row in the embeddings (checked before building them)."""
    if (needed := tokenizer_size(tokenizer)) > model_vocab_size:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has ids up to {needed - 1} but the model's embeddings "
                        f"hold {model_vocab_size}: {remedy}")


# What a model computes beyond its weights' shapes (refuse_unfit_checkpoint's): a resume under others trains on with
# another attention, activation or dropout, which the model card notes only as "model_config changed".
COMPUTE_SETTINGS = ("layer_types", "local_attention", "rope_parameters", "global_rope_theta", "local_rope_theta",
                    "hidden_activation", "norm_eps", "attention_dropout", "embedding_dropout", "mlp_dropout")


def changed_compute_settings(trained: dict, built: dict) -> list[str]:
    """``setting trained → built`` for each of COMPUTE_SETTINGS both configs hold (a key transformers renamed between
    the two is not a change) that differs; the layer types as the global layers' numbers."""
    def shown(key: str, value) -> str:
        if key == "layer_types" and isinstance(value, list):
            return str([i for i, kind in enumerate(value) if kind == "full_attention"])
        return repr(value)

    return [f"{'global layers' if key == 'layer_types' else key} {shown(key, trained[key])} → {shown(key, built[key])}"
            for key in COMPUTE_SETTINGS if key in trained and key in built and trained[key] != built[key]]


def weights_mismatch(expected: dict[str, torch.Size], saved: dict[str, torch.Size]) -> str | None:
    """How saved weights' shapes differ from a model's (the first keys missing or unexpected, else the first
    shape), or None when they load strictly: a one-line refusal instead of PyTorch's list of every tensor."""
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        return "; ".join(f"{holder} has no {_first_keys(keys)}" for holder, keys in
                         (("the checkpoint", missing), ("the model", unexpected)) if keys)
    for key, shape in saved.items():
        if shape != expected[key]:
            return f"'{key}' has shape {tuple(shape)}, the model expects {tuple(expected[key])}"
    return None


def _first_keys(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(f"'{key}'" for key in keys[:shown]) + more


def shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {key: tensor.shape for key, tensor in state.items()}


def refuse_unfit_checkpoint(path, module: nn.Module, saved: dict[str, torch.Size]) -> None:
    """A checkpoint of another architecture than the config builds (a resume under an edited ``model_config``)."""
    if mismatch := weights_mismatch(expected := shapes(module.state_dict()), saved):
        hint = vocab_hint(expected, saved, module.tokens.vocab_size)
        raise UserError(f"{path} does not fit the model model.init_args builds ({mismatch}): "
                        f"use the model settings it was trained with{hint}")


def vocab_hint(expected: dict[str, torch.Size], saved: dict[str, torch.Size], tokenizer_rows: int) -> str:
    """The setting to write when only the vocabulary's size differs and the tokenizer fits the trained rows: random
    models took ModernBertConfig's vocab_size (50,368) before it defaulted to the tokenizer's size, so resuming such a
    run with a smaller tokenizer and no vocab_size in its config builds fewer rows than it trained."""
    key = next((key for key in saved if key.endswith("tok_embeddings.weight")), None)
    if key is None or key not in expected or saved[key] == expected[key] or saved[key][0] < tokenizer_rows:
        return ""
    rows, trained = expected[key][0], saved[key][0]
    as_trained = {name: torch.Size([trained, *shape[1:]]) if shape and shape[0] == rows else shape
                  for name, shape in expected.items()}
    return "" if weights_mismatch(as_trained, saved) else f" (model.init_args.model_config.vocab_size: {trained})"


def tokenizer_facts(tokenizer) -> TokenizerFacts:
    """The named special tokens, every added token marked special (ModernBERT's 83 ``[unused]`` slots,
    ``<|endoftext|>``, ``<|padding|>``) and any id no token has (a vocabulary whose ids skip numbers): none of them is
    drawn as MLM's random token."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    size = tokenizer_size(tokenizer)
    unassigned = set(range(size)) - set(vocabulary(tokenizer).values())
    return TokenizerFacts(
        mask_id=tokenizer.mask_token_id,
        special_ids=tuple(sorted(set(tokenizer.all_special_ids) | added | unassigned)),
        vocab_size=size,
    )


TOKENIZER_RECORD = "tokenizer_identity"  # the checkpoint record an export's tokenizer is checked against


def tokenizer_differences(trained: dict, found: dict) -> list[str]:
    """How the tokenizer ``found`` (its ``tokenizer_identity``) differs from the one a run ``trained`` with."""
    differences = []
    if found["vocab_sha256"] != trained["vocab_sha256"]:
        differences.append("its vocabulary")
    if found["special_ids"] != trained["special_ids"]:
        changed = [f"{name} {trained['special_ids'].get(name)} → {found['special_ids'].get(name)}"
                   for name in trained["special_ids"] if trained["special_ids"].get(name) != found["special_ids"].get(name)]
        differences.append(f"its special-token ids ({', '.join(changed)})")
    if found["wraps"] != trained["wraps"]:
        differences.append(f"how it wraps a text ('a b' → {found['wraps']}, trained on {trained['wraps']})")
    return differences


def tokenizer_identity(tokenizer) -> dict:
    """What a fine-tuner's inputs depend on: the vocabulary, the special tokens' ids and how a text is wrapped (the
    post-processor adding CLS/SEP). The checkpoint records the run's tokenizer by name only, whose files may change
    after training; an export checks its tokenizer against this."""
    return {
        "vocab_sha256": vocabulary_sha256(tokenizer),
        "special_ids": {name: getattr(tokenizer, f"{name}_token_id") for name in ("cls", "sep", "pad", "mask", "unk")},
        "wraps": tokenizer("a b")["input_ids"],
    }
