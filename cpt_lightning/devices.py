"""The ``--device`` option of the tools that run models outside the trainer (evaluate, analyze)."""

from __future__ import annotations

import torch

from cpt_lightning.errors import UserError


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
    return device
