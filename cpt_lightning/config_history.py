"""The configs that trained a run's steps, when a resume or a branch changed it (a longer decay, a decay on
another mix): the model card reads what each trained, not the last config's settings for every step.

Every checkpoint holds the config it runs under (``run_config``) and, under ``config_history``, each earlier
one with the step where it stopped applying. A requeue under the same config (only ``ckpt_path`` differs)
adds nothing.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cpt_lightning.data.manifest import index_digest

RUN_CONFIG_KEY = "run_config"  # the checkpoint record holding the run's config.yaml text
CONFIG_HISTORY_KEY = "config_history"
DATA_DIGESTS_KEY = "data_digests"  # the checkpoint record of each data folder's index digest, as the run read it


def configured_callbacks(trainer: dict) -> list:
    """``trainer.callbacks`` as a list: Lightning (and so the config, and its saved ``config.yaml``) also takes
    one callback on its own."""
    callbacks = trainer.get("callbacks") or []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def source_key(source: dict) -> str:
    """A data source as the same folder however it is written (relative, absolute, through a link); its name
    without a path. A source renamed on a resume is still the folder it was."""
    path = source.get("path")
    return str(Path(path).resolve()) if isinstance(path, str) else str(source.get("name", "?"))


def data_identity(source: dict, digests: dict[str, str | None] | None = None) -> str:
    """A data source as the data it holds: its chunks' digest, as recorded when the config ran (``digests``, by
    folder) or read now, so a copy in another folder (node-local scratch, one per job) is the same source; else its
    folder however written."""
    key = source_key(source)
    if not isinstance(source.get("path"), str):
        return key
    return (digests or {}).get(key) or index_digest(key) or key


def data_digests(text: str) -> dict[str, str | None]:
    """Each data folder of a config (training and validation) with its index digest, to save beside the config."""
    data_args = _data_args(yaml.safe_load(text))
    folders = [source_key(source) for key in ("sources", "val_sources") for source in data_args.get(key) or []
               if isinstance(source, dict) and isinstance(source.get("path"), str)]
    return {folder: index_digest(folder) for folder in folders}


def _data_args(config) -> dict:
    data = config.get("data") if isinstance(config, dict) else None
    args = data.get("init_args") if isinstance(data, dict) else None
    return args if isinstance(args, dict) else {}


def comparable(text: str, digests: dict[str, str | None] | None = None):
    """A config as compared for a change: its mapping without ``ckpt_path`` or a time budget and with each data folder
    as the data it holds (``data_identity``; ``digests``: as recorded when this config ran) (the text if it is not a
    mapping)."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not isinstance(config, dict):
        return text
    return as_trained(config, digests)


def as_trained(config: dict, digests: dict[str, str | None] | None = None) -> dict:
    """A parsed config without what changes no training: ``ckpt_path``, and the time budget (``trainer.max_time``, a
    StepTimer's ``duration``: a resume after a max_time stop passes a larger one, and was recorded as a config
    change); each data folder as the data it holds (a copy on node-local scratch is the same data)."""
    config = {k: v for k, v in config.items() if k != "ckpt_path"}
    if isinstance(config.get("trainer"), dict):
        trainer = {k: v for k, v in config["trainer"].items() if k != "max_time"}
        if trainer.get("callbacks"):  # one callback on its own is saved as itself, not as a list of one
            trainer["callbacks"] = [_without_duration(callback) for callback in configured_callbacks(trainer)]
        config["trainer"] = trainer
    if isinstance(config.get("data"), dict) and isinstance(config["data"].get("init_args"), dict):
        data_args = dict(config["data"]["init_args"])
        for key in ("sources", "val_sources"):
            if isinstance(data_args.get(key), list):
                data_args[key] = [{**s, "path": data_identity(s, digests)} if isinstance(s, dict) and "path" in s
                                  else s for s in data_args[key]]
        config["data"] = {**config["data"], "init_args": data_args}
    return config


def _without_duration(callback):
    args = callback.get("init_args") if isinstance(callback, dict) else None
    if not (isinstance(args, dict) and str(callback.get("class_path", "")).endswith("Timer")):
        return callback
    return {**callback, "init_args": {k: v for k, v in args.items() if k != "duration"}}


def history_after_restore(checkpoint: dict, current_text: str) -> list[dict]:
    """The history to save from now on: the checkpoint's, plus its own config (up to its step) if this run's
    differs from it."""
    history = list(checkpoint.get(CONFIG_HISTORY_KEY) or [])
    earlier = checkpoint.get(RUN_CONFIG_KEY)
    if isinstance(earlier, str) and comparable(earlier, checkpoint.get(DATA_DIGESTS_KEY)) != comparable(current_text):
        history.append({"step": int(checkpoint["global_step"]), "config": earlier,
                        DATA_DIGESTS_KEY: checkpoint.get(DATA_DIGESTS_KEY)})
    return history
