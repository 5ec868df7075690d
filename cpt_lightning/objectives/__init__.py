"""Training objectives. Custom ones subclass :class:`Objective` and are named by ``class_path``."""

from cpt_lightning.objectives.base import (IGNORE_INDEX, Objective, TokenizerFacts, bind_checked, check_objective,
                                           objective_settings)
from cpt_lightning.objectives.causal import CausalLM
from cpt_lightning.objectives.masked import MaskedLM

__all__ = ["IGNORE_INDEX", "CausalLM", "MaskedLM", "Objective", "TokenizerFacts", "bind_checked", "check_objective",
           "objective_settings"]
