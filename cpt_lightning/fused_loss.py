"""Cross-entropy through the tied decoder, chunk by chunk, so the ``[N, vocab]`` logits never exist at once.

The CLM detour predicts every position: at 8192 tokens × 8 rows × 50,368 ids the logits alone are
13 GB in fp32, plus their gradient. Here the decoder matmul, the loss and its gradients run on
``chunk_size`` rows at a time; the gradients are computed in the forward pass (softmax − one-hot
is all backward needs), so there is no recomputation: three matmuls per chunk, as in the dense path.

Why not ``torch.nn.functional.linear_cross_entropy``: its chunked path accumulates the loss value
in the input dtype, so with bf16 inputs the reported loss is wrong (4.0 instead of 10.8 for 3,000
rows of a 50k vocabulary; its gradients are right). The loss is what training logs and what the
spike/non-finite guards watch, so it is accumulated in fp32 here.

On a CPU whose oneDNN has no bf16/fp16 GEMM (AVX2 for bf16; most CPUs for fp16) the three products run in
fp32 when they would run in that dtype (:func:`cpu_half_precision_product`): PyTorch's fallback GEMM is
emulated, and it was most of a bf16 step there. CPUs that have it (AVX512, AMX) keep the native products.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, with_grad: bool):
    """One chunk's cross-entropy parts: summed loss (fp32), argmax, and ``scale · (softmax − one-hot)``.

    The gradient comes back in the logits' dtype (None without ``with_grad``). Eager, everything is
    written in place on one fp32 copy of the logits; compiled (:func:`compiled_softmax_cross_entropy`)
    the same code becomes a few fused passes over the chunk instead of about ten.
    """
    logits32 = logits.float()
    target_logits = logits32.gather(1, labels[:, None]).squeeze(1)
    top, predictions = logits32.max(dim=-1)
    unnormalised = logits32.sub_(top[:, None]).exp_()  # the softmax numerator, reused for the gradient
    total = unnormalised.sum(dim=-1)
    loss = (top + total.log() - target_logits).sum()
    if not with_grad:
        return loss, predictions, None
    grad_logits = unnormalised.mul_((scale / total)[:, None])
    grad_logits[torch.arange(len(labels), device=labels.device), labels] -= scale
    return loss, predictions, grad_logits.to(logits.dtype)


def cpu_has_fast_gemm(dtype: torch.dtype) -> bool:
    """Whether PyTorch sends this CPU's ``dtype`` matmuls to oneDNN (the CPU probe inductor uses, and oneDNN not
    switched off by ``torch.backends.mkldnn.flags(enabled=False)``). Without it they take a slow fallback: on one
    CPU, 256 rows × width 32 × 50,368 ids took 8 ms in bf16 (oneDNN) and 36 ms in fp32, 216 ms in fp16 (no oneDNN
    fp16 there) and 279 ms in bf16 with oneDNN switched off; on an AVX2-only CPU, 540 ms in bf16, 77 ms in fp32."""
    supported = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and supported()


def half_precision_on_cpu(hidden: torch.Tensor) -> torch.dtype | None:
    """The bf16/fp16 dtype the decoder products of ``hidden`` would compute in on a CPU (autocast's where it is on,
    else the inputs') when this CPU has no fast GEMM for it; None otherwise (other devices, fp32, a fast GEMM),
    where the products run as they are."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    slow = device == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_gemm(dtype)
    return dtype if slow else None


def cpu_half_precision_product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, bias=None) -> torch.Tensor:
    """``a @ b (+ bias)`` with the values of a ``dtype`` GEMM, computed in fp32.

    Why: without oneDNN's GEMM for ``dtype`` (:func:`cpu_has_fast_gemm`) the matmul is emulated. Measured on an
    AVX2-only CPU (1 thread), the decoder product of 256 rows × 50,368 ids at width 32 took 540 ms in bf16 and
    77 ms in fp32, the gradient product 506 ms and 63 ms. The operands are rounded to ``dtype`` first (as
    autocast does), their products are exact in fp32, a half-precision GEMM accumulates in fp32 too, and the
    result is rounded to ``dtype`` once: only the order of the fp32 additions differs.
    """
    with torch.autocast(a.device.type, enabled=False):
        a32, b32 = a.to(dtype).float(), b.to(dtype).float()
        product = a32 @ b32 if bias is None else torch.addmm(bias.to(dtype).float(), a32, b32)
        return product.to(dtype)


@functools.cache
def compiled_softmax_cross_entropy():
    """:func:`softmax_cross_entropy` through ``torch.compile`` (as torchtitan compiles its loss), built once.

    ``dynamic=True``: the chunk's row count changes with every MLM batch (and in each last chunk),
    the scale is a tensor, so new batches reuse the graph instead of recompiling.
    """
    return torch.compile(softmax_cross_entropy, dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, wanted: tuple[bool, bool, bool], compiled: bool):
        rows = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        predictions = torch.empty(rows, dtype=torch.long, device=hidden.device)
        with_grads = any(wanted)
        scale = torch.full((), 1.0 / rows, dtype=torch.float32, device=hidden.device)  # d(mean)/d(each row's loss)
        chunk_parts = compiled_softmax_cross_entropy() if compiled else softmax_cross_entropy
        upcast = half_precision_on_cpu(hidden)
        if upcast:
            logits_of = functools.partial(cpu_half_precision_product, b=weight.t(), dtype=upcast, bias=bias)
            product = functools.partial(cpu_half_precision_product, dtype=upcast)
        else:
            logits_of = functools.partial(F.linear, weight=weight, bias=bias)
            product = torch.matmul
        grad_hidden = torch.empty_like(hidden) if wanted[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wanted[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wanted[2] else None
        for start in range(0, rows, chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden[part]
            chunk_loss, predictions[part], grad_logits = chunk_parts(logits_of(h), labels[part], scale, with_grads)
            loss += chunk_loss
            if grad_logits is None:
                continue
            if grad_hidden is not None:
                grad_hidden[part] = product(grad_logits, weight)
            if grad_weight is not None:
                grad_weight += product(grad_logits.t(), h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0, dtype=torch.float32)
            del grad_logits  # freed before the next chunk's logits exist: one [chunk, vocab] block at a time, not two
        ctx.grads = (  # consumed once by backward
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        ctx.mark_non_differentiable(predictions)
        return loss / rows, predictions

    @staticmethod
    def backward(ctx, grad_loss, _grad_predictions):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused loss's gradients were already consumed: a second backward is not supported")
        scaled = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*scaled, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, chunk_size: int,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, and the argmax predictions.

    ``hidden [N, d]``, ``weight [V, d]``, ``labels [N]`` (every row is predicted: select them first).
    The loss is fp32 whatever the input dtype; the predictions (for accuracy) come for free.
    The gradients are computed in forward for the inputs that require them and consumed by one backward.
    ``compiled`` runs each chunk's softmax/loss/gradient arithmetic through ``torch.compile``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] == 0:  # no predicted position: a zero loss that still reaches every input (same backward on every rank)
        zero = sum(t.sum() for t in (hidden, weight, bias) if t is not None) * 0.0
        return zero, labels.new_empty(0)
    wanted = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, wanted, compiled)
