"""``cpt prepare``: the raw corpora of one source → LitData token chunks + ``manifest.json``.

Documents are tokenized by ``litdata.optimize`` workers (one per core), each reading a
byte-balanced range of the input in order, separated by the tokenizer's SEP/EOS and packed
into ``block_size`` rows that ``TokensLoader`` reads back. A few documents of each shard go to
``OUTPUT/holdout`` instead, up to ``--holdout-tokens`` (see ``holdout.py``), so a probe or a
validation set can use text that no training block contains. Everything is written into a
hidden ``.NAME.partial`` folder, the manifests last, then renamed into place: an interrupted run
leaves nothing that looks prepared, and a rerun on unchanged inputs is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import traceback
from pathlib import Path
from unittest.mock import patch

from cpt_lightning.data.encoding import DocumentEncoder, TokenizerSpec, load_tokenizer
from cpt_lightning.data.holdout import (
    DOCUMENT_KEYS,
    HOLDOUT_STRIDE,
    SIDE_FILES,
    ShardHoldout,
    holdout_manifest,
    write_holdout,
    write_training_keys,
)
from cpt_lightning.data.manifest import HOLDOUT, MANIFEST, Manifest, chunks_sha256
from cpt_lightning.data.packing import BlockPacker
from cpt_lightning.data.progress import ProgressBar, SharedCounters
from cpt_lightning.data.readers import (
    FileIndex,
    Segment,
    SkipCounts,
    count_lines,
    find_input_files,
    index_file,
    iter_segment,
    plan_shards,
)
from cpt_lightning.atomic import check_output_folder, check_replaceable_folder, local_paths, replace_folder
from cpt_lightning.errors import (FILE_SYSTEM_FIXES, INTERRUPTED_EXIT_CODE, ArgumentParser, Terminated, UserError,
                                   command, found_in_chain, sigterm_received)
from cpt_lightning.folder_locks import replacing

ENCODE_BATCH = 256  # documents per encode_batch call: big enough to amortise the call, small for memory
CHUNK_BYTES = 16 << 20  # chunk files of ~16 MB, always a whole number of blocks
DEFAULT_HOLDOUT_TOKENS = 1_000_000
REPEATS_OPTION = "holdout_repeats"  # the fingerprint's note that held-out documents training repeats are left out


class TokenizeShard:
    """The ``optimize`` function: one numbered shard of documents → full token blocks, in input order."""

    def __init__(self, spec: TokenizerSpec, block_size: int, text_field: str, skip_invalid_utf8: bool,
                 counters: SharedCounters, work: str, holdout_quota: int):
        self.spec, self.block_size, self.text_field = spec, block_size, text_field
        self.skip_invalid_utf8, self.counters = skip_invalid_utf8, counters
        self.error_file, self.holdout_dir = Path(work, "errors.txt"), Path(work, SIDE_FILES)
        self.holdout_quota = holdout_quota

    def __call__(self, item):
        # A failing worker reports and stops instead of raising: litdata kills workers that raise and
        # leaves their helper processes behind. The parent turns the report into the error.
        try:
            yield from self._blocks(*item)
        except Exception as err:
            self.report(err)

    def report(self, err: Exception) -> None:
        """Write a worker's failure where the parent reads it, and stop the other workers' tokenizing. A file system's
        refusal is also counted by its errno, for the parent to say where the report itself could not be written (the
        output's disk full)."""
        refused = found_in_chain(err, OSError, lambda error: error.errno in FILE_SYSTEM_FIXES)
        self.counters.add(failed=1)
        if refused is not None:
            self.counters.set_first("refused_errno", refused.errno)
        message = str(err) if isinstance(err, UserError) else _file_system_message(refused, self.error_file.parent)
        report = {"message": message} if message else {"traceback": traceback.format_exc()}
        with contextlib.suppress(OSError), open(self.error_file, "a") as f:
            f.write(json.dumps(report) + "\n")

    def _blocks(self, number: int, shard):
        encode = DocumentEncoder(self.spec)
        packer = BlockPacker(self.block_size, self.spec.dtype)
        holdout = ShardHoldout(self.holdout_dir, number, self.holdout_quota, encode)
        skipped, reported = SkipCounts(), SkipCounts()
        documents = (
            text for segment in shard
            for text in iter_segment(segment, self.text_field, self.skip_invalid_utf8, skipped)
        )
        while not self.counters["failed"] and (batch := list(itertools.islice(documents, ENCODE_BATCH))):
            tokens = encode(holdout.split(batch))
            blocks = packer.add(tokens)
            yield from blocks
            self.counters.add(
                documents=len(batch), tokens=len(tokens), blocks=len(blocks),
                empty=skipped.empty - reported.empty, invalid_utf8=skipped.invalid_utf8 - reported.invalid_utf8,
            )
            reported = SkipCounts(skipped.empty, skipped.invalid_utf8)
        self.counters.add(
            dropped=packer.leftover,
            empty=skipped.empty - reported.empty, invalid_utf8=skipped.invalid_utf8 - reported.invalid_utf8,
            shards_done=1,
        )


def prepare(
    inputs: list[str],
    output: str,
    tokenizer: str,
    block_size: int = 8192,
    *,
    name: str | None = None,
    text_field: str = "text",
    text_unit: str = "file",
    num_workers: int | None = None,
    max_docs: int | None = None,
    skip_invalid_utf8: bool = False,
    holdout_tokens: int = DEFAULT_HOLDOUT_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Manifest, bool]:
    """Prepare one source; returns its manifest and whether the existing output was already up to date."""
    out = Path(output)
    name = name or out.name
    files = find_input_files(inputs)
    _check_inputs_and_output(files, out, tokenizer)
    if num_workers is not None and num_workers < 1:  # 0 meant every core and -4 one worker, without a word
        raise UserError(f"--num-workers {num_workers}: must be 1 or more (the default is every core)")
    spec = load_tokenizer(tokenizer)
    _check_block_size(block_size, spec)
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs {max_docs}: must be positive")
    if holdout_tokens < 0:
        raise UserError(f"--holdout-tokens {holdout_tokens}: must be 0 (no holdout) or more")
    workers = num_workers or usable_cores()  # the ranges decide which documents are held out
    options = dict(text_field=text_field, text_unit=text_unit, max_docs=max_docs, skip_invalid_utf8=skip_invalid_utf8,
                   holdout_tokens=holdout_tokens, holdout_stride=HOLDOUT_STRIDE, ranges=workers)
    if holdout_tokens:
        options[REPEATS_OPTION] = "left out"  # a holdout prepared before that differs
    fingerprint = _fingerprint(files, spec, block_size, options)
    existing = _existing(out) if out.exists() else None
    damage = _holdout_damage(out, existing) if existing is not None else None
    same = existing is not None and not damage and (existing.fingerprint, existing.source) == (fingerprint, name)
    if same and (out / DOCUMENT_KEYS).is_file():
        return existing, True  # up to date: nothing to replace, even with --overwrite
    if not (out / MANIFEST).is_file() and out.exists() and (not out.is_dir() or any(out.iterdir())):
        # --overwrite replaced any folder: a project folder holding other sources, notes and runs, or the sample.
        # A damaged or outdated one of ours (its manifest there, unreadable or failing its checks) it still replaces.
        raise UserError(f"{out} already exists and holds other data, not a folder cpt prepare wrote (no "
                        "manifest.json): --overwrite replaces only those; choose another --output, or empty it "
                        "yourself")
    if not overwrite and out.exists():
        planned = existing and (existing.num_workers or existing.num_ranges)  # the fingerprint's count
        only_workers_differ = planned not in (None, 0, workers) and existing.source == name \
            and _fingerprint(files, spec, block_size, {**options, "ranges": planned}) == existing.fingerprint
        kept_repeats = existing is not None and existing.source == name and REPEATS_OPTION in options \
            and _fingerprint(files, spec, block_size, _without(options, REPEATS_OPTION)) == existing.fingerprint
        this_run = dict(source=name, block_size=block_size, text_field=text_field, max_docs=max_docs, num_workers=workers)
        changed = _changes(existing, this_run, files, spec, tokenizer, holdout_tokens) if existing else []
        _refuse_to_replace(out, existing, damage, workers, planned if only_workers_differ else None, kept_repeats,
                           keys_missing=same, changed=changed)

    with _work_folder(out) as work, replacing(out):  # another prepare of it is refused by the first, as such
        indexes = _index(files, text_unit, text_field)
        shards = plan_shards(indexes, workers, max_docs)
        total = sum(s.stop - s.start for shard in shards for s in shard)
        (work / "cache").mkdir()
        (work / SIDE_FILES).mkdir()
        counters = SharedCounters()
        quota = math.ceil(holdout_tokens / len(shards))
        job = TokenizeShard(spec, block_size, text_field, skip_invalid_utf8, counters, str(work), quota)
        with ProgressBar(counters, total, name) if progress else contextlib.nullcontext() as bar:
            _optimize(job, shards, work, block_size, spec, workers=min(workers, len(shards)))
        counts = counters.snapshot()
        _check_every_shard_written(counts, len(shards), work / "data", workers)
        if counts["blocks"] == 0:
            raise UserError(_why_no_block(name, counts, block_size, text_field))
        held = write_holdout(work / SIDE_FILES, len(shards), work / "data" / HOLDOUT, block_size, spec.dtype,
                             _blocks_per_chunk(block_size, spec) * block_size)
        write_training_keys(work / SIDE_FILES, len(shards), work / "data")
        manifest = Manifest(
            source=name, inputs=[str(f) for f in files], text_field=text_field, tokenizer=tokenizer,
            vocab_size=spec.vocab_size, vocab_sha256=spec.vocab_sha256, separator_id=spec.separator_id,
            block_size=block_size, dtype=spec.dtype.name,
            num_documents=counts["documents"] - held.documents - held.repeats,
            num_tokens=counts["blocks"] * block_size, num_blocks=counts["blocks"],
            tokens_dropped=counts["dropped"] + (0 if held.blocks else held.dropped) + held.repeat_tokens,
            skipped_empty=counts["empty"], skipped_invalid_utf8=counts["invalid_utf8"], max_docs=max_docs,
            fingerprint=fingerprint, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            holdout_tokens=held.blocks * block_size, holdout_documents=held.documents if held.blocks else 0,
            holdout_repeats=held.repeats,
            num_ranges=len(shards), num_workers=workers, chunks_sha256=chunks_sha256(work / "data", workers),
        )
        if held.blocks:
            holdout_manifest(manifest, held, chunks_sha256(work / "data" / HOLDOUT, workers)).write(work / "data" / HOLDOUT)
        manifest.write(work / "data")
        if sigterm_received():  # its Terminated dropped where Python ignores exceptions: the earlier output stays
            raise Terminated
        replace_folder(work / "data", out)
    if progress:
        why = _why_no_holdout(held, len(shards), block_size, holdout_tokens) if holdout_tokens and not held.blocks \
            else None
        print(_summary(manifest, bar.elapsed, out, why), file=sys.stderr)
    return manifest, False


def _check_every_shard_written(counts: dict[str, int], shards: int, folder: Path, workers: int) -> None:
    """A tokenizing worker killed mid-range (the out-of-memory killer, a cgroup limit) ends without an error: litdata
    merged what the others wrote, and the source was saved without that range, its manifest counting blocks its
    chunks do not hold, and reported "up to date" ever after."""
    index = folder / "index.json"
    written = sum(chunk["chunk_size"] for chunk in json.loads(index.read_text())["chunks"]) if index.is_file() else 0
    if counts["shards_done"] != shards or written != counts["blocks"]:
        raise UserError(f"{shards - counts['shards_done']} of the {shards} tokenizing workers stopped before the end of "
                        f"their input range ({written:,} of {counts['blocks']:,} blocks written; killed, out of "
                        f"memory?): nothing was saved; run again, with fewer than --num-workers {workers} if memory "
                        "is short")


def _why_no_holdout(held, ranges: int, block_size: int, holdout_tokens: int) -> str:
    """A holdout was asked for and none was written: the stride, the repeats or the block size say why."""
    if held.documents + held.repeats == 0:
        return (f"every {HOLDOUT_STRIDE}th document of a range is held out and none of the {ranges} input ranges "
                f"reached {HOLDOUT_STRIDE} documents: fewer --num-workers make longer ranges, or add data")
    if held.documents == 0:
        return f"training repeats the text of all {held.repeats:,} documents held out"
    said = f"the {held.documents:,} documents held out ({held.dropped:,} tokens) fill no block of {block_size}"
    if held.dropped + held.repeat_tokens < holdout_tokens:  # the stride, not --holdout-tokens, held out no more
        return (f"{said}: at most every {HOLDOUT_STRIDE}th document is held out, short of --holdout-tokens "
                f"{holdout_tokens:,}; a smaller --block-size, or more data, makes a holdout")
    return f"{said}: a larger --holdout-tokens holds more out"


def usable_cores() -> int:
    """The cores this process may run on (SLURM's --cpus-per-task, taskset), not the machine's: 4 cores of a
    128-core node planned 128 ranges, each with its dropped tail, and 128 tokenizer processes."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _why_no_block(name: str, counts: dict, block_size: int, text_field: str) -> str:
    """Why nothing was written: every document empty (a --text-field naming a field that is null or empty in each
    record) or unreadable is not fixed by a smaller block, which the message advised."""
    if counts["documents"] == 0 and counts["empty"] + counts["invalid_utf8"] > 0:
        return (f"{name}: no document to prepare: {counts['empty']:,} were empty or null and {counts['invalid_utf8']:,} "
                f"not valid UTF-8, all skipped; check the field read from jsonl/parquet records (--text-field "
                f"{text_field}) and the input's encoding")
    return (f"{name}: {counts['tokens']} tokens from {counts['documents']} documents do not fill one block of "
            f"{block_size}; lower --block-size or add data")


NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}  # what flock raises where it is not supported


@contextlib.contextmanager
def _work_folder(out: Path):
    """The hidden ``.NAME.partial`` folder, emptied for this run and held by it alone, removed at the end.

    Its lock is inherited by the forked tokenizing workers, which can outlive a killed main process
    (not on Linux: ``_die_with_parent``), still writing chunks: a rerun meanwhile, or the same command
    started twice, is refused rather than clearing a folder that another process fills."""
    work = out.parent / f".{out.name}.partial"
    lock_path = work / ".lock"
    while True:
        work.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise UserError(
                f"{out}: another `cpt prepare` is writing it in {work} (or the tokenizing workers of one that was "
                f"killed still run: `fuser -v {lock_path}` lists them); let it finish or stop it, then rerun"
            ) from None
        except OSError as err:
            if err.errno not in NO_FLOCK:
                lock.close()
                raise
            break  # a filesystem without flock (Lustre mounted without -o flock): unguarded, as before
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()  # the run that held it removed the folder meanwhile: lock the new one
    try:
        for leftover in work.iterdir():  # a killed run's chunks
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover != lock_path:
                leftover.unlink()
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the lock file too, while still held
        lock.close()


def _check_inputs_and_output(files: list[Path], out: Path, tokenizer: str) -> None:
    """An input named twice (trained twice, and a held-out copy can sit in the training rows), or an output
    that is an input or holds one, the tokenizer's folder included (--overwrite deleted the raw corpus, or the
    tokenizer), the current folder, or one inside a prepared folder (--overwrite into a source's holdout/ replaced
    it, and the source's next prepare found itself up to date), is refused before anything is read."""
    seen: dict[Path, Path] = {}
    for file in files:
        if (real := file.resolve()) in seen:
            raise UserError(f"{file}: given twice (also as {seen[real]}); name each input once")
        seen[real] = file
    check_output_folder(out, "--output", [*files, *local_paths(tokenizer)])
    check_replaceable_folder(out, "--output")
    if prepared := [folder for folder in out.resolve().parents if Manifest.written_in(folder)]:
        raise UserError(f"--output {out} is inside {prepared[-1]}, which cpt prepare wrote (its holdout/ is part of "
                        "it, replaced only with it): give --output a folder of its own")


def _refuse_to_replace(out: Path, existing: Manifest | None, damage: str | None, workers: int,
                       workers_before: int | None, kept_repeats: bool, keys_missing: bool, changed: list[str]) -> None:
    """Without --overwrite, an output that is not up to date is kept: say why, and what to pass
    (``workers_before``: the worker count it was prepared with, when that is all that differs;
    ``kept_repeats``: all that differs is a holdout prepared before repeated documents were left out;
    ``keys_missing``: all that differs is a folder prepared before its documents' keys were kept;
    ``changed``: what its manifest shows this run does otherwise, see :func:`_changes`)."""
    if damage:
        raise UserError(f"{out}: its holdout is damaged ({damage}); pass --overwrite to prepare it again")
    if keys_missing:
        raise UserError(f"{out} was prepared before cpt prepare kept its documents' keys ({DOCUMENT_KEYS}), with which "
                        "cpt fit finds held-out documents that another source of the mix trains on; pass --overwrite "
                        "to prepare it again (the rows come out the same)")
    if kept_repeats:
        raise UserError(
            f"{out}: its holdout was prepared before held-out documents whose text training repeats were left out "
            "of it, so validation on it may score text the model trained on; pass --overwrite to prepare it again "
            "(the training rows come out the same)"
        )
    if workers_before is not None:
        raise UserError(
            f"{out} was prepared with --num-workers {workers_before} (this run: {workers}); the worker count "
            f"decides the held-out documents: pass --num-workers {workers_before} to keep it, or --overwrite"
        )
    if changed:
        raise UserError(f"{out} was prepared {'; '.join(changed)}; pass --overwrite to prepare it again")
    if existing is not None:  # a setting or input its manifest does not record
        raise UserError(
            f"{out} was prepared from other inputs or with other settings (--text-unit, --skip-invalid-utf8, "
            "--holdout-tokens, the tokenizer's settings, an input's size or time, ...); pass --overwrite to prepare it again"
        )


OPTIONS_RECORDED = {"source": "--name", "block_size": "--block-size", "text_field": "--text-field",
                    "max_docs": "--max-docs", "num_workers": "--num-workers"}  # manifest field → prepare's option


def _changes(existing: Manifest, this_run: dict, files: list[Path], spec: TokenizerSpec, tokenizer: str,
             holdout_tokens: int) -> list[str]:
    """What this run does otherwise than the manifest records of the output's preparation, each as "with
    --block-size 256 (this run: --block-size 512)": the refusal had listed what might differ, and left the user to
    guess which."""
    def given(option: str, value) -> str:
        return f"no {option}" if value is None else f"{option} {value}"

    changed = [f"with {given(option, getattr(existing, field))} (this run: {given(option, this_run[field])})"
               for field, option in OPTIONS_RECORDED.items()
               if getattr(existing, field) not in (this_run[field], 0)]  # 0 workers: prepared before they were recorded
    inputs = {f.resolve(): str(f) for f in files}  # as the fingerprint sees them: another spelling is the same file
    before = {Path(f).resolve(): f for f in existing.inputs}
    if list(inputs) != list(before):
        dropped = [spelled for path, spelled in before.items() if path not in inputs]
        added = [spelled for path, spelled in inputs.items() if path not in before]
        parts = [f"{len(paths)} {which}: {paths[0]}" + (", ..." if len(paths) > 1 else "")
                 for which, paths in (("not given now", dropped), ("new", added)) if paths]
        changed.append(f"from other inputs ({', '.join(parts) or 'the same files in another order'})")
    else:
        prepared_at = datetime.datetime.fromisoformat(existing.created).timestamp()  # to the second below it
        edited = [f for f in files if f.stat().st_mtime >= prepared_at + 1]
        if edited:
            changed.append(f"before {edited[0]}" + (f" and {len(edited) - 1} more inputs" if len(edited) > 1 else "")
                           + f" changed (modified after {existing.created})")
    if spec.vocab_sha256 != existing.vocab_sha256:
        changed.append(f"with another tokenizer's vocabulary ({existing.tokenizer}, {existing.vocab_size:,} tokens; "
                       f"this run: {tokenizer}, {spec.vocab_size:,})")
    if existing.holdout_tokens and not holdout_tokens:
        changed.append(f"with a holdout of {existing.holdout_tokens:,} tokens (this run: --holdout-tokens 0)")
    return changed


def _without(options: dict, key: str) -> dict:
    return {name: value for name, value in options.items() if name != key}


def _blocks_per_chunk(block_size: int, spec: TokenizerSpec) -> int:
    return max(1, CHUNK_BYTES // (block_size * spec.dtype.itemsize))


def _existing(out: Path) -> Manifest | None:
    try:
        return Manifest.read(out)
    except UserError:  # no manifest or an unreadable one: not an up-to-date output
        return None


def _holdout_damage(out: Path, manifest: Manifest) -> str | None:
    """Why the holdout the manifest announces cannot be read, if it cannot (then the output is not up to date)."""
    if not manifest.holdout_tokens:
        return None
    try:
        Manifest.read(out / HOLDOUT)
    except UserError as err:
        return str(err)
    return None


def _check_block_size(block_size: int, spec: TokenizerSpec) -> None:
    if block_size < 2:
        raise UserError(f"--block-size {block_size}: must be at least 2")
    if spec.model_max_length is not None and block_size > spec.model_max_length:
        raise UserError(
            f"--block-size {block_size} exceeds the model's max positions ({spec.model_max_length}, the tokenizer's "
            f"model_max_length); use --block-size {spec.model_max_length} or less, or, for a model with more positions "
            "(its config.json's max_position_embeddings), a copy of the tokenizer folder whose tokenizer_config.json "
            "says so in model_max_length"
        )


def _fingerprint(files: list[Path], spec: TokenizerSpec, block_size: int, options: dict) -> str:
    """Inputs (path, size, mtime), tokenizer and options: equal fingerprints mean equal output."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    tokenizer = hashlib.sha256(spec.backend_json.encode()).hexdigest()  # renamed Unigram pieces change it too
    encoding = "special-token text as text"  # DocumentEncoder's rule; data prepared before it differs
    blob = json.dumps([stats, tokenizer, encoding, spec.separator_id, spec.append_separator, block_size, options], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _index(files: list[Path], text_unit: str, text_field: str) -> list[FileIndex]:
    indexes = [index_file(f, text_unit, text_field) for f in files]
    empty = [index.path for index in indexes if index.num_records == 0]
    if len(empty) == len(indexes):
        raise UserError(f"no documents in {', '.join(map(str, files))}: every input file is empty")
    for path in empty:
        print(f"warning: {path} is empty", file=sys.stderr)
    for index in indexes:
        if index.unit == "jsonl" and index.num_records:  # fail before starting workers on the most common mistake
            next(iter_segment(_first_record(index), text_field, True, SkipCounts()), None)
    _warn_of_corpus_files_read_whole([index.path for index in indexes if index.unit == "file" and index.num_records])
    return indexes


def _warn_of_corpus_files_read_whole(whole_files: list[Path]) -> None:
    """A few .txt files of many lines each, read whole (the default): most likely a corpus of one document per line,
    prepared without a word as a few documents thousands of tokens long, attending across them, with no holdout."""
    if len(whole_files) >= HOLDOUT_STRIDE:  # as many documents as that: files of their own
        return
    for path in whole_files:
        if (lines := count_lines(path)) >= HOLDOUT_STRIDE:
            print(f"warning: {path} is read as one document of {lines:,} lines (--text-unit file, the default); "
                  "if each line is a document, pass --text-unit line", file=sys.stderr)


def _first_record(index: FileIndex) -> Segment:
    return Segment(str(index.path), index.unit, 0, 1, 0)


def _optimize(job: TokenizeShard, shards: list, work: Path, block_size: int, spec: TokenizerSpec, workers: int) -> None:
    """Run ``litdata.optimize`` with its scratch folders and SIGINT handler kept to this run."""
    from litdata import TokensLoader, optimize
    from litdata.processing.data_processor import BaseWorker

    env = {
        "DATA_OPTIMIZER_CACHE_FOLDER": str(work / "cache" / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(work / "cache" / "data"),
        # One tokenizer thread per worker process: the workers are the parallelism. Never "true" here:
        # a tokenizer thread pool used by this process before the fork is dead in the workers.
        "TOKENIZERS_PARALLELISM": "false",
        # One machine prepares: set by a multi-machine job, these handed every range to "other nodes" (0 documents)
        "DATA_OPTIMIZER_NUM_NODES": "1", "DATA_OPTIMIZER_NODE_RANK": "0",
    }
    with patch.dict(os.environ, env), _interruptible(), patch.object(BaseWorker, "_loop", _reporting_loop(job)):
        try:
            optimize(
                fn=job, inputs=list(enumerate(shards)), output_dir=str(work / "data"), num_workers=workers,
                chunk_size=_blocks_per_chunk(block_size, spec) * block_size, item_loader=TokensLoader(),
                start_method="fork", keep_data_ordered=True, reorder_files=False, verbose=False,
            )
        except RuntimeError as err:  # litdata reports a worker's error as the text of its traceback
            _raise_reported_failure(work, job.counters)
            _refuse_if_disk_full(str(err), work)
            raise
    _raise_reported_failure(work, job.counters)


def _reporting_loop(job: TokenizeShard):
    """litdata's worker loop, whose own failure (writing a chunk or its index: a full disk, an I/O error) is reported as
    the job's are, and whose helper processes are stopped. litdata queued the error for a main process that no longer
    read its queue, and the worker's exit waited for its file remover forever: ``cpt prepare`` hung for good."""
    from litdata.processing.data_processor import BaseWorker

    loop = BaseWorker._loop

    def run(worker) -> None:
        try:
            loop(worker)
        except Exception as err:
            try:
                job.report(err)
            finally:
                for queue in (worker.remove_queue, *worker.to_upload_queues):
                    queue.put(None)  # what ends a helper thread; a helper process is killed
                for helper in (worker.remover, *worker.uploaders, *worker.downloaders):
                    if isinstance(helper, multiprocessing.Process) and helper.is_alive():
                        helper.kill()
            raise

    return run


def _raise_reported_failure(work: Path, counters: SharedCounters) -> None:
    """The first failure a worker reported (``TokenizeShard.report``), as the error of the whole run; a file system's
    refusal whose report could not be written (the disk full) by its errno alone."""
    errors = work / "errors.txt"
    reports = errors.read_text().splitlines() if errors.is_file() else []
    if reports:
        report = json.loads(reports[0])
        if "message" in report:
            raise UserError(report["message"])
        _refuse_if_disk_full(report["traceback"], work)
        raise RuntimeError(f"a tokenizing worker failed:\n{report['traceback']}")
    if counters["refused_errno"]:
        raise UserError(_file_system_message(OSError(counters["refused_errno"], ""), work))


def _file_system_message(refused: OSError | None, work: Path) -> str | None:
    """One line for a file system's refusal: to write the prepared source (a full disk or quota, an I/O error, a file
    size limit), or, naming it, to read an input."""
    if refused is None:
        return None
    if refused.filename and work.resolve() not in Path(os.fsdecode(refused.filename)).resolve().parents:  # an input's
        return f"{os.strerror(refused.errno)}: {os.fsdecode(refused.filename)} ({FILE_SYSTEM_FIXES[refused.errno]})"
    return (f"could not write the prepared source in {work.parent}: {os.strerror(refused.errno).lower()}; "
            f"{FILE_SYSTEM_FIXES[refused.errno]}, or choose another --output (nothing was saved)")


def _refuse_if_disk_full(traceback_text: str, work: Path) -> None:
    """A full disk is the user's to fix, said in one line (it was a 40-line double traceback); nothing is kept."""
    if f"[Errno {errno.ENOSPC}]" in traceback_text:
        raise UserError(_file_system_message(OSError(errno.ENOSPC, ""), work))


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_forks_die_with_parent = False  # set while litdata runs: its workers and their helper processes are forked then
_forking_pid = 0  # the process that forked, as the child sees it


def _note_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _die_with_parent() -> None:
    """In a process forked while litdata runs: the kernel SIGKILLs it when its parent dies (Linux), so no
    worker or worker's helper (downloader, uploader, remover) of an interrupted or killed run lives on.

    A parent that died between the fork and the ``prctl`` sends no signal (a worker killed by a Ctrl-C while
    forking its helpers, under load): then the child is already another's and ends itself. One such helper
    outlived its run, holding ``cpt prepare``'s stderr open, in a CI run of the SIGINT test."""
    if _forks_die_with_parent and sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != _forking_pid:
            os._exit(INTERRUPTED_EXIT_CODE)


os.register_at_fork(before=_note_forking_pid, after_in_child=_die_with_parent)


@contextlib.contextmanager
def _interruptible():
    """A Ctrl-C stops every tokenizing process and raises KeyboardInterrupt here, so ``_work_folder`` removes
    the partial folder and ``cpt prepare`` says it was interrupted (exit code 130).

    litdata's own SIGINT handler asked the workers to stop without waiting and ``os._exit(0)``ed: an
    interrupted run looked like a success, and a SIGINT to this process alone (a scheduler's) left the
    workers' helper processes running, holding the output's lock. Here the workers are killed (the
    kernel then kills their helpers) and waited for; a worker given the SIGINT too (a Ctrl-C signals
    the whole process group) exits at once. Our own SIGINT handler comes back once litdata is done.
    """
    global _forks_die_with_parent
    from litdata.processing.data_processor import DataProcessor

    if threading.current_thread() is not threading.main_thread():  # no signal handlers but in the main thread
        yield
        return
    main_pid = os.getpid()
    interrupted = False

    def on_sigint(processor, signum, frame):
        nonlocal interrupted
        if os.getpid() != main_pid:
            os._exit(INTERRUPTED_EXIT_CODE)
        interrupted = True
        _stop_workers(others)
        raise KeyboardInterrupt

    def quiet_lost_interrupt(unraisable):
        # Raised inside a hook whose exceptions Python ignores (logging's or filelock's at-fork hooks while
        # litdata forked a worker), the interrupt is lost there, and Python printed it as a traceback: it is
        # raised again below. (errors.sigterm_raises quiets a lost SIGTERM.)
        if not (interrupted and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            unraisable_hook(unraisable)

    def raise_lost_interrupt():
        if interrupted:
            raise KeyboardInterrupt
        if sigterm_received():
            raise Terminated

    def start_workers(processor, *args, **kwargs):
        # The worker being forked when the interrupt was lost was not stopped with the others, and ran its whole
        # share before the run stopped: raised here, the interrupt stops every worker at once.
        create_process_workers(processor, *args, **kwargs)
        raise_lost_interrupt()

    saved, unraisable_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    create_process_workers = DataProcessor._create_process_workers
    _forks_die_with_parent, sys.unraisablehook = True, quiet_lost_interrupt
    others = set(multiprocessing.active_children())  # a caller's own (prepare called from Python): left alone
    try:
        with patch.object(DataProcessor, "_signal_handler", on_sigint), \
                patch.object(DataProcessor, "_create_process_workers", start_workers):
            try:
                yield
            except BaseException:  # a SIGTERM to this process alone (errors.Terminated): the exit waited for the
                _stop_workers(others)  # workers forever, and they for their helpers
                raise
        raise_lost_interrupt()  # lost in such a hook: the run finished, replaced the output and exited 0
    finally:
        _forks_die_with_parent, sys.unraisablehook = False, unraisable_hook
        signal.signal(signal.SIGINT, saved)


def _stop_workers(others: set) -> None:
    """Kill the tokenizing workers (the kernel then kills their helpers) and wait for them: every child process but
    ``others``, those that ran before litdata started."""
    for worker in set(multiprocessing.active_children()) - others:
        worker.kill()
        worker.join()


def _summary(m: Manifest, elapsed: float, out: Path, why_no_holdout: str | None = None) -> str:
    skipped = f"{m.skipped_empty:,} empty and {m.skipped_invalid_utf8:,} invalid-UTF-8 documents skipped"
    repeats = f" ({m.holdout_repeats:,} more left out: training repeats their text)" if m.holdout_repeats else ""
    holdout = (f"held out {m.holdout_documents:,} documents{repeats} → {m.holdout_tokens:,} tokens in {out / HOLDOUT}"
               if m.holdout_tokens else f"no holdout ({why_no_holdout})" if why_no_holdout else "no holdout")
    documents = m.num_documents + m.holdout_documents + (m.holdout_repeats or 0)
    tokens = m.num_tokens + m.tokens_dropped + m.holdout_tokens
    return (
        f"{m.source}: {m.num_documents:,} documents → {m.num_tokens:,} tokens in {m.num_blocks:,} blocks of "
        f"{m.block_size} ({m.tokens_dropped:,} tokens dropped; {skipped}); {holdout}; in {elapsed:.1f} s: "
        f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed / 1e6:.2f}M tokens/s → {out}"
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="cpt prepare",
        description="Tokenize the raw corpora of ONE source and pack them into LitData token chunks.",
    )
    parser.add_argument("inputs", nargs="+", help=".jsonl / .parquet / .txt files (.gz accepted) or folders of them")
    parser.add_argument("--output", "-o", required=True, help="output folder of this source (one per source)")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face name or local tokenizer folder")
    parser.add_argument("--block-size", type=int, default=8192, help="tokens per packed row (default 8192)")
    parser.add_argument("--name", help="source name recorded in the manifest (default: the output folder name)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text (default: text)")
    parser.add_argument("--text-unit", choices=("file", "line"), default="file",
                        help="what one document is in .txt inputs: a whole file (default) or one line")
    parser.add_argument("--num-workers", type=int, default=usable_cores(),
                        help="tokenizing processes (default: the cores this process may use); each tokenizes its own range of the inputs, so "
                        "the count decides which documents are held out: give the same one on every machine")
    parser.add_argument("--max-docs", type=int, help="only the first N records (quick subsets for tests and demos)")
    parser.add_argument("--holdout-tokens", type=int, default=DEFAULT_HOLDOUT_TOKENS, metavar="N",
                        help=f"hold about N tokens out of training, in OUTPUT/{HOLDOUT} (every {HOLDOUT_STRIDE}th "
                        f"document of each worker's shard until its N/workers share is met; default "
                        f"{DEFAULT_HOLDOUT_TOKENS:,}; 0: none). A probe for cpt analyze or a validation source")
    parser.add_argument("--skip-invalid-utf8", action="store_true",
                        help="skip (and count) documents that are not valid UTF-8 instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an output prepared from other inputs or settings (an up-to-date one is kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manifest, up_to_date = prepare(
        args.inputs, args.output, args.tokenizer, args.block_size, name=args.name, text_field=args.text_field,
        text_unit=args.text_unit, num_workers=args.num_workers, max_docs=args.max_docs,
        skip_invalid_utf8=args.skip_invalid_utf8, holdout_tokens=args.holdout_tokens, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if up_to_date and not args.quiet:
        print(f"{manifest.source}: {args.output} is up to date ({manifest.num_tokens:,} tokens); nothing to do",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
