"""`cpt bench` on CPU: a tiny model of the demo config, both objectives, 1 warm-up + 2 measured steps."""

import json
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_cli import ROWS, demo_config

from cpt_lightning.bench import Measurement, StepWindow, choose, parse_args, result_row
from cpt_lightning.bench_tables import compare_table, format_table
from cpt_lightning.cli import main
from cpt_lightning.errors import UserError
from cpt_lightning.training_cli import LIBRARY_NOTICES

ACCUMULATION = 2


@pytest.fixture
def bench_config(tmp_path, prepared_mix, tokenizer_dir, monkeypatch):
    """The demo config (every callback but exports) plus GlobalBatch for 2 accumulated micro-batches; cwd = run folder.

    Running inside the run folder puts the demo's relative checkpoint paths there too, so any file
    the bench should not write shows up in one place.
    """
    path = demo_config(tmp_path, prepared_mix, tokenizer_dir, clm_steps=2, mlm_steps=2)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "callbacks.GlobalBatch", "init_args": {"sequences": ROWS * ACCUMULATION}}
    )
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    return path


def bench(config, *args: str) -> tuple[int, dict | None]:
    out = config.parent / "bench.json"
    code = main(["bench", "--config", str(config), "--steps", "2", "--warmup", "1", "--out", str(out), *args])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_bench_measures_each_objective_and_writes_nothing_else(bench_config, prepared_mix, capsys, recwarn, monkeypatch):
    import weakref

    import lightning as L

    fitted, fit = [], L.Trainer.fit

    def fit_after_the_earlier_builds_are_gone(trainer, model, *args, **kwargs):
        # trainer <-> module is a cycle: on a GPU the previous objective's weights and AdamW state counted in the
        # next one's peak memory until a full garbage collection
        assert all(earlier() is None for earlier in fitted), "an earlier objective's model is still alive"
        fitted.append(weakref.ref(model))
        return fit(trainer, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit_after_the_earlier_builds_are_gone)
    started = time.perf_counter()
    code, report = bench(bench_config)
    wall = time.perf_counter() - started
    assert code == 0, capsys.readouterr().err[-3000:]

    rows = {row["objective"]: row for row in report["results"]}
    assert list(rows) == ["clm", "mlm"] and len(fitted) == 2  # the phases' order
    tokens_per_step = ROWS * prepared_mix.block_size * ACCUMULATION
    for row in rows.values():
        assert row["micro_batches_per_step"] == ACCUMULATION
        assert row["tokens_per_step"] == tokens_per_step
        assert 0 < 2 * row["step_time_s"] < wall
        assert row["tokens_per_s"] == pytest.approx(tokens_per_step / row["step_time_s"])
        assert row["tokens_per_s_per_device"] == row["tokens_per_s"]  # one device
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # CPU
    # the rows ran their own objective: CLM's head predicts every position, MLM's only 15%
    assert rows["clm"]["flops_per_token"] > 2 * rows["mlm"]["flops_per_token"] > 0
    for row in rows.values():  # the demo's short documents: attention over them is less than over whole rows
        assert 0 < row["document_masked_flops_per_token"] < row["flops_per_token"]

    assert report["world_size"] == 1 and report["accumulate_grad_batches"] == ACCUMULATION
    assert (report["steps"], report["warmup_steps"]) == (2, 1)
    assert (report["micro_batch_size"], report["block_size"]) == (ROWS, prepared_mix.block_size)
    assert report["attn_implementation"] == "sdpa" and report["precision"] == "32-true"
    assert report["compile"] is False and report["loss_chunk_size"] == 4096
    assert report["versions"]["torch"] and report["date"].endswith("+00:00")
    assert any("peak_memory_gib is null" in note for note in report["notes"])
    assert any("mfu is null" in note for note in report["notes"])  # CPU: Lightning knows no peak FLOP/s
    # the report a run writes is one scripts/bench_table.py reads (its versions, setup and row keys)
    assert f"| here | sdpa | no | {ROWS} × {ACCUMULATION} | mlm |" in compare_table({"here": report})

    assert report["not_measured"] == []
    notices = "|".join([*(m for _, m in LIBRARY_NOTICES), "no `val_dataloader`"])
    assert [str(w.message) for w in recwarn if re.search(notices, str(w.message))] == []  # filtered as under cpt fit
    printed = capsys.readouterr().out
    assert printed.count("| clm |") == 1 and "clm: " in printed  # CLM's row as soon as it was measured, then the table
    assert "| clm |" in printed and "| mlm |" in printed and f"32-true, sdpa, compile off, micro-batch {ROWS} × block" in printed
    written = sorted(p.name for p in bench_config.parent.rglob("*") if p.is_file())
    assert written == ["bench.json", "config.yaml"]  # no checkpoint, log, saved config or export



