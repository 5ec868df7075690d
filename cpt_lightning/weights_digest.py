"""A model folder's weights by content: which row of a ``cpt evaluate`` table is the model ``cpt export`` writes.

A folder's name cannot say it: the model evaluated is usually an earlier export of the same checkpoint in
another folder, and a folder re-exported from another checkpoint keeps its name. The files' bytes cannot
either: a writer's metadata and tensor order differ between versions. So the digest covers each tensor's
name, dtype, shape and bytes, read from the safetensors files without loading them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

CHUNK = 1 << 24


def weights_digest(folder: str | Path) -> str | None:
    """SHA-256 over the tensors of ``folder``'s ``*.safetensors`` files (one or sharded); None for a folder
    without any (a hub name, a folder of ``.bin`` files)."""
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        tensors.update({name: (file, 8 + length, spec) for name, spec in header.items()})
    if not tensors:
        return None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        file, data_start, spec = tensors[name]
        digest.update(json.dumps([name, spec["dtype"], spec["shape"]]).encode())
        begin, end = spec["data_offsets"]
        with file.open("rb") as f:
            f.seek(data_start + begin)
            for offset in range(begin, end, CHUNK):
                digest.update(f.read(min(CHUNK, end - offset)))
    return digest.hexdigest()


def update_with_file(digest, path: str | Path) -> None:
    """Feeds a file's bytes to ``digest`` a chunk at a time: a model's weights need not fit in memory."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
