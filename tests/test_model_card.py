"""The model card's parts read from small records: the figures a reader takes from it, and "not recorded" where the
records are silent (the card is written end to end in test_export.py)."""

import re
from types import SimpleNamespace

import yaml

from callbacks import Phase
from cpt_lightning import model_card as card
from cpt_lightning.objectives import CausalLM


def schedule(*phases: dict) -> dict:
    return {"trainer": {"callbacks": [{"class_path": "callbacks.ObjectiveSchedule", "init_args": {"phases": list(phases)}}]}}


CLM = {"objective": {"class_path": "cpt_lightning.objectives.CausalLM"}, "tokens": 100}
MLM = {"objective": {"class_path": "cpt_lightning.objectives.MaskedLM"}, "tokens": 50}


def test_a_decay_without_its_end_in_the_config_is_read_at_the_phases_default():
    default = Phase(tokens=1, objective=CausalLM()).final_lr_ratio
    assert card.describe_lr({"lr": "sqrt_decay"}) == f"1−sqrt decay to {default:g}× peak"


def test_a_run_without_a_schedule_or_a_warmup_record_says_its_lr_is_not_recorded():
    """Not "constant" without warmup, which the run may not have had."""
    assert card.whole_run_row({"model": {"init_args": {}}}, None)["lr"] == card.NOT_RECORDED


def test_a_config_change_says_its_step_and_that_the_steps_before_it_ran_under_the_old_config():
    old = yaml.safe_dump({"model": {"init_args": {"learning_rate": 1e-3}}})
    records = {"global_step": 20_000, "config_history": [{"step": 12_000, "config": old}]}
    (text,) = card.config_change_texts(records, {"model": {"init_args": {"learning_rate": 1e-4}}})
    assert text.startswith("Config changed at step 12,000 ") and "the steps before were trained" in text
    assert "differs in model.init_args.learning_rate" in text


def test_a_saved_copy_that_is_not_a_config_is_said_on_both_changes_it_borders():
    good = yaml.safe_dump({"model": {"init_args": {"learning_rate": 1e-3}}})
    records = {"global_step": 6, "config_history": [{"step": 2, "config": good}, {"step": 4, "config": "[not, a, config]"}]}
    texts = card.config_change_texts(records, {"model": {"init_args": {"learning_rate": 1e-4}}})
    assert len(texts) == 2 and all("differs in settings not recorded" in text for text in texts)


def test_a_changed_class_or_callback_order_is_named():
    assert card.differing_settings({"data": {"class_path": "a.A", "init_args": {}}},
                                   {"data": {"class_path": "b.B", "init_args": {}}}) == ["data.class_path"]
    a, b = {"class_path": "callbacks.A"}, {"class_path": "callbacks.B"}
    assert card.differing_settings({"trainer": {"callbacks": [a, b]}}, {"trainer": {"callbacks": [b, a]}}) == [
        "trainer.callbacks: their order"]


def test_seeds_of_zero_are_seeds_and_a_missing_one_is_not_recorded():
    config = {"data": {"init_args": {"seed": 0}}, "seed_everything": 0}
    assert card.seeds_text(config, {"seed": 0}) == "seeds: masks 0, data order 0, seed_everything 0"
    assert card.seeds_text({}, {}) == "seeds: masks not recorded, data order not recorded, seed_everything not recorded"


def test_hardware_names_lightnings_default_precision_and_an_unrecorded_device():
    assert card.hardware_text({"trainer": {"devices": 1, "accelerator": "cpu"}}, {}) == (
        "1 node(s) × 1 cpu device(s), precision default (32-true), strategy None; device model not recorded")


def test_a_clip_value_of_zero_is_no_clipping():
    """Lightning clips nothing at gradient_clip_val 0 (its precision plugin returns below 0 and at it)."""
    assert card.clipping_text({"trainer": {"gradient_clip_val": 0.0}}) == "none"


