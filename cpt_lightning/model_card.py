"""The exported model's README.md, in the shape of the seed models' cards, from the run's own records.

Every figure comes from a record the run wrote: the checkpoint (hyperparameters, global step,
tokens per step, callback states such as Lightning's ``Timer``), the LightningCLI ``config.yaml``
of the run (phases, objectives, data mix, trainer/hardware settings; each checkpoint holds a
copy), the data manifests of the prepared sources (``manifest.json`` written by ``cpt prepare``), the exported model itself (sizes) and
``cpt evaluate`` results. What the records do not hold is written as "not recorded", never guessed.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from cpt_lightning.config_history import CONFIG_HISTORY_KEY, DATA_DIGESTS_KEY, as_trained, configured_callbacks
from cpt_lightning.data.manifest import SOURCES_RECORD
from cpt_lightning.errors import UserError, load_yaml, one_line, read_text
from cpt_lightning.hf_compat import gaps_in_4x
from cpt_lightning.model_names import is_local_path
from cpt_lightning.objectives import MaskedLM
from cpt_lightning.objectives.base import objective_settings
from cpt_lightning.schedules import PhaseLR, TokenSchedule
from cpt_lightning.validation import PHASE_ENDS_RECORD

NOT_RECORDED = "not recorded"
MASK_EXAMPLE = {
    "en": "The patient was diagnosed with [MASK] and started on antibiotics.",
    "fr": "Le patient a reçu un diagnostic de [MASK] et a commencé un traitement antibiotique.",
}
SECOND_TEXT = {"en": "A second, shorter text.", "fr": "Un second texte, plus court."}  # the embeddings example's batch


@dataclass(frozen=True)
class RunConfig:
    """The text of a run's LightningCLI ``config.yaml`` and the file it was read from (None: the copy
    the checkpoint holds, which ``SaveConfigOnceTraining`` saves in every checkpoint)."""

    text: str
    path: Path | None = None

    @classmethod
    def read(cls, path: Path) -> RunConfig:
        return cls(read_text(path, f"run config {path}: unreadable"), path)

    def __str__(self) -> str:
        return f"`{self.path}`" if self.path else "the copy saved in the checkpoint"

    def parsed(self) -> dict:
        config = load_yaml(self.text, f"run config {self.path or 'saved in the checkpoint'}: unreadable")
        return config if isinstance(config, dict) else {}


# -- records → facts ----------------------------------------------------------------------------


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _callbacks_args(config: dict, name: str) -> list[dict]:
    return [callback.get("init_args") or {} for callback in configured_callbacks(config.get("trainer") or {})
            if isinstance(callback, dict) and _short(callback.get("class_path", "")) == name]


def _callback_args(config: dict, name: str) -> dict | None:
    found = _callbacks_args(config, name)
    return found[0] if found else None


def logger_args(config: dict) -> dict | None:
    """The run's logger arguments (its name and version: the folder under runs/), None when it names no logger."""
    logger = (config.get("trainer") or {}).get("logger")
    return (logger.get("init_args") or {}) if isinstance(logger, dict) else None


def run_name(config: dict) -> str | None:
    """The run's name, which tells the arms of a comparison apart."""
    name = (logger_args(config) or {}).get("name")
    return str(name) if name else None


def card_language(config: dict) -> str:
    """The language the run's PhaseEndExport wrote its cards in: ``cpt export`` of a French run wrote an English card."""
    return str((_callback_args(config, "PhaseEndExport") or {}).get("language", "en"))


def freeze_texts(config: dict, phases: list[dict]) -> list[str]:
    """What each LayerFreeze held still in the ``phases`` (``phase_rows``) this model trained, e.g. "encoder layers
    0–7 frozen during CLM": an ablation's card must not read like the detour it is compared with, and the CLM-end
    export of a run that freezes during MLM was never frozen. A phase whose objective is not known here keeps all."""
    return [text for text, _ in _freezes(config, phases)]


def _freezes(config: dict, phases: list[dict]) -> list[tuple[str, str]]:
    """``freeze_texts``' text and the objective it froze during, for each LayerFreeze."""
    from callbacks.layer_freeze import freeze_text, parse_layers

    trained = {phase["name"] for phase in phases}
    return [(freeze_text(parse_layers(args.get("layers", [])), during), during)
            for args in _callbacks_args(config, "LayerFreeze")
            if (during := str(args.get("during", "clm"))) in trained or None in trained]