def test_a_profiler_given_after_the_dashes_reports_beside_the_json(bench_config):
    """The --help's `-- --trainer.profiler=pytorch`: without a logger, Lightning wrote its trace into the current
    folder (the repository's root, where the docs say the bench writes nothing but the JSON)."""
    out = bench_config.parent / "reports" / "bench.json"
    code = main(["bench", "--config", str(bench_config), "--steps", "1", "--warmup", "1", "--objectives", "mlm",
                 "--out", str(out), "--", "--trainer.profiler=pytorch"])
    assert code == 0
    assert sorted(p.name for p in bench_config.parent.iterdir() if p.is_file()) == ["config.yaml"]
    assert any(p.name.endswith(".pt.trace.json") for p in out.parent.iterdir()) and out.is_file()

def test_a_failure_in_a_later_objective_keeps_the_rows_already_measured(bench_config, monkeypatch):
    """On a lent GPU with minutes to spare, an out-of-memory error or a time limit during MLM must not lose CLM."""
    import cpt_lightning.bench as bench_module

    measure = bench_module.measure

    def measure_until_mlm(cli, name, warmup, steps):
        if name == "mlm":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return measure(cli, name, warmup, steps)

    monkeypatch.setattr(bench_module, "measure", measure_until_mlm)
    with pytest.raises(torch.OutOfMemoryError):  # not a user error: its traceback is the report
        bench(bench_config)
    report = json.loads((bench_config.parent / "bench.json").read_text())
    assert [row["objective"] for row in report["results"]] == ["clm"] and report["results"][0]["tokens_per_s"] > 0
    assert report["not_measured"] == ["mlm"] and "incomplete: mlm not measured" in report["notes"]


def test_a_sigterm_during_a_later_objective_exits_143_and_keeps_the_rows_measured(bench_config, monkeypatch, capsys):
    """Lightning's SIGTERMException is a SystemExit without a code: a preempted bench job ended 0, as if complete."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import cpt_lightning.bench as bench_module

    measure = bench_module.measure

    def preempted_in_mlm(cli, name, warmup, steps):
        if name == "mlm":
            raise SIGTERMException
        return measure(cli, name, warmup, steps)

    monkeypatch.setattr(bench_module, "measure", preempted_in_mlm)
    code, report = bench(bench_config)
    assert code == 143 and "preempted (SIGTERM)" in capsys.readouterr().err
    assert [row["objective"] for row in report["results"]] == ["clm"] and report["not_measured"] == ["mlm"]


def test_bench_a_freeze_ablation_with_two_mlm_phases_labels_each_phase(bench_config):
    """The MLM baseline's two MLM phases get a row each; a CLM-only LayerFreeze stays out of the MLM rows."""
    config = yaml.safe_load(bench_config.read_text())
    phases = config["trainer"]["callbacks"][0]["init_args"]["phases"]
    phases.append({**phases[1], "objective": {"class_path": "cpt_lightning.objectives.MaskedLM",
                                              "init_args": {"mask_rate": 0.3}}})
    config["trainer"]["callbacks"].append({"class_path": "callbacks.LayerFreeze", "init_args": {"layers": "0-1"}})
    bench_config.write_text(yaml.safe_dump(config))
    code, report = bench(bench_config, "--objectives", "phase1-mlm,phase2-mlm")
    assert code == 0
    rows = {row["objective"]: row for row in report["results"]}
    assert list(rows) == ["phase1-mlm", "phase2-mlm"]
    assert rows["phase2-mlm"]["flops_per_token"] > rows["phase1-mlm"]["flops_per_token"]  # the head on 30%, not 15%


