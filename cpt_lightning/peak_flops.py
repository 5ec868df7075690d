"""One device's peak dense FLOP/s in the dtype its matmuls run in: the denominator of MFU.

Lightning's table (``get_available_flops``) is taken, except for Hopper chips where it gives the
figures *with sparsity* (twice the dense ones: an "NVIDIA H100 NVL" 1,978.8 TFLOP/s bf16) or none
(a plain "NVIDIA H200"); MFU against a sparse peak reads half of what it is. The dtype is the one
the matmuls run in: autocast's under ``*-mixed``, else FSDP2's ``param_dtype`` where set (under
``32-true`` the precision plugin says float32 while the matmuls run in bf16, and MFU against the
fp32 peak read 15× too high).
"""

from __future__ import annotations

import torch

# NVIDIA's datasheets, dense (without sparsity), TFLOP/s
HOPPER_DENSE_TFLOPS = {
    "h100 nvl": {torch.bfloat16: 835.5, torch.float16: 835.5, "tfloat32": 417.5, torch.float32: 60.0},
    "h200 nvl": {torch.bfloat16: 835.5, torch.float16: 835.5, "tfloat32": 417.5, torch.float32: 60.0},
    "h200": {torch.bfloat16: 989.4, torch.float16: 989.4, "tfloat32": 494.7, torch.float32: 66.9},  # SXM
}


def compute_dtype(trainer) -> torch.dtype:
    """What the matmuls run in: autocast's dtype under a ``*-mixed`` precision (it casts whatever FSDP2 gathers:
    ``param_dtype: float32`` beside ``bf16-mixed`` read as fp32, MFU 15× too high), else FSDP2's ``param_dtype``
    where set, else the precision plugin's."""
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision):
        return _plugin_to_compute_dtype(plugin)
    return getattr(trainer.strategy, "param_dtype", None) or _plugin_to_compute_dtype(plugin)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of ``device`` in ``dtype``; None where no figure is known (a CPU, an unlisted GPU)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    chip = _hopper_chip(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if chip is None:
        return get_available_flops(device, dtype)
    tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
    tflops = HOPPER_DENSE_TFLOPS[chip].get("tfloat32" if tf32 else dtype)
    return None if tflops is None else tflops * 1e12


def _hopper_chip(name: str) -> str | None:
    """The table's key for a Hopper chip whose figure Lightning lacks or gives with sparsity."""
    name = name.lower()
    if "h200" in name:  # an "NVIDIA GH200 480GB" too: its GPU computes as the H100 SXM and H200 do (989.4 bf16)
        return "h200 nvl" if "nvl" in name else "h200"
    if "h100" in name and "nvl" in name:
        return "h100 nvl"
    return None