AFRESH = "when they train again they start AdamW afresh, step 0 and zero moments"


def optimizer_after_freeze(during: str, phases: list[dict]) -> str:
    """What AdamW did for layers frozen ``during`` once a later phase of ``phases`` trained them. A parameter's state
    starts at its first update: layers frozen from the first phase start it afresh; layers trained before the freeze
    keep their moments and step count through it. "" when no later phase trained them or an objective is not known."""
    names = [phase["name"] for phase in phases]
    if None in names or during not in names:
        return ""
    first = names.index(during)
    if all(name == during for name in names[first + 1:]):
        return ""
    return AFRESH if first == 0 else "their AdamW moments and step count wait through the freeze and go on after it"


MASKED_LM_SETTINGS = ("mask_rate", "mask_token_ratio", "random_token_ratio")  # said in words by describe_objective


def built_objective(spec: dict):
    """The objective the run built (same class, same arguments); None where it cannot be built here."""
    try:
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))
    except Exception as err:  # a custom objective not importable here
        _note_unbuilt(str(spec.get("class_path")), one_line(err))
        return None


def describe_objective(spec: dict) -> str:
    """The objective the run built, described from its attributes (else by what the config says)."""
    return _described(spec, built_objective(spec))


def _described(spec: dict, objective) -> str:
    if objective is None:
        return f"`{spec.get('class_path')}` {spec.get('init_args') or ''}".strip()
    text = f"{objective.name.upper()} ({_short(spec['class_path'])}, {objective.attention} attention"
    settings = objective_settings(objective)  # what a custom objective's numbers mean is its own
    if isinstance(objective, MaskedLM):
        keep = 1 - objective.mask_token_ratio - objective.random_token_ratio
        text += (f", {objective.mask_rate:.0%} of tokens masked: {objective.mask_token_ratio:.0%} mask token / "
                 f"{objective.random_token_ratio:.0%} random / {keep:.0%} unchanged")
        settings = {name: value for name, value in settings.items() if name not in MASKED_LM_SETTINGS}  # a subclass's
    if settings:
        text += "; " + ", ".join(f"{name}={value}" for name, value in settings.items())
    return text + ")"


def objective_fields(spec: dict) -> dict:
    """A phase row's objective, built once: its description, and the name LayerFreeze's ``during`` gives it
    (None: not known here)."""
    objective = built_objective(spec)
    return {"objective": _described(spec, objective), "name": getattr(objective, "name", None)}


def reached(rows: list[dict]) -> list[dict]:
    """The phase rows a checkpoint has reached: not those still to come (0 tokens trained; None, not known, is kept)."""
    return [row for row in rows if row["trained"] != 0]


@functools.cache  # once per objective, not per phase and validation line naming it
def _note_unbuilt(class_path: str, reason: str) -> None:
    print(f"note: the model card describes {class_path} from the run config ({reason}): its attention is not known "
          "here, so a causal phase's notice and tag may be missing; put its module on PYTHONPATH and export again",
          file=sys.stderr)


def describe_lr(phase: dict) -> str:
    warmup = phase.get("warmup_tokens") or 0
    parts = [f"linear warmup over {warmup:,} tokens"] if warmup else []
    shape, ratio = phase.get("lr", "constant"), phase.get("final_lr_ratio", PhaseLR.final_ratio)
    parts.append({"constant": "constant", "sqrt_decay": f"1−sqrt decay to {ratio:g}× peak",
                  "linear_decay": f"linear decay to {ratio:g}× peak"}.get(shape, str(shape)))
    return ", then ".join(parts)


def phase_rows(config: dict, tokens_seen: int | None, tokens_per_step: int | None = None) -> list[dict]:
    """One row per ObjectiveSchedule phase: objective, token budget, tokens actually trained, LR shape.

    With ``tokens_per_step`` a phase ends where the run switched: its budget rounded up to a whole
    step (the recipe's 50B CLM tokens are 15,894.6 steps of 384 × 8192: CLM trains 1,346,560 more).
    """
    schedule = _callback_args(config, "ObjectiveSchedule")
    phases = (schedule or {}).get("phases") or []
    if not phases:
        return [whole_run_row(config, tokens_seen)] if config else []
    budgets = [int(phase["tokens"]) for phase in phases]
    switches = TokenSchedule([PhaseLR(tokens=budget) for budget in budgets])
    starts = (switches.on_step_grid(tokens_per_step) if tokens_per_step else switches).starts
    rows = []
    for i, (phase, budget) in enumerate(zip(phases, budgets)):
        trained = None
        if tokens_seen is not None:
            trained = max(tokens_seen - starts[i], 0)
            trained = trained if i == len(phases) - 1 else min(trained, starts[i + 1] - starts[i])
        rows.append({**objective_fields(phase["objective"]), "budget": budget, "trained": trained,
                     "lr": describe_lr(phase)})
    return rows


