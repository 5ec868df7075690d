"""The fused head + cross-entropy gives the dense path's loss, gradients and predictions without its logits."""

import contextlib
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cpt_lightning import fused_loss
from cpt_lightning.fused_loss import cpu_half_precision_product, linear_cross_entropy
from cpt_lightning.objectives import CausalLM, MaskedLM
from custom_objectives import SpanMaskedLM
from helpers import packed_position_ids, tiny_module

VOCAB, DIM = 5000, 16


def head_tensors(rows: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, DIM, generator=g, requires_grad=True)
    weight = (torch.randn(VOCAB, DIM, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(VOCAB, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(VOCAB, (rows,), generator=g)
    return hidden, weight, b, labels


def test_one_chunks_logits_exist_at_a_time(monkeypatch):
    """The previous chunk's gradient (its logits, written over in place) was still held while the next chunk's logits
    were made: two [chunk, vocab] blocks at once, 0.6 GiB more at the default chunk of 4096 (docs/benchmarks.md)."""
    made, held_before_each, real_linear = [], [], F.linear

    def linear(*args, **kwargs):
        held_before_each.append(sum(logits() is not None for logits in made))
        logits = real_linear(*args, **kwargs)
        made.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(fused_loss.F, "linear", linear)
    hidden, weight, bias, labels = head_tensors(64, bias=True)
    linear_cross_entropy(hidden, weight, bias, labels, chunk_size=16)[0].backward()
    assert held_before_each == [0, 0, 0, 0]


def loss_and_grads(loss_fn, hidden, weight, bias, labels):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss, predictions = loss_fn(hidden, weight, bias, labels)
    loss.backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    return loss.detach(), predictions, grads


@pytest.fixture(params=["onednn-gemm", "no-onednn-gemm"])
def cpu_half_precision_gemm(request, monkeypatch):
    """Both CPU paths on any CPU: the native bf16/fp16 products (oneDNN has the GEMM), or the fp32 products
    rounded to bf16/fp16 that a CPU without it (AVX2) takes."""
    monkeypatch.setattr(fused_loss, "cpu_has_fast_gemm", lambda dtype: request.param == "onednn-gemm")


def dense(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels), logits.argmax(-1)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("chunk_size", [1, 7, 50, 4096])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_cross_entropy_in_fp32(chunk_size, bias, compiled):
    tensors = head_tensors(50, bias)
    expected = loss_and_grads(dense, *tensors)
    got = loss_and_grads(lambda *t: linear_cross_entropy(*t, chunk_size=chunk_size, compiled=compiled), *tensors)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    for g, e in zip(got[2], expected[2]):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_loss_is_accumulated_in_fp32(compiled, cpu_half_precision_gemm):
    """3,000 rows of ~ln(5000) = 8.5 nats: a bf16 running sum would be off by whole nats."""
    hidden, weight, bias, labels = head_tensors(3000, bias=True)
    expected, _ = dense(hidden.detach(), weight.detach(), bias.detach(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, bias, labels, chunk_size=256, compiled=compiled)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 0.02 * expected.item()
    loss.backward()
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype


def test_compiled_chunks_take_new_row_counts_without_recompiling():
    """MLM predicts a different number of positions every batch: one dynamic graph serves them all. From a fresh
    compile: one that earlier tests left behind had already recompiled to dynamic shapes."""
    fused_loss.compiled_softmax_cross_entropy.cache_clear()
    torch._dynamo.reset()
    tensors = head_tensors(48, bias=True)  # compiles with and without gradients, for whole chunks of 16 only
    linear_cross_entropy(*tensors, chunk_size=16, compiled=True)[0].backward()
    with torch.no_grad():
        linear_cross_entropy(*tensors, chunk_size=16, compiled=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (123, 64, 29):
            tensors = head_tensors(rows, bias=True, seed=rows)
            expected = loss_and_grads(dense, *tensors)
            got = loss_and_grads(lambda *t: linear_cross_entropy(*t, chunk_size=16, compiled=True), *tensors)
            torch.testing.assert_close(got[0], expected[0])
            for g, e in zip(got[2], expected[2]):
                torch.testing.assert_close(g, e)


def test_without_grad_mode_computes_no_gradients(monkeypatch):
    """Validation runs under no_grad with inputs that require gradients: no chunk may compute softmax − one-hot, its
    two matmuls and a V×d fp32 buffer that nothing reads (the loss would be the same)."""
    with_grad, chunk_parts = [], fused_loss.softmax_cross_entropy
    monkeypatch.setattr(fused_loss, "softmax_cross_entropy", lambda *parts: with_grad.append(parts[3]) or chunk_parts(*parts))
    hidden, weight, bias, labels = head_tensors(20, bias=True)
    with torch.no_grad():
        loss, predictions = linear_cross_entropy(hidden, weight, bias, labels, chunk_size=8)
    assert not loss.requires_grad and with_grad == [False, False, False]
    torch.testing.assert_close(loss, dense(hidden, weight, bias, labels)[0].detach())


def test_no_predicted_position_gives_a_zero_loss_that_backpropagates():
    hidden, weight, bias, labels = head_tensors(0, bias=True)
    loss, predictions = linear_cross_entropy(hidden, weight, bias, labels, chunk_size=8)
    loss.backward()
    assert loss.item() == 0.0 and predictions.numel() == 0


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 50000, (2, 40), generator=g)
    pos = torch.stack([packed_position_ids([25, 15]), packed_position_ids([40])])
    return {"input_ids": ids, "position_ids": pos}


def step_loss_and_grads(module, objective):
    module.set_objective(objective)
    module.zero_grad()
    loss, predictions, targets = module.objective_step(batch(), torch.Generator().manual_seed(5))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), predictions, targets, grads


@pytest.mark.parametrize("objective", [CausalLM, MaskedLM], ids=["clm", "mlm"])
def test_training_step_equals_the_dense_hugging_face_path(tokenizer_dir, objective):
    fused = tiny_module(tokenizer_dir, attn_implementation="sdpa", loss_chunk_size=16)
    dense_module = tiny_module(tokenizer_dir, attn_implementation="sdpa", loss_chunk_size=None)
    got = step_loss_and_grads(fused, objective())
    expected = step_loss_and_grads(dense_module, objective())
    assert fused.model.loss_chunk_size == 16 and dense_module.model.loss_chunk_size is None
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    assert got[3].keys() == expected[3].keys() and "model.decoder.bias" in got[3]
    for name in expected[3]:
        torch.testing.assert_close(got[3][name], expected[3][name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_objective_with_its_own_loss_gets_dense_logits(tokenizer_dir):
    class ScaledLoss(SpanMaskedLM):
        def loss(self, logits, labels):
            return 2.0 * super().loss(logits, labels)

    module = tiny_module(tokenizer_dir, attn_implementation="sdpa", loss_chunk_size=16)
    module.set_objective(ScaledLoss())
    assert module.model.loss_chunk_size is None
    scaled = step_loss_and_grads(module, ScaledLoss())[0]
    plain = step_loss_and_grads(module, SpanMaskedLM())[0]
    assert module.model.loss_chunk_size == 16
    torch.testing.assert_close(scaled, 2 * plain)


def test_frozen_inputs_get_no_gradient_and_the_others_stay_exact():
    hidden, weight, bias, labels = head_tensors(30, bias=True)
    weight.requires_grad_(False)  # e.g. frozen (tied) embeddings: the [V, d] weight gradient is skipped
    expected = loss_and_grads(dense, hidden, weight, bias, labels)
    got = loss_and_grads(lambda *t: linear_cross_entropy(*t, chunk_size=8), hidden, weight, bias, labels)
    assert weight.grad is None and len(got[2]) == 2
    for g, e in zip(got[2], expected[2]):
        torch.testing.assert_close(g, e)


def test_a_second_backward_says_it_is_not_supported():
    hidden, weight, bias, labels = head_tensors(10, bias=False)
    loss, _ = linear_cross_entropy(hidden, weight, bias, labels, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward is not supported"):
        loss.backward()


def test_gradients_are_scaled_by_the_upstream_gradient():
    """Lightning divides each micro-batch's loss by the accumulated count before backward (and a custom
    objective may weigh it): the gradients computed in forward must be multiplied by what comes back."""
    tensors = head_tensors(30, bias=True)
    expected = loss_and_grads(lambda *t: tuple((0.25 * dense(*t)[0], None)), *tensors)
    got = loss_and_grads(lambda *t: (0.25 * linear_cross_entropy(*t, chunk_size=8)[0], None), *tensors)
    torch.testing.assert_close(got[0], expected[0])
    for g, e in zip(got[2], expected[2]):
        torch.testing.assert_close(g, e)


def test_bf16_weights_keep_the_loss_and_the_weight_gradient_in_fp32(cpu_half_precision_gemm):
    """FSDP2 with param_dtype bfloat16 hands the fused loss bf16 weights: the loss is still fp32 (and as
    exact as the fp32 reference within bf16 logits' rounding), the [V, d] gradient is summed over the
    chunks in fp32 and rounded to bf16 once (summed in bf16 over 94 chunks it is off by ~2%: 1.9e-2
    against 2.9e-3 here)."""
    hidden, weight, bias, labels = head_tensors(3000, bias=True)
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    reference = [t.detach().float().requires_grad_() for t in bf16]
    expected = F.cross_entropy(F.linear(*reference), labels)
    expected.backward()
    loss, _ = linear_cross_entropy(*bf16, labels, chunk_size=32)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 1e-4 * expected.item()
    for got, want in zip(bf16, reference):
        assert got.grad.dtype == torch.bfloat16
        assert (got.grad.float() - want.grad).norm() < 7e-3 * want.grad.norm()


def test_the_decoder_bias_gradient_is_summed_over_the_chunks_in_fp32():
    """Under bf16 autocast each chunk's bias gradient (a sum over its rows) is taken in fp32: summed in bf16 it was
    5 to 6 times further from the exact one (9.2e-4 against 1.4e-4 here; small logits, so that the bf16 rounding
    of the logits themselves does not hide it)."""
    g = torch.Generator().manual_seed(0)
    rows, vocab, dim = 1024, 8192, 64
    hidden, weight = torch.randn(rows, dim, generator=g), torch.randn(vocab, dim, generator=g) * 0.05
    labels = torch.randint(vocab, (rows,), generator=g)
    exact = torch.softmax(hidden.double() @ weight.double().T, -1)
    exact[torch.arange(rows), labels] -= 1
    exact = exact.sum(0) / rows
    bias = torch.zeros(vocab, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), bias, labels, chunk_size=256)
    loss.backward()
    assert (bias.grad.double() - exact).norm() < 4e-4 * exact.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_products_on_cpu_have_the_half_precision_gemms_values(dtype):
    """Computed in fp32 and rounded once, the products equal the native GEMM's but for the order of the
    fp32 additions: nearly every value bit-identical, the others one unit in the last place away, or
    within fp32 rounding of the 16 summed terms where they cancel to near 0."""
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(64, 16, generator=g), torch.randn(16, 3000, generator=g) * 0.5, torch.randn(3000, generator=g)
    for native, ours, magnitude in (
        (a.to(dtype) @ b.to(dtype), cpu_half_precision_product(a, b, dtype), a.abs() @ b.abs()),
        (torch.addmm(bias.to(dtype), a.to(dtype), b.to(dtype)), cpu_half_precision_product(a, b, dtype, bias),
         a.abs() @ b.abs() + bias.abs()),
    ):
        assert ours.dtype == dtype
        ulp = torch.maximum((torch.nextafter(native, native.new_tensor(float("inf"))) - native).abs(),
                            (torch.nextafter(native, native.new_tensor(float("-inf"))) - native).abs())
        assert ((ours.float() - native.float()).abs() <= torch.maximum(ulp.float(), 1e-6 * magnitude)).all()
        assert (ours == native).float().mean() > 0.999


@pytest.mark.parametrize("setting", ["autocast", "bf16-weights"])
def test_the_fused_loss_on_cpu_gives_what_the_native_half_precision_gemms_give(setting, monkeypatch):
    """Lightning's bf16-mixed (autocast) and FSDP2's bf16 weights both run the decoder's products in bf16; on a
    CPU without oneDNN's bf16 GEMM they run in fp32 and are rounded to bf16: the same loss, predictions and
    gradients as the native bf16 GEMMs, within the rounding of a few values by one unit in the last place."""
    tensors = head_tensors(600, bias=True)
    if setting == "bf16-weights":
        tensors = (*[t.detach().bfloat16().requires_grad_() for t in tensors[:3]], tensors[3])
    context = torch.autocast("cpu", dtype=torch.bfloat16) if setting == "autocast" else contextlib.nullcontext()
    results = {}
    with context:
        for fast in (False, True):
            monkeypatch.setattr(fused_loss, "cpu_has_fast_gemm", lambda dtype: fast)
            assert fused_loss.half_precision_on_cpu(tensors[0]) == (None if fast else torch.bfloat16)
            results[fast] = loss_and_grads(lambda *t: linear_cross_entropy(*t, chunk_size=128), *tensors)
    upcast, native = results[False], results[True]
    torch.testing.assert_close(upcast[0], native[0], rtol=1e-5, atol=0)
    assert (upcast[1] == native[1]).float().mean() > 0.99
    for got, want in zip(upcast[2], native[2]):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).norm() < 1e-2 * want.float().norm()


@pytest.mark.parametrize("fast", [True, False], ids=["onednn-gemm", "no-onednn-gemm"])
def test_the_cpu_products_are_computed_in_fp32_only_without_a_fast_half_precision_gemm(fast, monkeypatch):
    """On a CPU whose oneDNN has the bf16 (fp16) GEMM the products stay native: there they are faster than
    fp32 (8 against 36 ms on an AVX512-BF16 CPU), while the fallback GEMM of an AVX2 CPU is 7× slower."""
    assert fused_loss.cpu_has_fast_gemm(torch.bfloat16) in (True, False)  # PyTorch's probes exist on this build
    assert fused_loss.cpu_has_fast_gemm(torch.float16) in (True, False)
    with monkeypatch.context() as switched_off:  # PyTorch's fallback GEMM then, whatever the CPU
        switched_off.setattr(torch.backends.mkldnn, "enabled", False)
        assert not fused_loss.cpu_has_fast_gemm(torch.bfloat16) and not fused_loss.cpu_has_fast_gemm(torch.float16)
    assert torch.backends.mkldnn.enabled
    asked = []
    monkeypatch.setattr(fused_loss, "cpu_has_fast_gemm", lambda dtype: asked.append(dtype) or fast)
    hidden = torch.zeros(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_loss.half_precision_on_cpu(hidden) == (None if fast else torch.bfloat16)
    assert fused_loss.half_precision_on_cpu(hidden.half()) == (None if fast else torch.float16)
    assert fused_loss.half_precision_on_cpu(hidden) is None  # fp32 products run as they are
    assert asked == [torch.bfloat16, torch.float16]


def test_a_target_of_id_zero_is_predicted_like_any_other(tokenizer_dir):
    """Only labels of -100 are left out: id 0 is an ordinary token in ModernBERT's vocabulary."""
    module = tiny_module(tokenizer_dir, attn_implementation="sdpa", loss_chunk_size=16)
    module.set_objective(CausalLM())
    rows = batch()
    rows["input_ids"][:, 10:13] = 0
    labels = CausalLM().build_inputs(rows["input_ids"], rows["position_ids"], None)[1]
    with torch.no_grad():
        _, predictions, targets = module.objective_step(rows, torch.Generator().manual_seed(5))
    assert (targets == 0).sum() == 6 and torch.equal(targets, labels[labels != -100]) and len(predictions) == len(targets)


def test_the_fused_forward_hands_on_the_kernel_arguments_and_the_compile_setting(tokenizer_dir, monkeypatch):
    """FlashAttention's varlen boundaries and is_causal reach the encoder as extra keyword arguments (CPU's SDPA
    takes none: a stand-in one here); ``compile: true`` reaches the fused loss (run eager here, for speed)."""
    import cpt_lightning.masked_lm as masked_lm

    module = tiny_module(tokenizer_dir, attn_implementation="sdpa", loss_chunk_size=16)
    module.model.compile_loss = True
    kernel_arguments, compile_settings = [], []
    encoder_forward, fused_loss = module.model.model.forward, masked_lm.linear_cross_entropy
    monkeypatch.setattr(module.model.model, "forward", lambda *args, varlen=None, **kwargs: (
        kernel_arguments.append(varlen) or encoder_forward(*args, **kwargs)))
    monkeypatch.setattr(masked_lm, "linear_cross_entropy", lambda *args: (
        compile_settings.append(args[-1]) or fused_loss(*args[:-1])))
    rows = batch()
    output = module.model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], labels=rows["input_ids"],
                          varlen="cu_seqlens")
    assert kernel_arguments == ["cu_seqlens"] and compile_settings == [True] and output.loss > 0


def test_the_fp32_stand_in_for_a_slow_half_precision_gemm_is_for_cpus_only(monkeypatch):
    """A GPU node whose host CPU lacks oneDNN's bf16 GEMM ran the decoder products of the CLM head in fp32 on the GPU."""
    monkeypatch.setattr(fused_loss, "cpu_has_fast_gemm", lambda dtype: False)
    on = lambda device: SimpleNamespace(device=torch.device(device), dtype=torch.bfloat16)  # noqa: E731
    assert fused_loss.half_precision_on_cpu(on("cpu")) == torch.bfloat16
    assert fused_loss.half_precision_on_cpu(on("cuda")) is None
