"""The recipe's sharded path on CPU: FSDP2 over gloo, with the recipe's precision settings.

Fast: the strategy's sharding and mixed-precision policy on a 1-process group. Slow (end to end,
``cpt fit`` subprocesses): a tiny ModernBERT trains through the CLM→MLM switch with a global batch of 8 sequences and writes
sharded checkpoints. The same config then runs (a) resumed from its checkpoints, (b) on 1 process
from its step-6 checkpoint, where GlobalBatch derives 2 accumulated micro-batches instead of 1, and
(c, d) as 2 nodes × 1 process launched by the torchrun and SLURM scripts in scripts/; (e) with
2 accumulated micro-batches of 2 rows and layer 0 frozen during CLM, reducing the gradients once
per step and once per micro-batch.

(a), (c) and (d) see exactly the data of the uninterrupted 2-process run, so their losses must
match it step for step. (b) does not: litdata deals rows to 1 rank in another order than to 2,
so single steps differ by sampling noise and the curves are compared as 5-step means. Measured
with this config from step 0: 1 vs 2 processes differ by 0.13 nats at most per window; changing
only the data seed moves windows by up to 0.14 (0.28 in an fp32 variant); halving the learning
rate moves them by 1.15. The tolerance is 0.4. (e)'s two runs see the same rows as each other and add the same
gradients in another order: their losses and final weights must match (fp32 rounding; about 50 s).
The file alone took 454 s on a 2-core AVX-512 box (475 s before three runs were folded into others,
2026-12-08); beside the other worker of `make test`, about 1.4 times that.
"""

import os
import warnings
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cpt_lightning.errors import UserError
from cpt_lightning.export import read_checkpoint
from cpt_lightning.parallel import FSDP2
from helpers import TINY, free_port, same_files, tiny_module
from test_cli import ROOT, demo_config, scalars

SEQUENCES, MICRO_BATCH, BLOCK = 8, 4, 64
TOKENS_PER_STEP = SEQUENCES * BLOCK
CLM_STEPS, MLM_STEPS, CHECKPOINT_EVERY = 10, 10, 6
WINDOW, WINDOW_TOLERANCE = 5, 0.4
# One thread per process in every launch mode: the same arithmetic everywhere (Lightning would give
# 1 node × 2 processes one thread each but 2 nodes × 1 process two), and no oversubscribed cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp2")


@pytest.fixture(scope="module")
def config(workdir, prepared_mix, tokenizer_dir) -> Path:
    """demo_cpu.yaml shrunk to a tiny model, with the recipe's FSDP2/bf16 settings and GlobalBatch."""
    path = demo_config(workdir, prepared_mix, tokenizer_dir, clm_steps=CLM_STEPS, mlm_steps=MLM_STEPS)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"].update(model_config=dict(TINY), learning_rate=1e-2)
    config["data"]["init_args"].update(micro_batch_size=MICRO_BATCH, block_size=BLOCK)
    trainer = config["trainer"]
    trainer.update(precision="bf16-mixed", log_every_n_steps=1, strategy={
        "class_path": "cpt_lightning.parallel.FSDP2",
        "init_args": {"param_dtype": "bfloat16", "reduce_dtype": "float32", "activation_checkpointing": True},
    })
    phases = trainer["callbacks"][0]["init_args"]["phases"]
    phases[0].update(tokens=CLM_STEPS * TOKENS_PER_STEP, warmup_tokens=2 * TOKENS_PER_STEP)
    phases[1].update(tokens=MLM_STEPS * TOKENS_PER_STEP)
    for callback in trainer["callbacks"]:  # a few windows of 4 steps (the demo's 20 micro-batches fill one at step 21)
        if callback["class_path"].endswith("TokenThroughput"):
            callback["init_args"]["window_size"] = 4
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("TokenCheckpoint")] + [
        {"class_path": "callbacks.GlobalBatch", "init_args": {"sequences": SEQUENCES}},
        {"class_path": "callbacks.TokenCheckpoint",  # as in the recipes: under the run's log folder
         "init_args": {"every_n_train_steps": CHECKPOINT_EVERY, "keep_last": 10}},
        {"class_path": "callbacks.PhaseEndExport"},  # as in the recipes: export/ in the run's log folder
    ]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def one_process_group():
    """A 1-rank gloo world and its device mesh, as ModelParallelStrategy builds for FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        torch.distributed.destroy_process_group()


def sharded_tiny_module(mesh, tokenizer_dir, **options):
    """A tiny module sharded by ``FSDP2(**options)`` on ``mesh``, connected to its strategy as the Trainer does."""
    strategy = FSDP2(**options)
    strategy._device_mesh = mesh
    module = tiny_module(tokenizer_dir)
    strategy.connect(module)
    strategy.parallelize(module.model)
    return strategy, module


def test_fsdp2_computes_in_bf16_on_fp32_master_weights_and_checkpoints_layers(one_process_group, tokenizer_dir):
    strategy = FSDP2(param_dtype="bfloat16", reduce_dtype="float32", activation_checkpointing=True)
    strategy._device_mesh = one_process_group
    module = tiny_module(tokenizer_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers v6 drops gradient_checkpointing_enable
        strategy.parallelize(module.model)
    layers = module.model.model.layers
    assert all(type(m).__name__.startswith("FSDP") for m in [module.model, *layers])  # a shard unit per layer + root

    seen = []
    layers[0].attn.Wqkv.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
    ids = torch.randint(0, 50000, (2, 16))
    module(ids, torch.arange(16).repeat(2, 1), "bidirectional", labels=ids).loss.backward()
    assert seen == [torch.bfloat16, torch.bfloat16]  # gathered in bf16; run again in backward (checkpointing)
    weight = layers[0].attn.Wqkv.weight
    assert type(weight).__name__ == "DTensor" and weight.dtype == weight.grad.dtype == torch.float32


def test_fsdp2_refuses_a_checkpoint_of_another_architecture_before_loading_it(one_process_group, tokenizer_dir, tmp_path):
    """The recipes' strategy loads the weights before the module's hook sees the checkpoint: a resume under an
    edited model_config ended in a load error on every rank. Gathered file and sharded folder alike."""
    import torch.distributed.checkpoint as dcp

    strategy, module = sharded_tiny_module(one_process_group, tokenizer_dir)
    fewer_layers = tiny_module(tokenizer_dir, model_config={"num_hidden_layers": 2}).state_dict()
    torch.save({"state_dict": fewer_layers}, tmp_path / "gathered.ckpt")
    dcp.save({"state_dict": fewer_layers}, checkpoint_id=tmp_path / "sharded", no_dist=True)
    for path in (tmp_path / "gathered.ckpt", tmp_path / "sharded"):
        with pytest.raises(UserError, match=rf"{path} does not fit the model model.init_args builds \(the checkpoint has "
                                            r"no 'model.model.layers.2.attn.Wo.weight', [^;]* more\): use the model"):
            strategy.load_checkpoint(path)
    with pytest.raises(ValueError, match="does not point to a valid checkpoint"):  # Lightning's own error
        strategy.load_checkpoint(tmp_path / "missing.ckpt")

    own = tiny_module(tokenizer_dir, model_config={"initializer_range": 0.5}).state_dict()  # same shapes, other values
    torch.save({"state_dict": own}, tmp_path / "own.ckpt")
    strategy.load_checkpoint(tmp_path / "own.ckpt")
    assert torch.equal(module.model.decoder.bias.full_tensor(), own["model.decoder.bias"])


def test_fsdp2_options_are_plain_values_checked_by_name():
    with pytest.raises(UserError, match=r"FSDP2.param_dtype='bf16': choose one of \['bfloat16', 'float16', 'float32'\]"):
        FSDP2(param_dtype="bf16")
    for name in ("bfloat16", "float16", "float32"):
        strategy = FSDP2(param_dtype=name, reduce_dtype=name)
        assert strategy.param_dtype == strategy.reduce_dtype == getattr(torch, name)
    defaults = FSDP2()
    assert (defaults.param_dtype, defaults.reduce_dtype, defaults.activation_checkpointing,
            defaults.reshard_after_forward, defaults.reduce_every_micro_batch, defaults._save_distributed_checkpoint) \
        == (None, torch.float32, False, True, False, True)
    assert FSDP2(process_group_backend="gloo").process_group_backend == "gloo"


def test_every_process_of_every_node_holds_a_shard(monkeypatch):
    """FSDP2 shards over every process of the job (data parallel only): 2 nodes of 3 processes, 6 shards."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    monkeypatch.setattr(ModelParallelStrategy, "setup_environment", lambda self: None)  # no process group here
    strategy = FSDP2()
    strategy.num_nodes, strategy.parallel_devices = 2, [torch.device("cpu")] * 3
    strategy.setup_environment()
    assert strategy._data_parallel_size == 6