def schedule_position_texts(config: dict, records: dict) -> list[str]:
    """Where the checkpoint stands beside the phase table, which names each phase's whole shape: partway through a
    phase (a decay read as finished, at 0.6× peak where the table said 0.05×), or trained on past the last phase's end
    (``stop_after_last_phase: false``: more tokens than the budget, at the final rate, without a word)."""
    phases = (_callback_args(config, "ObjectiveSchedule") or {}).get("phases") or []
    tokens_per_step, seen = records.get("tokens_per_step"), tokens_seen(records)
    if not phases or not tokens_per_step or not seen:
        return []
    try:
        schedule = TokenSchedule([PhaseLR(int(p["tokens"]), p.get("lr", "constant"), int(p.get("warmup_tokens") or 0),
                                          float(p.get("final_lr_ratio", PhaseLR.final_ratio))) for p in phases])
    except (KeyError, TypeError, ValueError):  # a hand-edited config: the table says what it can
        return []
    grid = schedule.on_step_grid(tokens_per_step)
    last_step = grid.multiplier(seen - tokens_per_step)  # a step trains at the rate of the tokens before it
    if seen > grid.total_tokens:
        return [f"Trained on past the last phase's end: {seen - grid.total_tokens:,} tokens after it, at "
                f"{last_step:.3g}× the peak learning rate (`stop_after_last_phase: false`)"]
    index = grid.phase_index(seen - 1)  # the phase of the last token trained
    start, end = grid.starts[index], grid.starts[index + 1]
    if seen == end:
        return []
    return [f"This checkpoint stops partway through phase {index + 1}: {seen - start:,} of its {end - start:,} tokens, "
            f"its last step at {last_step:.3g}× the peak learning rate"]


def whole_run_row(config: dict, tokens_seen: int | None) -> dict:
    """A run without ObjectiveSchedule trains the model's own objective (MaskedLM() when none is set) from start to
    end, under its warmup_tokens then constant learning rate: one phase with no budget of its own."""
    model_args = (config.get("model") or {}).get("init_args") or {}
    objective = model_args.get("objective") or {"class_path": "cpt_lightning.objectives.MaskedLM"}
    warmup = model_args.get("warmup_tokens")  # LightningCLI's config.yaml holds every init arg, defaults included
    return {**objective_fields(objective), "budget": None, "trained": tokens_seen,
            "lr": NOT_RECORDED if warmup is None else describe_lr({"warmup_tokens": warmup, "lr": "constant"})}


def read_manifest(path: str):
    """The ``manifest.json`` ``cpt prepare`` wrote for a source (token and document counts), or None."""
    from cpt_lightning.data.manifest import Manifest

    try:
        return Manifest.read(path)
    except UserError:
        return None


def data_rows(config: dict, records: dict) -> list[dict]:
    """Each source of the run's mix with its share and its prepared size: as the checkpoint recorded it (the data the
    run read, whatever folder the export runs from and however the folder was prepared since), else from the
    source's ``manifest.json`` (a checkpoint saved before the record), whose relative path is read from here."""
    recorded = records.get(SOURCES_RECORD) or {}

    def manifest(source: dict):
        if (sizes := recorded.get(source.get("name"))) is not None:
            return SimpleNamespace(**sizes)
        return read_manifest(source["path"]) if source.get("path") else None

    sources = _sources(config)
    return [{"name": s.get("name", "?"), "path": s.get("path"), "proportion": proportion, "manifest": manifest(s)}
            for s, proportion in zip(sources, _proportions(sources))]


def _sources(config: dict) -> list[dict]:
    return ((config.get("data") or {}).get("init_args") or {}).get("sources") or []


def _proportions(sources: list[dict]) -> list[float]:
    total = sum(float(s.get("weight", 1.0)) for s in sources) or 1.0
    return [float(s.get("weight", 1.0)) / total for s in sources]


