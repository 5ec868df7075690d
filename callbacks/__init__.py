"""Callbacks named in YAML (``class_path: callbacks.ObjectiveSchedule``)."""

from callbacks.global_batch import GlobalBatch
from callbacks.layer_freeze import LayerFreeze
from callbacks.loss_spikes import LossSpikeMonitor
from callbacks.lr_monitor import StepLearningRateMonitor
from callbacks.non_finite_guard import NonFiniteGuard
from callbacks.objective_schedule import ObjectiveSchedule, Phase
from callbacks.phase_end_export import PhaseEndExport
from callbacks.preemption import PreemptionCheckpoint
from callbacks.progress import PhaseProgressBar
from callbacks.step_timer import StepTimer
from callbacks.throughput import TokenThroughput
from callbacks.token_checkpoint import TokenCheckpoint
from callbacks.token_validation import TokenValidation

__all__ = ["GlobalBatch", "LayerFreeze", "LossSpikeMonitor", "NonFiniteGuard", "ObjectiveSchedule", "Phase", "PhaseEndExport",
           "PhaseProgressBar", "PreemptionCheckpoint", "StepLearningRateMonitor", "StepTimer", "TokenCheckpoint", "TokenThroughput", "TokenValidation"]
