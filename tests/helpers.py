"""Tiny, randomly initialised ModernBERT models and packed batches for CPU tests, and the stand-ins several test
files share."""

from __future__ import annotations

import errno
import io
import os
import socket
import sys

import torch

from cpt_lightning import EncoderPretraining

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=512,
    global_attn_every_n_layers=2,  # layers: full, sliding, full
    local_attention=16,  # sliding_window = 8: short rows already exceed it
)


class Terminal(io.StringIO):
    """A stream that says it is a terminal: progress bars draw there and print no lines."""

    def isatty(self) -> bool:
        return True


def tiny_module(tokenizer_dir: str, **overrides) -> EncoderPretraining:
    model_config = {**TINY, **overrides.pop("model_config", {})}
    torch.manual_seed(0)
    return EncoderPretraining(model_config=model_config, tokenizer=str(tokenizer_dir), **overrides)


def packed_position_ids(lengths: list[int]) -> torch.Tensor:
    """Position ids of one packed row holding documents of the given lengths."""
    return torch.cat([torch.arange(n) for n in lengths])


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's or torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(line: str) -> None:
    """A line of a multi-process test script's output in one write: print writes its text and newline apart, and
    another rank's line came in between ("3.654947519302368rank 1 trained 2 steps")."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def same_files(checkpoint, other) -> bool:
    """Whether two checkpoints (files, or sharded checkpoints' folders) are the same files under two names."""
    if checkpoint.is_file():
        return checkpoint.samefile(other)
    names = sorted(path.relative_to(checkpoint) for path in checkpoint.rglob("*") if path.is_file())
    return names == sorted(path.relative_to(other) for path in other.rglob("*") if path.is_file()) and all(
        (checkpoint / name).samefile(other / name) for name in names)


def open_descriptors() -> int:
    """This process's open file descriptors: a write or lock that keeps one ends a long run at the open-files limit."""
    return len(os.listdir("/proc/self/fd"))


def without_flock(monkeypatch) -> None:
    """Lustre mounted without -o flock, some NFS: flock answers ENOSYS."""
    import fcntl

    def unsupported(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)


def without_exchange(patch, answer: int = errno.EINVAL) -> None:
    """NFS, a kernel before 3.15: renameat2 answers EINVAL to its flags, and folders are replaced by two renames.
    ``patch``: pytest's ``monkeypatch.setattr``, or ``mock.patch.object(...).start`` in a process a test starts."""
    import ctypes

    import cpt_lightning.atomic

    class WithoutExchange:
        @staticmethod
        def renameat2(*args):
            ctypes.set_errno(answer)
            return -1

    patch(cpt_lightning.atomic, "_libc", lambda: WithoutExchange)


def in_a_finalizer(action) -> None:
    """Run ``action`` where Python ignores what it raises, as in an at-fork hook: a finalizer. Python hands the
    exception to ``sys.unraisablehook`` ("Exception ignored") and goes on; a signal handler's exception is lost."""

    class Finalizer:
        def __del__(self):
            action()

    Finalizer()