def earlier_configs(records: dict) -> list[tuple[int, dict | None]]:
    """(step, config) for each config a resume or branch replaced, in order: it trained the steps up to that one.
    None for a saved copy that is not a config mapping (a hand-edited checkpoint)."""
    history = sorted(records.get(CONFIG_HISTORY_KEY) or [], key=lambda entry: entry["step"])
    configs = []
    for entry in history:
        try:
            parsed = RunConfig(entry["config"]).parsed()
        except UserError:
            parsed = {}
        configs.append((entry["step"], parsed or None))
    return configs


def tokens_by_source(records: dict, config: dict) -> list[float] | None:
    """Tokens each source of ``config`` gave, every config with its own mix for the steps it trained (a decay branched
    onto another mix read the parent's for the steps before the branch); None without the step count, or with an
    earlier config that trained steps and is unreadable or lists other sources. A source is the one in its place
    in the list: a resume or branch keeps the sources and their order (the loader refuses others) whatever their
    folders (a copy elsewhere) or names say."""
    tokens_per_step, steps = records.get("tokens_per_step"), records.get("global_step")
    if tokens_per_step is None or steps is None:
        return None
    totals = [0.0] * len(_sources(config))
    start = 0
    for end, segment_config in [*earlier_configs(records), (steps, config)]:
        trained_steps = max(min(end, steps) - start, 0)
        start = max(start, end)
        if not trained_steps:
            continue
        sources = _sources(segment_config or {})
        if len(sources) != len(totals):
            return None
        for index, proportion in enumerate(_proportions(sources)):
            totals[index] += trained_steps * tokens_per_step * proportion
    return totals


def config_change_texts(records: dict, config: dict) -> list[str]:
    """A line per config change: without it, a card read a decay stretched on resume as if it had run whole."""
    texts, configs = [], earlier_configs(records)
    history = sorted(records.get(CONFIG_HISTORY_KEY) or [], key=lambda entry: entry["step"])
    digests = [entry.get(DATA_DIGESTS_KEY) for entry in history] + [records.get(DATA_DIGESTS_KEY)]
    for index, (step, before) in enumerate(configs):
        after = configs[index + 1][1] if index + 1 < len(configs) else config
        if before and after:
            differing = differing_settings(as_trained(before, digests[index]), as_trained(after, digests[index + 1]))
            changed = ", ".join(differing) or "no setting"
        else:
            changed = f"settings {NOT_RECORDED} (its saved copy is not a config)"
        texts.append(f"Config changed at step {step:,} (a resume or branch under another config): the steps before "
                     f"were trained under one that differs in {changed}. "
                     "The phase table gives this run's config; the data table each config's mix for its steps")
    return texts


def differing_settings(before: dict, after: dict) -> list[str]:
    """Where two parsed configs differ, as the dotted names a config file uses (``data.init_args.sources``,
    ``trainer.callbacks: ObjectiveSchedule``), at the depth a reader would look for them."""
    names = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b or key == "ckpt_path":
            continue
        if key in ("model", "data") and isinstance(a, dict) and isinstance(b, dict):
            args_a, args_b = a.get("init_args") or {}, b.get("init_args") or {}
            names += [f"{key}.init_args.{k}" for k in sorted(set(args_a) | set(args_b)) if args_a.get(k) != args_b.get(k)]
            names += [f"{key}.class_path"] if a.get("class_path") != b.get("class_path") else []
        elif key == "trainer" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) == b.get(k):
                    continue
                names.append(f"trainer.callbacks: {', '.join(_changed_callbacks(a, b))}"
                             if k == "callbacks" else f"trainer.{k}")
        else:
            names.append(key)
    return names


def _changed_callbacks(trainer_before: dict, trainer_after: dict) -> list[str]:
    def by_class(trainer: dict) -> dict:
        grouped: dict[str, list] = {}
        for callback in configured_callbacks(trainer):
            name = _short(str(callback.get("class_path", "?") if isinstance(callback, dict) else callback))
            grouped.setdefault(name, []).append(callback)
        return grouped

    a, b = by_class(trainer_before), by_class(trainer_after)
    return [name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)] or ["their order"]


def seeds_text(config: dict, hp: dict) -> str:
    """The three seeds a run draws from: a second-seed run given only ``seed_everything`` kept the first's masks
    and data order, which a card naming "seed 17" hid."""
    seeds = {"masks": hp.get("seed"), "data order": ((config.get("data") or {}).get("init_args") or {}).get("seed"),
             "seed_everything": config.get("seed_everything")}
    return "seeds: " + ", ".join(f"{name} {NOT_RECORDED if seed is None else seed}" for name, seed in seeds.items())


