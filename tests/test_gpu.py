"""The checks that need a GPU: the fast kernels and the fused loss under bf16 training on CUDA, and the GPU
memory a training run logs.

Skipped without CUDA. On a device machine (no network) the tokenizer comes from the bench kit
(`bash scripts/gpu_kit.sh` here, carry `.bench-kit`): scripts/gpu_session.sh's `tests` stage runs
them with `CPT_TEST_TOKENIZER=.bench-kit/tokenizer` after the kit's wheels are installed.
"""

import pytest
import torch

from callbacks import TokenThroughput
from cpt_lightning.objectives import CausalLM, MaskedLM
from helpers import packed_position_ids, tiny_module
from test_throughput import Metrics, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROW = 512  # several 128-token flex blocks, longer than the window


def cuda_batch():
    g = torch.Generator().manual_seed(7)
    pos = torch.stack([packed_position_ids([300, 212]), packed_position_ids([100, 150, 262])])
    return {"input_ids": torch.randint(5, 50000, (2, ROW), generator=g).cuda(), "position_ids": pos.cuda()}


def bf16_step(module, objective):
    """One training step's loss and gradients under bf16 autocast, as bf16-mixed training runs it."""
    module.set_objective(objective)
    module.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = module.objective_step(cuda_batch(), torch.Generator("cuda").manual_seed(3))
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in module.named_parameters()}


def assert_grads_close(got: dict, expected: dict, rtol: float) -> None:
    for name, grad in expected.items():
        scale = grad.norm().clamp_min(1e-12)
        assert (got[name] - grad).norm() / scale < rtol, name


def pair(tokenizer_dir, reference: dict, other: dict):
    """Two tiny models with the same weights on the GPU, built with different settings."""
    first = tiny_module(tokenizer_dir, **reference).cuda()
    second = tiny_module(tokenizer_dir, **other).cuda()
    second.load_state_dict(first.state_dict())
    return first, second


@pytest.mark.parametrize("objective", [CausalLM, MaskedLM], ids=["clm", "mlm"])
def test_flex_attention_trains_like_sdpa_in_bf16(tokenizer_dir, objective):
    sdpa, flex = pair(tokenizer_dir, {"attn_implementation": "sdpa"}, {"attn_implementation": "flex_attention"})
    expected, got = bf16_step(sdpa, objective()), bf16_step(flex, objective())
    torch.testing.assert_close(got[0], expected[0], rtol=2e-2, atol=2e-2)
    assert_grads_close(got[1], expected[1], rtol=5e-2)


@pytest.mark.parametrize("objective", [CausalLM, MaskedLM], ids=["clm", "mlm"])
def test_fused_loss_trains_like_the_dense_head_in_bf16(tokenizer_dir, objective):
    dense, fused = pair(tokenizer_dir, {"attn_implementation": "sdpa", "loss_chunk_size": None},
                        {"attn_implementation": "sdpa", "loss_chunk_size": 128})
    expected, got = bf16_step(dense, objective()), bf16_step(fused, objective())
    torch.testing.assert_close(got[0], expected[0], rtol=1e-2, atol=1e-2)
    assert_grads_close(got[1], expected[1], rtol=2e-2)


def test_compiled_model_trains_like_eager_on_cuda(tokenizer_dir):
    """Compiled layers (FlexAttention inside) and compiled loss arithmetic, against eager, in bf16."""
    eager, compiled = pair(tokenizer_dir, {"attn_implementation": "flex_attention"}, {"attn_implementation": "flex_attention"})
    compiled.compile_model()
    for objective in (CausalLM(), MaskedLM()):
        expected, got = bf16_step(eager, objective), bf16_step(compiled, objective)
        torch.testing.assert_close(got[0], expected[0], rtol=2e-2, atol=2e-2)
        assert_grads_close(got[1], expected[1], rtol=5e-2)


def test_training_logs_the_gpu_memory_peaks(tokenizer_dir):
    logger = Metrics()
    fit(tokenizer_dir, TokenThroughput(window_size=3), logger=logger, accelerator="gpu", devices=1, precision="bf16-mixed")
    peaks = [(m["train/device/peak_allocated_gib"], m["train/device/peak_reserved_gib"])
             for m in logger.logged if "train/device/peak_allocated_gib" in m]
    assert peaks and all(0 < allocated <= reserved for allocated, reserved in peaks), peaks
