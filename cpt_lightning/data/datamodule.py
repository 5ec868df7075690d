"""PackedDataModule: prepared sources mixed by weight into packed, resumable batches.

One ``StreamingDataset`` per source (``TokensLoader`` rows of ``block_size``), mixed by weight
into an endless stream (``WeightedMix``: each source is read in reshuffled passes of its own);
litdata shards rows over ranks and loader workers and shuffles with the seed. Batches follow the
contract in ``packing`` and the loader's position is saved in Lightning checkpoints. The manifests
are read at construction so a config naming the wrong data fails before any model is built.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.seed import max_seed_value, min_seed_value

from cpt_lightning.data.loader import (
    ExactResumeStreamingDataset, ResumableStreamingDataLoader, WeightedMix, leave_sigterm_to_the_main_process,
    prepared_folder, stop_workers_at_exit,
)
from cpt_lightning.data.holdout import documents_shared
from cpt_lightning.data.manifest import DataFacts, Manifest, check_compatible, mix_facts, rows_of
from cpt_lightning.data.packing import PackedCollate
from cpt_lightning.errors import UserError
from cpt_lightning.folder_locks import lock_for_reading, release_all


@dataclass
class Source:
    """A prepared folder (``cpt prepare`` output) and its share of the mix."""

    name: str
    path: str
    weight: float = 1.0

    def __post_init__(self):
        self.path = os.path.expanduser(self.path)  # a YAML value or --opt=~/x: no shell expanded it


class PackedDataModule(L.LightningDataModule):
    """Weighted mix of prepared sources.

    Args:
        sources: training sources; weights are normalised (the recipes use 0.6 / 0.2 / 0.2).
        micro_batch_size: rows per batch on each device.
        block_size: row length; default the prepared one, smaller values re-cut the same chunks.
        seed: shuffling and mixing seed, the same on every rank (litdata gives ranks disjoint rows);
            each loader worker draws its own sequence of sources from it, and each pass over a source
            is shuffled anew.
        num_workers: loader processes per rank.
        shuffle: shuffle rows within each source (off: input order, for inspection).
        val_sources: optional held-out sources, each read once, whole, by a loader of its own (no weights).
        resume_on_another_layout: resume a checkpoint saved by another processes × loader workers ×
            micro-batch layout (a node lost or added), each source starting a new pass in an order not read
            before. litdata cannot re-split a weighted mix's position, so rows the passes under way had read
            may come again before the rows they had left; false refuses such a resume.
    """

    def __init__(
        self,
        sources: list[Source],
        micro_batch_size: int = 8,
        block_size: int | None = None,
        seed: int = 42,
        num_workers: int = 2,
        shuffle: bool = True,
        val_sources: list[Source] | None = None,
        resume_on_another_layout: bool = False,
    ):
        super().__init__()
        if not sources:
            raise UserError("data.init_args.sources is empty: name at least one prepared source")
        if micro_batch_size < 1:
            raise UserError(f"data.init_args.micro_batch_size={micro_batch_size}: must be at least 1")
        if not min_seed_value <= seed <= max_seed_value:  # litdata's shuffle seeds numpy with it, once training began
            raise UserError(f"data.init_args.seed={seed}: must be within [{min_seed_value}, {max_seed_value}]")
        if num_workers < 0:
            raise UserError(f"data.init_args.num_workers={num_workers}: must be 0 (load in the training process) or more")
        named = set()
        for source in [*sources, *(val_sources or [])]:
            if not 0 < source.weight < math.inf:  # inf passed, and every weight became nan in the loader workers
                raise UserError(f"source {source.name!r} has weight {source.weight}: weights must be positive and "
                                "finite")
            if source.name in named:  # names key the manifests checked against each other, and the model card
                raise UserError(f"source name {source.name!r} is used twice in data.init_args.sources/val_sources: "
                                "give each source its own name")
            named.add(source.name)
        folders = {"sources": {}, "val_sources": {}}  # field → resolved folder → source name
        for field, listed in (("sources", sources), ("val_sources", val_sources or [])):
            for source in listed:
                folder = Path(source.path).resolve()
                if folder in folders[field]:  # the mix would weigh one corpus twice while the model card names two
                    raise UserError(f"data.init_args.{field} {folders[field][folder]!r} and {source.name!r} both read "
                                    f"{source.path}: name each prepared folder once (its weight sets its share)")
                folders[field][folder] = source.name
                if field == "val_sources" and folder in folders["sources"]:
                    warnings.warn(f"data.init_args.val_sources {source.name!r} is the training source {source.path}: "
                                  f"its loss is not held out (cpt prepare held out {Path(source.path) / 'holdout'} for this)")
        self.sources, self.val_sources = list(sources), list(val_sources or [])
        self.micro_batch_size, self.seed, self.num_workers, self.shuffle = micro_batch_size, seed, num_workers, shuffle
        self.resume_on_another_layout = resume_on_another_layout
        self.manifests = {s.name: Manifest.read(s.path) for s in [*self.sources, *self.val_sources]}
        self._read_locks: list = []  # on the prepared folders while a run reads them, from setup to teardown
        weakref.finalize(self, release_all, self._read_locks)  # a module dropped without either hook
        self.facts: DataFacts = mix_facts(self.manifests, block_size, tuple(s.name for s in self.val_sources))
        self._warn_of_held_out_text_in_training()
        if self.val_sources:  # only then: Lightning runs (and warns about) validation when the hook exists
            self.val_dataloader = self._val_dataloader

    def _warn_of_held_out_text_in_training(self) -> None:
        """A holdout's documents that another source of the mix trains on (instructions built from PubMed
        abstracts, notes quoting papers): ``cpt prepare`` leaves out only those its own source repeats."""
        for held in self.val_sources:
            for trained in self.sources:
                if Path(held.path).resolve() == Path(trained.path).resolve():
                    continue  # said at __init__: the holdout is a training source
                shared = documents_shared(Path(held.path), Path(trained.path))
                if shared and shared[0]:
                    warnings.warn(f"data.init_args.val_sources {held.name!r}: {shared[0]:,} of its {shared[1]:,} "
                                  f"documents are training documents of source {trained.name!r} too (the same text): "
                                  "its curve scores them as held out; take them out of that source's input and "
                                  "prepare it again")

    @property
    def separator_id(self) -> int:
        return self.facts.separator_id

    @property
    def block_size(self) -> int:
        return self.facts.block_size

    def mix_plan(self, tokens: int, seen: int = 0) -> str:
        """How often the ``tokens - seen`` tokens the phases have left read each source: a weighted mix repeats a
        small source (20% of 50B tokens from a 2B-token corpus is five passes over it) and leaves part of a large one
        unread, which decides whether a domain's gain comes from new text or from repetition. Each source is read in
        whole passes of its own (``WeightedMix``), so 0.82 passes is 82% of it, read once. A resumed or branched
        run's mix reads only what is left (the model card counts the tokens each config read)."""
        total = sum(source.weight for source in self.sources)
        shares = [source.weight / total for source in self.sources]
        if seen >= tokens:  # a run that trains on past its phases (stop_after_last_phase: false), resumed there
            mix = ", ".join(f"{source.name} {share:.0%}" for source, share in zip(self.sources, shares))
            return (f"[data] the phases' {tokens:,} training tokens were all read before this resume (at {seen:,}); "
                    f"the steps past them read {mix}")
        left = tokens - seen
        parts = []
        for source, share in zip(self.sources, shares):
            prepared = self.manifests[source.name].num_tokens
            parts.append(f"{source.name} {share:.0%} ≈ {round(share * left):,} of its {prepared:,} tokens, "
                         f"{share * left / prepared:.2f} passes")
        said = f"{tokens:,}" if not seen else f"{left:,} left of {tokens:,} (resumed at {seen:,})"
        return (f"[data] the phases' {said} training tokens read " + "; ".join(parts) + " (each loader worker reads its "
                "share of a source's pass whole, reshuffled, before any of it repeats)")

    def check_compatible(self, model_vocab_size: int, max_position_embeddings: int, tokenizer=None) -> None:
        """Raise a UserError naming the setting to fix if the model cannot read this data."""
        check_compatible(self.facts, model_vocab_size, max_position_embeddings, tokenizer)

    def setup(self, stage: str) -> None:
        """Checked on every process once the processes are known: the first validation may come hours later."""
        from litdata.utilities.env import _DistributedEnv

        if stage == "validate" and not self.val_sources:
            raise UserError(
                "cpt validate needs validation data: set data.init_args.val_sources, e.g. "
                "[{name: pubmed_holdout, path: PREPARED/pubmed/holdout}] (cpt prepare writes a holdout/ per source)"
            )
        self._refuse_sources_smaller_than_the_world(_DistributedEnv.detect().world_size)
        if stage == "fit" and self.trainer is not None:
            self._resume_the_stream_after_any_stop()
        release_all(self._read_locks)  # a second setup (a validate after a fit in one process) holds them once
        self._read_locks += lock_for_reading([Path(s.path) for s in [*self.sources, *self.val_sources]])

    def _resume_the_stream_after_any_stop(self) -> None:
        """Lightning restores a loader's position only in an epoch it thinks unfinished, or in iteration-based
        training (``max_steps`` set). A run that stops itself (``max_time``, the last phase's end) ends its epoch,
        this mix's one endless epoch, as finished, and ``--ckpt_path last`` trained on from the stream's first rows
        again, without a word (an extended last phase too). Training on this stream is taken as iteration-based, as
        Lightning asks before it restores the checkpoint's loops: every resume continues it. Not a ``max_steps`` no
        run reaches, which a progress bar of Lightning's showed as the steps to go; and not for a finite loader's
        epochs, which ``max_epochs`` ends (its resume at an epoch's end trained no more epochs)."""
        self.trainer.fit_loop._iteration_based_training = lambda: True

    def teardown(self, stage: str) -> None:
        """Frees the prepared folders for `cpt prepare --overwrite` (``folder_locks``)."""
        release_all(self._read_locks)

    def on_exception(self, exception: BaseException) -> None:
        """Lightning skips teardown when a fit fails: a notebook's failed fit kept its data from being prepared again."""
        release_all(self._read_locks)

    def train_dataloader(self):
        # Lightning fetches one batch ahead of the step being trained; the loader leaves it out of its state.
        held = 1 if self.trainer is not None else 0
        self._refuse_sources_smaller_than_a_step()
        stop_workers_at_exit()
        mix = self._mix(self.sources, shuffle=self.shuffle, weights=[s.weight for s in self.sources])
        return ResumableStreamingDataLoader(
            mix, batch_size=self.micro_batch_size, num_workers=self.num_workers, drop_last=True,
            collate_fn=PackedCollate(self.separator_id), held_batches=held, worker_init_fn=leave_sigterm_to_the_main_process,
            pin_memory=self._training_on_cuda(), another_layout_starts_next_passes=self.resume_on_another_layout,
        )

    def _training_on_cuda(self) -> bool:
        """Pinned batches for a GPU: PyTorch copies pageable memory to a GPU synchronously, so every micro-batch's
        transfer waited for the GPU to finish the previous one's queued work (Lightning copies non-blocking)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    @property
    def val_source_names(self) -> list[str]:
        """The names of the validation loaders, in order: the module logs each source's figures under its name."""
        return [source.name for source in self.val_sources]

    def _val_dataloader(self):
        """One loader per validation source, reading every row once, in order (no weights, no shuffling): each
        source's loss is then its own curve beside the one over all of them (``cpt_lightning.validation``).

        Plain ``DataLoader``s: litdata trims a source read through its own loader to whole batches
        on every rank (``micro_batch_size × ranks`` rows), which emptied a 122-row holdout at 8 GPUs
        × micro-batch 16. Here only up to ranks − 1 rows per source go, so every rank gets the same
        rows and batches (the last one short) and none waits in a collective.

        One worker each at most, kept between evaluations (starting it again at each one cost the demo 2 to 3 s
        per validation, a sixth of its run time). Two or more each end their share with a short batch, so a loader
        yields more batches than its length, where Lightning stops: the last rows went unvalidated (at 8 workers
        and 3 sources), and the figures changed with ``num_workers``.
        """
        from torch.utils.data import DataLoader

        workers = 1 if self.num_workers else 0
        stop_workers_at_exit()
        return [
            DataLoader(
                self._mix([source], shuffle=False, weights=None), batch_size=self.micro_batch_size,
                num_workers=workers, collate_fn=PackedCollate(self.separator_id),
                worker_init_fn=leave_sigterm_to_the_main_process, persistent_workers=workers > 0,
            )
            for source in self.val_sources
        ]

    def _rows(self, source: Source) -> int:
        """Per chunk: counted from the source's whole token count, a source a row short of a micro-batch per worker
        passed the size check and gave no batch (the fit hung at its first step)."""
        return rows_of(source.path, self.block_size)

    def _refuse_sources_smaller_than_a_step(self) -> None:
        """Each loader worker of each process reads a source in passes of its share of the rows: with fewer rows than
        one micro-batch per worker, a worker's share holds no whole batch."""
        from litdata.utilities.env import _DistributedEnv

        readers = max(self.num_workers, 1) * _DistributedEnv.detect().world_size
        for source in self.sources:
            rows = self._rows(source)
            if rows < self.micro_batch_size * readers:
                raise UserError(
                    f"data.init_args.sources {source.name!r} holds {rows} rows of {self.block_size} tokens, fewer than "
                    f"one micro-batch of {self.micro_batch_size} for each of the {readers} loader workers × processes "
                    "that share it: lower data.init_args.micro_batch_size or num_workers, or prepare more data"
                )

    def _refuse_sources_smaller_than_the_world(self, processes: int) -> None:
        """Each process reads ``rows // processes`` rows of a validation source: a holdout of fewer rows than
        processes is read by none (litdata's bare AssertionError when its loader was built, at the first
        validation)."""
        for source in self.val_sources:
            rows = self._rows(source)
            if rows < processes:
                raise UserError(
                    f"data.init_args.val_sources {source.name!r} holds {rows} rows of {self.block_size} tokens, fewer "
                    f"than the {processes} processes: none would validate on it. Prepare a larger holdout "
                    "(cpt prepare --holdout-tokens) or leave it out of val_sources"
                )

    def _mix(self, sources: list[Source], shuffle: bool, weights: list[float] | None):
        # Built here, not in __init__: StreamingDataset reads the distributed world at construction.
        from litdata import TokensLoader

        datasets = [
            ExactResumeStreamingDataset(
                prepared_folder(s.path), item_loader=TokensLoader(self.block_size), shuffle=shuffle, drop_last=True,
                seed=self.seed, item_shuffle_window="full",
            )
            for s in sources
        ]
        return WeightedMix(datasets, seed=self.seed, weights=weights, iterate_over_all=weights is None)