def validation_text(config: dict, records: dict) -> str | None:
    """What the run's validation curves measure: which objectives, on which held-out data, how often (None: the run
    did not validate). Judged by ``val_objectives`` the curves of two runs compare; by each phase's own they do not.
    Phase ends are named only from the step the checkpoint records TokenValidation validated them from (runs before
    2026-12-04 did not)."""
    data = (config.get("data") or {}).get("init_args") or {}
    sources = [s for s in data.get("val_sources") or [] if isinstance(s, dict) and "path" in s]
    if not sources:
        return None
    held_out = ", ".join(f"`{s.get('name') or Path(s['path']).name}`" for s in sources)
    if len(sources) > 1:
        held_out += " (over all of them, and each under `val/<source>/`)"
    objectives = ((config.get("model") or {}).get("init_args") or {}).get("val_objectives") or {}
    judged = ("; ".join(f"`val/{key}_loss` by {describe_objective(spec)}" for key, spec in objectives.items())
              or "each phase's own objective (`val/<objective>_loss`)")
    every = _callback_args(config, "TokenValidation")
    since = records.get(PHASE_ENDS_RECORD)
    phase_ends = "" if since is None else ", after each phase's last step" + (f" from step {since:,} on" if since else "")
    if every and "every_n_tokens" in every:
        when = f"every {every['every_n_tokens']:,} training tokens{phase_ends} and at the end"
    else:
        when = "at Lightning's `val_check_interval`"
    return f"- Validation: {judged}; on {held_out}, {when}"


def ran_on(config: dict, records: dict) -> dict:
    """Nodes, devices per node, accelerator and accumulation as the run had them (recorded in the checkpoint),
    else as its config states them (checkpoints saved before they recorded them; the config may say "auto")."""
    trainer = config.get("trainer") or {}
    hardware = records.get("hardware") or {}
    nodes = hardware.get("num_nodes", trainer.get("num_nodes", 1))
    world = hardware.get("world_size")
    return {
        "nodes": nodes,
        "devices": world // nodes if isinstance(world, int) and isinstance(nodes, int) else trainer.get("devices"),
        "accelerator": hardware.get("accelerator", trainer.get("accelerator")),
        "accumulate": hardware.get("accumulate_grad_batches", trainer.get("accumulate_grad_batches")),
    }


def block_size(config: dict, mix: list[dict]) -> int | None:
    """The rows' length: the config's ``block_size``, else the prepared one, the smallest over the sources."""
    block = ((config.get("data") or {}).get("init_args") or {}).get("block_size")
    if block is None and (manifests := [r["manifest"] for r in mix]) and all(manifests):
        block = min(m.block_size for m in manifests)
    return block


def batch_text(config: dict, records: dict) -> str:
    tokens_per_step = records.get("tokens_per_step")
    if tokens_per_step is None:
        return NOT_RECORDED
    data = (config.get("data") or {}).get("init_args") or {}
    block = block_size(config, data_rows(config, records))
    run = ran_on(config, records)
    factors = [data.get("micro_batch_size"), block, run["accumulate"], run["devices"], run["nodes"]]
    if all(isinstance(f, int) for f in factors) and math.prod(factors) == tokens_per_step:
        rows, length, accumulate, devices, nodes = factors
        return (f"{tokens_per_step:,} tokens per optimizer step = {rows} rows × {length} tokens × "
                f"{accumulate} accumulation × {devices * nodes} device(s)")
    return f"{tokens_per_step:,} tokens per optimizer step"


def clipping_text(config: dict) -> str:
    """Lightning's ``gradient_clip_val``: part of the recipe (the demo clips at 1.0), kept in the trainer's settings."""
    trainer = config.get("trainer") or {}
    if not trainer:
        return NOT_RECORDED
    if not (clip := trainer.get("gradient_clip_val")):
        return "none"
    if (trainer.get("gradient_clip_algorithm") or "norm") == "value":
        return f"each gradient value to ±{clip}"
    return f"the global gradient norm to {clip} (train/grad_norm is logged before clipping)"