def test_bench_objectives_filter_and_overrides(bench_config):
    code, report = bench(bench_config, "--objectives", "mlm", "--peak-tflops", "0.001", "--",
                         "--data.init_args.micro_batch_size=2")
    assert code == 0
    assert [row["objective"] for row in report["results"]] == ["mlm"]
    row = report["results"][0]
    assert report["peak_flops_per_device"] == 1e9
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s_per_device"] / 1e9)
    assert row["mfu_document_masked"] == pytest.approx(row["document_masked_flops_per_token"] * row["tokens_per_s_per_device"] / 1e9)
    assert report["overrides"] == ["--data.init_args.micro_batch_size=2"]
    assert report["results"][0]["micro_batches_per_step"] == 2 * ACCUMULATION  # GlobalBatch re-derived it


def test_a_second_config_is_merged_over_the_first(bench_config):
    """`cpt bench --config recipe.yaml --config arm.yaml` measured the arm alone (argparse kept the last --config): an
    overlay holding only its own settings was refused for want of a model, and two whole configs measured the second."""
    overlay = bench_config.with_name("arm.yaml")
    overlay.write_text("data.init_args.micro_batch_size: 2\n"
                       "model.init_args.val_objectives: {clm: {class_path: cpt_lightning.objectives.CausalLM}}\n")
    with pytest.warns(UserWarning) as said:
        code, report = bench(bench_config, "--config", str(overlay))
    assert code == 0
    assert report["config"] == [str(bench_config), str(overlay)]
    assert [row["micro_batches_per_step"] for row in report["results"]] == [2 * ACCUMULATION] * 2  # GlobalBatch's
    assert sum("mlm15 are no longer validated" in str(w.message) for w in said) == 1  # once, not per objective


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--warmup", "-1"], "--warmup must be a positive integer, got -1"),
        (["--peak-tflops", "0"], "--peak-tflops must be positive, got 0.0"),
        (["--objectives", "clm,span"], "unknown ['span']; the config's objectives are ['clm', 'mlm']"),
        (["--objectives", "mlm, clm,mlm"], "--objectives 'mlm, clm,mlm' names mlm more than once: list each once"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
        (["--out", "{folder}"], "--out {folder} is a folder: name the JSON file to write, e.g. {folder}/"),
        (["--out", "{config}/bench.json"], "--out {config}/bench.json: {config} is a file, not a folder"),
    ],  # the --out ones: a traceback once every objective had been measured
    ids=["zero-steps", "negative-warmup", "zero-peak", "unknown-objective", "repeated-objective", "missing-config", "out-folder", "out-under-a-file"],
)
def test_bench_bad_arguments_exit_2_with_one_line(bench_config, args, message, capsys):
    paths = {"folder": bench_config.parent, "config": bench_config}
    args, message = [arg.format(**paths) for arg in args], message.format(**paths)
    code, report = bench(bench_config, *args)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and report is None
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr


def test_the_device_machine_config_runs_here_shrunk(prepared_mix, tokenizer_dir, tmp_path, monkeypatch):
    """configs/bench/gpu_base.yaml with only size, paths and hardware overridden: what a GPU session runs."""
    from helpers import TINY

    monkeypatch.chdir(tmp_path)
    sources = [{"name": s.name, "path": str(s.path), "weight": s.weight} for s in prepared_mix.sources]
    config = Path(__file__).resolve().parents[1] / "configs/bench/gpu_base.yaml"
    out = tmp_path / "bench.json"
    code = main(["bench", "--config", str(config), "--steps", "1", "--warmup", "1", "--out", str(out), "--",
                 f"--model.init_args.tokenizer={tokenizer_dir}", f"--model.init_args.model_config={json.dumps(TINY)}",
                 f"--data.init_args.sources={json.dumps(sources)}", f"--data.init_args.block_size={prepared_mix.block_size}",
                 "--data.init_args.num_workers=0", "--trainer.accelerator=cpu", "--trainer.precision=32-true"])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["objective"] for row in report["results"]] == ["clm", "mlm"]
    assert report["attn_implementation"] == "sdpa"  # `auto` without a GPU
    assert report["accumulate_grad_batches"] == 8  # the optimizer step weighs on a token as under the recipe
    assert report["results"][0]["tokens_per_step"] == 8 * 4 * prepared_mix.block_size  # micro-batch 4