def micro_batch_loss(module, ids):
    return module(ids, torch.arange(ids.shape[1]).repeat(len(ids), 1), "bidirectional", labels=ids).loss


@pytest.mark.parametrize("every_micro_batch", [False, True], ids=["once-per-step", "every-micro-batch"])
def test_accumulated_micro_batches_reduce_their_summed_gradients_once(one_process_group, tokenizer_dir,
                                                                    every_micro_batch):
    """Inside Lightning's no_sync (every accumulated micro-batch but the step's last) the shard units keep their
    gradients unsharded, unless reduce_every_micro_batch; the step's last backward reduces the sum, the same
    gradient as one model accumulating both micro-batches unsharded."""
    g = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(0, 50000, (2, 16), generator=g) for _ in range(2)]
    plain = tiny_module(tokenizer_dir)
    for ids in micro_batches:
        micro_batch_loss(plain, ids).backward()
    strategy, module = sharded_tiny_module(one_process_group, tokenizer_dir, reduce_every_micro_batch=every_micro_batch)
    weights = [layer.attn.Wqkv.weight for layer in module.model.model.layers] + [module.model.head.dense.weight]
    with strategy.block_backward_sync():
        micro_batch_loss(module, micro_batches[0]).backward()
    assert [weight.grad is not None for weight in weights] == [every_micro_batch] * len(weights)
    micro_batch_loss(module, micro_batches[1]).backward()
    expected = [layer.attn.Wqkv.weight.grad for layer in plain.model.model.layers] + [plain.model.head.dense.weight.grad]
    for weight, grad in zip(weights, expected):
        torch.testing.assert_close(weight.grad.full_tensor(), grad)


def test_an_error_inside_no_sync_leaves_gradient_sync_on(one_process_group, tokenizer_dir):
    """An interrupted micro-batch (a Ctrl-C in a notebook, an exception caught around fit) must not leave the shard
    units holding every later gradient unreduced."""
    strategy, module = sharded_tiny_module(one_process_group, tokenizer_dir)
    with pytest.raises(KeyboardInterrupt), strategy.block_backward_sync():
        raise KeyboardInterrupt
    micro_batch_loss(module, torch.randint(0, 50000, (2, 16))).backward()
    assert all(layer.attn.Wqkv.weight.grad is not None for layer in module.model.model.layers)


@pytest.mark.parametrize("reshard", [None, True, False], ids=["default", "zero3", "zero2"])
def test_gathered_weights_are_freed_after_forward_unless_asked_to_keep_them(one_process_group, tokenizer_dir, reshard):
    """reshard_after_forward (ZeRO-3, the default) frees each layer's gathered weights after its forward: only the
    shards (DTensors) stay; false (ZeRO-2) keeps the gathered ones until backward."""
    options = {} if reshard is None else {"reshard_after_forward": reshard}
    _, module = sharded_tiny_module(one_process_group, tokenizer_dir, **options)
    ids = torch.randint(0, 50000, (2, 16))
    micro_batch_loss(module, ids)
    sharded = [type(layer.attn.Wqkv.weight).__name__ == "DTensor" for layer in module.model.model.layers]
    assert sharded == [reshard is not False] * len(sharded)


def test_refreshing_gradient_dtypes_after_an_unfreeze_leaves_the_weights_sharded(one_process_group, tokenizer_dir):
    """LayerFreeze's unfreeze under bf16 FSDP2: the layer frozen at the first forward reduces fp32 gradients once
    refreshed, and the refresh frees the weights it gathered to do so."""
    strategy, module = sharded_tiny_module(one_process_group, tokenizer_dir, param_dtype="bfloat16")
    layer = module.model.model.layers[0]
    layer.requires_grad_(False)
    ids = torch.randint(0, 50000, (2, 16))
    micro_batch_loss(module, ids).backward()
    assert layer.attn.Wqkv.weight.grad is None
    layer.requires_grad_(True)
    strategy.refresh_gradient_dtypes(layer)
    assert type(layer.attn.Wqkv.weight).__name__ == "DTensor"
    micro_batch_loss(module, ids).backward()
    assert layer.attn.Wqkv.weight.grad.dtype == torch.float32


def test_bf16_micro_batches_accumulate_in_the_fp32_reduce_dtype(one_process_group, tokenizer_dir):
    """bf16 compute, fp32 reduce_dtype: the gradients kept unsharded between micro-batches are summed in fp32,
    exactly as reducing each micro-batch in fp32 and summing the shards (bf16 sums would round them)."""
    g = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(0, 50000, (2, 16), generator=g) for _ in range(2)]
    grads = {}
    for every_micro_batch in (False, True):
        strategy, module = sharded_tiny_module(one_process_group, tokenizer_dir, param_dtype="bfloat16",
                                               reduce_every_micro_batch=every_micro_batch)
        with strategy.block_backward_sync():
            micro_batch_loss(module, micro_batches[0]).backward()
        micro_batch_loss(module, micro_batches[1]).backward()
        grads[every_micro_batch] = [layer.attn.Wqkv.weight.grad.full_tensor() for layer in module.model.model.layers]
    for once, every in zip(grads[False], grads[True]):
        assert once.dtype == torch.float32 and torch.equal(once, every)


def run_dir_args(run_dir: Path) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir)]