def hardware_text(config: dict, records: dict) -> str:
    trainer = config.get("trainer") or {}
    if not trainer:
        return NOT_RECORDED
    run = ran_on(config, records)
    device = (records.get("hardware") or {}).get("device_name", NOT_RECORDED)
    strategy = trainer.get("strategy")
    strategy = _short(strategy.get("class_path", "")) if isinstance(strategy, dict) else strategy
    return (f"{run['nodes']} node(s) × {run['devices']} {run['accelerator']} device(s), "
            f"precision {trainer.get('precision') or 'default (32-true)'}, strategy {strategy}; device model "
            f"{device}")


def wall_clock_text(records: dict) -> str:
    for key, state in (records.get("callbacks") or {}).items():
        if key.startswith("Timer") and isinstance(state, dict):
            seconds = (state.get("time_elapsed") or {}).get("train")
            if seconds is not None:
                return f"{datetime.timedelta(seconds=round(seconds))} (h:mm:ss of training)"
    return f"{NOT_RECORDED} (add callbacks.StepTimer to trainer.callbacks)"


# -- rendering --------------------------------------------------------------------------------


def front_matter(base_model: str | None, language: str, license: str, causal: bool) -> str:
    lines = ["---", "language:", f"- {language}", f"license: {license}", "library_name: transformers"]
    if base_model and not is_local_path(base_model):  # the Hub takes model ids there; a folder is named in the text
        lines += ["base_model:", f"- {base_model}"]
    tags = ["fill-mask", "masked-lm", "modernbert", "encoder", "cpt-lightning"] + (["clm-detour"] if causal else [])
    lines += ["tags:", *(f"- {t}" for t in tags), "pipeline_tag: fill-mask", "---"]
    return "\n".join(lines)


def python_string(text: str) -> str:
    """``text`` as a Python string literal in double quotes: a path pasted between quotes as it was broke every snippet
    (a ``"`` in it) or loaded another path (a ``\\n`` in a Windows-style one)."""
    return json.dumps(text, ensure_ascii=False)


def usage(model_id: str, language: str, mask_token: str, loads_in_4x: bool = True) -> str:
    model_id = python_string(model_id)
    text = MASK_EXAMPLE.get(language, MASK_EXAMPLE["en"]).replace("[MASK]", mask_token)  # <mask> for RoBERTa-style vocabularies
    second = SECOND_TEXT.get(language, SECOND_TEXT["en"])
    versions = ("Loads with transformers 4.48 or later (5.x included), with the same tokens and outputs in both."
                if loads_in_4x else "Loads with transformers 5.x: transformers 4.x cannot build its layer pattern or "
                "RoPE scaling as trained.")
    return f'''## Usage

{versions}

Masked language modelling:

```python
from transformers import AutoTokenizer, AutoModelForMaskedLM

model_id = {model_id}
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForMaskedLM.from_pretrained(model_id)

text = "{text}"
inputs = tokenizer(text, return_tensors="pt")
outputs = model(**inputs)

masked_index = inputs["input_ids"][0].tolist().index(tokenizer.mask_token_id)
predicted_token_id = outputs.logits[0, masked_index].argmax(axis=-1)
predicted_token = tokenizer.decode(predicted_token_id)
print("Predicted token:", predicted_token)
```

With a pipeline:

```python
from transformers import pipeline

fill = pipeline("fill-mask", model={model_id})
print(fill("{text}"))
```

Embeddings for fine-tuning (classification, NER, ...). The encoder takes `input_ids` and
`attention_mask` only (no `token_type_ids`); the masked-LM head is not part of `AutoModel`.
From transformers 5.25, on a GPU, `from_pretrained` swaps the rotary embedding for a kernel
downloaded from the Hub, in training too; `use_kernels=False` (or `USE_HUB_KERNELS=0`) keeps
the PyTorch code this model was trained and evaluated with:

```python
import torch
from transformers import AutoTokenizer, AutoModel

model_id = {model_id}
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModel.from_pretrained(model_id)

inputs = tokenizer(["{text}", "{second}"], padding=True, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
print(outputs.last_hidden_state.shape)  # [batch, sequence, hidden]
```'''


def _count(value: int | None) -> str:
    return NOT_RECORDED if value is None else f"{value:,}"


def _source_row(source: dict, trained: float | None) -> str:
    """A source's share, its prepared size and, from the tokens it gave, how often the run read it (repetition is
    part of what a domain's gain means; each source is read whole before any of it repeats)."""
    manifest = source["manifest"]
    if manifest is None:
        counts = f"{NOT_RECORDED} (no manifest.json at {source['path']}) | {NOT_RECORDED}"
    else:
        counts = f"{manifest.num_tokens:,} | {manifest.num_documents:,}"
    passes = f"{_count(None if trained is None else round(trained))} | " + (
        NOT_RECORDED if trained is None or manifest is None else f"{trained / manifest.num_tokens:.2f}")
    return f"| {source['name']} | {source['proportion']:.1%} | {counts} | {passes} |"


