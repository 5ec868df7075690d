"""``cpt export``: a training checkpoint → a Hugging Face folder people can load and judge.

The folder holds ``config.json``, ``model.safetensors`` (decoder tied to the embeddings, so it is
stored once), the tokenizer, a ``README.md`` model card written from the run's own records
(see ``cpt_lightning.model_card``) and, when the run's config is known, a copy of it as
``training_config.yaml`` (how the model was trained; ``cpt analyze`` finds the run's data there). Both checkpoint layouts are read: a single ``.ckpt`` file and
a sharded folder written by ``torch.distributed.checkpoint`` (Lightning's ModelParallelStrategy /
FSDP with sharded state). Weights are loaded with strict key checks: an export that silently
drops or invents a tensor would evaluate a different model than the one trained.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, ModernBertConfig

from cpt_lightning.atomic import check_output_folder, check_replaceable_folder, folder_beside, hidden_beside, local_paths
from cpt_lightning.config_history import DATA_DIGESTS_KEY, RUN_CONFIG_KEY, comparable
from cpt_lightning.errors import ArgumentParser, UserError, command, one_line, tokenizer_load_reason
from cpt_lightning.hf_compat import add_tokenizer_keys, save_model
from cpt_lightning.model_card import RunConfig, write_model_card
from cpt_lightning.model_loading import (
    MODEL_CONFIG_RECORD,
    TOKENIZER_RECORD,
    check_vocab_fits,
    random_init_config,
    shapes,
    tokenizer_differences,
    tokenizer_identity,
    weights_mismatch,
)
from cpt_lightning.weights_digest import weights_digest

MODULE_PREFIX = "model."  # EncoderPretraining keeps the HF model in ``self.model``
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint.save
LIGHTNING_EXTRA = "meta.pt"  # Lightning's non-tensor state beside a sharded checkpoint
TRAINING_CONFIG = "training_config.yaml"  # the run's config.yaml, copied into the exported folder


@dataclass
class TrainingCheckpoint:
    """The HF model's weights (keys without the module prefix) and Lightning's other records."""

    path: Path
    weights: dict[str, torch.Tensor]
    records: dict  # hyper_parameters, global_step, callbacks, tokens_per_step, ...

    @property
    def hparams(self) -> dict:
        return self.records.get("hyper_parameters") or {}


def read_checkpoint(path: str | Path, *, weights: bool = True) -> TrainingCheckpoint:
    """Read a single-file ``.ckpt`` or a sharded (DCP) checkpoint folder; only model weights are kept.

    ``weights=False`` is for readers of the records alone (hyperparameters, step, ...): a sharded
    checkpoint's weights are then not assembled, a file's not read for their CRCs, and ``weights`` is empty."""
    path = Path(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):  # torch's words for it advised saving the file again with another option
            raise UserError(f"{path}: not a zip-format checkpoint, as cpt fit writes a .ckpt (another format, or one "
                            "cut short); give another of the run's checkpoints/*.ckpt, or a sharded checkpoint folder")
        if weights and (damaged := zip_damage(path)) is not None:
            raise UserError(f"{path}: {damaged}; give another of the run's checkpoints/*.ckpt")
        try:
            raw = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as err:  # torch raises many types for a file that is not a checkpoint
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
        if not isinstance(raw, dict) or "state_dict" not in raw:
            raise UserError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
        state = raw.pop("state_dict")
        raw.pop("optimizer_states", None)
    elif (path / DCP_METADATA).is_file():
        with _damaged_shards_refused(path):
            state = _read_sharded_state_dict(path) if weights else {}
            extra = path / LIGHTNING_EXTRA
            if not extra.is_file():  # read as {}: the error asked for --tokenizer, then for hyper_parameters
                raise UserError(f"{path}: the sharded checkpoint has no {LIGHTNING_EXTRA} (Lightning's records: "
                                "hyperparameters, step, tokenizer); copy the folder whole, or give another checkpoint")
            raw = torch.load(extra, map_location="cpu", weights_only=False)
    elif (path / "config.json").is_file():
        raise UserError(f"{path}: already a Hugging Face model folder (config.json); load or evaluate it as it is, "
                        "or export from the run's checkpoints/*.ckpt")
    elif path.is_dir():
        held = sorted([*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])  # a run folder, or its checkpoints/
        hint = f"; it holds {', '.join(map(str, held[:3]))}{', …' if len(held) > 3 else ''}: give one of those" \
            if held else ""
        raise UserError(f"{path}: a folder without {DCP_METADATA}; not a sharded (torch.distributed.checkpoint) "
                        f"checkpoint{hint}")
    elif hidden_beside(path, "old").exists():
        raise UserError(_interrupted_replacement(path))
    else:
        raise UserError(f"{path}: no such checkpoint file or folder")
    model_weights = {k[len(MODULE_PREFIX):]: v for k, v in state.items() if k.startswith(MODULE_PREFIX)}
    if weights and not model_weights:
        raise UserError(f"{path}: no '{MODULE_PREFIX}*' weights; was it written by cpt fit (EncoderPretraining)?")
    return TrainingCheckpoint(path, model_weights, raw)


def zip_damage(path: Path) -> str | None:
    """What is damaged in a zip-format checkpoint (``torch.save``'s), or None: a member whose bytes fail the CRC the
    zip records (a disk or copy fault that keeps the file's length). ``torch.load`` checks none, so a zeroed block
    was resumed and exported as zero weights, and a garbled one as NaN. About one read of the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(entry.CRC for entry in archive.infolist()):  # saved under set_crc32_options(False): no CRC
                return None
            failed = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # a garbled central directory
        return f"damaged (its zip directory cannot be read: {one_line(err)})"
    return None if failed is None else f"damaged ({failed} in it fails its CRC check: a disk or copy fault)"


def _interrupted_replacement(path: Path) -> str:
    """What to do about a checkpoint a killed save was replacing. A reader renames nothing (a live run may be
    between its renames); resuming the run puts it back (``restore_interrupted_replacements``)."""
    from cpt_lightning.checkpointing import replacement_to_restore  # it imports this module

    waiting = replacement_to_restore(path)
    if waiting is None:  # the run's save renamed it into place just now
        return f"{path}: was being replaced while it was read; read it again"
    which = "the one it was replacing" if waiting == hidden_beside(path, "old") else "the new save, whole"
    return (f"{path}: a save was killed while replacing this checkpoint; {which} waits in {waiting}: rename it to "
            f"{path.name} (the run's `cpt fit ... --ckpt_path last` does it when it resumes)")


def is_training_checkpoint(path: str | Path) -> bool:
    """A layout ``read_checkpoint`` reads: a Lightning ``.ckpt`` file or a sharded checkpoint folder."""
    return Path(path).is_file() or Path(path, DCP_METADATA).is_file()


@contextlib.contextmanager
def _damaged_shards_refused(path: Path):
    """A shard missing or cut short, or garbled metadata: one line, not torch's traceback (a ``CheckpointException``,
    a ``BaseException``, also escaped the phase-end export's guard and left the other ranks at its barrier)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except UserError:
        raise
    except (Exception, CheckpointException) as err:
        cause = next(iter(err.failures.values()))[0] if isinstance(err, CheckpointException) and err.failures else err
        raise UserError(f"{path}: the sharded checkpoint cannot be read ({type(cause).__name__}: {one_line(cause)}): "
                        "a shard is missing, cut short or damaged; export another checkpoint of the run") from None


def _sharded_state_dict_metadata(reader) -> dict:
    """``state_dict`` key → its tensor's metadata (size, dtype) in a DCP checkpoint (a ``FileSystemReader``), read
    from ``.metadata`` only."""
    import torch.distributed.checkpoint as dcp

    metadata = reader.read_metadata()
    found = {}
    for flat_key, item in metadata.state_dict_metadata.items():
        top, *rest = metadata.planner_data[flat_key]
        if top == "state_dict" and len(rest) == 1 and isinstance(item, dcp.metadata.TensorStorageMetadata):
            found[rest[0]] = item
    return found


def _read_sharded_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Assemble the full ``state_dict`` entry of a DCP checkpoint in this process (optimizer state left on disk)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(path)
    target = {key: torch.empty(item.size, dtype=item.properties.dtype)
              for key, item in _sharded_state_dict_metadata(reader).items()}
    if not target:
        raise UserError(f"{path}: the sharded checkpoint holds no 'state_dict' tensors")
    with warnings.catch_warnings():  # torch warns of every no_dist load that it assumes one process: as asked
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .* assuming the intent is to load in a single")
        dcp.load({"state_dict": target}, storage_reader=reader, no_dist=True)
    return target


def saved_weight_shapes(path: str | Path) -> dict[str, torch.Size]:
    """The shape of every ``state_dict`` tensor of a ``.ckpt`` file (memory-mapped) or a sharded folder (its
    metadata), without reading the weights."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if path.is_file():
        return shapes(torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("state_dict") or {})
    with _damaged_shards_refused(path):
        metadata = _sharded_state_dict_metadata(dcp.FileSystemReader(path))
    return {key: torch.Size(item.size) for key, item in metadata.items()}


def rebuild_model(checkpoint: TrainingCheckpoint, tokenizer, dtype: torch.dtype | None = None) -> nn.Module:
    """The HF masked-LM the run trained, architecture from `trained_config`, weights checked strictly; in
    ``dtype``, else in the precision the run stored."""
    # Plain ModernBertForMaskedLM (the training subclass only adds a loss path) with the portable
    # kernel: the weights do not depend on which attention kernel trained them.
    model = AutoModelForMaskedLM.from_config(trained_config(checkpoint, tokenizer), attn_implementation="sdpa")
    load_weights(model, dict(checkpoint.weights), source=checkpoint.path, dtype=dtype)
    return model.eval()


def trained_config(checkpoint: TrainingCheckpoint, tokenizer) -> ModernBertConfig:
    """The config the run trained: the copy the checkpoint holds (read offline, and exact even if the base
    model's files on the Hub changed since), else, for checkpoints saved before they held one, the base model's
    config (its name, read again) or the random-init dict in the hyperparameters."""
    if (saved := checkpoint.records.get(MODEL_CONFIG_RECORD)) is not None:
        return ModernBertConfig.from_dict(saved)
    hp = checkpoint.hparams
    if hp.get("model") is not None:
        try:
            return AutoConfig.from_pretrained(hp["model"])
        except OSError as err:
            raise UserError(f"{checkpoint.path} holds no copy of its model config (saved by an older cpt-lightning) and "
                            f"the base model {hp['model']!r} it names cannot be read ({one_line(err)}): "
                            "export where that name loads (online, or with it in the Hugging Face cache)") from None
    if hp.get("model_config") is not None:  # those runs took ModernBertConfig's vocab_size, not the tokenizer's
        return random_init_config({"vocab_size": ModernBertConfig().vocab_size, **hp["model_config"]}, tokenizer)
    raise UserError(f"{checkpoint.path}: hyper_parameters name neither 'model' nor 'model_config'")


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Path,
                 dtype: torch.dtype | None = None) -> None:
    """``load_state_dict(strict=True)`` plus a tie check, with errors that name the keys; the model is cast to
    ``dtype``, else to the weights' precision (casting rounds its rotary frequencies too: they are not saved).

    The ties are the model's own (``all_tied_weights_keys``), not its class's ``_tied_weights_keys``: a
    config with ``tie_word_embeddings: false`` trains a decoder of its own, which differs from the embeddings."""
    # First: NaN != NaN, so the tie check below blamed a diverged run's NaN on an untied decoder.
    if broken := next((key for key, value in weights.items() if not value.isfinite().all()), None):
        raise UserError(f"{source}: '{broken}' holds NaN or infinite values (a run that diverged before this "
                        "checkpoint): give an earlier one")
    for tied, origin in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tied not in weights and origin in weights:  # a writer may store a tied tensor once
            weights[tied] = weights[origin]
        elif tied in weights and origin in weights and not torch.equal(weights[tied], weights[origin]):
            raise UserError(f"{source}: '{tied}' differs from '{origin}'; the decoder was untied during training")
    if mismatch := weights_mismatch(shapes(model.state_dict()), shapes(weights)):
        raise UserError(f"{source}: checkpoint weights do not match the model built from its hyperparameters ({mismatch})")
    model.to(dtype or weights[next(iter(weights))].dtype)  # by default the precision the run stored (fp32, or bf16)
    model.load_state_dict(weights, strict=True)


def load_tokenizer(checkpoint: TrainingCheckpoint, override: str | None):
    """The tokenizer the run recorded (by name or path), or ``override``, checked to be the one the run trained with
    where the checkpoint records it."""
    source = override or checkpoint.hparams.get("tokenizer") or checkpoint.hparams.get("model")
    if source is None:
        raise UserError(f"{checkpoint.path}: no tokenizer recorded; pass --tokenizer PATH")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer {source!r} ({tokenizer_load_reason(source, err)}); pass --tokenizer PATH") from None
    if trained := checkpoint.records.get(TOKENIZER_RECORD):
        check_same_tokenizer(trained, tokenizer_identity(tokenizer), source)
    return tokenizer


def check_same_tokenizer(trained: dict, found: dict, source: str) -> None:
    """A tokenizer folder edited after training (a post-processor dropped, another snapshot of a hub name) or a
    ``--tokenizer`` of another model exported a model whose inputs differ from those it trained on, without a word."""
    if differences := tokenizer_differences(trained, found):
        raise UserError(f"the tokenizer {source!r} is not the one the run trained with: it differs in "
                        f"{'; '.join(differences)}; pass --tokenizer with the training tokenizer (a copy of it, or an "
                        "earlier export of the run)")


def find_run_config(checkpoint_path: Path) -> Path | None:
    """LightningCLI's ``config.yaml`` in the log folder: beside the checkpoint or one level up (``checkpoints/``)."""
    for folder in (checkpoint_path.parent, checkpoint_path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def run_config_of(checkpoint: TrainingCheckpoint, given: str | Path | None) -> RunConfig | None:
    """The config that trained ``checkpoint``: ``given`` (--run-config), else the copy the checkpoint holds,
    else the log folder's ``config.yaml`` (checkpoints saved before they held a copy).

    The copy is exact where the log folder's file is not: after a resume under another config that file
    is the later one, and a checkpoint set aside or moved to another machine has none beside it."""
    saved = checkpoint.records.get(RUN_CONFIG_KEY)
    if given is not None:
        config = RunConfig.read(Path(given))
        digests = checkpoint.records.get(DATA_DIGESTS_KEY)  # a requeue's ckpt_path or a moved data folder is no change
        if isinstance(saved, str) and comparable(config.text, digests) != comparable(saved, digests):
            print(f"warning: --run-config {given} is not the config the checkpoint holds (the one that trained it): "
                  "the card and training_config.yaml describe the given one", file=sys.stderr)
        return config
    if isinstance(saved, str):
        return RunConfig(saved)
    found = find_run_config(checkpoint.path)
    return RunConfig.read(found) if found else None


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    run_config: str | Path | None = None,
    eval_results: str | Path | None = None,
    model_id: str | None = None,
    language: str | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> Path:
    """Write the HF folder for ``checkpoint`` into ``out_dir`` and return it.

    A non-empty ``out_dir`` is refused unless ``overwrite``. The folder is written under a hidden
    temporary sibling and renamed into place only once complete, so a failed export leaves no
    half-written folder and, with ``overwrite``, the earlier export stays until the new one is whole.
    """
    out = Path(out_dir)
    ckpt = read_checkpoint(checkpoint)
    _check_out_dir(out, overwrite, local_paths(checkpoint, eval_results))
    tok = load_tokenizer(ckpt, tokenizer)
    model = rebuild_model(ckpt, tok)
    # ids past the embeddings: cpt evaluate and cpt fit refuse the folder
    check_vocab_fits(tok, model.config.vocab_size, "pass the tokenizer the model was trained with (--tokenizer)")
    config = run_config_of(ckpt, run_config)
    results = _read_eval_results(eval_results) if eval_results else None
    with folder_beside(out, "export", replace=overwrite) as staging:
        save_model(model, staging, shown_as=out)
        evaluated_as = _row_of(staging, results, eval_results) if results else None
        # ModernBERT takes no token_type_ids; the card's `model(**tokenizer(text))` must not produce them.
        tok.model_input_names = ["input_ids", "attention_mask"]
        tok.model_max_length = model.config.max_position_embeddings
        tok.save_pretrained(staging)
        add_tokenizer_keys(staging, tok)
        write_model_card(staging, ckpt.records, model, config, results, model_id or str(out), language, license,
                         mask_token=tok.mask_token, evaluated_as=evaluated_as, tokenizer_tokens=len(tok),
                         titled_by_run=model_id is None)
        if config is not None:
            (staging / TRAINING_CONFIG).write_text(config.text)
    return out


def _check_out_dir(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """--overwrite replaced the run's checkpoints/ with the export, and an evaluation's folder: it replaces only an
    earlier export (a folder with a config.json). The inputs the export does not carry (the
    checkpoint, --eval-results) must be outside OUT_DIR; the tokenizer and run config are saved into it, so an
    earlier export may give its own (``--tokenizer OUT_DIR --overwrite``)."""
    check_output_folder(out, "OUT_DIR", inputs)
    check_replaceable_folder(out, "OUT_DIR")
    held = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    if held and not (out / "config.json").is_file():  # an evaluation's results, a run folder: deleted whole
        raise UserError(f"{out}: holds no exported model (no config.json) but {', '.join(held[:4])}"
                        f"{', …' if len(held) > 4 else ''}; --overwrite replaces only an earlier export: give OUT_DIR "
                        "a folder of its own")
    if held and not overwrite:  # said first, the other folders were offered --overwrite, then refused it
        raise UserError(f"{out}: holds an earlier export; pass --overwrite to replace it")


def _read_eval_results(path: str | Path) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--eval-results {path}: {err}") from None
    fields = {"seeds": list, "tasks": dict, "models": dict, "runs": list}  # what the model card reads
    missing = sorted(fields.keys() - set(results if isinstance(results, dict) else ()))
    if missing:
        raise UserError(f"--eval-results {path}: not the results.json of cpt evaluate (missing: {', '.join(missing)})")
    entries = [*results["tasks"].values(), *results["models"].values(), *results["runs"]] \
        if all(isinstance(results[key], kind) for key, kind in fields.items()) else [None]
    if not all(isinstance(entry, dict) for entry in entries):
        raise UserError(f"--eval-results {path}: not the results.json of cpt evaluate (its fields hold other types); "
                        "pass the results.json cpt evaluate wrote")
    return results


def _row_of(folder: Path, results: dict, path: str | Path) -> str:
    """The model of ``results`` whose weights are ``folder``'s: a card showing rows of other models only would
    present their scores as this model's."""
    digest = weights_digest(folder)
    for name, entry in results["models"].items():
        if entry.get("weights") == digest:
            return name
    if not any(entry.get("weights") for entry in results["models"].values()):
        raise UserError(f"--eval-results {path}: it names no model's weights (written before cpt evaluate recorded "
                        "them, or no model is a folder of safetensors weights, as cpt export writes), so no row can be "
                        "told to be this model; evaluate an export of this checkpoint (cpt export CKPT DIR; cpt "
                        "evaluate --models DIR ..., which reuses every stored run) and pass the results.json it writes")
    raise UserError(f"--eval-results {path}: none of its models ({', '.join(results['models'])}) has this "
                    "checkpoint's weights, so its table is not this model's; evaluate an export of this checkpoint "
                    "(cpt export CKPT DIR; cpt evaluate --models DIR ...) and pass that results.json")


@command
def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="cpt export",
        description="Turn a cpt fit checkpoint (.ckpt file or sharded folder) into a Hugging Face folder with a model card.",
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt file or torch.distributed.checkpoint folder")
    parser.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer, README.md)")
    parser.add_argument("--tokenizer", help="tokenizer name/path (default: the one the run recorded)")
    parser.add_argument("--run-config", help="LightningCLI config.yaml of the run (default: the copy the checkpoint holds; "
                        "for checkpoints without one, the config.yaml beside it or one level up; another config "
                        "than the checkpoint's copy gets a warning); "
                        f"copied into OUT_DIR as {TRAINING_CONFIG}")
    parser.add_argument("--eval-results", help="results.json written by `cpt evaluate`, for the card's table")
    parser.add_argument("--model-id", help="name used in the card's snippets, e.g. org/model (default: OUT_DIR)")
    parser.add_argument("--language", help="card front matter and fill-mask example (default: the run's "
                        "PhaseEndExport language, else en)")
    parser.add_argument("--license", default="apache-2.0", help="card front matter (default: apache-2.0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT_DIR that holds an earlier export (the new folder is written "
                        "beside it and renamed into place)")
    args = parser.parse_args(argv)
    out = export_checkpoint(
        args.checkpoint, args.out_dir, tokenizer=args.tokenizer, run_config=args.run_config,
        eval_results=args.eval_results, model_id=args.model_id, language=args.language, license=args.license,
        overwrite=args.overwrite,
    )
    print(f"exported {args.checkpoint} → {out}")
    return 0


def __getattr__(name: str):
    """``cpt_lightning.export.PhaseEndExport``, the class path that run configs saved before it moved to
    ``callbacks.PhaseEndExport`` name, still resolves (``cpt validate --config runs/X/config.yaml``)."""
    if name == "PhaseEndExport":
        from callbacks.phase_end_export import PhaseEndExport

        return PhaseEndExport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
