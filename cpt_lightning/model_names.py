"""Telling a local model folder from a Hugging Face hub id before ``from_pretrained`` is asked.

``from_pretrained`` takes both. Given a mistyped folder it asks the hub, which offline retries for
tens of seconds and then blames the network instead of naming the missing folder.
"""

from __future__ import annotations

from pathlib import Path


def is_local_path(name: str) -> bool:
    """``name`` means a folder here: it exists, starts like a path (``.``, ``/``, ``~``), has more than one
    ``/`` (a hub id is ``ORG/NAME``), or its first part is a folder here (``runs/detuor``)."""
    path = Path(name)
    return (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))