def tokens_seen(records: dict) -> int | None:
    tokens_per_step, steps = records.get("tokens_per_step"), records.get("global_step")
    return steps * tokens_per_step if steps is not None and tokens_per_step is not None else None


def _budget(tokens: int | None) -> str:
    return "the whole run (no ObjectiveSchedule)" if tokens is None else f"{tokens:,}"


def training(records: dict, config: dict, run_config: RunConfig | None) -> str:
    hp = records.get("hyper_parameters") or {}
    tokens_per_step, steps, seen = records.get("tokens_per_step"), records.get("global_step"), tokens_seen(records)
    lines = ["## Training", ""]
    source = run_config or "no run config.yaml found (pass --run-config)"
    lines.append(f"Figures below come from the training checkpoint and the run's configuration ({source}).")
    lines += ["", "### Phases", ""]
    phases = phase_rows(config, seen, tokens_per_step)
    if phases:
        lines += ["| Phase | Objective | Token budget | Tokens trained | Learning rate |", "|---|---|---:|---:|---|"]
        lines += [f"| {i} | {p['objective']} | {_budget(p['budget'])} | {_count(p['trained'])} | {p['lr']} |"
                  for i, p in enumerate(phases, 1)]
    else:
        lines.append(f"Phase schedule: {NOT_RECORDED} (no run config).")
    lines += [f"\n- {text}" for text in schedule_position_texts(config, records)]
    trained_phases = reached(phases)
    freezes = [(text, optimizer_after_freeze(during, trained_phases)) for text, during in _freezes(config, trained_phases)]
    lines += [f"\n- Intervention: {text} (LayerFreeze: no update, gradients still flow through them"
              + (f"; {after})" if after else ")") for text, after in freezes]
    lines += [f"\n- {text}" for text in config_change_texts(records, config)]
    lines += [f"\n- Branched off another run at step {branch['step']:,}, from `{branch['checkpoint']}`: its weights, "
              "optimizer state and data position; the steps before were trained there (that run's card and config "
              "say how)" for branch in records.get("branched_from") or []]
    betas = hp.get("betas")
    lines += [
        "", "### Optimization", "",
        f"- Optimizer: AdamW, peak learning rate {hp.get('learning_rate')}, betas {tuple(betas) if betas else None}, "
        f"eps {hp.get('eps')}, weight decay {hp.get('weight_decay')} "
        + ("(decoupled as Composer's DecoupledAdamW: × lr/peak per step; " if hp.get("decoupled_weight_decay") else "(")
        + "not on biases and norms)"
        + ("; its state carries over phase switches, only the learning-rate shape restarts" if len(phases) > 1 else "")
        + (" (the frozen layers' restarts: see Intervention)" if any(after == AFRESH for _, after in freezes) else ""),
        f"- Gradient clipping: {clipping_text(config)}",
        f"- Batch: {batch_text(config, records)}",
        f"- Optimizer steps: {_count(steps)}; tokens seen: {_count(seen)}",
        f"- Attention implementation: {hp.get('attn_implementation')}; {seeds_text(config, hp)}",
        "", "### Data", "",
    ]
    mix = data_rows(config, records)
    if mix:
        lines += ["| Source | Proportion | Tokens (prepared) | Documents | Tokens trained (≈) | Passes (≈) |",
                  "|---|---:|---:|---:|---:|---:|"]
        trained = tokens_by_source(records, config) or [None] * len(mix)
        lines += [_source_row(source, tokens) for source, tokens in zip(mix, trained)]
    else:
        lines.append(f"Data mix: {NOT_RECORDED}.")
    if validated := validation_text(config, records):
        lines += ["", validated]
    lines += [
        "", "### Hardware and time", "",
        f"- Hardware: {hardware_text(config, records)}",
        f"- Wall-clock: {wall_clock_text(records)}",
        f"- Lightning {records.get('pytorch-lightning_version', NOT_RECORDED)}",
    ]
    return "\n".join(lines)


