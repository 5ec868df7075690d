"""The ``--device`` option of the tools that run models outside the trainer (evaluate, analyze)."""

from __future__ import annotations

import torch

from cpt_lightning.errors import UserError, one_line


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when there is one, else cpu) or a torch device name that this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here")
    if device.type == "meta":  # tensors without storage: a traceback once the first loss or score was read
        raise UserError(f"--device {name}: holds no data, only shapes; give cpu, cuda or auto")
    try:  # mps on a torch without it, cuda:3 on a 2-GPU node: a traceback once the first model had loaded
        torch.empty(0, device=device)
    except Exception as err:  # each backend its own: RuntimeError (mps), AssertionError (xpu), ModuleNotFoundError (hpu)
        # its first sentence only: torch's dispatcher then lists ~90 backends
        raise UserError(f"--device {name}: not usable here ({one_line(err).split('. ')[0]})") from None
    return device


def host_scalar(value: float) -> torch.Tensor:
    """A value for ``self.log`` that costs the GPU nothing: ``self.log`` turns a Python number into a tensor
    on the module's device (a host-to-GPU copy that waits for all queued work) and Lightning reads logged
    values back with ``.item()`` (another wait, at every micro-batch for progress-bar values); a CPU tensor
    stays on the CPU, and reading it waits for nothing."""
    return torch.tensor(float(value), dtype=torch.float32)
