"""TokenThroughput logs tokens/s per device, the module's FLOP/s and MFU against a given peak."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks import ObjectiveSchedule, Phase, TokenThroughput
from callbacks.throughput import log_peak_memory
from cpt_lightning.errors import UserError
from cpt_lightning.flops import training_flops
from cpt_lightning.training_cli import in_hook_order
from cpt_lightning.objectives import CausalLM
from helpers import tiny_module
from test_objective_schedule import LENGTH, ROWS, TOKENS_PER_STEP, PackedRows


class Metrics(Logger):
    """Keeps every logged dict in memory."""

    def __init__(self):
        super().__init__()
        self.logged = []

    name, version, experiment = "memory", "0", None

    def log_metrics(self, metrics, step=None):
        self.logged.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(tokenizer_dir, throughput, steps=6, accumulate=2, logger=None, **trainer_kwargs):
    module = tiny_module(tokenizer_dir)
    logger = logger or Metrics()
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=logger, log_every_n_steps=1, accumulate_grad_batches=accumulate,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ObjectiveSchedule([Phase(CausalLM(), tokens=steps * accumulate * TOKENS_PER_STEP)]), throughput],
        **trainer_kwargs,
    )
    rows = torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
    trainer.fit(module, rows, rows if "val_check_interval" in trainer_kwargs else None)
    return module, [m for m in logger.logged if "train/device/items_per_sec" in m]


def test_tokens_flops_and_mfu_against_a_given_peak(tokenizer_dir):
    module, logged = fit(tokenizer_dir, TokenThroughput(window_size=3, peak_tflops=1e-3))
    assert logged, "no throughput was logged"
    # CLM predicts every position but each document's last (PackedRows: 2 documents per row)
    predicted = ROWS * (LENGTH - 2)
    per_token = training_flops(module.model.config, ROWS, LENGTH, causal=True, predicted=predicted) / (ROWS * LENGTH)
    for metrics in logged:
        assert metrics["train/device/items_per_sec"] > 0
        assert metrics["train/device/flops_per_sec"] == pytest.approx(metrics["train/device/items_per_sec"] * per_token)
        assert metrics["train/device/mfu"] == pytest.approx(metrics["train/device/flops_per_sec"] / 1e9)


@pytest.mark.parametrize("world_size", [1, 2])
def test_hours_left_is_the_schedules_tokens_left_at_the_jobs_rate(tokenizer_dir, monkeypatch, world_size):
    """A 50B-token run showed tokens/s but not when it would end. The job's rate is every device's: one process
    standing in for two (each step then counts twice the tokens, as it would on two)."""
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda trainer: world_size))
    logger = Metrics()
    fit(tokenizer_dir, TokenThroughput(window_size=3), steps=6 * world_size, logger=logger)  # 6 steps; timed from step 3
    rates = [m["train/device/items_per_sec"] * world_size for m in logger.logged if "train/device/items_per_sec" in m]
    hours = [m["train/hours_left"] for m in logger.logged if "train/hours_left" in m]
    tokens_left = [(6 - step) * 2 * world_size * TOKENS_PER_STEP for step in range(3, 7)]
    assert len(rates) == len(hours) == 4
    assert hours == pytest.approx([left / rate / 3600 for left, rate in zip(tokens_left, rates)], rel=1e-6)
    assert hours[-1] == 0 < hours[-2]
    if world_size > 1:  # Lightning logs the job's rate only where it knows of several devices
        jobs = [m for m in logger.logged if "train/items_per_sec" in m]
        assert len(jobs) == 4
        assert all(m["train/items_per_sec"] == pytest.approx(2 * m["train/device/items_per_sec"]) for m in jobs)


def test_a_run_that_trains_on_after_its_last_phase_logs_no_hours_left(tokenizer_dir):
    """It ends at the trainer's own limit, not the schedule's: 'hours left' would read 0 for the rest of it."""
    schedule = ObjectiveSchedule([Phase(CausalLM(), tokens=2 * 2 * TOKENS_PER_STEP)], stop_after_last_phase=False)
    logger = Metrics()
    trainer = L.Trainer(max_steps=5, max_epochs=-1, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[schedule, TokenThroughput(window_size=3)])
    trainer.fit(tiny_module(tokenizer_dir), torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    assert [m for m in logger.logged if "train/device/items_per_sec" in m]
    assert not [m for m in logger.logged if "train/hours_left" in m] and schedule.tokens_left(0) is None


def test_the_window_is_rounded_up_to_whole_optimizer_steps(tokenizer_dir, monkeypatch):
    """window_size counts micro-batches: 5 of them at 2 per step are 3 steps (never fewer micro-batches than asked
    for), so the first rate comes at the end of step 4, over steps 2 to 4: the clock is read at each step's end.
    The window held one reading per step asked for, so it averaged a step fewer (4 micro-batches here).

    A fake clock that the micro-batches advance: steps 1 to 4 take 0.2, 0.4, 0.8 and 1.6 s."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import throughput_monitor

    from cpt_lightning import EncoderPretraining

    clock, step = [0.0], EncoderPretraining.training_step
    monkeypatch.setattr(throughput_monitor, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(EncoderPretraining, "training_step", lambda self, *args: (
        clock.__setitem__(0, clock[0] + 0.1 * 2 ** self.trainer.global_step), step(self, *args))[1])
    _, logged = fit(tokenizer_dir, TokenThroughput(window_size=5), steps=4)
    assert len(logged) == 1
    assert logged[0]["train/device/items_per_sec"] == pytest.approx(6 * TOKENS_PER_STEP / (0.4 + 0.8 + 1.6))  # per micro-batch


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),  # Lightning's figure
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.5),  # Lightning: 1,978.8, with sparsity
    ("NVIDIA H200", torch.bfloat16, 989.4),  # Lightning: none
    ("NVIDIA H200 NVL", torch.bfloat16, 835.5),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.4),  # Grace Hopper's GPU: the H100 SXM's compute
    ("NVIDIA H200", torch.float32, 66.9),
    ("NVIDIA H100 NVL", "tf32", 417.5),  # float32 under torch.set_float32_matmul_precision("high")
    ("NVIDIA H200 NVL", "tf32", 417.5),
    ("NVIDIA H200", "tf32", 494.7),
])
def test_mfu_is_against_the_dense_peak(monkeypatch, name, dtype, tflops):
    """Every row but plain float32 runs with float32 matmuls set to TF32, as a bf16 run may be: the TF32 peak is
    float32's alone (against it a bf16 run's MFU would read twice what it is)."""
    from cpt_lightning.peak_flops import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    precision = "highest" if dtype is torch.float32 else "high"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    dtype = torch.float32 if dtype == "tf32" else dtype
    assert peak_flops(torch.device("cuda", 0), dtype) == pytest.approx(tflops * 1e12)
    for elsewhere in ("cpu", "xpu"):  # not a CUDA device: no figure, whatever CUDA card the machine also has
        assert peak_flops(torch.device(elsewhere), torch.bfloat16) is None