def fake_report(attention: str, tokens_per_s: dict[str, float], device: str = "NVIDIA H100 80GB HBM3",
                world_size: int = 1) -> dict:
    """A report as run_bench builds it, from measurements of 10 steps of 32,768 tokens on each device."""
    setup = {"device": device, "world_size": world_size, "precision": "bf16-mixed", "attn_implementation": attention,
             "compile": False, "micro_batch_size": 4, "accumulate_grad_batches": 8, "peak_flops_per_device": 989e12}
    rows = [result_row(name, Measurement(tokens=327_680, seconds=327_680 / rate, flops=327_680 * 1.2e9,
                                         document_masked_flops=327_680 * 0.8e9, micro_batches=10,
                                         peak_memory_bytes=20 * 2**30), 10, setup)
            for name, rate in tokens_per_s.items()]
    versions = {"torch": "2.11.0", "cuda": "13.0", "transformers": "5.24.0", "flash_attn": None}
    return {**setup, "date": "2026-11-25T10:00:00+00:00", "versions": versions, "results": rows}


def test_a_row_counts_every_device_and_divides_per_device_figures_back():
    """Rank 0 measures its own tokens and FLOPs; on 4 GPUs the job trains 4× those, each device 1×."""
    measured = Measurement(seconds=2.0, micro_batches=16, tokens=65_536, flops=65_536 * 1.2e9,
                           document_masked_flops=None, peak_memory_bytes=None)
    row = result_row("clm", measured, 4, {"world_size": 4, "peak_flops_per_device": 989e12})
    assert (row["tokens_per_s"], row["tokens_per_s_per_device"], row["tokens_per_step"]) == (131_072, 32_768, 65_536)
    assert row["flops_per_token"] == pytest.approx(1.2e9) and row["mfu"] == pytest.approx(32_768 * 1.2e9 / 989e12)