def run(command: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """``subprocess.run`` that kills the whole process group on timeout.

    Lightning starts rank 1 itself and it inherits the pipes, so killing rank 0 alone (what
    ``subprocess.run`` does) leaves a run hung in a collective blocking the test forever.
    """
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"still running after {timeout} s (a rank waiting in a collective?): {stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def cpt_fit(config: Path, run_dir: Path, *args: str, env: dict = ENV) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cpt_lightning.cli", "fit", "--config", str(config), *run_dir_args(run_dir), *args]
    return run(command, cwd=config.parent, env=env)


def fit(config: Path, run_dir: Path, *args: str) -> str:
    """``cpt fit`` as a user types it (Lightning starts rank 1 itself when devices > 1); returns the log."""
    result = cpt_fit(config, run_dir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def start_nodes(command: list[str], envs: list[dict], cwd: Path, timeout: int = 300) -> list[tuple[int, str]]:
    """Start the launcher once per environment (a simulated node, all on this machine); (exit code, log) of each."""
    processes = [subprocess.Popen(command, cwd=cwd, env={**ENV, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True) for env in envs]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"the launched nodes were still running after {timeout} s (a rank waiting in a collective?)")
    return [(p.returncode, log) for p, log in zip(processes, logs)]


def launch(command: list[str], envs: list[dict], cwd: Path) -> str:
    """``start_nodes``, all of which must succeed; their logs joined."""
    results = start_nodes(command, envs, cwd)
    assert [code for code, _ in results] == [0] * len(results), results[0][1][-3000:] + results[-1][1][-3000:]
    return "".join(log for _, log in results)


def assert_every_rank_stopped_with(code: int, log: str, error: str) -> None:
    """Both ranks of the srun job printed the one-line error and exited (2), with no traceback and no abort
    after it (a gloo group left to interpreter teardown once made a rank exit 134: cli.destroy_process_group)."""
    assert code == 2, log[-3000:]
    assert log.count(error) == 2 and "Traceback" not in log, log[-3000:]


@pytest.fixture
def slurm_job(tmp_path) -> dict:
    """The environment of a 2-node × 1-task SLURM job; ``srun`` is a stand-in that starts each task
    with the variables srun gives it, each on its own, as srun does (no launcher kills the others)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text(  # --kill-on-bad-exit=1: the first task to fail ends the others
        "#!/usr/bin/env bash\n"
        "kill_on_bad_exit=0\n"
        "while [[ $1 == --* ]]; do [[ $1 == --kill-on-bad-exit=1 ]] && kill_on_bad_exit=1; shift; done\n"
        "pids=()\n"
        "for ((rank = 0; rank < SLURM_NTASKS; rank++)); do\n"
        "  SLURM_PROCID=$rank SLURM_LOCALID=$((rank % SLURM_NTASKS_PER_NODE)) "
        "SLURM_NODEID=$((rank / SLURM_NTASKS_PER_NODE)) \"$@\" &\n"
        "  pids+=($!)\n"
        "done\n"
        "status=0\n"
        "for _ in \"${pids[@]}\"; do\n"
        "  wait -n; code=$?\n"
        "  if ((code != 0 && status == 0)); then status=$code; ((kill_on_bad_exit)) && kill \"${pids[@]}\" 2>/dev/null; fi\n"
        "done\n"
        "exit $status\n"
    )
    (fake_bin / "srun").chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "cpt-fit", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
            "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
            "PATH": f"{fake_bin}{os.pathsep}{ENV['PATH']}"}


def losses(run_dir: Path) -> dict[int, float]:
    """Per optimizer step: the objective's loss over the whole global batch (all ranks and micro-batches)."""
    logged = scalars(run_dir)
    return {step: value for tag in ("train/clm_loss", "train/mlm_loss") for step, value in logged.get(tag, [])}


def window_means(curve: dict[int, float]) -> list[float]:
    values = [curve[step] for step in sorted(curve)]
    windows = [values[i:i + WINDOW] for i in range(0, len(values), WINDOW)]
    return [sum(window) / len(window) for window in windows]


@pytest.fixture(scope="module")
def two_processes(config, workdir):
    run_dir = workdir / "two_processes"
    return fit(config, run_dir, "--trainer.devices", "2"), run_dir


@pytest.mark.slow
def test_two_processes_shard_train_through_the_switch_and_save_sharded_checkpoints(two_processes):
    log, run_dir = two_processes
    assert "8 sequences per optimizer step = micro_batch_size 4 × 2 devices × 1 nodes × 1 accumulated" in log
    assert "entering phase 1 (mlm" in log
    checkpoints = sorted(run_dir.rglob("step*.ckpt")) + list(run_dir.rglob("last.ckpt"))
    # every 6 steps, at the switch (10 steps) and at the end (20)
    assert [p.stem for p in checkpoints] == [f"step{s:09d}" for s in (6, 10, 12, 18, 20)] + ["last"]
    for checkpoint in checkpoints:  # a folder with one shard per rank (torch.distributed.checkpoint)
        assert checkpoint.is_dir() and {p.name for p in checkpoint.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    curve = losses(run_dir)
    assert sorted(curve) == list(range(CLM_STEPS + MLM_STEPS))
    logged = scalars(run_dir)
    assert logged["train/tokens_seen"][-1][1] == (CLM_STEPS + MLM_STEPS - 1) * TOKENS_PER_STEP
    job, device = logged["train/items_per_sec"], logged["train/device/items_per_sec"]  # tokens/s: both ranks, one
    assert job and [step for step, _ in job] == [step for step, _ in device]
    assert [value for _, value in job] == pytest.approx([2 * value for _, value in device])


@pytest.mark.slow
def test_two_processes_export_each_phase_end_as_a_transformers_folder(two_processes):
    """The recipes' PhaseEndExport on 2 ranks (rank 0 once read a broadcast alone there and hung the run)."""
    from transformers import AutoModelForMaskedLM

    _, run_dir = two_processes
    (export,) = run_dir.glob("*/export")
    for name in ("phase0-clm", "phase1-mlm"):
        model = AutoModelForMaskedLM.from_pretrained(export / name)
        assert model.config.num_hidden_layers == TINY["num_hidden_layers"]
        assert model.decoder.weight.data_ptr() == model.model.embeddings.tok_embeddings.weight.data_ptr()


def cpt_validate(config: Path, run_dir: Path, *args: str) -> dict[str, float]:
    """``cpt validate`` with validation data and objectives added; the values it logged."""
    command = [sys.executable, "-m", "cpt_lightning.cli", "validate", "--config", str(config), *run_dir_args(run_dir), *args]
    result = run(command, cwd=config.parent, env=ENV, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_dist=True" not in result.stderr  # Lightning's advice for figures the module sums over ranks itself
    return {tag: points[-1][1] for tag, points in scalars(run_dir).items() if tag.startswith("val/")}


@pytest.mark.slow
def test_two_ranks_validate_a_sharded_checkpoint_as_one_process_does(config, workdir, prepared_mix, two_processes):
    """``cpt validate`` of the FSDP2 run's last sharded checkpoint: the CLM loss over the held-out rows is the same
    on 2 ranks as on 1 (a mean per predicted position over every rank), over both sources and for each, and an
    objective that predicts nothing on rank 1 leaves no rank waiting in the reduction of the metrics (rank 1 logs
    them with weight 0)."""
    _, run_dir = two_processes
    (last,) = run_dir.rglob("last.ckpt")
    sources = ", ".join(f"{{name: {name}_held_out, path: {prepared_mix.dirs[name] / 'holdout'}}}"
                        for name in ("pubmed", "medical_qa"))
    validation = [f"--data.init_args.val_sources=[{sources}]",
                  "--model.init_args.val_objectives={clm: {class_path: cpt_lightning.objectives.CausalLM}, "
                  "rank0: {class_path: recorders.PredictsOnRank0Only}}", "--ckpt_path", str(last),
                  "--trainer.limit_val_batches=1.0"]  # every held-out row on both (the demo's 10 micro-batches a rank differ)
    two = cpt_validate(config, workdir / "validate_two", "--trainer.devices", "2", *validation)
    one = cpt_validate(config, workdir / "validate_one", "--trainer.devices", "1", *validation)
    figures = ["clm_accuracy", "clm_loss", "rank0_accuracy", "rank0_loss"]
    groups = ("", "pubmed_held_out/", "medical_qa_held_out/")
    assert sorted(two) == sorted(one) == sorted(f"val/{group}{figure}" for group in groups for figure in figures)
    for group in groups:  # over both sources and for each
        assert two[f"val/{group}clm_loss"] == pytest.approx(one[f"val/{group}clm_loss"], rel=1e-3)
    each = [two[f"val/{group}clm_loss"] for group in groups[1:]]
    assert each[0] != each[1] and min(each) < two["val/clm_loss"] < max(each)  # each its own rows; all, a mean of both
    assert one["val/rank0_loss"] == pytest.approx(one["val/clm_loss"], rel=1e-6)  # one process is rank 0
    assert 0 < two["val/rank0_loss"] != pytest.approx(two["val/clm_loss"], rel=1e-4)  # rank 0's rows alone


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_fewer_processes_when_asked(config, workdir, two_processes):
    """A node lost: the 2-process run's checkpoint of step 6 goes on in 1 process (torch.distributed.checkpoint
    merges its shards) with each source's next pass, as data.init_args.resume_on_another_layout asks; without it,
    refused. GlobalBatch keeps the 8 sequences of a step with 2 accumulated micro-batches instead of 1. Other rows
    than the reference's from the same weights: the same token clock and the same curve within noise."""
    _, uninterrupted = two_processes
    (checkpoint,) = uninterrupted.rglob(f"step{CHECKPOINT_EVERY:09d}.ckpt")
    refused = cpt_fit(config, workdir / "relayout_refused", "--trainer.devices", "1", "--ckpt_path", str(checkpoint))
    assert refused.returncode == 2 and "set data.init_args.resume_on_another_layout: true" in refused.stderr
    run_dir = workdir / "relayout"
    log = fit(config, run_dir, "--trainer.devices", "1", "--ckpt_path", str(checkpoint),
              "--data.init_args.resume_on_another_layout", "true")
    assert ("saved by 2 process(es) on 1 node(s) × 1 loader worker(s) × micro-batch 4; this run has 1 process(es) on 1 "
            "node(s) × 1 loader worker(s) × micro-batch 4: each source starts a new pass") in log
    assert "resuming in phase 0 (clm" in log
    assert "8 sequences per optimizer step = micro_batch_size 4 × 1 devices × 1 nodes × 2 accumulated" in log
    assert scalars(run_dir)["train/tokens_seen"] == [
        (step, tokens) for step, tokens in scalars(uninterrupted)["train/tokens_seen"] if step >= CHECKPOINT_EVERY]
    resumed, reference = losses(run_dir), losses(uninterrupted)
    assert sorted(resumed) == list(range(CHECKPOINT_EVERY, CLM_STEPS + MLM_STEPS))
    assert resumed != pytest.approx({step: reference[step] for step in resumed}, abs=1e-5)  # other rows
    windows = window_means(resumed)
    assert windows == pytest.approx(window_means({step: reference[step] for step in resumed}), abs=WINDOW_TOLERANCE)
    assert windows[-1] < windows[0] - 2 * WINDOW_TOLERANCE  # it learns: the windows compare curves, not noise
    # the checkpoint's weights, not a new model's (10.83 at step 0; 10.40 at step 6 on the reference's rows)
    assert resumed[CHECKPOINT_EVERY] == pytest.approx(reference[CHECKPOINT_EVERY], abs=0.1)
    assert reference[0] - reference[CHECKPOINT_EVERY] > 0.3


@pytest.mark.slow
def test_torchrun_script_on_two_nodes_reproduces_one_node(config, workdir, two_processes):
    run_dir = workdir / "torchrun"
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "PYTHON": sys.executable}
    log = launch(
        ["bash", str(ROOT / "scripts/torchrun/train.sh"), str(config), *run_dir_args(run_dir)],
        [{**common, "NODE_RANK": str(rank)} for rank in (0, 1)], cwd=config.parent,
    )
    assert "8 sequences per optimizer step = micro_batch_size 4 × 1 devices × 2 nodes × 1 accumulated" in log
    assert losses(run_dir) == pytest.approx(losses(two_processes[1]), abs=1e-5)


def test_the_slurm_script_has_every_task_signalled_minutes_before_its_time_limit():
    """At the time limit itself SLURM allows KillWait (30 s by default) between its SIGTERM and the SIGKILL, and
    PreemptionCheckpoint needs a step and a sharded save. The script asks for SIGTERM well before, sent to
    the tasks (a ``B:`` prefix would signal only the batch shell, which trains nothing)."""
    script = (ROOT / "scripts/slurm/train.sbatch").read_text().splitlines()
    options = {key: value for key, _, value in
               (line.removeprefix("#SBATCH --").partition("=") for line in script if line.startswith("#SBATCH --"))}
    signal_name, _, seconds = options["signal"].partition("@")
    assert signal_name in ("TERM", "SIGTERM", "15") and int(seconds) >= 120


def sbatch_run(tmp_path, code: int, left: str, scontrol_code: int = 0, squeue_fails_at_end: bool = False,
               **env) -> tuple[int, list[str], list[str]]:
    """The SLURM script under stand-ins: ``srun`` records its arguments, CPT_REQUEUED and SRUN_CPUS_PER_TASK and exits
    ``code``, ``squeue`` says ``left`` of the time limit (at the end, fails: a busy controller), ``scontrol`` records
    its arguments and exits ``scontrol_code``. The script's exit code, srun's arguments (then CPT_REQUEUED's and
    SRUN_CPUS_PER_TASK's values) and scontrol's calls; its output in tmp_path / "output"."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    squeue = f"echo {left}"
    if squeue_fails_at_end:  # answers once, at the start
        squeue = (f'[[ -e {tmp_path}/asked ]] && {{ echo "slurm_load_jobs error: Socket timed out" >&2; exit 1; }}\n'
                  f"touch {tmp_path}/asked; echo {left}")
    for name, body in (("srun", f'echo "$@" "[${{CPT_REQUEUED:-}}]" "[${{SRUN_CPUS_PER_TASK:-}}]" > {tmp_path}/srun.args; '
                                f"exit {code}"),
                       ("squeue", squeue),
                       ("scontrol", f'echo "$@" >> {tmp_path}/scontrol.calls; exit {scontrol_code}')):
        (fake_bin / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (fake_bin / name).chmod(0o755)
    (tmp_path / "scontrol.calls").write_text("")
    env = {"PATH": f"{fake_bin}{os.pathsep}{ENV['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "4", **env}
    done = subprocess.run(["bash", str(ROOT / "scripts/slurm/train.sbatch"), "configs/en_detour.yaml", "--seed_everything",
                           "3"], env=env, capture_output=True, text=True, timeout=60)
    (tmp_path / "output").write_text(done.stdout + done.stderr)
    return (done.returncode, (tmp_path / "srun.args").read_text().split(),
            (tmp_path / "scontrol.calls").read_text().splitlines())


@pytest.mark.parametrize("code, left, env, requeued", [
    (143, "04:30", {}, True),                      # the time limit's SIGTERM: last.ckpt saved, 4.5 minutes left
    (143, "04:30", {"scontrol_code": 1}, True),    # requeue not allowed here: the job still ends as it stopped
    (143, "9:59", {}, True),
    (143, "04:30", {"squeue_fails_at_end": True}, True),  # a controller busy after the save: the start's answer
    (143, "14:05", {"REQUEUE_WINDOW": "1200"}, True),     # a --signal lead of 15 minutes, for a large model's save
    (143, "14:05", {}, False),                     # ... without the window: a line says why
    (143, "3:10:00", {}, False),                   # a scancel hours before the limit
    (143, "1-00:04:30", {}, False),
    (143, "04:30", {"RESUBMIT": "0"}, False),
    (143, "INVALID", {}, False),                   # squeue cannot tell
    (0, "04:30", {}, False),                       # the run ended
    (1, "04:30", {}, False),                       # it failed
], ids=["limit", "requeue-refused", "limit-10min", "squeue-busy-at-end", "longer-lead", "lead-beyond-window", "scancel",
        "days-left", "turned-off", "unknown", "finished", "failed"])
def test_a_job_stopped_by_its_time_limit_requeues_itself(tmp_path, code, left, env, requeued):
    """A recipe runs longer than a 24 h limit (the English detour's 22.5 h of training with its validations and
    saves; the large variants about 54 h): nothing submitted the next job. A stop on SIGTERM that is not requeued
    says why (a squeue that failed after the save, or a --signal lead beyond the window, ended the job silently)."""
    status, args, calls = sbatch_run(tmp_path, code, left, **env)
    assert status == code and args[-4:] == ["--seed_everything", "3", "[]", "[]"]
    assert calls == (["requeue 4242"] if requeued else [])
    said = (tmp_path / "output").read_text()
    assert ("cpt-fit: " in said) == (code == 143) and ("requeueing job 4242" in said) == requeued


def test_srun_gets_the_jobs_cpus_per_task(tmp_path):
    """srun from Slurm 22.05 no longer inherits sbatch's --cpus-per-task: a rank shared one core with its loaders."""
    _, args, _ = sbatch_run(tmp_path, 0, "20:00:00", SLURM_CPUS_PER_TASK="8")
    assert args[-1] == "[8]"


def test_a_requeued_job_tells_cpt_fit_it_was_requeued(tmp_path):
    """It appended --ckpt_path last, which restarted a branch that had not saved yet from step 0 (cpt fit now picks
    the run's last.ckpt or the job's own --ckpt_path: ``requeued_ckpt_path``)."""
    _, args, _ = sbatch_run(tmp_path, 0, "20:00:00", SLURM_RESTART_COUNT="1")
    assert args[-4:] == ["--seed_everything", "3", "[1]", "[]"]


@pytest.mark.slow
def test_slurm_script_on_two_nodes_reproduces_one_node(config, workdir, two_processes, slurm_job):
    run_dir = workdir / "slurm"
    log = launch(["bash", str(ROOT / "scripts/slurm/train.sbatch"), str(config), *run_dir_args(run_dir)], [slurm_job],
                 cwd=config.parent)
    assert "8 sequences per optimizer step = micro_batch_size 4 × 1 devices × 2 nodes × 1 accumulated" in log
    assert losses(run_dir) == pytest.approx(losses(two_processes[1]), abs=1e-5)


@pytest.mark.slow
def test_a_rank_that_dies_alone_ends_the_srun_job(config, workdir, slurm_job):
    """A failure on one rank only (an OOM, a driver error, a full disk under rank 0's log writes) left the
    other ranks waiting: here rank 0 dies before the rendezvous, and rank 1 would wait for it until
    the store's timeout. The script's ``srun --kill-on-bad-exit=1`` ends the job instead."""
    dying = yaml.safe_load(config.read_text())
    dying["trainer"]["strategy"]["class_path"] = "recorders.DiesOnRank0"
    dying_config = config.with_name("dies_on_rank_0.yaml")
    dying_config.write_text(yaml.safe_dump(dying))
    ((code, log),) = start_nodes(["bash", str(ROOT / "scripts/slurm/train.sbatch"), str(dying_config),
                                  *run_dir_args(workdir / "dies_on_rank_0")], [slurm_job], cwd=config.parent, timeout=120)
    assert code != 0 and "rank 0 died" in log, log[-3000:]


STARTED_WITH_A_SHORT_GRACE = """
import sys
from cpt_lightning import launched_ranks
launched_ranks.GRACE_S = 2  # every rank runs this script: Lightning starts rank 1 with rank 0's command line
from cpt_lightning.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_a_rank_started_by_rank_0_ends_soon_after_rank_0_fails_alone(config, workdir):
    """``cpt fit --trainer.devices 2``: rank 0 starts rank 1 as its child. Rank 0 failing alone (an error in code only
    it runs) left rank 1 waiting for it (on GPUs in NCCL's collective, until its timeout; here asleep) past the test's
    timeout: Lightning stops the ranks only when a child dies or on a Ctrl-C. (A SIGKILLed starter:
    tests/test_launched_ranks.py.)"""
    failing = yaml.safe_load(config.read_text())
    failing["trainer"]["callbacks"].append({"class_path": "recorders.Rank0FailsAlone", "init_args": {"at_step": 2}})
    failing_config = config.with_name("rank_0_fails_alone.yaml")
    failing_config.write_text(yaml.safe_dump(failing))
    script = workdir / "started_with_a_short_grace.py"
    script.write_text(STARTED_WITH_A_SHORT_GRACE)
    command = [sys.executable, str(script), "fit", "--config", str(failing_config),
               *run_dir_args(workdir / "rank_0_fails_alone"), "--trainer.devices", "2"]
    result = run(command, cwd=config.parent, env=ENV, timeout=90)
    assert result.returncode == 1 and "RuntimeError: rank 0 failed alone" in result.stderr, result.stderr[-3000:]
    assert "local rank 1 stopped: the local rank 0 process that started it ended 2 s before" in result.stderr, \
        result.stderr[-3000:]


@pytest.mark.slow
def test_a_refusal_on_rank_0_stops_every_rank_of_an_srun_job(config, workdir, slurm_job):
    """Only rank 0 measures the checkpoint disk. Under srun nobody stops the other ranks when rank 0
    exits, so each must get the verdict: alone, rank 1 trained on into a collective with a dead rank 0
    (a gloo traceback here; on GPUs, NCCL waits until its timeout)."""
    greedy = yaml.safe_load(config.read_text())
    for callback in greedy["trainer"]["callbacks"]:
        if callback["class_path"].endswith("TokenCheckpoint"):
            callback["init_args"]["keep_last"] = 10**9  # petabytes of checkpoints: no disk holds them
    greedy_config = config.with_name("keep_a_billion.yaml")
    greedy_config.write_text(yaml.safe_dump(greedy))
    run_dir = workdir / "refused_on_rank_0"
    ((code, log),) = start_nodes(["bash", str(ROOT / "scripts/slurm/train.sbatch"), str(greedy_config),
                                  *run_dir_args(run_dir)], [slurm_job], cwd=config.parent, timeout=180)
    assert_every_rank_stopped_with(code, log, "error: checkpoint folder")
    assert not list(run_dir.rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "gathered"])
def test_a_write_failing_on_rank_0_stops_every_rank_and_keeps_the_last_checkpoint(config, workdir, slurm_job, sharded):
    """Rank 0 raising alone left the others in the next collective (srun does not stop them): every rank
    now stops with one line, and ``last.ckpt`` still holds the step saved before the failed write."""
    failing = yaml.safe_load(config.read_text())
    strategy = failing["trainer"]["strategy"]
    strategy["class_path"] = "recorders.FullDiskOnRank0"
    strategy["init_args"].update(at_step=CLM_STEPS, save_distributed_checkpoint=sharded)
    failing["trainer"]["plugins"] = [{"class_path": "cpt_lightning.checkpointing.AtomicCheckpointIO"}]
    run_dir = workdir / f"full_disk_{sharded}"
    failing_config = config.with_name(f"full_disk_{sharded}.yaml")
    failing_config.write_text(yaml.safe_dump(failing))
    ((code, log),) = start_nodes(["bash", str(ROOT / "scripts/slurm/train.sbatch"), str(failing_config),
                                  *run_dir_args(run_dir)], [slurm_job], cwd=config.parent, timeout=240)
    assert_every_rank_stopped_with(code, log, "error: could not write the checkpoint")
    assert "No space left on device" in log
    (last,) = run_dir.rglob("last.ckpt")
    assert read_checkpoint(last).records["global_step"] == CHECKPOINT_EVERY


def killed_mid_save_config(config: Path, **kill) -> Path:
    killed = yaml.safe_load(config.read_text())
    strategy = killed["trainer"]["strategy"]
    strategy["class_path"] = "recorders.KilledMidSave"
    strategy["init_args"].update(kill)
    path = config.with_name(f"killed_mid_save_{kill['kill_at_step']}.yaml")
    path.write_text(yaml.safe_dump(killed))
    return path


@pytest.mark.slow
def test_a_kill_during_a_sharded_save_keeps_the_previous_checkpoint_and_resumes_exactly(config, workdir, two_processes):
    """Both ranks are killed after writing the shards of step 12's checkpoint, before the rename that publishes them.
    The run resumed from step 10 is killed again at step 18, between the two renames that replace last.ckpt by a
    second name for step 18's checkpoint: the next `--ckpt_path last` puts that back in place and resumes from it."""
    env = {**ENV, "PYTHONUNBUFFERED": "1"}  # a killed run's output too
    run_dir = workdir / "killed_mid_save"
    result = cpt_fit(killed_mid_save_config(config, kill_at_step=12), run_dir, "--trainer.devices", "2", env=env)
    assert result.returncode == -9, result.stderr[-3000:]
    (checkpoints,) = {p.parent for p in run_dir.rglob("last.ckpt")}
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".step000000012.ckpt.partial", "last.ckpt", "step000000006.ckpt", "step000000010.ckpt"]
    assert {p.name for p in (checkpoints / "last.ckpt").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    resumed_dir = workdir / "resumed_after_kill"  # a run folder of its own, for `--ckpt_path last` below
    killed_again = killed_mid_save_config(config, kill_at_step=18, between_renames=True)
    result = cpt_fit(killed_again, resumed_dir, "--trainer.devices", "2", "--ckpt_path", str(checkpoints / "last.ckpt"),
                     env=env)
    assert result.returncode == -9, result.stderr[-3000:]
    assert "resuming in phase 1 (mlm" in result.stdout + result.stderr  # last.ckpt was step 10's: the switch
    (new_checkpoints,) = {p.parent for p in resumed_dir.rglob("step000000012.ckpt")}
    assert sorted(p.name for p in new_checkpoints.iterdir()) == [
        ".last.ckpt.old", ".last.ckpt.partial", "step000000012.ckpt", "step000000018.ckpt"]

    log = fit(config, resumed_dir, "--trainer.devices", "2", "--ckpt_path", "last")
    assert "last.ckpt: a save was killed between moving the previous one aside and renaming the new one into place; " \
           "restored the save that was replacing it (.last.ckpt.partial)" in log
    assert "resuming in phase 1 (mlm" in log and "(step 18)" in log
    resumed, reference = losses(resumed_dir), losses(two_processes[1])
    assert {step: resumed[step] for step in range(10, 20)} == pytest.approx(
        {step: reference[step] for step in range(10, 20)}, abs=1e-5)
    assert (new_checkpoints / "last.ckpt").is_dir() and not list(new_checkpoints.glob(".*"))
    assert same_files(new_checkpoints / "last.ckpt", max(new_checkpoints.glob("step*.ckpt")))


@pytest.mark.slow
def test_compiled_layers_under_fsdp2_follow_the_eager_curve(config, workdir, two_processes):
    """compile: true with FSDP2 and activation checkpointing on 2 processes: the same losses within bf16 noise."""
    run_dir = workdir / "compiled"
    log = fit(config, run_dir, "--trainer.devices", "2", "--model.init_args.compile", "true")
    assert f"compile: {TINY['num_hidden_layers']} encoder layers and the fused loss wrapped by torch.compile" in log
    compiled, eager = losses(run_dir), losses(two_processes[1])
    assert sorted(compiled) == sorted(eager) == list(range(CLM_STEPS + MLM_STEPS))
    assert compiled == pytest.approx(eager, abs=5e-3)


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_every_rank_at_the_same_step_and_resumes_exactly(config, workdir, two_processes):
    """SLURM signals every rank, but a launcher or an operator may signal one only: the others learn of it and every
    rank stops at its step and saves its shard of last.ckpt. Rank 1 here: the ranks agree through one symmetric
    all-reduce of their flags (not a broadcast from rank 0), so a signal to rank 0 alone or to every rank takes the
    same path (each such 2-process run costs about 20 s: left out). Also the test of a resume from a sharded
    checkpoint: it continues exactly, through the switch when saved before it."""
    preempted = yaml.safe_load(config.read_text())
    preempted["trainer"]["callbacks"].append({"class_path": "recorders.SigtermAt", "init_args": {"step": 5, "rank": 1}})
    preempted_config = config.with_name("preempted.yaml")
    preempted_config.write_text(yaml.safe_dump(preempted))
    run_dir = workdir / "preempted"
    result = cpt_fit(preempted_config, run_dir, "--trainer.devices", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 143, output[-3000:]
    assert output.count("preempted (SIGTERM): rerun the same command") == 2  # both ranks stopped, not hung
    saved_at = int(re.search(r"SIGTERM at step (\d+): saved", output)[1])
    assert 5 <= saved_at < CLM_STEPS + MLM_STEPS
    (last,) = run_dir.rglob("last.ckpt")
    assert {p.name for p in last.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    records = read_checkpoint(last, weights=False).records
    assert records["global_step"] == saved_at
    assert str(yaml.safe_load(records["run_config"])["trainer"]["devices"]) == "2"  # the config, in rank 0's meta.pt

    resumed_dir = workdir / "resumed_after_sigterm"
    log = fit(config, resumed_dir, "--trainer.devices", "2", "--ckpt_path", str(last))
    assert f"(step {saved_at})" in log
    in_clm = saved_at < CLM_STEPS
    assert (f"resuming in phase {0 if in_clm else 1} ({'clm' if in_clm else 'mlm'}" in log
            and ("entering phase 1 (mlm" in log) == in_clm)
    resumed, reference = losses(resumed_dir), losses(two_processes[1])
    assert sorted(resumed) == list(range(saved_at, CLM_STEPS + MLM_STEPS))
    assert resumed == pytest.approx({step: reference[step] for step in resumed}, abs=1e-5)


ACCUMULATED_MICRO_BATCH = 2  # 8 sequences = 2 rows × 2 processes × 2 accumulated micro-batches
ACCUMULATED_CLM_STEPS = ACCUMULATED_MLM_STEPS = 3  # each step's counts and losses are checked: a few a side
SHARD_UNITS = TINY["num_hidden_layers"] + 1  # a unit per encoder layer + the root
FROZEN_IN_CLM = 1  # LayerFreeze("0"): its unit computes no gradient to reduce during CLM


@pytest.fixture(scope="module")
def accumulated(config, workdir):
    """2 processes accumulating 2 micro-batches per step, layer 0 frozen during CLM, once per way of reducing
    the gradients, through shorter phases: for each ``reduce_every_micro_batch``, the run's folder and its per-step
    reduce-scatter counts on every rank."""
    import json

    runs = {}
    for every_micro_batch in (False, True):
        variant = yaml.safe_load(config.read_text())
        variant["data"]["init_args"]["micro_batch_size"] = ACCUMULATED_MICRO_BATCH
        variant["trainer"]["strategy"]["init_args"]["reduce_every_micro_batch"] = every_micro_batch
        clm, mlm = variant["trainer"]["callbacks"][0]["init_args"]["phases"]
        clm["tokens"], mlm["tokens"] = ACCUMULATED_CLM_STEPS * TOKENS_PER_STEP, ACCUMULATED_MLM_STEPS * TOKENS_PER_STEP
        counts = workdir / f"reduce_scatters_{every_micro_batch}.jsonl"
        variant["trainer"]["callbacks"] += [
            {"class_path": "callbacks.LayerFreeze", "init_args": {"layers": "0", "during": "clm"}},
            {"class_path": "recorders.ReduceScatterCount", "init_args": {"path": str(counts)}}]
        variant_config = config.with_name(f"accumulated_{every_micro_batch}.yaml")
        variant_config.write_text(yaml.safe_dump(variant))
        run_dir = workdir / f"accumulated_{every_micro_batch}"
        result = cpt_fit(variant_config, run_dir, "--trainer.devices", "2")
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-3000:]
        assert "micro_batch_size 2 × 2 devices × 1 nodes × 2 accumulated" in log
        runs[every_micro_batch] = run_dir, [json.loads(line) for line in counts.read_text().splitlines()]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("every_micro_batch", [False, True], ids=["once-per-step", "every-micro-batch"])
def test_accumulated_gradients_are_reduce_scattered_once_per_step(accumulated, every_micro_batch):
    """Lightning blocks only DDP's sync for accumulated micro-batches; FSDP2 reduce-scattered each one's
    gradients (fp32, the whole model per micro-batch). Now once per optimizer step, unless asked otherwise;
    a frozen layer's unit reduces nothing until the switch, and again after it."""
    _, counts = accumulated[every_micro_batch]
    clm_steps, all_steps = ACCUMULATED_CLM_STEPS, ACCUMULATED_CLM_STEPS + ACCUMULATED_MLM_STEPS
    assert sorted((c["rank"], c["step"]) for c in counts) == [(r, s) for r in (0, 1) for s in range(all_steps)]
    reductions = 2 if every_micro_batch else 1
    for phase, steps, units in (("clm", range(clm_steps), SHARD_UNITS - FROZEN_IN_CLM),
                                ("mlm", range(clm_steps, all_steps), SHARD_UNITS)):
        assert {(c["micro_batches"], c["reduce_scatters"]) for c in counts if c["step"] in steps} == {
            (2, reductions * units)}, phase


@pytest.mark.slow
def test_reducing_once_per_step_trains_as_reducing_every_micro_batch(accumulated):
    """The same sums in another order: the same curve through the switch and the same final weights."""
    from safetensors.torch import load_file

    (once_dir, _), (every_dir, _) = accumulated[False], accumulated[True]
    once, every = losses(once_dir), losses(every_dir)
    assert sorted(once) == sorted(every) == list(range(ACCUMULATED_CLM_STEPS + ACCUMULATED_MLM_STEPS))
    assert once == pytest.approx(every, rel=1e-6)
    (once_weights,), (every_weights,) = [[load_file(p) for p in d.rglob("phase1-mlm/model.safetensors")]
                                         for d in (once_dir, every_dir)]
    assert once_weights.keys() == every_weights.keys()
    for name, weight in once_weights.items():
        torch.testing.assert_close(weight, every_weights[name], rtol=1e-6, atol=1e-7, msg=name)


DDP_VALIDATION = '''
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import lightning as L
from cpt_lightning.cli import destroy_process_group  # as cpt does: a gloo group left to interpreter exit may abort it
from cpt_lightning.objectives import CausalLM
from helpers import tiny_module, packed_position_ids, say


class Sums(L.Callback):
    def on_validation_end(self, trainer, pl_module):  # after the module's reduction: every rank's
        loss, _, predicted = pl_module._validation.sums[0, 0].tolist()
        say(f"rank {{trainer.global_rank}}: {{loss!r}} over {{predicted:.0f}}")


if __name__ == "__main__":
    module = tiny_module({tokenizer!r}, objective=CausalLM())
    ids = torch.randint(5, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    rows = [{{"input_ids": ids[0], "position_ids": packed_position_ids([4, 1, 1, 1, 1])}},  # 3 predicted
            {{"input_ids": ids[1], "position_ids": packed_position_ids([1] * 8)}}]  # none
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Sums()])
    (metrics,) = trainer.validate(module, torch.utils.data.DataLoader(rows, batch_size=1))
    if trainer.global_rank == 0:
        say(f"logged {{metrics['val/clm_loss']!r}}")
    destroy_process_group()
'''


def test_the_validation_loss_over_ranks_is_the_mean_over_every_predicted_position(tmp_path, tokenizer_dir):
    """Two ranks, one predicting 3 positions and the other none: Lightning's sync_dist mean of the ranks' means,
    weighted by their positions, divided by an integer mean of the counts cut short (1 for 3 / 2), logged 1.5 × the
    loss."""
    script = tmp_path / "validate_on_two_ranks.py"
    script.write_text(DDP_VALIDATION.format(tests=str(Path(__file__).parent), tokenizer=str(tokenizer_dir)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-2000:]
    sums = re.findall(r"rank \d: (\S+) over (\d+)", done.stdout)
    (logged,) = re.findall(r"logged (\S+)", done.stdout)
    assert len(sums) == 2 and sums[0] == sums[1] and sums[0][1] == "3"  # every rank holds the sums of both
    assert float(logged) == pytest.approx(float(sums[0][0]) / 3, rel=1e-6)


DDP_TRAINING_WITHOUT_TARGETS_ON_ONE_RANK = '''
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from callbacks import NonFiniteGuard
from cpt_lightning.cli import destroy_process_group
from cpt_lightning.objectives import CausalLM
from helpers import tiny_module, packed_position_ids, say


class Printed(Logger):
    name, version = "printed", 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    @rank_zero_only  # one process writes the lines: two interleave
    def log_metrics(self, metrics, step):
        if "train/clm_loss" in metrics:
            say(f"step {{step}}: clm_loss {{metrics['train/clm_loss']!r}}")
        if "train/grad_norm" in metrics:
            say(f"step {{step}}: grad_norm {{metrics['train/grad_norm']!r}}")


if __name__ == "__main__":
    devices = int(sys.argv[1])  # 1: the same steps on one process, each row a micro-batch
    ids = torch.randint(5, 1000, (4, 8), generator=torch.Generator().manual_seed(0))
    predicted, nothing = packed_position_ids([4, 4]), packed_position_ids([1] * 8)  # one-token documents: no target
    rows = [{{"input_ids": row, "position_ids": positions}}
            for row, positions in zip(ids, [predicted, nothing, predicted, nothing])]  # rank 0 gets 0, 2; rank 1 1, 3
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
                        accumulate_grad_batches=3 - devices, log_every_n_steps=1, logger=Printed(),
                        callbacks=[NonFiniteGuard()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(tiny_module({tokenizer!r}, objective=CausalLM()), torch.utils.data.DataLoader(rows, batch_size=1))
    say(f"rank {{trainer.global_rank}} trained {{trainer.global_step}} steps")
    destroy_process_group()
'''


def test_a_rank_that_predicts_nothing_neither_hangs_the_run_nor_changes_the_gradient(tmp_path, tokenizer_dir):
    """The train curves' flush reduces the metrics over the ranks; each rank decided alone whether to flush, on
    whether it had updated them, so a rank that predicted nothing in a window (a targeted objective's) skipped the
    collective the others waited in, for good. The gradient is the one a single process gets from the same rows."""
    script = tmp_path / "train_on_two_ranks.py"
    script.write_text(DDP_TRAINING_WITHOUT_TARGETS_ON_ONE_RANK.format(tests=str(Path(__file__).parent),
                                                                      tokenizer=str(tokenizer_dir)))
    outputs = []
    for devices in (2, 1):
        done = run([sys.executable, str(script), str(devices)], cwd=tmp_path, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
        assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
        outputs.append(done.stdout)
    assert sorted(re.findall(r"rank (\d) trained (\d) steps", outputs[0])) == [("0", "2"), ("1", "2")]
    assert len(re.findall(r"step \d: clm_loss", outputs[0])) >= 2  # rank 0's points, over rank 0's positions
    # each step's gradient is the mean over every rank's predicted positions, as one process accumulating the same
    # rows gets it: a world-size factor dropped from its scaling halved the norm here, and every run was clipped at
    # a norm N times the configured one on N GPUs (grad_norm is rank 0's view of the reduced gradient)
    norms = [[float(norm) for norm in re.findall(r"step \d: grad_norm (\S+)", output)] for output in outputs]
    assert len(norms[0]) == 2 and norms[0] == pytest.approx(norms[1], rel=1e-5)


DDP_REFUSAL_ON_ONE_RANK = '''
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import lightning as L
from cpt_lightning.cli import destroy_process_group
from cpt_lightning.errors import UserError
from cpt_lightning.objectives import CausalLM
from cpt_lightning.parallel import FSDP2
from helpers import tiny_module, packed_position_ids, say


class IdsOutOfRangeOnRank1(CausalLM):
    name = "odd"

    def build_inputs(self, input_ids, position_ids, generator):
        inputs, labels = super().build_inputs(input_ids, position_ids, generator)
        return (inputs + 10**6 if torch.distributed.get_rank() == 1 else inputs), labels


if __name__ == "__main__":
    module = tiny_module({tokenizer!r}, objective=CausalLM(), val_objectives={{"odd": IdsOutOfRangeOnRank1()}})
    ids = torch.randint(5, 1000, (8, 8), generator=torch.Generator().manual_seed(0))  # 4 batches per rank
    rows = [{{"input_ids": row, "position_ids": packed_position_ids([8])}} for row in ids]
    strategy = "ddp" if sys.argv[1] == "ddp" else FSDP2(process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    try:
        trainer.validate(module, torch.utils.data.DataLoader(rows, batch_size=1))
    except UserError as refusal:
        say(f"rank {{trainer.global_rank}} refused: {{refusal}}")
    destroy_process_group()
'''


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_an_objective_refused_on_one_ranks_batch_stops_every_rank_with_its_refusal(tmp_path, tokenizer_dir, strategy):
    """The first batch's check of an objective's inputs refused on the rank whose rows gave bad ids alone: the others
    went on into the next collective, where they died of its closed connection (gloo: a 60-line traceback, exit 1)
    or waited for it (NCCL: until its timeout). Every rank now stops with a refusal at that batch; the training's
    first batch goes through the same ``raise_on_every_rank``. (FSDP2 gathers weights in every forward: a refusing
    rank that skipped its batches and agreed only where validation ends hung the others' next forward.)"""
    script = tmp_path / "refuse_on_one_rank.py"
    script.write_text(DDP_REFUSAL_ON_ONE_RANK.format(tests=str(Path(__file__).parent), tokenizer=str(tokenizer_dir)))
    done = run([sys.executable, str(script), strategy], cwd=tmp_path, timeout=120,
               env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output[-3000:]
    refusals = dict(re.findall(r"rank (\d) refused: (.*)", done.stdout))
    assert refusals.keys() == {"0", "1"}, output[-3000:]
    assert refusals["0"] == "another rank's first validation batch gave an objective's inputs it refused: its error " \
                            "says why"
    assert re.fullmatch(r"IdsOutOfRangeOnRank1\.build_inputs gave input ids from 100\d{4} to 100\d{4} on the first "
                        r"batch: each is a token id in \[0, 50368\)", refusals["1"])
