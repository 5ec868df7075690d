"""The recipe configs parse, say what the recipe says, and differ from each other only where they should.

Configs are resolved exactly as ``cpt fit --config X --print_config`` resolves them (in-process for
speed; one test runs the real command), so these tests also pin the composition rules the recipes
rely on: ``config:`` includes, dotted-key overrides, and YAML files given as values.
"""

import contextlib
import io
import math
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml

from callbacks.global_batch import derive_layout
from callbacks.layer_freeze import parse_layers
from cpt_lightning.cli import main as cpt_main
from cpt_lightning.schedules import PhaseLR, TokenSchedule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EN_MIX = {"pubmed": 0.6, "medical_instructions": 0.2, "mimic_notes": 0.2}
FR_MIX = {"biomedical": 0.70, "medical_qa": 0.20, "e3c_clinical_cases": 0.04, "emea": 0.06}
CLM = ("cpt_lightning.objectives.CausalLM", None)
MLM15, MLM30 = ("cpt_lightning.objectives.MaskedLM", 0.15), ("cpt_lightning.objectives.MaskedLM", 0.30)
EN_BASE, EN_LARGE = "answerdotai/ModernBERT-base", "answerdotai/ModernBERT-large"

# name → model, mix, phases [(objective, mask rate, tokens)], micro-batch, frozen layers during CLM
RECIPES = {
    "en_detour": (EN_BASE, EN_MIX, [(*CLM, 50e9), (*MLM15, 5e9)], 4, None),
    "en_mlm_baseline": (EN_BASE, EN_MIX, [(*MLM30, 50e9), (*MLM15, 5e9)], 4, None),
    "en_freeze_early": (EN_BASE, EN_MIX, [(*CLM, 50e9), (*MLM15, 5e9)], 4, range(0, 8)),
    "en_freeze_mid": (EN_BASE, EN_MIX, [(*CLM, 50e9), (*MLM15, 5e9)], 4, range(8, 15)),
    "fr_detour": ("almanach/moderncamembert-base", FR_MIX, [(*CLM, 10e9), (*MLM15, 1e9)], 4, None),
    "en_detour_large": (EN_LARGE, EN_MIX, [(*CLM, 50e9), (*MLM15, 5e9)], 2, None),
    "en_mlm_baseline_large": (EN_LARGE, EN_MIX, [(*MLM30, 50e9), (*MLM15, 5e9)], 2, None),
}
TOKENS_PER_STEP = 384 * 8192


@lru_cache(maxsize=None)
def _printed(path: str, *extra: str) -> str:
    args = ["fit", "--config", path, *extra, "--print_config"]
    out = io.StringIO()
    with patch.object(sys, "argv", ["cpt", *args]), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cpt_main(args)
    assert exit_.value.code in (0, None), f"{path} does not parse"
    return out.getvalue()


def resolved(name_or_path: str, *extra: str) -> dict:
    path = name_or_path if name_or_path.endswith(".yaml") else str(CONFIGS / f"{name_or_path}.yaml")
    return yaml.safe_load(_printed(path, *extra))


def callback(config: dict, class_name: str) -> dict | None:
    found = [c for c in config["trainer"]["callbacks"] if c["class_path"].rsplit(".", 1)[-1] == class_name]
    assert len(found) <= 1
    return found[0].get("init_args", {}) if found else None


def without_run_folder(config: dict, name: str) -> dict:
    """The config with this recipe's own run name and folder (``runs/<name>``) made generic, to compare recipes."""
    generic = yaml.safe_load(yaml.safe_dump(config).replace(f"runs/{name}/", "runs/RUN/"))
    generic["trainer"]["logger"]["init_args"]["name"] = "RUN"
    return generic