def test_compare_table_gives_ratios_to_the_first_report_per_objective(tmp_path):
    reports = {"sdpa": fake_report("sdpa", {"clm": 200_000, "mlm": 250_000}),
               "flex": fake_report("flex_attention", {"clm": 300_000, "mlm": 275_000})}
    for name, report in reports.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    script = Path(__file__).resolve().parents[1] / "scripts/bench_table.py"
    printed = subprocess.run([sys.executable, str(script), str(tmp_path / "sdpa.json"), str(tmp_path / "flex.json")],
                             check=True, capture_output=True, text=True).stdout
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| sdpa") or line.startswith("| flex")]
    assert [(r[0], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("| sdpa", "4 × 8", "clm", "200,000", "1.00"), ("| sdpa", "4 × 8", "mlm", "250,000", "1.00"),
        ("| flex", "4 × 8", "clm", "300,000", "1.50"), ("| flex", "4 × 8", "mlm", "275,000", "1.10"),
    ]  # micro-batch × accumulation: s/step compares only runs of equal accumulation
    assert "| 24.3% | 16.2% |" in printed  # 200k tokens/s × 1.2 (0.8 document-masked) GFLOP ÷ 989 TFLOP/s
    assert "not one machine" not in printed

    (tmp_path / "s2").mkdir()  # two sessions' reports of one stage: one row replaced the other, the second the baseline
    (tmp_path / "s2" / "sdpa.json").write_text((tmp_path / "sdpa.json").read_text())
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "sdpa.json"), str(tmp_path / "s2" / "sdpa.json")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == ("error: reports named alike (sdpa.json): a row would replace another; give each "
                                   "report its own file name")

    # the documented command names every stage's report: one a session skipped or cut is left out, with a note, and
    # the script runs on a python without the package installed (its usage line says python3)
    done = subprocess.run(["/usr/bin/env", "-u", "PYTHONPATH", sys.executable, "-I", "-S", str(script),
                           str(tmp_path / "sdpa.json"), str(tmp_path / "freeze.json"), str(tmp_path / "flex.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == printed and "freeze.json is not there" in done.stderr


def test_compare_table_flags_reports_of_different_devices_precisions_or_device_counts():
    """Its header names the first report's setup alone: a bf16 row against an fp32 baseline read as a speed-up of
    the attention its row names."""
    table = compare_table({"h100": fake_report("sdpa", {"clm": 1.0}), "h200": fake_report("sdpa", {"clm": 1.0}, "NVIDIA H200")})
    assert "note: not one machine: NVIDIA H100 80GB HBM3 and NVIDIA H200" in table
    assert "not one precision" not in table and "not one device count" not in table
    fp32, two = fake_report("sdpa", {"clm": 1.0}), fake_report("sdpa", {"clm": 1.0})
    fp32["precision"], two["world_size"] = "32-true", 2  # the header names the first report's alone
    table = compare_table({"bf16": fake_report("sdpa", {"clm": 1.0}), "fp32": fp32, "x2": two})
    assert "note: not one precision: bf16-mixed and 32-true; the ratios compare different precisions" in table
    assert "note: not one device count: 1 and 2; the ratios compare different world sizes" in table
    assert "not one machine" not in table


def test_compare_table_notes_a_report_cut_short():
    cut = {**fake_report("flex_attention", {"clm": 1.0}), "not_measured": ["mlm"]}
    table = compare_table({"sdpa": fake_report("sdpa", {"clm": 1.0, "mlm": 1.0}), "flex": cut})
    assert "note: flex is incomplete: mlm not measured" in table and "sdpa is incomplete" not in table


def test_reading_reports_imports_neither_torch_nor_lightning():
    """scripts/bench_table.py ran in ~7 s, nearly all of it importing Lightning through cpt_lightning.bench."""
    check = "import sys, cpt_lightning.bench_tables; print(sorted({'torch', 'lightning'} & sys.modules.keys()))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_compare_script_names_a_file_that_is_not_a_report(tmp_path):
    (tmp_path / "other.json").write_text('{"loss": 1.0}')
    script = Path(__file__).resolve().parents[1] / "scripts/bench_table.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "other.json")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {tmp_path / 'other.json'}")
    assert "is not a cpt bench report" in done.stderr
    (tmp_path / "unreadable.json").write_text("{cut")  # a stage killed while it wrote: the others' table still comes
    (tmp_path / "sdpa.json").write_text(json.dumps(fake_report("sdpa", {"clm": 200_000})))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "sdpa.json"), str(tmp_path / "unreadable.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "| sdpa" in done.stdout
    assert done.stderr.startswith(f"note: {tmp_path / 'unreadable.json'}: cannot read a JSON report") and "left out" in done.stderr
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "unreadable.json")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.endswith("error: none of the reports can be read\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.endswith("error: none of the reports is there\n")  # each one noted
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("One Markdown table") and not done.stderr


def drive_window(monkeypatch, device: str, events: list) -> Measurement | None:
    """A StepWindow(warmup=1, steps=2) through 3 optimizer steps of 2 micro-batches each: micro-batch k ends at
    second 10·(k+1) with 16 tokens, 100·(k+1) nominal and 10·(k+1) document-masked FLOPs."""
    import cpt_lightning.bench as bench_module

    now = [0.0]
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or now[0]))
    window = StepWindow(warmup=1, steps=2)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_step=0)
    module = SimpleNamespace()
    window.on_train_start(trainer, module)
    for k in range(6):
        now[0], trainer.global_step = 10.0 * (k + 1), (k + 1) // 2  # the optimizer steps after every second micro-batch
        module.flops_per_batch = 100.0 * (k + 1)
        module.last_batch_flops = lambda document_masked, k=k: torch.tensor(10.0 * (k + 1))  # a device tensor
        events.append(f"batch {k}")
        window.on_train_batch_end(trainer, module, None, {"input_ids": torch.zeros(2, 8, dtype=torch.long)}, k)
    return window.measurement


def test_the_window_times_and_counts_the_measured_steps_only(monkeypatch):
    """Warm-up steps (compilation, the allocator's growth, the first data loading) must stay out of every figure:
    the clock starts when step `warmup` has ended and stops when step `warmup + steps` has, and only the
    micro-batches in between count, tokens and FLOPs alike."""
    m = drive_window(monkeypatch, "cpu", [])
    assert (m.seconds, m.micro_batches, m.tokens) == (60.0 - 20.0, 4, 4 * 16)  # micro-batches 2-5: steps 2 and 3
    assert m.flops == 300 + 400 + 500 + 600 and m.document_masked_flops == 30 + 40 + 50 + 60
    assert isinstance(m.document_masked_flops, float) and m.peak_memory_bytes is None  # JSON-ready; no peak off CUDA


