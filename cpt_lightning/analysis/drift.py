"""Per-layer relative weight change ‖W − W_base‖_F / ‖W_base‖_F, layers as the encoder numbers them.

A layer's parameters (attention, MLP, norms) are concatenated into one vector before taking norms,
so a layer counts as one unit whatever its parameter mix. The embeddings are reported as layer −1;
the final norm and the MLM head/decoder are not part of any layer.
"""

from __future__ import annotations

import re

import torch

from cpt_lightning.errors import UserError

EMBEDDINGS = -1
# keys of ModernBertModel ("layers.3.attn.Wo.weight") and of the MaskedLM wrapper ("model.layers.3...")
_LAYER_KEY = re.compile(r"^(?:model\.)*(?:layers\.(\d+)|embeddings)\.")


def layer_of(key: str) -> int | None:
    """Layer index of a state-dict key: −1 for embeddings, i for ``layers.i.``, None otherwise."""
    match = _LAYER_KEY.match(key)
    if match is None:
        return None
    return EMBEDDINGS if match.group(1) is None else int(match.group(1))


def group_by_layer(state_dict: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Parameters per layer, keyed by their name without the wrapper's ``model.`` prefix."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        layer = layer_of(key)
        if layer is not None:
            groups.setdefault(layer, {})[re.sub(r"^(?:model\.)+", "", key)] = value
    return groups


def relative_drift(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[int, float]:
    """‖ΔW‖_F / ‖W_base‖_F per layer, over the layer's concatenated parameters (float64)."""
    base_groups, other_groups = group_by_layer(base), group_by_layer(other)
    if base_groups.keys() != other_groups.keys():
        raise UserError(f"models have different layers: {sorted(base_groups)} vs {sorted(other_groups)}")
    return {layer: _layer_drift(base_groups[layer], other_groups[layer]) for layer in sorted(base_groups)}


def _layer_drift(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    if base.keys() != other.keys():
        raise UserError(f"other parameters ({sorted(base.keys() ^ other.keys())[:3]}); weight drift needs one architecture")
    for key in base:
        if base[key].shape != other[key].shape:
            raise UserError(f"{key} is {list(other[key].shape)}, not {list(base[key].shape)}; weight drift needs one "
                            "architecture")
    change = sum(((other[k].double() - base[k].double()) ** 2).sum() for k in base)
    size = sum((base[k].double() ** 2).sum() for k in base)
    return (change / size).sqrt().item()
