"""Callbacks named in YAML (``class_path: callbacks.ObjectiveSchedule``)."""

from callbacks.layer_freeze import LayerFreeze
from callbacks.objective_schedule import ObjectiveSchedule, Phase
from callbacks.throughput import TokenThroughput

__all__ = ["LayerFreeze", "ObjectiveSchedule", "Phase", "TokenThroughput"]
