"""Downstream evaluation: fine-tune encoders on NER / classification tasks, report F1 over seeds.

``tasks`` (YAML) → ``data`` (JSONL / CoNLL readers) → ``features`` (tokenize, align) →
``finetune`` (train, select on dev, score) → ``metrics`` (F1) → ``report`` (tables); ``cli`` ties
them together and ``pubmed_tasks`` builds real offline tasks from the PubMed sample.
"""

from cpt_lightning.evaluate.cli import main

__all__ = ["main"]
