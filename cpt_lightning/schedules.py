"""Learning-rate shapes expressed in tokens, the unit the recipe is written in.

A schedule maps *tokens seen* to a multiplier of the peak learning rate. Phases each bring their
own shape, restarted at the phase start (the optimizer state is not touched): the CLM detour is
linear warmup → constant, the MLM decay is 1−sqrt from peak to ``final_ratio`` of peak.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from typing import Literal

LRShape = Literal["constant", "sqrt_decay", "linear_decay"]


def steps_for(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that train ``tokens``, rounded up: a token count between steps is reached at the next step
    (phase ends, checkpoint and validation intervals)."""
    return math.ceil(tokens / tokens_per_step)


@dataclass(frozen=True)
class PhaseLR:
    """The learning-rate shape of one phase, over ``tokens`` tokens."""

    tokens: int
    shape: LRShape = "constant"
    warmup_tokens: int = 0
    final_ratio: float = 0.1

    def multiplier(self, tokens_into_phase: int) -> float:
        if tokens_into_phase < self.warmup_tokens:
            return tokens_into_phase / self.warmup_tokens
        if self.shape == "constant":
            return 1.0
        span = self.tokens - self.warmup_tokens  # 0 for a phase that is all warmup: past it, at its end value
        progress = min((tokens_into_phase - self.warmup_tokens) / span, 1.0) if span > 0 else 1.0
        decayed = 1.0 - (math.sqrt(progress) if self.shape == "sqrt_decay" else progress)
        return self.final_ratio + (1.0 - self.final_ratio) * decayed


class TokenSchedule:
    """Phases laid end to end; ``multiplier(tokens)`` uses the phase that ``tokens`` falls in.

    After the last phase the last phase's final value holds (a run may overshoot by one step).
    """

    def __init__(self, phases: list[PhaseLR]):
        if not phases:
            raise ValueError("a token schedule needs at least one phase")
        self.phases = list(phases)
        self.starts = [0]
        for phase in self.phases:
            self.starts.append(self.starts[-1] + phase.tokens)

    @property
    def total_tokens(self) -> int:
        return self.starts[-1]

    def phase_index(self, tokens: int) -> int:
        return min(bisect.bisect_right(self.starts, tokens) - 1, len(self.phases) - 1)

    def multiplier(self, tokens: int) -> float:
        index = self.phase_index(tokens)
        return self.phases[index].multiplier(tokens - self.starts[index])

    def on_step_grid(self, tokens_per_step: int) -> TokenSchedule:
        """The same phases with every boundary rounded up to a whole optimizer step.

        That is where a switch really happens, so each phase's shape starts at its first step (the
        MLM decay at exactly peak, not ~1.5% below it as a 0.4-step overrun of 50B tokens costs
        1−sqrt) and reaches its end value where the phase ends. A step takes the value at the tokens
        before it, as transformers' schedulers do, so the last step trains one step short of the floor
        (0.1003× peak over the English recipe's 1,590 MLM steps). A phase can come out empty (fewer
        tokens than a step).
        """
        ends = [steps_for(end, tokens_per_step) * tokens_per_step for end in self.starts[1:]]
        starts = [0, *ends[:-1]]
        return TokenSchedule([replace(p, tokens=end - start) for p, start, end in zip(self.phases, starts, ends)])


def warmup_then_constant(warmup_tokens: int) -> TokenSchedule:
    """The default for a run without phases: linear warmup, then the peak learning rate."""
    return TokenSchedule([PhaseLR(tokens=max(warmup_tokens, 1), warmup_tokens=warmup_tokens)])