def test_mfu_is_against_the_peak_of_the_dtype_the_matmuls_run_in():
    """FSDP2(param_dtype: bfloat16) under 32-true: the plugin says float32, so MFU was against the fp32 peak (15×).
    FSDP2(param_dtype: float32) under bf16-mixed: autocast runs the matmuls in bf16, and MFU read 15× too high."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from cpt_lightning.peak_flops import compute_dtype

    def trainer(param_dtype, plugin):
        return SimpleNamespace(strategy=SimpleNamespace(param_dtype=param_dtype), precision_plugin=plugin)

    assert compute_dtype(SimpleNamespace(strategy=SimpleNamespace(), precision_plugin=Precision())) == torch.float32
    assert compute_dtype(trainer(torch.bfloat16, Precision())) == torch.bfloat16
    autocast = MixedPrecision("bf16-mixed", device="cpu")
    assert torch.nn.Linear(2, 2)(torch.ones(2)).dtype == torch.float32  # fp32 weights, as param_dtype: float32 gathers
    with autocast.forward_context():
        assert torch.nn.Linear(2, 2)(torch.ones(2)).dtype == torch.bfloat16
    for param_dtype in (None, torch.float32, torch.bfloat16):
        assert compute_dtype(trainer(param_dtype, autocast)) == torch.bfloat16


def test_without_a_known_peak_no_mfu_is_logged(tokenizer_dir):
    _, logged = fit(tokenizer_dir, TokenThroughput(window_size=3), steps=3)  # the CPU is not in Lightning's table
    assert logged and all("train/device/mfu" not in m and m["train/device/flops_per_sec"] > 0 for m in logged)


@pytest.mark.parametrize("peak", [0, -5.0])
def test_a_non_positive_peak_is_refused(peak):
    with pytest.raises(UserError, match="peak_tflops"):
        TokenThroughput(peak_tflops=peak)


@pytest.mark.parametrize("val_check_interval", [4, 3], ids=["between-steps", "between-micro-batches"])
def test_validation_is_left_out_of_the_throughput_and_not_logged(tokenizer_dir, monkeypatch, val_check_interval):
    """Validation batches were logged as ``validate/*`` against their own batch counter (not the step
    TensorBoard plots training against) and priced at training FLOPs (3 passes for a forward).
    ``val_check_interval`` counts micro-batches: 3 runs validation inside an optimizer step, whose
    micro-batches so far (timed only at the step's end) dropped out of training's time, doubling tokens/s.

    The monitor's clock is a fake one that the steps advance: 0.1 s per training micro-batch, 10 s
    per validation batch and 5 s after an evaluation's last batch (its epoch end: the all-reduce of the loss sums,
    which Lightning's monitor counted as training), so what training's clock holds is exact, whatever the
    machine's load. The sanity
    check's batches (before training) are neither timed nor logged: timing them, before the monitor started a
    clock for them, stopped every run with validation data at its first batch.
    """
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import throughput_monitor

    from cpt_lightning import EncoderPretraining

    clock = [0.0]
    monkeypatch.setattr(throughput_monitor, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for hook, seconds in (("training_step", 0.1), ("validation_step", 10.0), ("on_validation_epoch_end", 5.0)):
        step = getattr(EncoderPretraining, hook)
        monkeypatch.setattr(EncoderPretraining, hook,
                            lambda self, *args, step=step, seconds=seconds: (clock.__setitem__(0, clock[0] + seconds),
                                                                             step(self, *args))[1])
    logger = Metrics()
    _, logged = fit(tokenizer_dir, TokenThroughput(window_size=3, peak_tflops=1e-3), steps=6, logger=logger,
                    val_check_interval=val_check_interval, limit_val_batches=3, num_sanity_val_steps=2)  # Lightning's default
    assert logged and not [key for m in logger.logged for key in m if key.startswith("validate/")]
    # 12 micro-batches of training after 2 evaluations of 3 batches: training's clock stopped while they ran
    assert (logged[-1]["train/batches"], logged[-1]["train/time"]) == (12, pytest.approx(1.2))
    assert [m["train/device/items_per_sec"] for m in logged] == pytest.approx([TOKENS_PER_STEP / 0.1] * len(logged))
    hours = [m["train/hours_left"] for m in logger.logged if "train/hours_left" in m]  # at training's rate only
    assert len(hours) == len(logged) and hours[-1] == 0 and hours[-2] == pytest.approx(0.2 / 3600, rel=1e-6)  # a step


def test_checkpoint_saves_and_phase_end_exports_are_left_out_of_the_throughput(tokenizer_dir, tmp_path, monkeypatch):
    """A phase-end export (a whole checkpoint and an HF folder, written before the step's clock reading) and the
    checkpoint saves (after it) were counted as training time: the tokens/s and MFU logged at each phase end read
    several-fold low. A fake clock that saves advance by 50 s and exports by 30 s, training by 0.1 s a micro-batch."""
    from lightning.pytorch.callbacks import throughput_monitor

    import callbacks.phase_end_export as phase_end_export
    from callbacks import PhaseEndExport, TokenCheckpoint
    from cpt_lightning import EncoderPretraining
    from cpt_lightning.objectives import MaskedLM

    clock = [0.0]
    monkeypatch.setattr(throughput_monitor, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(seconds, function):
        return lambda *args, **kwargs: (clock.__setitem__(0, clock[0] + seconds), function(*args, **kwargs))[1]

    monkeypatch.setattr(EncoderPretraining, "training_step", taking(0.1, EncoderPretraining.training_step))
    monkeypatch.setattr(L.Trainer, "save_checkpoint", taking(50.0, L.Trainer.save_checkpoint))
    monkeypatch.setattr(phase_end_export, "export_checkpoint", taking(30.0, phase_end_export.export_checkpoint))
    logger = Metrics()
    phases = [Phase(CausalLM(), tokens=3 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=3 * TOKENS_PER_STEP)]
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=in_hook_order([ObjectiveSchedule(phases), PhaseEndExport(str(tmp_path / "export")),
                                 TokenThroughput(window_size=2, peak_tflops=1e-3),
                                 TokenCheckpoint(str(tmp_path / "checkpoints"), every_n_train_steps=2)]),
    )
    trainer.fit(tiny_module(tokenizer_dir), torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    logged = [m for m in logger.logged if "train/device/items_per_sec" in m]
    assert len(logged) >= 3 and len(list((tmp_path / "checkpoints").glob("step*.ckpt"))) == 3
    assert [m["train/device/items_per_sec"] for m in logged] == pytest.approx([TOKENS_PER_STEP / 0.1] * len(logged))
    assert logged[-1]["train/time"] == pytest.approx(0.6)
    # in the CLI's order the phase-end checkpoint counts the step it ends (its throughput totals were a step short)
    for phase, steps in (("phase0-clm", 3), ("phase1-mlm", 6)):
        saved = torch.load(tmp_path / "export" / f"{phase}.ckpt", weights_only=False)["callbacks"]
        assert (saved["TokenThroughput"]["batches"], saved["TokenThroughput"]["lengths"]) == (steps, steps * TOKENS_PER_STEP)


@pytest.mark.parametrize("validated", [False, True], ids=["no-validation", "validated-as-the-recipes"])
def test_a_resumed_run_carries_the_running_totals_on(tokenizer_dir, tmp_path, monkeypatch, validated):
    """``train/time``, ``batches``, ``samples`` and ``lengths`` started again at 0 in a resumed run, so TensorBoard's
    curves of them fell back to 0 at each resume of a multi-day run. A fake clock (0.1 s per micro-batch, 10 s per
    validation batch) makes the time exact: the resumed run ends with the uninterrupted run's totals. Validated as
    the recipes list it (TokenValidation after TokenThroughput), the resume validates the step its checkpoint was
    saved at first, and that validation's idle-time count took the trained time out again."""
    from lightning.pytorch.callbacks import ModelCheckpoint, throughput_monitor

    from callbacks import TokenValidation
    from cpt_lightning import EncoderPretraining

    clock = [0.0]
    monkeypatch.setattr(throughput_monitor, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for hook, seconds in (("training_step", 0.1), ("validation_step", 10.0)):
        step = getattr(EncoderPretraining, hook)
        monkeypatch.setattr(EncoderPretraining, hook,
                            lambda self, *args, step=step, seconds=seconds: (clock.__setitem__(0, clock[0] + seconds),
                                                                             step(self, *args))[1])

    def totals(ckpt_path=None):
        logger = Metrics()
        validation = [TokenValidation(3 * 2 * TOKENS_PER_STEP)] if validated else []
        trainer = L.Trainer(
            max_steps=-1, max_epochs=-1, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            limit_val_batches=2, num_sanity_val_steps=0,
            callbacks=[ObjectiveSchedule([Phase(CausalLM(), tokens=6 * 2 * TOKENS_PER_STEP)]), TokenThroughput(3),
                       *validation, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)],
        )
        clock[0] += 1000.0  # another process: its clock reads something else
        rows = torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)
        trainer.fit(tiny_module(tokenizer_dir), rows, rows if validated else None, ckpt_path=ckpt_path)
        return [{key: m[f"train/{key}"] for key in ("time", "batches", "samples", "lengths")}
                for m in logger.logged if "train/batches" in m]

    uninterrupted = totals()
    assert uninterrupted[-1] == {"time": pytest.approx(1.2), "batches": 12, "samples": 12 * ROWS,
                                 "lengths": 12 * ROWS * LENGTH}
    (halfway,) = (tmp_path / "ckpt").glob("*step=3.ckpt")
    resumed = totals(halfway)
    assert resumed == [{**m, "time": pytest.approx(m["time"])} for m in uninterrupted[3:]]  # steps 4 to 6


def test_gpu_memory_peaks_are_logged_for_each_window_then_reset(monkeypatch):
    """The CUDA allocator's peaks since the previous point (read, then reset); nothing off CUDA. (On a GPU:
    tests/test_gpu.py.)"""
    resets, logged = [], {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 5 * 2**29)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    module = SimpleNamespace(log=lambda name, value, **_: logged.__setitem__(name, float(value)))
    on = lambda device: SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), lightning_module=module)
    log_peak_memory(on("cpu"))
    assert logged == {} and resets == []
    log_peak_memory(on("cuda:1"))
    assert logged == {"train/device/peak_allocated_gib": 3.0, "train/device/peak_reserved_gib": 2.5}
    assert resets == [torch.device("cuda:1")]


def test_memory_peaks_are_read_only_at_logging_steps(monkeypatch):
    """Each point's peak is the highest since the previous point: read (and reset) at every step, with
    ``log_every_n_steps`` above 1 it would cover the last step alone."""
    from lightning.pytorch.trainer.states import RunningStage

    from callbacks import throughput

    reads = []
    monkeypatch.setattr(throughput, "log_peak_memory", reads.append)
    callback = TokenThroughput(window_size=3)
    callback._throughputs[RunningStage.TRAINING] = SimpleNamespace(compute=dict, separator="/")
    for logging_step in (False, True):
        trainer = SimpleNamespace(state=SimpleNamespace(stage=RunningStage.TRAINING), callbacks=[],
                                  _logger_connector=SimpleNamespace(should_update_logs=logging_step,
                                                                    log_metrics=lambda *args, **kwargs: None))
        callback._compute(trainer)
        assert reads == [trainer] * logging_step


def test_a_checkpoint_saved_before_training_starts_again_keeps_the_totals_it_resumed_from():
    """Until training starts again (and on ranks other than 0, which time nothing) the totals are those of the
    checkpoint it resumed from: a save then passes them on, where none would make the next resume count its time
    and tokens from 0. Such a save leaves no time out."""
    from callbacks.throughput import untimed

    resumed = TokenThroughput(window_size=3)
    totals = {"time": 12.5, "batches": 40, "samples": 80, "lengths": 5120}
    resumed.load_state_dict(totals)
    assert resumed.state_dict() == totals
    with untimed(SimpleNamespace(callbacks=[resumed])):
        pass
    assert resumed.state_dict() == totals


def test_the_learning_rate_is_logged_once_per_step_however_many_micro_batches_it_has(tokenizer_dir):
    """Lightning's LearningRateMonitor logged it at each micro-batch of a logging step: 3 identical points here, 12
    to 48 with the recipes' accumulation."""
    from callbacks import StepLearningRateMonitor

    class Steps(Metrics):
        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

    logger = Steps()
    fit(tokenizer_dir, StepLearningRateMonitor(logging_interval="step"), steps=4, accumulate=3, logger=logger)
    assert [step for step, metrics in logger.logged if "lr-AdamW/pg1" in metrics] == [0, 1, 2, 3]


def test_on_cuda_the_training_clock_waits_for_the_gpu(monkeypatch):
    """CUDA kernels run asynchronously and the module syncs nothing per step: a clock read without synchronize timed
    the launches, and tokens/s, MFU and hours left read high."""
    from lightning.pytorch.callbacks import throughput_monitor
    from lightning.pytorch.trainer.states import RunningStage

    events, stage = [], RunningStage.TRAINING
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    monkeypatch.setattr(throughput_monitor, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or 5.0))
    callback = TokenThroughput(window_size=3)
    callback._t0s[stage], callback._batches[stage], callback._samples[stage], callback._lengths[stage] = 1.0, 2, 4, 64
    callback._throughputs[stage] = SimpleNamespace(update=lambda **measured: events.append(measured["time"]))
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    callback._time(trainer, stage, flops=None)
    assert events == ["synchronize", "clock", 4.0]
