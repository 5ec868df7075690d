"""Exact resume for a weighted litdata mix that reads each source in passes of its own.

Six gaps in litdata 0.2.x, each closed by a small subclass or wrapper:

* litdata deals a source's rows to the loader workers differently by file system and pass: on a
  network file system (NFS, Lustre, GPFS, ...) whole chunks in fixed stripes, each worker cut to the
  smallest share (a source's short last chunks left most of it unread in every pass, and a worker
  dealt no chunk ended its rank's mix: that rank waited in a collective); on several nodes, from
  the second pass on, each node again the chunks it touched in the first (a chunk split between two
  nodes was read whole by both). ``EveryRowOncePerPass`` deals every pass of every source over all
  workers of all nodes, as litdata does on one node's local disk.

* A weighted ``CombinedStreamingDataset`` ends its epoch when any source runs out, and the next epoch
  reshuffles every source: a large source was read anew from a random start each epoch, so 0.82 passes
  of it read 59% of its rows. In ``WeightedMix`` a loader worker that has read its share of a source
  starts that source's next pass (litdata's next epoch of it, reshuffled) while the other sources go on
  where they are: each worker reads its share of a pass whole before any of it repeats, and the mix never ends.
* Lightning's training loop fetches one batch ahead when a loader has no length (a weighted
  ``CombinedStreamingDataset`` has none), so the state saved with a checkpoint already counts a
  batch the model never trained on (DESIGN §6). ``ResumableStreamingDataLoader`` remembers the
  position before its most recent batches and saves the one before the ``held_batches`` still
  held by the consumer.
* A source restores its loader workers from its *total* row count, assuming each worker drew the
  same share in turn; in a weighted mix each worker's share of a source is uneven, so rows would
  be repeated or skipped. The loader also saves each worker's exact count per source, counted on
  across passes, and ``ExactResumeStreamingDataset`` resumes every worker in its pass, at its row.
* The loader labels each batch with the next worker in turn, but once a worker's mix has ended (a source's
  next pass dealt it no rows) the others yield the remaining batches, so the per-worker counts it saves
  would belong to the wrong workers. Each batch carries the id of the worker that made it
  (``WorkerTaggedCollate``) and ``ResumableStreamingDataLoader`` files the counts under it.
* The mix draws each row's source from ``random.Random(seed)`` in every loader worker and every
  epoch, so all workers yield the same source pattern. ``WeightedMix`` seeds each from (seed, epoch,
  worker); litdata's resume replays the draws from that same seed, so exact resume is kept. Ranks keep
  one sequence on purpose: each rank holds the same row count per source, so a mix that does end (a
  worker with no rows in a source's next pass) ends on every rank at the same batch (otherwise a rank
  would wait in a collective), at the price of a step's mix varying as if it had 1/ranks of its rows.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util  # registers its exit handler on import: before stop_workers_at_exit's, so it runs after
import os
import signal
from collections import deque
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litdata.streaming.dataset as litdata_dataset
from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset
from litdata.streaming.combined import _CombinedDatasetIterator
from litdata.streaming.resolver import Dir
from litdata.streaming.shuffle import FullShuffle, NoShuffle, Shuffle
from litdata.utilities.env import _DistributedEnv, _WorkerEnv
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import get_worker_info

from cpt_lightning.data.manifest import index_digest
from cpt_lightning.errors import UserError

PER_WORKER = "cpt_rows_per_worker"
WORKER_KEY = "cpt_loader_worker"
INDEX_DIGEST = "cpt_index_sha256"  # a source's content as its position counts it: the rows of its chunks, in order


@dataclass(frozen=True)
class Layout:
    """Processes, loader workers per process and micro-batch: litdata deals a source's rows by them. The nodes are
    said, not compared: every pass deals as on one node (``EveryRowOncePerPass``), so 2 nodes × 2 GPUs resume as
    1 node × 4."""

    processes: int
    nodes: int = field(compare=False)
    workers: int
    micro_batch: int

    def __str__(self) -> str:
        return (f"{self.processes} process(es) on {self.nodes} node(s) × {self.workers} loader worker(s) × micro-batch "
                f"{self.micro_batch}")


def dealt_rows(shuffler, world: _DistributedEnv, workers: int, micro_batch: int, epoch: int, worker: int) -> int:
    """The rows pass ``epoch`` of a source deals loader ``worker`` of rank ``world.global_rank`` (0: its mix ends)."""
    _, intervals = shuffler.get_chunks_and_intervals_per_workers(world, workers, micro_batch, epoch)
    return sum(end - start for _, start, end, _ in intervals[world.global_rank * workers + worker])


def first_unread_pass(dataset: StreamingDataset, layout: Layout, epoch: int, counts: dict[int, int]) -> int:
    """The first of a source's passes (numbered from the loader ``epoch`` whose rows ``counts`` are counted from) that
    no loader worker of ``layout`` read into, ``counts`` holding each rank's worker's rows (the same on every rank).
    Each pass's shares are dealt by the source's own shuffler, as under that layout: they vary with the shuffle."""
    shuffler = dataset._create_shuffler(dataset._create_cache(_WorkerEnv(layout.workers, 0)))
    left = {(rank, worker): count for rank in range(layout.processes) for worker, count in counts.items() if count > 0}
    while left:  # the rows each worker has still to account for from this pass on
        for rank, worker in left:
            world = _DistributedEnv(layout.processes, rank, layout.nodes)
            share = dealt_rows(shuffler, world, layout.workers, layout.micro_batch, epoch, worker)
            left[rank, worker] -= share if share else left[rank, worker]  # dealt nothing: its mix ended there
        left = {key: count for key, count in left.items() if count > 0}
        epoch += 1
    return epoch


class EveryRowOncePerPass(FullShuffle):
    """litdata's ``FullShuffle`` as it is on one node: each pass shuffles the chunks anew and deals them, split where
    need be, over every loader worker of every node, so each row goes to one reader and every reader gets the same
    share (less than one micro-batch per reader left out). The nodes only chose node-local chunk sets there."""

    def get_chunks_and_intervals_per_workers(self, distributed_env: _DistributedEnv, num_workers: int,
                                             batch_size: int, current_epoch: int) -> Any:
        one_node = _DistributedEnv(distributed_env.world_size, distributed_env.global_rank, 1)
        return super().get_chunks_and_intervals_per_workers(one_node, num_workers, batch_size, current_epoch)


def prepared_folder(path: str) -> str | Dir:
    """A prepared folder as litdata's ``input_dir``: a path ending in ``.parquet`` (a folder named after its input,
    ``prepared/pubmed.parquet``) it reads as a Parquet file and looks for the index in the parent folder."""
    return Dir(path=str(Path(path).absolute().resolve())) if str(path).endswith(".parquet") else path


class ExactResumeStreamingDataset(StreamingDataset):
    def _create_shuffler(self, cache) -> Shuffle:
        shuffler = super()._create_shuffler(cache)
        if isinstance(shuffler, NoShuffle):
            return shuffler
        return EveryRowOncePerPass(cache, shuffler.seed, shuffler.drop_last, item_window=shuffler.item_window)

    def __iter__(self):
        if self._state_dict and PER_WORKER in self._state_dict:
            self._state_dict = self._in_its_pass(self._state_dict)
        return super().__iter__()

    def _in_its_pass(self, state: dict[str, Any]) -> dict[str, Any]:
        """The saved state with this worker's pass (litdata's ``current_epoch``) and its row count in it: the count
        runs on across the passes since the state's epoch, and each pass deals the rows out to workers anew."""
        worker_env = _WorkerEnv.detect()
        shuffler = self._create_shuffler(self._create_cache(worker_env))
        epoch, read = state["current_epoch"], state[PER_WORKER][worker_env.rank]
        while True:
            share = dealt_rows(shuffler, self.distributed_env, worker_env.world_size, self.batch_size, epoch, worker_env.rank)
            if not share or read < share:  # a pass that dealt this worker no rows ended its mix: it resumes ended
                break
            read, epoch = read - share, epoch + 1
        counts = [0] * len(state[PER_WORKER])  # only this worker's count is read here
        counts[worker_env.rank] = read
        # litdata checks the total count against one pass
        return {**state, "current_epoch": epoch, PER_WORKER: counts, "num_samples_yielded": read}

    def _resume(self, workers_chunks: list[list[int]], workers_intervals: list[Any]) -> None:
        exact = self._state_dict.get(PER_WORKER) if self._state_dict else None
        if exact is None:
            return super()._resume(workers_chunks, workers_intervals)
        replay = litdata_dataset._replay_sampling  # litdata's even-share guess, replaced for this call only
        litdata_dataset._replay_sampling = lambda *_: dict(enumerate(exact))
        try:
            super()._resume(workers_chunks, workers_intervals)
        finally:
            litdata_dataset._replay_sampling = replay


def leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """Loader workers ignore SIGTERM: SLURM signals every process of a job step, and a worker killed
    by it crashed the step that PreemptionCheckpoint would have finished and saved (exit 1, not 143).
    Their own shutdown does not need it: the main process stops them (``stop_workers_at_exit`` when
    their loader is still alive at exit), and they exit when it is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@functools.cache
def stop_workers_at_exit() -> None:
    """At exit, multiprocessing stops its daemonic children still running (loader workers) with SIGTERM, which
    loader workers ignore, and then waits for them: a run that left a loader's workers running at exit (a SIGINT
    to the main process alone) waited forever. Registered after multiprocessing's own exit handler, this one
    runs before it (last in, first out) and stops them with SIGINT, on which a worker's loop returns."""
    atexit.register(_stop_daemonic_children)


WORKER_STOP_GRACE_S = 5.0  # a worker still running after SIGINT this long is killed


def _stop_daemonic_children() -> None:
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        os.kill(child.pid, signal.SIGINT)
    for child in children:
        child.join(WORKER_STOP_GRACE_S)
        if child.is_alive():
            child.kill()
            child.join()


class WeightedMix(CombinedStreamingDataset):
    """A ``CombinedStreamingDataset`` whose source draws differ per epoch and loader worker and which, with
    weights, never ends: a source a worker has read its share of starts its next pass there (``_NextPassIterator``)."""

    def __iter__(self):
        worker = _WorkerEnv.detect().rank
        counts = (self._num_samples_yielded or {}).get(worker)  # a resumed worker's draws so far, replayed
        iterator = _CombinedDatasetIterator if self._iterate_over_all else _NextPassIterator
        self._iterator = iterator(self._datasets, hash((self._seed, self._current_epoch, worker)), self._weights,
                                  self._use_streaming_dataloader, counts, self.batch_size, self._batching_method,
                                  self._iterate_over_all)
        return self._iterator


