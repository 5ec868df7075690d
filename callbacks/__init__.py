"""Callbacks named in YAML (``class_path: callbacks.ObjectiveSchedule``)."""

from callbacks.layer_freeze import LayerFreeze
from callbacks.non_finite_guard import NonFiniteGuard
from callbacks.objective_schedule import ObjectiveSchedule, Phase
from callbacks.throughput import TokenThroughput

__all__ = ["LayerFreeze", "NonFiniteGuard", "ObjectiveSchedule", "Phase", "TokenThroughput"]
