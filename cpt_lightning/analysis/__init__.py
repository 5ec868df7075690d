"""``cpt analyze``: where continued pretraining changed an encoder — per-layer CKA and weight drift."""

from cpt_lightning.analysis.cli import main

__all__ = ["main"]