def test_on_cuda_the_clock_waits_for_the_device_and_the_peak_is_the_windows_own(monkeypatch):
    """CUDA kernels run asynchronously: a clock read without synchronize times the launches, not the work. The
    allocator's peak is reset when the window opens, or the warm-up's (or a previous objective's) would be reported."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset peak"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: events.append("read peak") or 3 * 2**30)
    m = drive_window(monkeypatch, "cuda", events)
    opening = events[events.index("batch 1") + 1:events.index("batch 2")]
    closing = events[events.index("batch 5") + 1:]
    assert opening.index("synchronize") < opening.index("clock") and "reset peak" in opening
    assert closing.index("synchronize") < closing.index("clock") and "read peak" in closing
    assert events.count("reset peak") == events.count("read peak") == 1 and m.peak_memory_bytes == 3 * 2**30
    assert m.seconds == 40.0


def test_a_row_on_several_devices_keeps_the_per_device_columns_per_device():
    """micro-batches/step is each device's accumulation, document-masked FLOPs scale with the devices as the
    nominal ones do, and peak GiB is rank 0's allocator peak in GiB (2³⁰ bytes, as torch.cuda reports memory)."""
    measured = Measurement(seconds=2.0, micro_batches=16, tokens=65_536, flops=65_536 * 1.2e9,
                           document_masked_flops=65_536 * 0.8e9, peak_memory_bytes=3 * 2**29)
    row = result_row("mlm", measured, 4, {"world_size": 4, "peak_flops_per_device": 1e15})
    assert (row["micro_batches_per_step"], row["step_time_s"], row["peak_memory_gib"]) == (4, 0.5, 1.5)
    assert row["document_masked_flops_per_token"] == pytest.approx(0.8e9)
    assert row["mfu_document_masked"] == pytest.approx(32_768 * 0.8e9 / 1e15)  # each device: 65,536 tokens in 2 s


def test_compare_table_ratios_are_per_device_whatever_the_world_size():
    """A 2-GPU run at the 1-GPU run's tokens/s/device is not faster per device: × first is 1.00 both ways, and
    the compile and peak GiB columns say which report is which."""
    two = fake_report("flex_attention", {"clm": 200_000}, world_size=2)
    one = {**fake_report("sdpa", {"clm": 200_000}), "compile": True}
    table = compare_table({"two": two, "one": one})
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith(("| two", "| one"))]
    assert [(r[0], r[2], r[5], r[6], r[10]) for r in rows] == [
        ("two", "no", "200,000", "1.00", "20.00"), ("one", "yes", "200,000", "1.00", "20.00")]


def test_the_table_shows_gflop_per_token_and_mfu_of_each_count():
    """The printed table is what gets pasted into docs: GFLOP (10⁹) per token, MFU nominal and doc-masked, peak GiB."""
    report = {**fake_report("sdpa", {"clm": 200_000}), "block_size": 8192, "steps": 10, "warmup_steps": 2, "notes": []}
    table = format_table(report)
    assert table.startswith("NVIDIA H100 80GB HBM3 × 1, bf16-mixed, sdpa, compile off, micro-batch 4 × block 8192 ")
    assert table.splitlines()[0].endswith("; 10 steps after 2 warm-up")
    assert format_table({**report, "steps": 1}).splitlines()[0].endswith("; 1 step after 2 warm-up")
    row = next(line for line in table.splitlines() if line.startswith("| clm"))
    # 200k tokens/s × 1.2 (0.8) GFLOP ÷ 989 TFLOP/s; 10 steps of 32,768 tokens in 1.6384 s
    assert row == "| clm | 200,000 | 200,000 | 0.164 | 1 | 32,768 | 1.200 | 24.3% | 0.800 | 16.2% | 20.00 |"


