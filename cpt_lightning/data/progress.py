"""Live counters shared by the tokenizing workers, shown as a docs/s · tokens/s progress bar.

litdata's own bar counts work items (one per worker here), which says nothing while a shard is
being tokenized; the workers add to shared integers instead and a thread in the parent draws them.
Where stderr is not a terminal (a batch job's log), tqdm draws nothing, so a line is printed every
``line_interval`` seconds instead.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import time
from datetime import timedelta

from tqdm import tqdm

FIELDS = ("documents", "tokens", "blocks", "dropped", "empty", "invalid_utf8", "failed", "shards_done", "refused_errno")


class SharedCounters:
    """Integers every worker adds to (fork-inherited shared memory, one lock)."""

    def __init__(self):
        self._values = mp.get_context("fork").Array("q", len(FIELDS))

    def add(self, **amounts: int) -> None:
        with self._values.get_lock():
            for name, amount in amounts.items():
                self._values[FIELDS.index(name)] += amount

    def set_first(self, name: str, value: int) -> None:
        """Set ``name`` unless a worker already has (the first failure's errno: a sum of two would be another)."""
        with self._values.get_lock():
            if not self._values[FIELDS.index(name)]:
                self._values[FIELDS.index(name)] = value

    def __getitem__(self, name: str) -> int:
        return self._values[FIELDS.index(name)]

    def snapshot(self) -> dict[str, int]:
        with self._values.get_lock():
            return dict(zip(FIELDS, self._values[:]))


class ProgressBar:
    """Context manager drawing ``counters`` against ``total`` records until the block exits."""

    def __init__(self, counters: SharedCounters, total: int, label: str, interval: float = 0.5,
                 line_interval: float = 60.0):
        self.counters, self.interval, self.total, self.label = counters, interval, total, label
        self.bar = tqdm(total=total, desc=label, unit=" docs", dynamic_ncols=True, disable=None, smoothing=0.1)
        self.line_interval = line_interval if self.bar.disable else None  # tqdm's disable=None: not a terminal
        self.start = self._last_line = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._draw(self.counters.snapshot())
        self.bar.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            counts = self.counters.snapshot()
            self._draw(counts)
            if self.line_interval is not None and time.perf_counter() - self._last_line >= self.line_interval:
                self._print_line(counts)

    def _draw(self, counts: dict[str, int]) -> None:
        self.bar.update(documents_read(counts) - self.bar.n)
        self.bar.set_postfix_str(f"{counts['tokens'] / max(self.elapsed, 1e-9) / 1e6:.2f}M tokens/s", refresh=False)

    def _print_line(self, counts: dict[str, int]) -> None:
        seen, elapsed = documents_read(counts), self.elapsed
        left = f", {timedelta(seconds=round(elapsed * (self.total - seen) / seen))} left" if seen else ""
        print(f"{self.label}: {seen:,} of {self.total:,} documents ({seen / max(self.total, 1):.1%}), "
              f"{counts['tokens']:,} tokens, {counts['tokens'] / elapsed / 1e6:.2f}M tokens/s{left}", file=sys.stderr)
        self._last_line = time.perf_counter()


def documents_read(counts: dict[str, int]) -> int:
    """Those tokenized and those skipped (empty, invalid UTF-8): the documents of the total read so far."""
    return counts["documents"] + counts["empty"] + counts["invalid_utf8"]