def evaluation(results: dict | None, evaluated_as: str | None) -> str:
    """The table of ``cpt evaluate``; ``evaluated_as``: its row with this model's weights (the folder evaluated)."""
    from cpt_lightning.evaluate.report import legend, markdown_table

    if not results:
        return "## Evaluation\n\nNo `cpt evaluate` results were given to `cpt export` (`--eval-results`)."
    others = ", the other rows the models it was compared with" if len(results["models"]) > 1 else ""
    return (f"## Evaluation\n\nFine-tuned with `cpt evaluate`. This model is the row `{evaluated_as}` (the folder "
            f"evaluated, with the same weights){others}.\n\n{markdown_table(results)}\n\n{legend(results)}")


# A CLM phase's export (PhaseEndExport's phase0-clm, a checkpoint taken mid-detour) reads as a fill-mask encoder
# otherwise: transformers runs ModernBERT bidirectionally only.
ENDS_CAUSAL = ("\n\n**This checkpoint ends in a causal phase**: its latest training was next-token prediction with "
               "causal attention. transformers runs it with bidirectional attention (its ModernBERT has no causal "
               "mode), which it has not trained with since, and the fill-mask example below shows that; for fine-tuning "
               "or masked-token prediction, the run's export after its MLM phase is the model.")


def summary(model, base_model: str | None, phases: list[dict], freezes: list[str], tokens: int | None) -> str:
    """``tokens``: the tokenizer's (None: not known); a vocabulary padded to a multiple of 64 has more embedding rows."""
    config = model.config
    start = f"continued pretraining of `{base_model}`" if base_model else "pretraining from random initialisation"
    recipe = " → ".join(p["objective"].split(" (")[0] for p in phases) or NOT_RECORDED
    recipe += "".join(f"; {text}" for text in freezes)
    params = sum(p.numel() for p in model.parameters())  # tied decoder counted once
    n_global = list(config.layer_types).count("full_attention")
    n_local = config.num_hidden_layers - n_global
    layers = f"{config.num_hidden_layers} layer{'s' * (config.num_hidden_layers != 1)}: {n_global} global attention"
    local = f", {n_local} local with a {config.local_attention}-token window" if n_local else ""
    rows = [
        ("Architecture", f"ModernBERT ({layers}{local})"),
        ("Parameters", f"{params:,}"),
        ("Hidden size", str(config.hidden_size)),
        ("Attention heads", str(config.num_attention_heads)),
        ("Context length", f"{config.max_position_embeddings:,} tokens"),
        ("Vocabulary", f"{config.vocab_size:,}" if tokens in (None, config.vocab_size) else
                       f"{tokens:,} tokens ({config.vocab_size:,} embedding rows, the rest unused)"),
        ("Base model", f"`{base_model}`" if base_model else "none (random initialisation)"),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return (f"## Model Summary\n\nAn encoder trained with cpt-lightning by {start}, objectives in order: {recipe}."
            f"{ENDS_CAUSAL if phases and 'causal attention' in phases[-1]['objective'] else ''}\n\n{table}")


def write_model_card(out: Path, records: dict, model, run_config: RunConfig | None, results: dict | None,
                     model_id: str, language: str | None, license: str, mask_token: str = "[MASK]",
                     evaluated_as: str | None = None, tokenizer_tokens: int | None = None,
                     titled_by_run: bool = False) -> Path:
    """``evaluated_as``: the row of ``results`` that is this model (see ``export._row_of``); ``language`` None: the
    run's (``card_language``); ``tokenizer_tokens``: the exported tokenizer's size; ``titled_by_run``: the title
    names the run before the folder (an export's own folder name, ``phase1-mlm``, was every arm's title)."""
    config = run_config.parsed() if run_config else {}
    language = language or card_language(config)
    base_model = (records.get("hyper_parameters") or {}).get("model")
    phases = reached(phase_rows(config, tokens_seen(records), records.get("tokens_per_step")))
    causal = any("causal attention" in p["objective"] for p in phases)
    title = Path(model_id).name or model_id
    if titled_by_run and (run := run_name(config)):
        title = f"{run} · {title}"
    sections = [
        front_matter(base_model, language, license, causal),
        f"# {title}",
        summary(model, base_model, phases, freeze_texts(config, phases), tokenizer_tokens),
        usage(model_id, language, mask_token, loads_in_4x=not gaps_in_4x(model.config)),
        training(records, config, run_config),
        evaluation(results, evaluated_as),
        f"## License\n\n{license}",
    ]
    path = out / "README.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