def test_the_table_of_a_job_on_two_devices_gives_both_rates_and_its_notes():
    """The job's tokens/s is both devices' (twice each device's), and the notes (a null MFU's reason) end the table."""
    report = {**fake_report("sdpa", {"clm": 200_000}, world_size=2), "block_size": 8192, "steps": 10,
              "warmup_steps": 2, "notes": ["mfu is null: no peak known"]}
    table = format_table(report)
    assert next(line for line in table.splitlines() if line.startswith("| clm")).startswith("| clm | 400,000 | 200,000 |")
    assert table.endswith("\nnote: mfu is null: no peak known")


def test_bench_writes_beside_the_runs_by_default(tmp_path):
    """Without --out the JSON goes to runs/bench/<config name>.json, a folder git ignores; after -- come overrides."""
    config = tmp_path / "en_detour.yaml"
    config.write_text("{}")
    args, overrides = parse_args(["--config", str(config), "--steps", "3", "--", "--trainer.devices=1"])
    assert args.out == Path("runs/bench/en_detour.json") and overrides == ["--trainer.devices=1"]
    assert (args.steps, args.warmup, args.peak_tflops) == (3, 5, None)
    arm = tmp_path / "en_freeze_early.yaml"  # an arm's overlay, given after its recipe
    arm.write_text("{}")
    args, _ = parse_args(["--config", str(config), "--config", str(arm)])
    assert args.config == [str(config), str(arm)] and args.out == Path("runs/bench/en_freeze_early.json")


def test_objectives_option_reads_spaces_and_rejects_an_empty_list():
    """`--objectives "mlm, clm"` is how people type a list; `--objectives ,` names nothing, and a bench that
    measured nothing would exit 0 without writing a report."""
    assert choose(["clm", "mlm"], " mlm , clm") == ["mlm", "clm"]
    with pytest.raises(UserError, match="the config's objectives are"):
        choose(["clm", "mlm"], " , ")


def test_the_callbacks_that_shape_a_step_stay_and_the_others_go():
    """A freeze of the measured objective is what the `freeze` row measures (skipped weight gradients); the
    gradient-norm check and accumulation are part of every step; checkpoints and monitors are not."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks import GlobalBatch, LayerFreeze, NonFiniteGuard
    from cpt_lightning.bench import shapes_the_step

    assert shapes_the_step(LayerFreeze("0-7", during="clm"), "clm")
    assert not shapes_the_step(LayerFreeze("0-7", during="clm"), "mlm")
    assert shapes_the_step(GlobalBatch(sequences=8), "mlm") and shapes_the_step(NonFiniteGuard(), "mlm")
    assert not shapes_the_step(ModelCheckpoint(), "clm")


def test_a_run_that_stops_before_the_window_closes_is_a_user_error():
    """Data that runs out, or a callback that stops training, before warm-up + steps must be said in one line,
    not end in an AttributeError on a measurement that was never taken."""
    from cpt_lightning.bench import measure

    model = SimpleNamespace(objective=SimpleNamespace(name="clm"), set_objective=lambda objective: None)
    trainer = SimpleNamespace(callbacks=[], global_step=3, fit=lambda model, datamodule: None)
    with pytest.raises(UserError, match="clm: training stopped at step 3, before the 7 the bench needs"):
        measure(SimpleNamespace(trainer=trainer, model=model, datamodule=None), "clm", warmup=2, steps=5)


def run_compare_script(monkeypatch, capsys, *args: str):
    """scripts/bench_table.py in this process (a subprocess would spend seconds importing torch)."""
    script = Path(__file__).resolve().parents[1] / "scripts/bench_table.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(script), run_name="__main__")
    return exit.value.code, capsys.readouterr()


def test_compare_script_without_reports_prints_its_usage_and_fails(monkeypatch, capsys, tmp_path):
    """No file is a usage error (exit 2), and a report lacking `versions` is refused before compare_table needs it."""
    code, printed = run_compare_script(monkeypatch, capsys)
    assert code == 2 and printed.out.startswith("One Markdown table")
    report = {key: value for key, value in fake_report("sdpa", {"clm": 1.0}).items() if key != "versions"}
    (tmp_path / "old.json").write_text(json.dumps(report))
    code, _ = run_compare_script(monkeypatch, capsys, str(tmp_path / "old.json"))
    assert code == f"error: {tmp_path / 'old.json'} is not a cpt bench report (no results/device/versions)"