def flat(value, prefix=""):
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def differing_keys(a: dict, b: dict) -> set[str]:
    fa, fb = flat(a), flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def test_the_recipe_set_is_deliberate():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} - {"demo_cpu"} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_printed_config_is_complete_and_standalone(name, tmp_path):
    full = resolved(name)
    printed = tmp_path / "printed.yaml"
    printed.write_text(_printed(str(CONFIGS / f"{name}.yaml")))
    assert "config" not in full and resolved(str(printed)) == full  # no include or relative path left


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_values(name):
    model, mix, phases, micro, frozen = RECIPES[name]
    config = resolved(name)
    assert config["seed_everything"] == 17
    hp = config["model"]["init_args"]
    assert hp["model"] == model
    assert (hp["learning_rate"], hp["betas"], hp["eps"], hp["weight_decay"], hp["seed"]) == (2e-4, [0.9, 0.98], 1e-6, 1e-5, 17)
    assert hp["decoupled_weight_decay"] is True  # Composer's reading of 1e-5, as the paper's runs
    data = config["data"]["init_args"]
    assert {s["name"]: s["weight"] for s in data["sources"]} == mix and math.isclose(sum(mix.values()), 1.0)
    assert (data["block_size"], data["seed"], data["micro_batch_size"]) == (8192, 42, micro)

    trainer = config["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"], trainer["precision"]) == ("gpu", 4, 1, "bf16-mixed")
    assert trainer["accumulate_grad_batches"] == 1  # derived at start-up by GlobalBatch, never hand-set
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "cpt_lightning.parallel.FSDP2"
    assert strategy["init_args"].items() >= {"param_dtype": "bfloat16", "reduce_dtype": "float32", "save_distributed_checkpoint": True}.items()
    assert [plugin["class_path"] for plugin in trainer["plugins"]] == ["cpt_lightning.checkpointing.AtomicCheckpointIO"]
    logger = trainer["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"], logger["version"]) == ("runs", name, "")  # everything in runs/<name>
    assert callback(config, "PhaseEndExport")["dirpath"] is None  # → runs/<name>/export
    assert callback(config, "PhaseEndExport")["language"] == name[:2]  # the model card's language and example
    assert callback(config, "TokenCheckpoint")["dirpath"] is None  # → runs/<name>/checkpoints
    for standard in ("PreemptionCheckpoint", "NonFiniteGuard", "LossSpikeMonitor", "TokenThroughput",
                     "StepLearningRateMonitor", "StepTimer", "TokenValidation"):
        assert callback(config, standard) is not None, standard

    freeze = callback(config, "LayerFreeze")
    if frozen is None:
        assert freeze is None
    else:
        assert parse_layers(freeze["layers"]) == list(frozen) and freeze["during"] == "clm"

    schedule = callback(config, "ObjectiveSchedule")["phases"]
    assert [(p["objective"]["class_path"], p["objective"].get("init_args", {}).get("mask_rate"), p["tokens"])
            for p in schedule] == phases
    decay = schedule[1]["objective"]["init_args"]
    assert (decay["mask_token_ratio"], decay["random_token_ratio"]) == (0.8, 0.1)  # 80/10/10


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_derived_batch_and_schedule(name):
    """384 × 8192 tokens per step on 4 GPUs; warmup 100M tokens; constant, then 1−sqrt down to 10%."""
    config = resolved(name)
    sequences = callback(config, "GlobalBatch")["sequences"]
    data, trainer = config["data"]["init_args"], config["trainer"]
    layout = derive_layout(sequences, data["micro_batch_size"], trainer["devices"], trainer["num_nodes"])
    assert layout.sequences == 384 and sequences * data["block_size"] == TOKENS_PER_STEP == 3_145_728
    assert layout.accumulation == {4: 24, 2: 48}[data["micro_batch_size"]]

    phases = callback(config, "ObjectiveSchedule")["phases"]
    assert [(p["lr"], p["warmup_tokens"], p["final_lr_ratio"]) for p in phases] == [("constant", 100_000_000, 0.1),
                                                                                    ("sqrt_decay", 0, 0.1)]
    schedule = TokenSchedule([PhaseLR(p["tokens"], p["lr"], p["warmup_tokens"], p["final_lr_ratio"]) for p in phases])
    first, total = phases[0]["tokens"], schedule.total_tokens
    assert schedule.multiplier(50_000_000) == 0.5 and schedule.multiplier(100_000_000) == 1.0
    assert schedule.multiplier(first - 1) == 1.0 and schedule.multiplier(first) == 1.0  # no re-warmup at the switch
    assert math.isclose(schedule.multiplier(first + phases[1]["tokens"] // 2), 0.1 + 0.9 * (1 - math.sqrt(0.5)), rel_tol=1e-6)
    assert math.isclose(schedule.multiplier(total), 0.1)
    # the figures docs/recipes.md quotes: steps to the switch and in all, MLM steps, warmup and checkpoint steps
    switch, steps = {50e9: (15_895, 17_485), 10e9: (3_179, 3_497)}[first]
    assert (math.ceil(first / TOKENS_PER_STEP), math.ceil(total / TOKENS_PER_STEP)) == (switch, steps)
    assert steps - switch == {50e9: 1_590, 10e9: 318}[first] and round(100_000_000 / TOKENS_PER_STEP) == 32
    assert first != 50e9 or switch * TOKENS_PER_STEP == 50_001_346_560
    checkpoint = callback(config, "TokenCheckpoint")
    assert (checkpoint["every_n_tokens"], math.ceil(checkpoint["every_n_tokens"] / TOKENS_PER_STEP)) == (2_000_000_000, 636)
    assert checkpoint["keep_last"] == 2
    validation = callback(config, "TokenValidation")["every_n_tokens"]
    assert (validation, math.ceil(validation / TOKENS_PER_STEP)) == (500_000_000, 159)
    assert "val_check_interval" not in {k for k, v in trainer.items() if v is not None}  # TokenValidation decides


def test_freeze_ablations_are_the_detour_plus_a_freeze():
    detour = without_run_folder(resolved("en_detour"), "en_detour")
    for name in ("en_freeze_early", "en_freeze_mid"):
        ablation = without_run_folder(resolved(name), name)
        callbacks = ablation["trainer"]["callbacks"]
        ablation["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith("LayerFreeze")]
        assert len(callbacks) == len(detour["trainer"]["callbacks"]) + 1 and ablation == detour


def test_baseline_differs_from_the_detour_only_in_the_first_objective():
    for detour, baseline in (("en_detour", "en_mlm_baseline"), ("en_detour_large", "en_mlm_baseline_large")):
        a, b = without_run_folder(resolved(detour), detour), without_run_folder(resolved(baseline), baseline)
        assert differing_keys(a, b) == {
            "trainer.callbacks.0.init_args.phases.0.objective.class_path",
            *(f"trainer.callbacks.0.init_args.phases.0.objective.init_args.{k}"
              for k in ("mask_rate", "mask_token_ratio", "random_token_ratio")),
        }


def test_large_variants_differ_only_by_model_and_batch():
    for base in ("en_detour", "en_mlm_baseline"):
        large = f"{base}_large"
        a, b = without_run_folder(resolved(base), base), without_run_folder(resolved(large), large)
        assert differing_keys(a, b) == {"model.init_args.model", "data.init_args.micro_batch_size"}


def test_french_recipe_shares_everything_but_model_data_and_budgets():
    en, fr = without_run_folder(resolved("en_detour"), "en_detour"), without_run_folder(resolved("fr_detour"), "fr_detour")
    allowed = ("model.init_args.model", "data.init_args.sources.", "trainer.callbacks.0.init_args.phases.",
               "trainer.callbacks.1.init_args.language")
    assert all(key.startswith(allowed) for key in differing_keys(en, fr))



def test_the_bench_config_steps_as_the_recipe_does():
    """configs/bench/gpu_base.yaml (what a GPU session measures) says all but the model's build is the recipe's: its
    AdamW had torch's coupled weight decay, where the recipe's is decoupled."""
    bench, recipe = resolved(str(CONFIGS / "bench" / "gpu_base.yaml")), resolved("en_detour")
    differing = differing_keys(recipe["model"]["init_args"], bench["model"]["init_args"])
    assert {key.split(".")[0] for key in differing} == {"model", "model_config", "tokenizer", "val_objectives"}

def test_a_user_config_points_a_recipe_at_other_corpora_and_hardware(tmp_path):
    """How docs/recipes.md tells users to use their data: include the recipe, override what differs."""
    mine = tmp_path / "my_en_detour.yaml"
    sources = [{"name": n, "path": f"/corpora/{n}", "weight": w} for n, w in EN_MIX.items()]
    mine.write_text(yaml.safe_dump({"config": str(CONFIGS / "en_detour.yaml"), "data.init_args.sources": sources,
                                    "trainer.num_nodes": 2}))
    config, recipe = resolved(str(mine)), resolved("en_detour")
    assert config["data"]["init_args"]["sources"] == sources
    assert differing_keys(config, recipe) == {"trainer.num_nodes"} | {f"data.init_args.sources.{i}.path" for i in range(3)}
    assert derive_layout(384, 4, config["trainer"]["devices"], 2).accumulation == 12


def docs_config(name: str) -> str:
    """The YAML block of docs/recipes.md whose first line is ``# configs/my/<name>``."""
    blocks = (ROOT / "docs" / "recipes.md").read_text().split("```yaml\n")[1:]
    (block,) = [b.split("```")[0] for b in blocks if b.startswith(f"# configs/my/{name}")]
    return block


def test_the_validated_recipe_of_the_docs_adds_validation_data_and_nothing_else(tmp_path):
    """docs/recipes.md's "One validation curve for every run", as a user copies it beside the recipes; every recipe
    validates by the same objectives (without them the baseline's curve was 30% MLM, the detour's CLM)."""
    mine = tmp_path / "my" / "en_detour_validated.yaml"
    mine.parent.mkdir()
    mine.write_text(docs_config("en_detour_validated.yaml").replace("../en_detour.yaml", str(CONFIGS / "en_detour.yaml")))
    config, recipe = resolved(str(mine)), resolved("en_detour")
    assert {key.split(".")[2] for key in differing_keys(config, recipe)} == {"val_sources"}
    for name in RECIPES:
        objectives = resolved(name)["model"]["init_args"]["val_objectives"]
        assert {key: (o["class_path"], o.get("init_args", {}).get("mask_rate")) for key, o in objectives.items()} == {
            "mlm15": MLM15, "clm": CLM}, name
    sources = config["data"]["init_args"]["sources"]
    assert [v["path"] for v in config["data"]["init_args"]["val_sources"]] == [f"{s['path']}/holdout" for s in sources]


def cpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cpt_lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cpt_fit_prints_a_recipe_from_any_directory(tmp_path):
    result = cpt("fit", "--config", str(CONFIGS / "en_detour.yaml"), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout) == resolved("en_detour")


def test_missing_prepared_data_is_one_clear_line_before_the_model_loads(tmp_path):
    """The data folders are user-supplied: run from a directory without them, the error names the folder.

    The recipe's model is answerdotai/ModernBERT-base, which cannot be fetched here: the data check
    has to come first for this to be the error.
    """
    result = cpt("fit", "--config", str(CONFIGS / "en_detour.yaml"),
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data/prepared/en/pubmed: not a prepared source (no such folder); run `cpt prepare` for it first"]
    assert "Traceback" not in result.stderr


def test_a_run_config_saved_before_phase_end_export_moved_still_parses(tmp_path):
    """Runs saved their config with PhaseEndExport under cpt_lightning.export: `cpt validate --config
    runs/X/config.yaml` must still read it (as callbacks.PhaseEndExport)."""
    saved = yaml.safe_load(_printed(str(CONFIGS / "demo_cpu.yaml")))
    exports = [c for c in saved["trainer"]["callbacks"] if c["class_path"].endswith("PhaseEndExport")]
    assert len(exports) == 1 and saved["trainer"]["callbacks"][0]["init_args"]["stop_after_last_phase"] is True
    exports[0]["class_path"] = "cpt_lightning.export.PhaseEndExport"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert callback(resolved(str(tmp_path / "config.yaml")), "PhaseEndExport") == exports[0]["init_args"]