def test_the_wall_clock_is_the_timers_training_time_rounded():
    records = {"callbacks": {"Timer": {"time_elapsed": {"train": 3724.6, "validate": 60.0}}}}
    assert card.wall_clock_text(records) == "1:02:05 (h:mm:ss of training)"


def test_a_sources_tokens_trained_are_rounded_and_not_recorded_without_a_count():
    source = {"name": "a", "path": "p", "proportion": 2 / 3, "manifest": SimpleNamespace(num_tokens=100, num_documents=3)}
    assert card._source_row(source, 200 / 3) == "| a | 66.7% | 100 | 3 | 67 | 0.67 |"
    assert card._source_row(source, None) == "| a | 66.7% | 100 | 3 | not recorded | not recorded |"


def test_a_run_of_phases_without_a_freeze_points_to_no_intervention():
    text = card.training({}, schedule(CLM, MLM), None)
    assert "phase switches" in text and "frozen layers" not in text


def test_a_tokenizer_that_fills_the_embeddings_is_the_vocabulary_without_unused_rows():
    config = SimpleNamespace(layer_types=["full_attention"], num_hidden_layers=1, local_attention=16, hidden_size=8,
                             num_attention_heads=1, max_position_embeddings=64, vocab_size=128)
    text = card.summary(SimpleNamespace(config=config, parameters=lambda: []), None, [], [], 128)
    assert "| Vocabulary | 128 |" in text and "unused" not in text


def tiny_card(folder, run_config: dict | None, records: dict | None = None) -> str:
    """The card of a one-layer ModernBERT from the run's config (None: no config at all) and the checkpoint's
    ``records`` (none by default: no step records)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, cls_token_id=1, sep_token_id=2)
    run = None if run_config is None else card.RunConfig(yaml.safe_dump(run_config))
    return card.write_model_card(folder, records or {}, ModernBertForMaskedLM(config), run, None, "org/m", "en",
                                 "mit").read_text()


def test_a_card_without_step_records_still_names_the_phases_and_the_detour(tmp_path):
    text = tiny_card(tmp_path, schedule(CLM, MLM))
    assert "objectives in order: CLM → MLM." in text and "- clm-detour" in text


def test_the_clm_end_card_of_a_run_freezing_during_mlm_names_no_freeze(tmp_path):
    """The summary read "objectives in order: CLM; encoder layers 0–1 frozen during MLM" for a model that never
    trained an MLM step nor had a layer frozen."""
    config = schedule(CLM, MLM)
    config["trainer"]["callbacks"].append({"class_path": "callbacks.LayerFreeze",
                                           "init_args": {"layers": "0-1", "during": "mlm"}})
    assert "objectives in order: CLM.\n" in tiny_card(tmp_path, config, {"global_step": 10, "tokens_per_step": 10})
    assert "objectives in order: CLM → MLM; encoder layers 0–1 frozen during MLM." in tiny_card(tmp_path, config)


def test_a_checkpoint_partway_through_a_phase_or_past_the_last_says_where_it_stands(tmp_path):
    """The table names each phase's whole shape: a checkpoint 3 steps into an 11-step decay read "1−sqrt decay to 0.05×
    peak" at 0.6× peak, and a run trained on past its last phase (stop_after_last_phase: false) read as its budget."""
    config = schedule({**CLM, "warmup_tokens": 20}, {**MLM, "lr": "sqrt_decay", "final_lr_ratio": 0.05})

    def said(step, tokens_per_step=10):
        return card.schedule_position_texts(config, {"global_step": step, "tokens_per_step": tokens_per_step})

    assert said(2) == ["This checkpoint stops partway through phase 1: 20 of its 100 tokens, its last step at 0.5× "
                       "the peak learning rate"]  # in the warmup: the step from 10 tokens
    assert said(12) == [f"This checkpoint stops partway through phase 2: 20 of its 50 tokens, its last step at "
                        f"{0.05 + 0.95 * (1 - 0.2 ** 0.5):.3g}× the peak learning rate"]
    assert said(10) == said(15) == said(0) == []  # the phases' ends, and before any step
    assert said(4, tokens_per_step=30) == []  # 120 tokens: the detour's end on a grid of 30-token steps (100 rounded up)
    config["trainer"]["callbacks"][0]["init_args"]["stop_after_last_phase"] = False
    assert said(18) == ["Trained on past the last phase's end: 30 tokens after it, at 0.05× the peak learning rate "
                        "(`stop_after_last_phase: false`)"]
    assert "\n- This checkpoint stops partway through phase 2: 20 of its 50 tokens" in tiny_card(
        tmp_path, config, {"global_step": 12, "tokens_per_step": 10})


