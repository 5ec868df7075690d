"""The objective protocol: what a training objective must say so the module can run it.

An objective turns a packed batch into model inputs and per-position targets, and names the
attention it needs. The module does the rest (masks, encoder, head on predicted positions only,
logging under ``objective.name``), so a custom objective is a small class named by ``class_path``.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from cpt_lightning.attention import AttentionKind
from cpt_lightning.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer ids an objective may need; filled in by the module from the real tokenizer."""

    mask_id: int | None
    special_ids: tuple[int, ...]  # never masked, never drawn as a random token ([CLS], [MASK], [unused0], unassigned ids)
    vocab_size: int  # ids [0, vocab_size) minus special_ids are the ordinary tokens


class Objective(ABC):
    """One training objective. Subclasses set ``name`` (logging prefix) and ``attention``."""

    name: str
    attention: AttentionKind

    def bind(self, tokens: TokenizerFacts) -> None:
        """Receive the tokenizer facts before the first batch (override to validate them)."""
        self.tokens = tokens

    @abstractmethod
    def build_inputs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(model_input_ids, labels)``, both ``[B, L]``; ``labels == IGNORE_INDEX`` is not predicted."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss over the predicted positions only: ``logits [N, V]``, ``labels [N]`` → the mean over the N positions,
        a 0-dimensional float tensor (the module weighs micro-batches by N, logs exp(loss) as the perplexity and the
        argmax of the logits as the predictions)."""
        return F.cross_entropy(logits.float(), labels)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "tokens" and not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def objective_settings(objective: Objective) -> dict[str, bool | int | float | None]:
    """The objective's numeric and boolean constructor arguments it keeps under their own names
    (``mask_rate``...), the settings a config gives it; read back from the object, as its state
    (counters, tokenizer facts) is not. Strings are left out: often paths, which move with the machine."""
    parameters = inspect.signature(type(objective).__init__).parameters
    return {
        name: getattr(objective, name) for name in sorted(parameters)
        if name != "self" and isinstance(getattr(objective, name, ...), (bool, int, float, type(None)))
    }


OBJECTIVE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_objective(objective: Objective) -> None:
    """Refuse what the module would misread: the mask builders treat any attention but "causal" as
    bidirectional (a typo such as "casual" let next-token labels see the future), and the name
    prefixes the curves, LayerFreeze's ``during`` and the phase-end export folders."""
    kind = type(objective).__name__
    name = getattr(objective, "name", None)
    if not isinstance(name, str) or not name:
        raise UserError(f"{kind}.name={name!r}: must be a non-empty name (it prefixes the curves: train/<name>_loss)")
    if not OBJECTIVE_NAME.fullmatch(name):  # val/span/5_loss read as source "span"; "span.5" failed at its switch (a
        # torch module key), after the phases before it trained; 300 characters failed at its phase-end export
        raise UserError(f"{kind}.name={name!r}: must be 1 to 64 letters, digits, '_' or '-' (it names the curves, "
                        "train/<name>_loss, the phase-end export folders, phase<i>-<name>, and a torch module key, "
                        "which cannot hold '.')")
    if isinstance(objective, nn.Module):  # registered as the module's own: checkpoints of its phase loaded under no
        raise UserError(f"{kind} is a torch.nn.Module: an objective is a plain class (subclass "  # other objective
                        "cpt_lightning.objectives.Objective only); keep any module it uses as an attribute")
    check_holds_no_weights(objective)
    attention = getattr(objective, "attention", None)
    if attention not in get_args(AttentionKind):
        raise UserError(f"{kind}.attention={attention!r}: must be 'causal' or 'bidirectional'")
    for method, arguments in (("build_inputs", "input_ids, position_ids, generator"), ("loss", "logits, labels")):
        try:  # a method written to another signature failed at the first batch in a 70-line traceback
            inspect.signature(getattr(objective, method)).bind(*arguments.split(", "))
        except TypeError:
            raise UserError(f"{kind}.{method}{inspect.signature(getattr(objective, method))} cannot be called as "
                            f"{method}({arguments}): see docs/objectives.md") from None


def check_holds_no_weights(objective: Objective) -> None:
    """The optimizer never holds an objective's weights: they were never trained, and their gradient only grew until
    the run stopped."""
    learned = [key for key, value in vars(objective).items() if _trainable(value)]
    if learned:
        raise UserError(f"{type(objective).__name__}.{', '.join(learned)}: trainable weights in an objective are "
                        "neither optimised nor checkpointed; put learned parts in the model, or set "
                        "requires_grad=False on fixed ones")


def bind_checked(objective: Objective, tokens: TokenizerFacts) -> None:
    """``objective.bind(tokens)``, then the weights check again: a weight sized by the vocabulary is made there. A
    ``bind`` that does not call ``super().bind`` failed at the first batch, in a traceback about ``self.tokens``."""
    objective.bind(tokens)
    if not isinstance(getattr(objective, "tokens", None), TokenizerFacts):  # its own (a replace()d copy) will do
        raise UserError(f"{type(objective).__name__}.bind does not call super().bind(tokens), which keeps the "
                        "tokenizer facts as self.tokens for build_inputs: add it (docs/objectives.md)")
    check_holds_no_weights(objective)


def _trainable(value, within: bool = False) -> bool:
    """A module with a trainable parameter or a tensor that requires grad, itself or (one level down) in a list,
    tuple or dict."""
    if isinstance(value, nn.Module):
        return any(parameter.requires_grad for parameter in value.parameters())
    if isinstance(value, (list, tuple, dict)) and not within:
        return any(_trainable(item, within=True) for item in (value.values() if isinstance(value, dict) else value))
    return isinstance(value, torch.Tensor) and value.requires_grad