class _NextPassIterator(_CombinedDatasetIterator):
    """litdata's iterator over the mix, which ended where a source did."""

    def _get_sample(self, dataset_index: int) -> Any:
        try:
            return super()._get_sample(dataset_index)
        except StopIteration:  # litdata has moved the source on to its next epoch: read this worker's share of it
            self._dataset_iters[dataset_index] = iter(self._datasets[dataset_index])
            return super()._get_sample(dataset_index)


class WorkerTaggedCollate:
    """Adds the id of the loader worker that collated a batch (0 without workers) under ``WORKER_KEY``."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> dict:
        worker = get_worker_info()
        return {**self.collate_fn(items), WORKER_KEY: worker.id if worker else 0}


class ResumableStreamingDataLoader(StreamingDataLoader):
    """``StreamingDataLoader`` over a ``CombinedStreamingDataset`` of ``ExactResumeStreamingDataset``."""

    def __init__(self, *args: Any, collate_fn, held_batches: int = 0, another_layout_starts_next_passes: bool = False,
                 **kwargs: Any):
        super().__init__(*args, collate_fn=WorkerTaggedCollate(collate_fn), **kwargs)
        self.held_batches = held_batches
        self.another_layout_starts_next_passes = another_layout_starts_next_passes
        self._positions: deque = deque(maxlen=held_batches + 1)
        self._exhausted = False
        self._resumed_from: tuple[dict, int] | None = None

    def _position(self) -> tuple[dict, int]:
        return deepcopy(self._num_samples_yielded_wrapper), self._latest_worker_idx

    def __iter__(self):
        """Full batches only: a mix that ends (a worker with no rows in a source's next pass) leaves a short last
        batch, and every step must hold the same tokens (the token clock counts them)."""
        resuming = self.restore and self._resumed_from is not None
        self._positions.clear()
        self._positions.append(self._resumed_from if resuming else ({}, -1))
        self._exhausted = False
        counts = dict(self._num_samples_yielded_wrapper) if self.restore else {}  # litdata starts a new epoch at {}
        for batch in super().__iter__():
            self._file_counts_under(batch.pop(WORKER_KEY), counts)
            if len(batch["input_ids"]) < self.batch_size:
                continue  # the epoch's last batch: read to the end, so litdata closes the epoch itself
            self._positions.append(self._position())
            yield batch
        self._exhausted = True

    def _file_counts_under(self, worker: int, counts: dict[int, list[int]]) -> None:
        """Move the counts litdata just recorded under its turn-taking label to the worker that made the batch,
        restoring what the label's own worker had (``counts``: every worker's true counts so far)."""
        counts[worker] = self._num_samples_yielded_wrapper[self._latest_worker_idx]
        self._num_samples_yielded_wrapper = dict(counts)
        self._latest_worker_idx = worker

    def state_dict(self) -> dict[str, Any]:
        current = self._position()
        if self._positions and not self._exhausted:  # the restored position itself until a batch comes: litdata's
            # live one then names the next worker as the last, and a resume from it took each worker's turn a batch late
            back = min(self.held_batches, len(self._positions) - 1)
            self._num_samples_yielded_wrapper, self._latest_worker_idx = deepcopy(self._positions[-1 - back])
        try:
            state = deepcopy(super().state_dict())  # children return their live state dicts
        finally:
            self._num_samples_yielded_wrapper, self._latest_worker_idx = current
        per_worker = state["num_samples_yielded"]
        if not per_worker:  # nothing consumed in this epoch: a restored loader starts it afresh
            state["latest_worker_idx"] = -1
            state["current_epoch"] += 0 if self._positions else 1  # never iterated: epoch 1 comes next
        workers = max(self.num_workers, 1)
        for index, source in state["dataset"].items():
            source[PER_WORKER] = [per_worker.get(w, [0] * len(state["dataset"]))[int(index)] for w in range(workers)]
            source[INDEX_DIGEST] = index_digest(source["input_dir_path"])
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if not obj["num_samples_yielded"]:
            self.current_epoch = obj["current_epoch"] - 1  # __iter__ counts it up again
            return
        self._check_same_sources(obj)
        if (saved := self._saved_layout(obj)) != (current := self._layout()):
            if not self.another_layout_starts_next_passes:
                raise UserError(
                    f"the checkpoint's data position was saved by {saved}; this run has {current}. Resume with the "
                    "same processes (trainer.devices × trainer.num_nodes; the nodes alone may differ), "
                    "data.init_args.num_workers and data.init_args.micro_batch_size (a weighted mix cannot be "
                    "re-split exactly), or set data.init_args.resume_on_another_layout: true to go on with each "
                    "source's next pass")
            return self._start_next_passes(obj, saved, current)
        # The counts start in the loader's epoch, whatever a source's own says: without loader workers it moves on with
        # the source's passes, and positions saved before the mix read passes of its own could say epoch 1 after a
        # resume in a later epoch. A source found in another folder (a copy: _check_same_sources) is read there.
        epoch = obj["current_epoch"]
        super().load_state_dict({**obj, "dataset": {
            index: {**source, "current_epoch": epoch, "input_dir_path": dataset.input_dir.path}
            for (index, source), dataset in zip(obj["dataset"].items(), self.dataset._datasets)}})
        self._resumed_from = (deepcopy(obj["num_samples_yielded"]), obj["latest_worker_idx"])
        self._positions.clear()
        self._positions.append(self._resumed_from)
        self._exhausted = False

    @staticmethod
    def _saved_layout(obj: dict[str, Any]) -> Layout:
        """A weighted mix resumes exactly only on the layout that saved it. The nodes: litdata's record of the first
        run's (a position started afresh records its own), for the message."""
        state = next(iter(obj["dataset"].values()))
        return Layout(state["world_size"], state.get("initial_num_nodes", 1), max(state["num_workers"], 1),
                      state["batch_size"])

    def _layout(self) -> Layout:
        world = _DistributedEnv.detect()
        return Layout(world.world_size, max(1, world.num_nodes), max(self.num_workers, 1), self.batch_size)

    def _start_next_passes(self, obj: dict[str, Any], saved: Layout, current: Layout) -> None:
        """Go on from the loader epoch after every source's furthest pass, each source from the start of a pass in an
        order not read before (``first_unread_pass``)."""
        epoch = obj["current_epoch"]
        first = max(first_unread_pass(dataset, saved, epoch, {worker: counts[index] for worker, counts in
                                                              obj["num_samples_yielded"].items()})
                    for index, dataset in enumerate(self.dataset._datasets))
        self.current_epoch = first - 1  # __iter__ counts it up once more
        rank_zero_warn(
            f"the checkpoint's data position was saved by {saved}; this run has {current}: each source starts a new "
            f"pass (loader epoch {first}) as data.init_args.resume_on_another_layout asks. The rows the passes under "
            "way had read may come again before those they had left")

    def _check_same_sources(self, obj: dict[str, Any]) -> None:
        """The position is per source folder, and litdata checked the rest in each loader worker, after the
        checkpoint was restored: a data seed given to a branch ended in a worker's traceback."""
        saved = list(obj["dataset"].values())
        current = self.dataset._datasets
        if len(saved) != len(current):
            folders = ", ".join(state["input_dir_path"] for state in saved)
            raise UserError(f"the checkpoint's training mix read {len(saved)} sources ({folders}); this run's "
                            f"data.init_args.sources has {len(current)}: resume with the same sources, or start a new "
                            "run from the exported weights")
        for state, dataset in zip(saved, current):
            folder, then, now = dataset.input_dir.path, state.get(INDEX_DIGEST), index_digest(dataset.input_dir.path)
            if then is not None and now is not None and then != now:
                where = "there" if folder == state["input_dir_path"] else f"in {state['input_dir_path']}"
                raise UserError(f"{folder} holds other chunks than those the checkpoint's position in the training mix "
                                f"counts {where} (prepared again from other text or settings, or replaced): resume "
                                "with the sources in the same order, each the prepared folder it read or a copy of it "
                                "(data.init_args.sources), or start a new run from the exported weights")
            if folder != state["input_dir_path"] and (then is None or now is None):
                raise UserError(f"the checkpoint's position in the training mix is in {state['input_dir_path']}; this "
                                f"run reads {folder} there, which may be a copy, which a checkpoint saved before "
                                "2026-12-04 cannot tell: resume with the sources in the same order and folders "
                                "(data.init_args.sources)")
        first = saved[0]
        for setting, value, now in (("seed", first["seed"], current[0].seed),
                                    ("shuffle", first["shuffle"], current[0].shuffle)):
            if value != now:
                raise UserError(f"the checkpoint's position in the training mix was saved with data.init_args.{setting} "
                                f"{value}; this run has {now}: a resume or branch keeps the data order (set it back; "
                                "for another seed of a branch, change seed_everything and model.init_args.seed)")
        rows_then = (first.get("item_loader") or {}).get("block_size")
        rows_now = current[0].item_loader.state_dict().get("block_size")
        if rows_then != rows_now:
            raise UserError(f"the checkpoint's position in the training mix counts rows of {rows_then} tokens "
                            f"(data.init_args.block_size); this run cuts rows of {rows_now}: resume with the same "
                            "block_size, or start a new run from the exported weights")