def test_a_card_without_a_run_config_says_its_objectives_are_not_recorded(tmp_path):
    assert "objectives in order: not recorded." in tiny_card(tmp_path, None)


def test_a_run_whose_phase_end_export_names_no_language_has_english_cards():
    phase_end = {"class_path": "callbacks.PhaseEndExport", "init_args": {}}
    assert card.card_language({"trainer": {"callbacks": [phase_end]}}) == card.card_language({}) == "en"


def test_tokens_seen_is_zero_at_step_zero_and_not_recorded_without_the_step_size():
    assert "Optimizer steps: 0; tokens seen: 0\n" in card.training({"global_step": 0, "tokens_per_step": 10}, {}, None)
    assert "Optimizer steps: 5; tokens seen: not recorded\n" in card.training({"global_step": 5}, {}, None)


def test_the_results_of_this_model_alone_name_no_other_rows():
    results = {"seeds": [0], "tasks": {"HoC": {"type": "multilabel", "family": "BigBIO", "metric": "micro_f1"}},
               "models": {"runs/m": {"context": 512, "weights": "0" * 64}},
               "runs": [{"model": "runs/m", "task": "HoC", "seed": 0, "test_f1": 60.0}]}
    text = card.evaluation(results, "runs/m")
    assert "This model is the row `runs/m` (the folder evaluated, with the same weights).\n" in text
    results["models"]["runs/base"] = {"context": 512, "weights": "1" * 64}
    assert "with the same weights), the other rows the models it was compared with.\n" in card.evaluation(results,
                                                                                                          "runs/m")


def test_the_snippets_load_the_model_id_as_given_whatever_its_characters(tmp_path):
    """The id (OUT_DIR by default) was pasted between quotes as it was: a path holding a quote made every snippet a
    SyntaxError, one holding a backslash loaded another path. A folder moved aside has its card's snippets repointed."""
    import ast

    from callbacks.phase_end_export import repoint_card

    def loaded(text: str) -> list[set]:
        snippets = re.findall(r"```python\n(.*?)```", text, re.S)
        return [{node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)} for code in snippets]

    old, new = tmp_path / 'runs\\new "x"' / "phase1-mlm", tmp_path / "aside" / "phase1-mlm"
    snippets = loaded(card.usage(str(old), "en", "[MASK]"))
    assert len(snippets) == 3 and all(str(old) in constants for constants in snippets)
    new.mkdir(parents=True)
    (new / "README.md").write_text(f"# {old}\n\n" + card.usage(str(old), "en", "[MASK]"))
    repoint_card(old, new)
    assert all(str(new) in constants and str(old) not in constants for constants in loaded((new / "README.md").read_text()))
    assert str(old) not in (new / "README.md").read_text()


def test_the_architecture_line_counts_what_the_model_has():
    """"1 layers", and a window for local layers a model of global ones alone does not have."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    def line(layers: int, every_n: int) -> str:
        config = ModernBertConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=layers,
                                  global_attn_every_n_layers=every_n, local_attention=16, vocab_size=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        text = card.summary(ModernBertForMaskedLM(config), None, [], [], None)
        return next(row for row in text.splitlines() if row.startswith("| Architecture"))

    assert line(1, 1) == "| Architecture | ModernBERT (1 layer: 1 global attention) |"
    assert line(3, 2) == "| Architecture | ModernBERT (3 layers: 2 global attention, 1 local with a 16-token window) |"
