"""`cpt prepare`: the token stream is the documents tokenized and joined, in order, in every input format;
the holdout is every 50th document of a shard up to its quota and nothing else, and no training block holds it;
reruns are no-ops; failures leave nothing that looks prepared; bad input gets a one-line error."""

import codecs
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cpt_lightning.data import Manifest
from cpt_lightning.data.holdout import HOLDOUT_STRIDE, ShardHoldout, write_holdout
from cpt_lightning.data.prepare import TokenizeShard, main, prepare
from cpt_lightning.data.progress import ProgressBar, SharedCounters
from cpt_lightning.data.readers import index_file, plan_shards
from cpt_lightning.errors import INTERRUPTED_EXIT_CODE, Terminated, UserError, sigterm_raises
from helpers import Terminal, in_a_finalizer

BLOCK = 32


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def stream(folder, block=BLOCK):
    """Every token of a prepared folder, in stored order, read back through litdata's TokensLoader."""
    from litdata import StreamingDataset, TokensLoader

    dataset = StreamingDataset(str(folder), item_loader=TokensLoader(block), shuffle=False)
    return np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)


def full_blocks(ids, block=BLOCK):
    return ids[: len(ids) // block * block]


@pytest.fixture(scope="module")
def abstracts(sample_texts):
    return sample_texts[:120]


@pytest.fixture(scope="module")
def encode(modernbert_tokenizer):
    def tokens(docs):
        return np.array([t for d in docs for t in modernbert_tokenizer(d)["input_ids"]], dtype=np.int64)

    return tokens


def run(inputs, out, tokenizer_dir, **kwargs):
    kwargs.setdefault("num_workers", 1)
    kwargs.setdefault("holdout_tokens", 0)  # these tests follow every document; the holdout has its own below
    kwargs.setdefault("progress", False)
    return prepare([str(p) for p in inputs], str(out), str(tokenizer_dir), kwargs.pop("block_size", BLOCK), **kwargs)


def test_stream_is_documents_tokenized_and_joined(tmp_path, tokenizer_dir, abstracts, encode):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    manifest, _ = run([raw], tmp_path / "out", tokenizer_dir)
    expected = encode(abstracts)
    got = stream(tmp_path / "out")
    assert np.array_equal(got, full_blocks(expected))
    assert got[0] == 50281 and (got == 50282).sum() >= len(abstracts) - 1  # [CLS] … [SEP] per document
    assert (manifest.num_documents, manifest.num_tokens, manifest.tokens_dropped) == (
        len(abstracts), len(got), len(expected) - len(got))
    assert (manifest.vocab_size, manifest.separator_id, manifest.dtype, manifest.block_size) == (
        50368, 50282, "uint16", BLOCK)
    assert Manifest.read(tmp_path / "out") == manifest


def test_special_tokens_written_in_a_document_are_text(tmp_path, tokenizer_dir, modernbert_tokenizer):
    """A paper about BERT: its "[SEP]" must not end the document, its "[MASK]" must not reach the model as a mask."""
    docs = ["BERT joins segments with [SEP] and predicts [MASK] tokens from [CLS] context.", "A second document."]
    raw = write_jsonl(tmp_path / "docs.jsonl", docs * 8)
    run([raw], tmp_path / "out", tokenizer_dir)
    got = stream(tmp_path / "out")
    specials = {modernbert_tokenizer.cls_token_id, modernbert_tokenizer.sep_token_id}
    assert not np.isin(got, [modernbert_tokenizer.mask_token_id, modernbert_tokenizer.pad_token_id]).any()
    separators, starts = (got == modernbert_tokenizer.sep_token_id).sum(), (got == modernbert_tokenizer.cls_token_id).sum()
    assert separators in (starts, starts - 1)  # one per document (the stored stream may stop inside the last one)
    first = got[: list(got).index(modernbert_tokenizer.sep_token_id) + 1]
    assert modernbert_tokenizer.decode(first[1:-1]) == docs[0] and not np.isin(first[1:-1], list(specials)).any()


def test_a_tokenizer_folder_without_its_special_tokens_named_says_where_to_name_them(tmp_path, tokenizer_dir):
    """A folder holding only tokenizer.json (its post-processor frames texts with [SEP], but no file names that token
    the separator) is refused naming the file and key that fix it."""
    from cpt_lightning.data.encoding import load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", bare)
    with pytest.raises(UserError, match=r"neither a SEP nor an EOS token .*tokenizer_config.json, e.g. \"sep_token\""):
        load_tokenizer(str(bare))
    (bare / "tokenizer_config.json").write_text(json.dumps({"sep_token": "[SEP]"}))
    assert load_tokenizer(str(bare)).separator_id == 50282


def test_two_workers_split_the_input_in_order(tmp_path, tokenizer_dir, abstracts, encode):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    run([raw], tmp_path / "out", tokenizer_dir, num_workers=2)
    shards = plan_shards([index_file(raw, "file", "text")], 2)
    assert len(shards) == 2 and shards[0][0].stop == shards[1][0].start > 0
    expected = np.concatenate([full_blocks(encode(abstracts[s[0].start:s[0].stop])) for s in shards])
    assert np.array_equal(stream(tmp_path / "out"), expected)


def test_a_tokenizing_worker_killed_mid_range_saves_nothing(tmp_path, tokenizer_dir, abstracts, monkeypatch):
    """The out-of-memory killer's SIGKILL ended a worker without an error: litdata merged the other's chunks, the
    source was saved without that range, exit 0, and a rerun said "up to date"."""
    from cpt_lightning.data import prepare as prepare_module

    blocks = prepare_module.TokenizeShard._blocks

    def killed_in_range_1(self, number, shard):
        for i, block in enumerate(blocks(self, number, shard)):
            if number == 1 and i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            yield block

    monkeypatch.setattr(prepare_module.TokenizeShard, "_blocks", killed_in_range_1)
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    with pytest.raises(UserError, match=r"1 of the 2 tokenizing workers stopped before the end of their input range "
                                        r"\(.* blocks written; killed, out of memory\?\): nothing was saved"):
        run([raw], tmp_path / "out", tokenizer_dir, num_workers=2)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_a_folder_prepare_wrote(tmp_path, tokenizer_dir, abstracts):
    """--overwrite deleted whatever --output named: a project's prepared/ folder with its other sources, notes and
    runs (the refusal without it even advised --overwrite)."""
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    project = tmp_path / "prepared"
    run([raw], project / "medical_qa", tokenizer_dir)
    (project / "NOTES.md").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"prepared already exists and holds other data, not a folder cpt prepare "
                                            r"wrote \(no manifest.json\): --overwrite replaces only those"):
            run([raw], project, tokenizer_dir, overwrite=overwrite)
    assert (project / "NOTES.md").read_text() == "keep" and Manifest.read(project / "medical_qa").num_documents
    (tmp_path / "empty").mkdir()
    assert run([raw], tmp_path / "empty", tokenizer_dir)[0].num_documents  # an empty folder is no one's data
    chunk = next((project / "medical_qa").glob("chunk-*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:100])  # a damaged one of ours: its manifest there, failing its checks
    with pytest.raises(UserError, match="damaged LitData chunk"):
        Manifest.read(project / "medical_qa")
    assert run([raw], project / "medical_qa", tokenizer_dir, overwrite=True)[0] == Manifest.read(project / "medical_qa")


def test_a_full_disk_is_one_line_and_saves_nothing(tmp_path, tokenizer_dir, abstracts, monkeypatch):
    """It was litdata's error around the worker's traceback, 40 lines, where every other writer says one."""
    import errno

    from cpt_lightning.data import prepare as prepare_module

    def disk_full(self, number, shard):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield  # a generator, as _blocks

    monkeypatch.setattr(prepare_module.TokenizeShard, "_blocks", disk_full)
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    with pytest.raises(UserError, match=r"^could not write the prepared source in .*: no space left on device; free "
                                        r"space on that disk, or choose another --output \(nothing was saved\)$"):
        run([raw], tmp_path / "out", tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_an_input_that_cannot_be_read_is_named(tmp_path, tokenizer_dir, abstracts, monkeypatch):
    """Not "could not write the prepared source ..., choose another --output": the input is at fault."""
    import errno
    import io

    from cpt_lightning.data import readers

    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    main_process, open_binary = os.getpid(), readers.open_binary

    class FailingRead(io.BytesIO):
        def __iter__(self):
            raise OSError(errno.EIO, "Input/output error")  # as a read's: no file name

    def unreadable_in_the_workers(path):  # the main process's look at the first record reads it
        return open_binary(path) if os.getpid() == main_process else FailingRead()

    monkeypatch.setattr(readers, "open_binary", unreadable_in_the_workers)
    with pytest.raises(UserError, match=rf"^Input/output error: {raw} \(check that disk or network mount, then "
                                        r"retry\)$"):
        run([raw], tmp_path / "out", tokenizer_dir)


FAILING_CHUNK_WRITE = textwrap.dedent("""
    import builtins, errno, os, sys
    from litdata.streaming.writer import BinaryWriter
    from cpt_lightning.cli import main

    error, report_written = getattr(errno, sys.argv[1].split("+")[0]), "+report" not in sys.argv[1]

    def failing(self, raw_data, filename, *args, **kwargs):  # naming the chunk, as open() does, or not, as write()
        raise OSError(error, "injected", *[os.path.join(self._cache_dir, filename)] * ("+named" in sys.argv[1]))

    def full_for_the_report(file, *args, **kwargs):
        if str(file).endswith("errors.txt"):
            raise OSError(error, "injected", file)
        return opened(file, *args, **kwargs)

    BinaryWriter.write_chunk_to_file = failing  # litdata's own write of a chunk, in the forked workers
    if not report_written:  # a disk really full: the worker's report of the failure cannot be written either
        opened, builtins.open = builtins.open, full_for_the_report
    sys.exit(main(["prepare", *sys.argv[2:]]))
""")


@pytest.mark.parametrize("error, line", [
    ("ENOSPC", "no space left on device; free space on that disk"),
    ("ENOSPC+report", "no space left on device; free space on that disk"),
    ("EIO+named", "input/output error; check that disk or network mount, then retry"),  # through a symlink
])
def test_a_chunk_litdata_cannot_write_is_one_line_and_keeps_the_earlier_output(tmp_path, tokenizer_dir, abstracts,
                                                                               error, line):
    """The error was queued for a main process that no longer read it, and the worker's exit waited for its file
    remover forever: `cpt prepare` hung on a full disk, also where the worker could not write its report there."""
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    earlier, _ = run([raw], tmp_path / "out", tokenizer_dir)
    write_jsonl(raw, abstracts[:31])
    (tmp_path / "link").symlink_to(tmp_path)  # litdata writes where the link leads: still the output, not an input
    folder = tmp_path / "link" if "+named" in error else tmp_path
    started = subprocess.Popen(
        [sys.executable, "-c", FAILING_CHUNK_WRITE, error, str(raw), "-o", str(folder / "out"), "--tokenizer",
         str(tokenizer_dir), "--block-size", str(BLOCK), "--num-workers", "2", "--overwrite", "--quiet"],
        start_new_session=True, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stderr = started.communicate(timeout=60)[1]
    finally:
        for pid in processes_in_session(started.pid):
            os.kill(pid, signal.SIGKILL)
    assert started.returncode == 2, stderr[-3000:]
    assert stderr == f"error: could not write the prepared source in {folder}: {line}, or choose another --output " \
                     "(nothing was saved)\n"
    assert Manifest.read(tmp_path / "out") == earlier and not list(tmp_path.glob(".out.partial*"))


def test_every_input_format_gives_the_same_stream(tmp_path, tokenizer_dir, abstracts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [" ".join(d.split()) for d in abstracts[:40]]  # one line each, for the line-per-document text format
    write_jsonl(tmp_path / "docs.jsonl", docs)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((tmp_path / "docs.jsonl").read_text())
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet", row_group_size=16)
    (tmp_path / "lines.txt").write_text("\n".join(docs) + "\n")
    folder = tmp_path / "notes"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d)

    reference = run([tmp_path / "docs.jsonl"], tmp_path / "a", tokenizer_dir)[0]
    run([tmp_path / "docs.jsonl.gz"], tmp_path / "b", tokenizer_dir, num_workers=2)
    run([tmp_path / "docs.parquet"], tmp_path / "c", tokenizer_dir, text_field="body")
    run([tmp_path / "lines.txt"], tmp_path / "d", tokenizer_dir, text_unit="line")
    run([folder], tmp_path / "e", tokenizer_dir)
    expected = stream(tmp_path / "a")
    for name in "cde":
        assert np.array_equal(stream(tmp_path / name), expected), name
    assert Manifest.read(tmp_path / "e").num_documents == reference.num_documents == 40
    assert Manifest.read(tmp_path / "b").num_documents == 40


def test_max_docs_takes_the_first_records(tmp_path, tokenizer_dir, abstracts, encode):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    manifest, _ = run([raw], tmp_path / "out", tokenizer_dir, max_docs=25)
    assert manifest.num_documents == 25
    assert np.array_equal(stream(tmp_path / "out"), full_blocks(encode(abstracts[:25])))


def held_out_by_rule(docs, lengths, quota):
    """Indexes of one shard's held-out documents: every HOLDOUT_STRIDE-th, while fewer than quota tokens are held."""
    held, tokens = [], 0
    for i in range(HOLDOUT_STRIDE - 1, len(docs), HOLDOUT_STRIDE):
        if tokens >= quota:
            break
        held.append(i)
        tokens += lengths[i]
    return held


def contains_run(stream_ids, run):
    windows = np.lib.stride_tricks.sliding_window_view(stream_ids, len(run))
    return bool((windows == run).all(axis=1).any())


@pytest.mark.parametrize("holdout_tokens", [10**9, 600, 1])  # 1: under one token a shard, still a document each
def test_holdout_is_every_50th_document_of_a_shard_and_out_of_training(
    tmp_path, tokenizer_dir, sample_texts, encode, holdout_tokens
):
    raw = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    manifest, _ = run([raw], tmp_path / "out", tokenizer_dir, num_workers=2, holdout_tokens=holdout_tokens)
    shards = [sample_texts[s[0].start:s[0].stop] for s in plan_shards([index_file(raw, "file", "text")], 2)]
    quota = -(-holdout_tokens // len(shards))
    held = [[docs[i] for i in held_out_by_rule(docs, [len(encode([d])) for d in docs], quota)] for docs in shards]
    kept = [[d for d in docs if d not in out] for docs, out in zip(shards, held)]
    candidates = [len(docs) // HOLDOUT_STRIDE for docs in shards]
    if holdout_tokens > 10**6:  # no quota reached: every 50th document of each shard
        assert [len(out) for out in held] == candidates and min(candidates) >= 2
    else:  # 300 tokens a shard (or 1): one shard stops before its last candidate
        assert all(len(out) >= 1 for out in held) and [len(out) for out in held] != candidates

    training, holdout = stream(tmp_path / "out"), stream(tmp_path / "out" / "holdout")
    assert np.array_equal(training, np.concatenate([full_blocks(encode(docs)) for docs in kept]))
    assert np.array_equal(holdout, full_blocks(encode([d for out in held for d in out])))
    for doc in (d for out in held for d in out):  # no held-out document's text reaches a training block
        ids = encode([doc])
        assert not contains_run(training, ids[1:17]) and contains_run(holdout, ids[1:17])
    assert manifest.num_documents + manifest.holdout_documents == len(sample_texts)
    assert manifest.holdout_documents == sum(map(len, held)) and manifest.holdout_tokens == len(holdout)
    side = Manifest.read(tmp_path / "out" / "holdout")
    assert (side.source, side.num_documents, side.num_tokens) == ("out/holdout", manifest.holdout_documents, len(holdout))
    assert side.vocab_sha256 == manifest.vocab_sha256 and side.block_size == BLOCK
    assert side.tokens_dropped == len(encode([d for out in held for d in out])) - len(holdout)  # the last block's rest
    per_shard = [sum(len(encode([d])) for d in out) for out in held]
    assert all(tokens - len(encode([out[-1]])) < quota for tokens, out in zip(per_shard, held))  # stops at the quota


def test_a_shard_whose_first_held_document_meets_its_quota_holds_no_more(tmp_path, sample_texts, encode):
    """The quota is met at exactly its tokens: the next candidate stays in training."""
    texts = sample_texts[:3 * HOLDOUT_STRIDE]
    first = len(encode([texts[HOLDOUT_STRIDE - 1]]))
    shard = ShardHoldout(tmp_path, 0, first, encode)
    kept = shard.split(texts)
    assert shard.held == first and kept == texts[:HOLDOUT_STRIDE - 1] + texts[HOLDOUT_STRIDE:]


def test_held_out_documents_that_training_repeats_are_left_out_of_the_holdout(tmp_path, tokenizer_dir, sample_texts,
                                                                               encode, capsys):
    """Held out by the stride but repeated in training (before or after, spaced otherwise, in another Unicode form) or
    by an earlier held-out document: left out, so validation scores no text the model trained on; of two held-out
    copies the first stays."""
    import unicodedata

    docs = list(sample_texts[:250])  # held out by the stride: 49, 99, 149, 199, 249
    docs[10] = "  " + docs[49].replace(" ", "\n  ") + "\n"  # a training document before it, other spacing
    docs[99] += " Naïve café in Besançon."
    docs[180] = unicodedata.normalize("NFD", docs[99])  # a training document after it, é as e + accent
    docs[199] = docs[149]  # a held-out document after it: 149 stays
    raw = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert main([str(raw), "-o", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--block-size", "16",
                 "--holdout-tokens", str(10**9), "--num-workers", "1"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    manifest = Manifest.read(tmp_path / "out")

    kept, repeats = [docs[149], docs[249]], [docs[49], docs[99], docs[199]]
    assert np.array_equal(stream(tmp_path / "out" / "holdout", 16), full_blocks(encode(kept), 16))
    assert (manifest.holdout_documents, manifest.holdout_repeats) == (2, 3)
    assert Manifest.read(tmp_path / "out" / "holdout").num_documents == 2
    training = [d for i, d in enumerate(docs) if (i + 1) % HOLDOUT_STRIDE]
    assert manifest.num_documents == len(training) == 245  # neither trained on nor held out: counted apart
    assert manifest.num_tokens + manifest.tokens_dropped == len(encode(training)) + len(encode(repeats))
    assert "held out 2 documents (3 more left out: training repeats their text) →" in summary
    assert "out: 245 documents" in summary
    from cpt_lightning.data.holdout import DOCUMENT_KEYS, text_key

    assert np.load(tmp_path / "out" / "holdout" / DOCUMENT_KEYS).tolist() == sorted(map(text_key, kept))  # not repeats
    assert text_key("ﬁnding ５ µg²") == text_key("finding 5 μg2")  # forms only NFKC folds: PDF-extracted text


def test_the_vocabulary_hash_covers_each_tokens_id():
    """Data of a tokenizer with the same tokens under other ids passed the checks between sources and model."""
    from cpt_lightning.data.encoding import vocab_sha256

    assert vocab_sha256({"a": 0, "b": 1}) != vocab_sha256({"a": 1, "b": 0})


def test_a_holdout_another_source_of_the_mix_trains_on_is_warned_of(tmp_path, tokenizer_dir, sample_texts):
    """cpt prepare leaves out of a holdout only what its own source repeats: an instruction set built from the
    held-out abstracts trained on them without a word, and their curve scored them as held out."""
    import warnings

    from cpt_lightning.data import PackedDataModule, Source

    abstracts = list(sample_texts[:100])  # held out by the stride: 49 and 99
    instructions = [*sample_texts[100:160], "  " + abstracts[49].replace(" ", "\n ")]  # the same words, spaced otherwise
    for name, docs, holdout in (("abstracts", abstracts, 10**9), ("instructions", instructions, 0)):
        assert main([str(write_jsonl(tmp_path / f"{name}.jsonl", docs)), "-o", str(tmp_path / name), "--tokenizer",
                     str(tokenizer_dir), "--block-size", "16", "--holdout-tokens", str(holdout), "--num-workers", "1"]) == 0
    sources = [Source("abstracts", str(tmp_path / "abstracts")), Source("instructions", str(tmp_path / "instructions"))]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        PackedDataModule(sources, micro_batch_size=1, val_sources=[Source("held", str(tmp_path / "abstracts" / "holdout"))])
    assert [str(w.message) for w in said] == [
        "data.init_args.val_sources 'held': 1 of its 2 documents are training documents of source 'instructions' too "
        "(the same text): its curve scores them as held out; take them out of that source's input and prepare it again"]


def test_repeats_are_found_across_shards(tmp_path, tokenizer_dir, sample_texts, encode):
    """A shard's held-out document repeated by another shard's training document, earlier or later, is left out."""
    from cpt_lightning.data.encoding import DocumentEncoder, load_tokenizer

    spec = load_tokenizer(str(tokenizer_dir))
    side, shards = tmp_path / "side", [list(sample_texts[i:i + 50]) for i in (0, 50, 100)]  # held out: each one's 49
    side.mkdir()
    shards[1][10] = shards[0][49]  # a later shard trains on shard 0's held-out text
    shards[0][5] = shards[1][49]  # an earlier shard trains on shard 1's
    for number, docs in enumerate(shards):
        holdout = ShardHoldout(side, number, 10**9, DocumentEncoder(spec))
        assert holdout.split(docs[:30]) + holdout.split(docs[30:]) == docs[:49]

    counts = write_holdout(side, len(shards), tmp_path / "holdout", 16, spec.dtype, 16 * 64)
    assert (counts.documents, counts.repeats) == (1, 2)
    assert counts.repeat_tokens == len(encode([shards[0][49], shards[1][49]]))
    assert np.array_equal(stream(tmp_path / "holdout", 16), full_blocks(encode([shards[2][49]]), 16))


def test_a_holdout_prepared_before_repeats_were_left_out_needs_overwrite(tmp_path, tokenizer_dir, abstracts):
    """Same inputs and settings, but a holdout from before: refused with why; --overwrite keeps the training rows."""
    from cpt_lightning.data.encoding import load_tokenizer
    from cpt_lightning.data.prepare import REPEATS_OPTION, _fingerprint, _without

    raw, out = write_jsonl(tmp_path / "docs.jsonl", abstracts), tmp_path / "out"
    first, _ = run([raw], out, tokenizer_dir, holdout_tokens=1000)
    options = dict(text_field="text", text_unit="file", max_docs=None, skip_invalid_utf8=False, holdout_tokens=1000,
                   holdout_stride=HOLDOUT_STRIDE, ranges=1, **{REPEATS_OPTION: "left out"})
    spec = load_tokenizer(str(tokenizer_dir))
    assert _fingerprint([raw], spec, BLOCK, options) == first.fingerprint  # the options prepare hashes
    data = json.loads((out / "manifest.json").read_text())
    del data["holdout_repeats"]
    data["fingerprint"] = _fingerprint([raw], spec, BLOCK, _without(options, REPEATS_OPTION))
    (out / "manifest.json").write_text(json.dumps(data))
    training = stream(out)

    with pytest.raises(UserError, match="its holdout was prepared before held-out documents whose text training "
                                        "repeats were left out of it.*pass --overwrite"):
        run([raw], out, tokenizer_dir, holdout_tokens=1000)
    assert Manifest.read(out).holdout_repeats is None
    with pytest.raises(UserError, match="was prepared from other inputs"):  # other settings: the general refusal
        run([raw], out, tokenizer_dir, holdout_tokens=2000)
    again, up_to_date = run([raw], out, tokenizer_dir, holdout_tokens=1000, overwrite=True)
    assert not up_to_date and again.holdout_repeats == 0 and np.array_equal(stream(out), training)


def test_a_folder_prepared_before_the_document_keys_were_kept_needs_overwrite(tmp_path, tokenizer_dir, abstracts):
    """It was "up to date" for good, so cpt fit could never compare its holdout with the mix's other sources."""
    from cpt_lightning.data.holdout import DOCUMENT_KEYS

    raw, out = write_jsonl(tmp_path / "docs.jsonl", abstracts), tmp_path / "out"
    run([raw], out, tokenizer_dir, holdout_tokens=1000)
    keys, training = np.load(out / DOCUMENT_KEYS), stream(out)
    (out / DOCUMENT_KEYS).unlink()
    with pytest.raises(UserError, match=rf"{out} was prepared before cpt prepare kept its documents' keys "
                                        rf"\({DOCUMENT_KEYS}\), .*; pass --overwrite to prepare it again"):
        run([raw], out, tokenizer_dir, holdout_tokens=1000)
    _, up_to_date = run([raw], out, tokenizer_dir, holdout_tokens=1000, overwrite=True)
    assert not up_to_date and np.array_equal(np.load(out / DOCUMENT_KEYS), keys) and np.array_equal(stream(out), training)


def test_a_folder_a_run_reads_is_not_replaced_under_it(tmp_path, tokenizer_dir, abstracts):
    """--overwrite swapped the data under a running fit: it read on from the deleted chunks and opened new ones under
    the old index, and its resume was then refused. A run reading the source or only its holdout holds them (from
    setup to teardown); a prepare replacing them holds them alone, and a run starting meanwhile is told."""
    from cpt_lightning.data import PackedDataModule, Source
    from cpt_lightning.folder_locks import replacing

    raw, out, other = write_jsonl(tmp_path / "docs.jsonl", abstracts), tmp_path / "out", tmp_path / "other"
    run([raw], out, tokenizer_dir, holdout_tokens=1000)
    run([raw], other, tokenizer_dir)
    training = stream(out)
    write_jsonl(raw, abstracts[:-1])
    for reads, read in (({"sources": [Source("docs", str(out))]}, out),
                        ({"sources": [Source("other", str(other))], "val_sources": [Source("held", str(out / "holdout"))]},
                         out / "holdout")):
        data = PackedDataModule(micro_batch_size=1, num_workers=0, **reads)
        data.setup("fit")
        with pytest.raises(UserError, match=rf"^{read} is read by a running cpt fit or cpt validate"):
            run([raw], out, tokenizer_dir, holdout_tokens=1000, overwrite=True)
        assert np.array_equal(stream(out), training)
        if read == out:
            data.teardown("fit")
        else:  # a failed fit: Lightning calls no teardown then
            data.on_exception(RuntimeError("the fit failed"))
    with replacing(out), pytest.raises(UserError, match=rf"^{out / 'holdout'} is being prepared again"):
        data.setup("fit")
    replaced, _ = run([raw], out, tokenizer_dir, holdout_tokens=1000, overwrite=True)
    assert replaced.num_documents + replaced.holdout_documents == len(abstracts) - 1


def test_a_folder_is_read_through_its_linked_sub_folders_and_a_broken_link_is_refused(tmp_path):
    """Path.rglob skipped linked sub-folders (shards linked in from other storage) and dropped broken links, with
    their documents, without a word."""
    from cpt_lightning.data.readers import find_input_files

    corpus, store = tmp_path / "corpus", tmp_path / "store" / "part2"
    store.mkdir(parents=True)
    corpus.mkdir()
    write_jsonl(corpus / "part1.jsonl", ["a"])
    write_jsonl(store / "x.jsonl", ["b"])
    (corpus / "part2").symlink_to(store)
    (store / "loop").symlink_to(corpus)  # a link back up: each folder is read once
    (corpus / ".git").mkdir()
    (corpus / ".git" / "dangling").symlink_to(tmp_path / "nowhere")  # hidden folders are skipped, not walked
    assert [p.relative_to(corpus) for p in find_input_files([str(corpus)])] == [Path("part1.jsonl"), Path("part2/x.jsonl")]
    (corpus / "part3.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(UserError, match=r"part3.jsonl: a link to .*gone.jsonl, which does not exist; fix or remove it"):
        find_input_files([str(corpus)])


def test_the_default_workers_are_the_usable_cores_and_a_jobs_litdata_nodes_are_ignored(tmp_path, tokenizer_dir,
                                                                                        abstracts, monkeypatch):
    """os.cpu_count() planned a range per core of the machine (a 4-core SLURM job on 128 cores: 128 ranges); a
    multi-machine job's DATA_OPTIMIZER_NUM_NODES handed every range to other nodes: 0 documents."""
    import cpt_lightning.data.prepare as prepare_module

    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:60])
    monkeypatch.setattr(prepare_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("DATA_OPTIMIZER_NUM_NODES", "2")
    monkeypatch.setenv("DATA_OPTIMIZER_NODE_RANK", "0")
    manifest, _ = prepare([str(raw)], str(tmp_path / "out"), str(tokenizer_dir), BLOCK, holdout_tokens=0, progress=False)
    assert (manifest.num_workers, manifest.num_documents) == (1, 60)


def test_no_holdout_with_zero_tokens_or_less_than_one_block(tmp_path, tokenizer_dir, abstracts, encode):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    manifest, _ = run([raw], tmp_path / "none", tokenizer_dir, holdout_tokens=0)
    assert (manifest.num_documents, manifest.holdout_documents, manifest.holdout_tokens) == (len(abstracts), 0, 0)
    assert not (tmp_path / "none" / "holdout").exists()

    block = 512  # one held-out abstract (document 50, ~300 tokens) fills no block: no holdout, its tokens dropped
    manifest, _ = run([raw], tmp_path / "small", tokenizer_dir, holdout_tokens=1, block_size=block)
    assert len(encode([abstracts[49]])) < block and not (tmp_path / "small" / "holdout").exists()
    kept = abstracts[:49] + abstracts[50:]
    assert np.array_equal(stream(tmp_path / "small", block), full_blocks(encode(kept), block))
    assert (manifest.num_documents, manifest.holdout_documents, manifest.holdout_tokens) == (len(kept), 0, 0)
    assert manifest.tokens_dropped == len(encode(kept)) % block + len(encode([abstracts[49]]))


def test_a_few_text_files_of_many_lines_read_whole_are_warned_of(tmp_path, tokenizer_dir, abstracts, capsys):
    """One corpus file of a document per line, read whole by default, was prepared as one document of 87k tokens
    (position ids and attention across all of them) with nothing said but "1 documents"."""
    lines = [" ".join(abstract.split()) for abstract in abstracts]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines[:HOLDOUT_STRIDE]) + "\n")
    run([corpus], tmp_path / "whole", tokenizer_dir)
    assert capsys.readouterr().err == (f"warning: {corpus} is read as one document of {HOLDOUT_STRIDE} lines "
                                       "(--text-unit file, the default); if each line is a document, pass "
                                       "--text-unit line\n")
    run([corpus], tmp_path / "lines", tokenizer_dir, text_unit="line")
    (tmp_path / "short.txt").write_text("\n".join(lines[:HOLDOUT_STRIDE - 1]))  # a document of paragraphs
    run([tmp_path / "short.txt"], tmp_path / "paragraphs", tokenizer_dir)
    folder = tmp_path / "notes"  # a file per document, as many as a holdout needs: files of their own
    folder.mkdir()
    for i in range(HOLDOUT_STRIDE):
        shutil.copy(corpus, folder / f"{i:03d}.txt")
    run([folder], tmp_path / "files", tokenizer_dir)
    assert capsys.readouterr().err == ""


def test_a_holdout_asked_for_and_not_written_is_explained(tmp_path, tokenizer_dir, abstracts, capsys):
    """A small corpus got "no holdout" and nothing more; then its holdout/ was "not a prepared source ... run
    `cpt prepare` for it first", which the user had done, asking for a holdout."""
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:40])
    run([raw], tmp_path / "few", tokenizer_dir, holdout_tokens=1000, progress=True)
    assert ("no holdout (every 50th document of a range is held out and none of the 1 input ranges reached 50 "
            "documents: fewer --num-workers make longer ranges, or add data)") in capsys.readouterr().err
    with pytest.raises(UserError, match=r"few/holdout: .*few was prepared without a holdout \(its summary said why\)"):
        Manifest.read(tmp_path / "few" / "holdout")
    raw = write_jsonl(tmp_path / "more.jsonl", abstracts)
    run([raw], tmp_path / "short", tokenizer_dir, holdout_tokens=1, block_size=512, progress=True)
    assert re.search(r"no holdout \(the 1 documents held out \([\d,]+ tokens\) fill no block of 512: a larger "
                     r"--holdout-tokens holds more out\)", capsys.readouterr().err)
    run([raw], tmp_path / "stride", tokenizer_dir, holdout_tokens=1_000_000, block_size=4096, progress=True)
    assert re.search(r"no holdout \(the \d+ documents held out \([\d,]+ tokens\) fill no block of 4096: at most every "
                     r"50th document is held out, short of --holdout-tokens 1,000,000; a smaller --block-size, or more "
                     r"data, makes a holdout\)", capsys.readouterr().err)  # a larger quota changed nothing


def test_holdout_setting_and_ranges_are_part_of_the_fingerprint(tmp_path, tokenizer_dir, abstracts):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    out = tmp_path / "out"
    first, _ = run([raw], out, tokenizer_dir, holdout_tokens=0)
    assert run([raw], out, tokenizer_dir, holdout_tokens=0)[1]
    with pytest.raises(UserError, match="was prepared from other inputs or with other settings .*--overwrite"):
        run([raw], out, tokenizer_dir, holdout_tokens=1000)
    updated, up_to_date = run([raw], out, tokenizer_dir, holdout_tokens=1000, overwrite=True)
    assert not up_to_date and updated.fingerprint != first.fingerprint and updated.holdout_documents == 2
    assert updated.num_ranges == 1
    with pytest.raises(UserError, match="prepared with --num-workers 1 \\(this run: 2\\).*pass --num-workers 1 to keep it"):
        run([raw], out, tokenizer_dir, holdout_tokens=1000, num_workers=2)  # other ranges hold out other documents
    assert run([raw], out, tokenizer_dir, holdout_tokens=1000, num_workers=2, overwrite=True)[0].num_ranges == 2
    with pytest.raises(UserError, match="--holdout-tokens -1"):
        run([raw], out, tokenizer_dir, holdout_tokens=-1)


def test_a_worker_count_beyond_the_inputs_ranges_is_named_when_it_alone_differs(tmp_path, tokenizer_dir, abstracts):
    """With fewer seek points than workers the ranges are fewer than the workers; the fingerprint holds the workers
    asked for, so a rerun with another count was refused as "other inputs or other settings"."""
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    out = tmp_path / "out"
    first, _ = run([raw], out, tokenizer_dir, holdout_tokens=0, num_workers=64)
    assert first.num_workers == 64 and 1 < first.num_ranges < 64  # 2: the seek points of 120 abstracts
    with pytest.raises(UserError, match=rf"prepared with --num-workers 64 \(this run: {first.num_ranges}\).*"
                                        r"pass --num-workers 64 to keep it"):
        run([raw], out, tokenizer_dir, holdout_tokens=0, num_workers=first.num_ranges)
    assert run([raw], out, tokenizer_dir, holdout_tokens=0, num_workers=64)[1]  # up to date


def test_manifest_without_later_fields_still_reads(tmp_path, tokenizer_dir, abstracts):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:60])
    manifest, _ = run([raw], tmp_path / "out", tokenizer_dir, holdout_tokens=1000)
    path = tmp_path / "out" / "manifest.json"
    data = json.loads(path.read_text())
    for field in ("holdout_tokens", "holdout_documents", "holdout_repeats"):  # written before the holdout existed
        del data[field]
    path.write_text(json.dumps(data))
    old = Manifest.read(tmp_path / "out")
    assert (old.holdout_tokens, old.holdout_documents, old.holdout_repeats) == (0, 0, None)
    assert old.num_blocks == manifest.num_blocks
    del data["num_blocks"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="unreadable manifest.*'num_blocks'"):
        Manifest.read(tmp_path / "out")


def test_rerun_is_a_no_op_and_changed_input_needs_overwrite(tmp_path, tokenizer_dir, abstracts, capsys):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    out = tmp_path / "out"
    first, _ = run([raw], out, tokenizer_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again, up_to_date = run([raw], out, tokenizer_dir)
    assert up_to_date and again == first
    assert main([str(raw), "--output", str(out), "--tokenizer", str(tokenizer_dir), "--block-size", str(BLOCK),
                 "--holdout-tokens", "0", "--num-workers", "1"]) == 0
    assert "up to date" in capsys.readouterr().err
    assert run([raw], out, tokenizer_dir, overwrite=True)[1]  # --overwrite replaces only what differs
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    write_jsonl(raw, abstracts[:31])  # named as changed once a second has passed since the manifest's time
    with pytest.raises(UserError, match=r"was prepared (from other inputs|before \S+/docs.jsonl changed)"):
        run([raw], out, tokenizer_dir)
    updated, up_to_date = run([raw], out, tokenizer_dir, overwrite=True)
    assert not up_to_date and updated.num_documents == 31
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # no temp folders left


def fixed_typo(raw):
    """An input edited in place to a file of the same size (a fixed typo), with a later mtime."""
    data = raw.read_bytes()
    raw.write_bytes(data.replace(b"patients", b"Patients", 1))
    assert raw.stat().st_size == len(data) and raw.read_bytes() != data
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    return {}


def prepared_before_workers_were_recorded(out):
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["num_workers"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return {}


@pytest.mark.parametrize("change, named", [
    (lambda raw: {"max_docs": 25}, r"with --max-docs 60 \(this run: --max-docs 25\)"),  # the corpus after a subset
    (lambda raw: {"text_field": "title"}, r"with --text-field text \(this run: --text-field title\)"),
    (lambda raw: {"block_size": 2 * BLOCK}, rf"with --block-size {BLOCK} \(this run: --block-size {2 * BLOCK}\)"),
    (lambda raw: {"block_size": 2 * BLOCK, **prepared_before_workers_were_recorded(raw.with_name("out"))},
     rf"with --block-size {BLOCK} \(this run: --block-size {2 * BLOCK}\)"),  # not "--num-workers 0"
    (lambda raw: {"block_size": 2 * BLOCK, "inputs": [os.path.relpath(raw)]},
     rf"with --block-size {BLOCK} \(this run: --block-size {2 * BLOCK}\)"),  # the same input, not "other inputs"
    (fixed_typo, r"before \S+/docs.jsonl changed \(modified after 20\d\d-[^)]+\)"),
    (lambda raw: {"holdout_tokens": 0}, r"with a holdout of [\d,]+ tokens \(this run: --holdout-tokens 0\)"),
    (lambda raw: {"name": "pubmed"}, r"with --name out \(this run: --name pubmed\)"),
    (lambda raw: {"inputs": [raw, write_jsonl(raw.with_name("more.jsonl"), ["An abstract added since."])]},
     r"from other inputs \(1 new: \S+/more.jsonl\)"),
], ids=["max-docs", "text-field", "block-size", "block-size-workers-unrecorded", "block-size-input-relative",
        "same-size-edit", "holdout-dropped", "name", "input-added"])
def test_a_rerun_with_other_settings_or_an_edited_input_is_not_up_to_date(tmp_path, tokenizer_dir, abstracts, change,
                                                                          named):
    """Max docs, text field, block size and a same-size edit, once left out of the fingerprint, made a rerun say "up
    to date" and keep the old data: a quick subset trained on as the corpus, another field's or row length's tokens,
    an edit unread.
    The refusal names what differs, as the manifest shows it (it had listed what might, and left the user to guess)."""
    raw = tmp_path / "docs.jsonl"
    raw.write_text("".join(json.dumps({"text": text, "title": text[:80]}) + "\n" for text in abstracts[:60]))
    assert run([raw], tmp_path / "out", tokenizer_dir, max_docs=60, holdout_tokens=100)[0].holdout_tokens
    changed = {"max_docs": 60, "holdout_tokens": 100, **change(raw)}
    with pytest.raises(UserError, match=rf"out was prepared {named}; pass --overwrite to prepare it again$"):
        run(changed.pop("inputs", [raw]), tmp_path / "out", tokenizer_dir, **changed)


def test_a_rerun_that_reads_a_text_file_by_another_unit_is_not_up_to_date(tmp_path, tokenizer_dir, abstracts):
    raw = tmp_path / "notes.txt"
    raw.write_text("\n".join(" ".join(text.split()) for text in abstracts[:40]) + "\n")
    run([raw], tmp_path / "out", tokenizer_dir, text_unit="file")
    with pytest.raises(UserError, match="was prepared from other inputs or with other settings"):
        run([raw], tmp_path / "out", tokenizer_dir, text_unit="line")


@pytest.mark.parametrize("token, named", [
    ("patients", r"from other inputs or with other settings \(.*the tokenizer's settings.*\)"),  # a word it had
    ("patientsxyz", r"with another tokenizer's vocabulary \(\S+, 50,368 tokens; this run: \S+/tokenizer, 50,369\)"),
], ids=["same-vocabulary", "new-token"])
def test_a_changed_tokenizer_needs_overwrite(tmp_path, tokenizer_dir, abstracts, token, named):
    """Same separator, another tokenizer: data it did not tokenize must not pass for up to date (a token added to
    the vocabulary is named; the same vocabulary with another added-token rule is among the unrecorded settings)."""
    from tokenizers import Tokenizer

    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    run([raw], tmp_path / "out", tokenizer_dir)
    changed = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, changed)
    backend = Tokenizer.from_file(str(changed / "tokenizer.json"))
    backend.add_tokens([token])
    backend.save(str(changed / "tokenizer.json"))
    with pytest.raises(UserError, match=rf"was prepared {named}; pass --overwrite"):
        run([raw], tmp_path / "out", changed)
    assert not run([raw], tmp_path / "out", changed, overwrite=True)[1]


def test_rerun_repairs_a_damaged_holdout_and_takes_a_new_name(tmp_path, tokenizer_dir, abstracts):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts)
    out = tmp_path / "out"
    first, _ = run([raw], out, tokenizer_dir, holdout_tokens=1000)
    chunk = next((out / "holdout").glob("chunk-*.bin"))
    whole = chunk.read_bytes()
    chunk.write_bytes(whole[:100])  # what the validation loader reports as "prepare the source again"
    with pytest.raises(UserError, match="damaged LitData chunk"):
        Manifest.read(out / "holdout")
    with pytest.raises(UserError, match=r"out: its holdout is damaged \(.*damaged LitData chunk.*\); pass --overwrite"):
        run([raw], out, tokenizer_dir, holdout_tokens=1000)
    again, up_to_date = run([raw], out, tokenizer_dir, holdout_tokens=1000, overwrite=True)
    assert not up_to_date and chunk.read_bytes() == whole and again.fingerprint == first.fingerprint

    renamed, up_to_date = run([raw], out, tokenizer_dir, holdout_tokens=1000, name="pubmed", overwrite=True)
    assert not up_to_date and renamed.source == "pubmed" and Manifest.read(out / "holdout").source == "pubmed/holdout"


def test_failed_run_leaves_no_output_and_keeps_the_old_one(tmp_path, tokenizer_dir, abstracts, monkeypatch):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    stale = tmp_path / ".out.partial"
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "index.json").write_text("{}")  # left by a killed run

    def crash(self, number, shard):
        yield from []
        raise RuntimeError("worker killed")

    with monkeypatch.context() as m:
        m.setattr(TokenizeShard, "_blocks", crash)
        with pytest.raises(RuntimeError):
            run([raw], tmp_path / "out", tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]

    good, _ = run([raw], tmp_path / "out", tokenizer_dir)  # a rerun after the failure just works
    write_jsonl(raw, abstracts[:31])
    with monkeypatch.context() as m:
        m.setattr(TokenizeShard, "_blocks", crash)
        with pytest.raises(RuntimeError):
            run([raw], tmp_path / "out", tokenizer_dir, overwrite=True)
    assert Manifest.read(tmp_path / "out") == good


KILLED_WHILE_ITS_WORKER_RUNS = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from cpt_lightning.data.prepare import _work_folder

    with _work_folder(Path(sys.argv[1])) as work:
        (work / "data").mkdir()
        (work / "data" / "chunk-0-0.bin").write_bytes(b"tokens")
        worker = os.fork()  # as litdata forks its tokenizing workers
        if worker == 0:
            time.sleep(60)
            os._exit(0)
        print(worker, flush=True)
        time.sleep(60)  # SIGKILLed here
""")


def test_a_rerun_while_a_killed_runs_workers_still_write_is_refused(tmp_path, tokenizer_dir, abstracts):
    """The workers of a SIGKILLed `cpt prepare` live on and write chunks into .out.partial: a rerun cleared
    that folder under them (and the same command started twice cleared each other's)."""
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    before, _ = run([raw], tmp_path / "out", tokenizer_dir)
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_ITS_WORKER_RUNS, str(tmp_path / "out")],
                              stdout=subprocess.PIPE, text=True)
    worker = int(killed.stdout.readline())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    write_jsonl(raw, abstracts[:31])
    try:
        with pytest.raises(UserError, match=r"out: another `cpt prepare` is writing it in .*\.out\.partial .*fuser -v"):
            run([raw], tmp_path / "out", tokenizer_dir, overwrite=True)
        assert (tmp_path / ".out.partial" / "data" / "chunk-0-0.bin").read_bytes() == b"tokens"
        assert Manifest.read(tmp_path / "out") == before
    finally:
        os.kill(worker, signal.SIGKILL)
    for _ in range(100):  # the lock goes with the worker's exit
        try:
            after, _ = run([raw], tmp_path / "out", tokenizer_dir, overwrite=True)
            break
        except UserError:
            time.sleep(0.1)
    assert after.num_documents == 31 and sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def describe(pids: list[int]) -> str:
    """pid, parent, state and command line of each process, for a failure message."""
    described = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        described.append(f"{pid} (parent {fields[1]}, state {fields[0]}): {command}")
    return "; ".join(described) or "none"


def processes_in_session(session: int) -> list[int]:
    """Live processes of a session (field 6 of /proc/PID/stat), the forked workers' helpers included."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_an_error_while_litdata_runs_stops_its_workers_and_no_other_child_process():
    """A SIGTERM (or any error) while litdata ran left its workers running, and the exit waited for them for good.
    They are stopped; a child process the caller had started before is not (prepare called from Python)."""
    import multiprocessing

    from cpt_lightning.data.prepare import _interruptible

    from litdata.processing.data_processor import DataProcessor

    context = multiprocessing.get_context("fork")
    callers = context.Process(target=time.sleep, args=(30,))
    callers.start()
    try:
        with pytest.raises(RuntimeError, match="a worker's failure"), _interruptible():
            worker = context.Process(target=time.sleep, args=(30,))
            worker.start()
            raise RuntimeError("a worker's failure")
        assert not worker.is_alive() and callers.is_alive()
        with pytest.raises(KeyboardInterrupt), _interruptible():  # a Ctrl-C: the handler litdata installs, ours
            worker = context.Process(target=time.sleep, args=(30,))
            worker.start()
            DataProcessor._signal_handler(None, signal.SIGINT, None)
        assert not worker.is_alive() and callers.is_alive()
    finally:
        callers.kill()
        callers.join()


def test_an_interrupt_raised_where_python_ignores_exceptions_still_stops_the_run(monkeypatch):
    """A Ctrl-C landing in logging's or filelock's at-fork hook (while litdata forked a helper) raised its
    KeyboardInterrupt where Python only reports "Exception ignored" with a traceback: the run finished, replaced the
    output and exited 0 (seen once in CI). The interrupt is kept and raised again when litdata returns, before
    anything is replaced, and not reported as a traceback (seen in CI after the first fix)."""
    from litdata.processing.data_processor import DataProcessor

    from cpt_lightning.data.prepare import _interruptible

    reported = []  # what Python's hook would print on stderr
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_value))

    def broken():
        raise ValueError("not an interrupt")

    with pytest.raises(KeyboardInterrupt), _interruptible():
        in_a_finalizer(lambda: DataProcessor._signal_handler(None, signal.SIGINT, None))  # litdata's handler, ours in
        in_a_finalizer(broken)  # other ignored exceptions are still reported
    assert [repr(error) for error in reported] == ["ValueError('not an interrupt')"]
    in_a_finalizer(broken)  # the hook is the earlier one again afterwards
    assert len(reported) == 2


@pytest.mark.parametrize("lost", [KeyboardInterrupt, Terminated])
def test_an_interrupt_lost_while_the_workers_start_stops_them_all_at_once(monkeypatch, lost):
    """A Ctrl-C or a SIGTERM landing in an at-fork hook as litdata forked its second worker was lost there: that
    worker ran its whole share before the run stopped (11–13 s from the signal to the exit on the sample's PubMed,
    signalling `cpt prepare` as its first worker started; now 2–3 s). The interrupt is raised as soon as the
    workers have started, which stops them all."""
    import multiprocessing

    from litdata.processing.data_processor import DataProcessor

    from cpt_lightning.data.prepare import _interruptible

    context = multiprocessing.get_context("fork")
    workers, went_on = [], []

    def interrupt():
        if lost is KeyboardInterrupt:
            DataProcessor._signal_handler(None, signal.SIGINT, None)  # the handler litdata installs, ours patched in
        else:
            signal.raise_signal(signal.SIGTERM)

    def create_process_workers(processor, *args):
        for worker in range(2):
            if worker == 1:
                in_a_finalizer(interrupt)
            workers.append(context.Process(target=time.sleep, args=(30,)))
            workers[-1].start()

    monkeypatch.setattr(DataProcessor, "_create_process_workers", create_process_workers)
    try:
        with sigterm_raises(), pytest.raises(lost) as raised, _interruptible():
            DataProcessor._create_process_workers(None)
            went_on.append("litdata's loop")
        assert raised.type is lost and not went_on
        assert len(workers) == 2 and not any(worker.is_alive() for worker in workers)
    finally:
        for worker in workers:
            worker.kill()


def test_a_sigterm_python_dropped_still_stops_the_run_before_it_replaces_the_output(tmp_path, tokenizer_dir,
                                                                                   abstracts, monkeypatch, capsys):
    """A SIGTERM landing in logging's at-fork hook (as litdata forked a worker) raised its Terminated where Python
    only prints "Exception ignored": the run finished, replaced the earlier output and exited 0 (seen in CI). It
    ends with 143 and one line, the earlier output intact and no partial folder left."""
    from cpt_lightning.data import prepare as prepare_module

    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    earlier, _ = run([raw], tmp_path / "out", tokenizer_dir)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    optimize = prepare_module._optimize

    def optimize_then_drop_a_sigterm(*args, **kwargs):
        optimize(*args, **kwargs)
        in_a_finalizer(lambda: signal.raise_signal(signal.SIGTERM))

    monkeypatch.setattr(prepare_module, "_optimize", optimize_then_drop_a_sigterm)
    assert main([str(raw), "-o", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--block-size", str(BLOCK),
                 "--holdout-tokens", "0", "--num-workers", "1", "--max-docs", "20", "--overwrite"]) == 143
    assert capsys.readouterr().err == "error: terminated (SIGTERM)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # no .out.partial
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert Manifest.read(tmp_path / "out") == earlier


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("stop", ["sigint-main-process", "sigint-process-group", "sigterm-main-process",
                                  "sigkill-main-process"])
def test_a_stopped_run_leaves_no_process_and_keeps_the_earlier_output(tmp_path, tokenizer_dir, abstracts,
                                                                      sample_corpus, stop):
    """litdata's SIGINT handler os._exit(0)ed: a Ctrl-C ended `cpt prepare` with exit code 0 and no word, and a
    SIGINT to the main process alone (a scheduler's) left the workers' helper processes running, holding the
    output's lock; the workers of a SIGKILLed run wrote on; a SIGTERM to the main process alone (`kill PID`, a
    container's stop) hung it for good, waiting for workers nothing stopped. Now a SIGINT exits 130 and a SIGTERM
    143, with one line, and remove the partial folder, and no process of the run outlives it; the earlier output
    is intact either way."""
    earlier, _ = run([write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])], tmp_path / "out", tokenizer_dir)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    started = subprocess.Popen(
        [sys.executable, "-m", "cpt_lightning.cli", "prepare", sample_corpus.raw["pubmed"], "-o", str(tmp_path / "out"),
         "--tokenizer", str(tokenizer_dir), "--block-size", str(BLOCK), "--num-workers", "2", "--overwrite"],
        start_new_session=True, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(children_of(started.pid)) < 2 and started.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until both tokenizing workers run (31k documents: many seconds of work)
        if stop == "sigint-process-group":
            os.killpg(started.pid, signal.SIGINT)  # what a Ctrl-C in the terminal does
        else:
            started.send_signal({"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(stop[:7], signal.SIGINT))
        try:
            _, stderr = started.communicate(timeout=60)
        except subprocess.TimeoutExpired as timeout:  # which process keeps stderr open: say it before killing them
            raise AssertionError(f"still running 60 s after the signal: {describe(processes_in_session(started.pid))}; "
                                 f"stderr so far: {timeout.stderr!r}") from None
        for _ in range(100):  # the kernel kills a dead process's children (PR_SET_PDEATHSIG)
            if not processes_in_session(started.pid):
                break
            time.sleep(0.1)
        assert processes_in_session(started.pid) == []
    finally:
        for pid in processes_in_session(started.pid):
            os.kill(pid, signal.SIGKILL)
    if stop == "sigkill-main-process":
        assert started.returncode == -signal.SIGKILL  # its .out.partial is the next run's to remove
    else:
        code, line = (143, "error: terminated (SIGTERM)\n") if stop.startswith("sigterm") else (130, "error: interrupted\n")
        assert started.returncode == code and stderr.endswith(line) and "Traceback" not in stderr, stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # no .out.partial
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert Manifest.read(tmp_path / "out") == earlier


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_process_whose_parent_died_before_it_could_ask_to_die_with_it_ends_itself(monkeypatch):
    """A worker killed by a Ctrl-C while forking its helpers: the kernel sends no death signal to a child whose
    parent was gone before its ``prctl``, and one helper outlived the run (holding stderr) in a loaded CI run.
    The child sees it: its parent is no longer the process that forked it."""
    from cpt_lightning.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_forks_die_with_parent", True)
    child = os.fork()  # the hook asks for the signal; the test's process is alive: the child goes on
    if child == 0:
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # (the hook ended no child of a living parent)
    child = os.fork()
    if child == 0:
        prepare_module._forking_pid = -1  # as if the process that forked it had died and it had been adopted
        prepare_module._die_with_parent()
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == INTERRUPTED_EXIT_CODE


def test_a_killed_runs_leftovers_are_cleared_and_the_folder_stays_locked_until_removed(tmp_path, tokenizer_dir,
                                                                                      abstracts, monkeypatch):
    """Chunks of another numbering would have been published with the new ones, and a leftover cache/ made the
    rerun fail; the lock is released only after the folder is gone, so no other run clears it half-removed."""
    import fcntl

    from cpt_lightning.data import prepare as prepare_module

    leftovers = tmp_path / ".out.partial"
    for name in ("cache/chunks/x.bin", "data/chunk-7-0.bin", "stray.tmp"):
        (leftovers / name).parent.mkdir(parents=True, exist_ok=True)
        (leftovers / name).write_bytes(b"old")
    held_while_removed = []
    rmtree = shutil.rmtree

    def removing(path, *args, **kwargs):
        if path == leftovers:
            with open(leftovers / ".lock") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held_while_removed.append(True)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module.shutil, "rmtree", removing)
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    manifest, _ = run([raw], tmp_path / "out", tokenizer_dir)
    assert manifest.num_documents == 30 and not (tmp_path / "out" / "chunk-7-0.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"] and held_while_removed == [True]


def test_a_filesystem_without_flock_still_prepares(tmp_path, tokenizer_dir, abstracts, monkeypatch):
    """Lustre mounted without -o flock answers ENOSYS: the lock is a guard, not a requirement."""
    from helpers import without_flock

    without_flock(monkeypatch)
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    manifest, _ = run([raw], tmp_path / "out", tokenizer_dir)
    assert manifest.num_documents == 30 and sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]


def test_empty_documents_are_skipped_and_counted(tmp_path, tokenizer_dir, abstracts, encode):
    lines = [json.dumps({"text": abstracts[0]}), json.dumps({"text": "   \n\t"}), "", json.dumps({"text": None}),
             json.dumps({"text": ""}), json.dumps({"text": abstracts[1]})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    manifest, _ = run([tmp_path / "docs.jsonl", tmp_path / "empty.jsonl"], tmp_path / "out", tokenizer_dir)
    assert (manifest.num_documents, manifest.skipped_empty) == (2, 4)
    assert np.array_equal(stream(tmp_path / "out"), full_blocks(encode(abstracts[:2])))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [abstracts[0], None, "", "  ", abstracts[1]]}), tmp_path / "docs.parquet")
    manifest, _ = run([tmp_path / "docs.parquet"], tmp_path / "parquet", tokenizer_dir)
    assert (manifest.num_documents, manifest.skipped_empty) == (2, 3)


def test_invalid_utf8_names_file_and_line_or_is_skipped(tmp_path, tokenizer_dir, abstracts):
    good = [json.dumps({"text": d}).encode() for d in abstracts[:4]]
    raw = tmp_path / "docs.jsonl"
    raw.write_bytes(b"\n".join(good[:2] + [b'{"text": "caf\xe9 au lait"}'] + good[2:]) + b"\n")
    with pytest.raises(UserError, match=r"docs\.jsonl:3: invalid UTF-8 \(byte 0xe9\).*--skip-invalid-utf8"):
        run([raw], tmp_path / "out", tokenizer_dir, num_workers=2)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    manifest, _ = run([raw], tmp_path / "out", tokenizer_dir, skip_invalid_utf8=True)
    assert (manifest.num_documents, manifest.skipped_invalid_utf8) == (4, 1)

    notes = tmp_path / "notes"  # a document per file: the line is counted in the whole file
    notes.mkdir()
    (notes / "a.txt").write_bytes(b"first line\nsecond line\nthe caf\xe9\n")
    with pytest.raises(UserError, match=r"a\.txt:3: invalid UTF-8 \(byte 0xe9\)"):
        run([notes], tmp_path / "notes_out", tokenizer_dir)


def test_text_holding_a_nul_byte_is_refused_or_skipped_as_invalid_utf8(tmp_path, tokenizer_dir, abstracts):
    """ASCII saved as UTF-16 without a byte-order mark is valid UTF-8, a NUL after each letter: it was prepared as
    such (2.4x the tokens of the text, every other one a NUL) with nothing said."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text(abstracts[0])
    (notes / "b.txt").write_bytes(abstracts[1].encode("ascii", "ignore").decode().encode("utf-16-le"))
    with pytest.raises(UserError, match=r"b\.txt:1: invalid UTF-8 \(a NUL byte: UTF-16 text without a byte-order mark"):
        run([notes], tmp_path / "out", tokenizer_dir)
    manifest, _ = run([notes], tmp_path / "out", tokenizer_dir, skip_invalid_utf8=True)
    assert (manifest.num_documents, manifest.skipped_invalid_utf8) == (1, 1)

    lines = tmp_path / "lines.txt"  # a document per line: the line is named
    first, last = (" ".join(text.split()) for text in abstracts[:2])
    lines.write_text(f"{first}\nsome\0padded\0line\n{last}\n")
    with pytest.raises(UserError, match=r"lines\.txt:2: invalid UTF-8 \(a NUL byte"):
        run([lines], tmp_path / "lines_out", tokenizer_dir, text_unit="line")
    escaped = write_jsonl(tmp_path / "docs.jsonl", [first, "some\0padded\0record", last])  # as \u0000 in JSON
    with pytest.raises(UserError, match=r"docs\.jsonl:2: invalid UTF-8 \(a NUL byte"):
        run([escaped], tmp_path / "jsonl_out", tokenizer_dir)


def test_a_parquet_string_not_utf8_or_holding_a_nul_is_named_by_row_or_skipped(tmp_path, tokenizer_dir, abstracts):
    """pyarrow checks no string's bytes when a file is written: another writer's invalid UTF-8 stopped the tokenizing
    worker with a traceback naming neither file nor row, --skip-invalid-utf8 or not; a NUL went into the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first, last = (text.encode() for text in abstracts[:2])
    for name, bad, culprit in (("bytes", b"the caf\xe9", r"byte 0xe9"), ("nul", b"some\0padded\0text", "a NUL byte")):
        values = [first, bad, last]
        offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
        column = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": column}), path)
        with pytest.raises(UserError, match=rf"{name}\.parquet row 2: invalid UTF-8 \({culprit}.*--skip-invalid-utf8"):
            run([path], tmp_path / f"{name}_out", tokenizer_dir)
        assert not (tmp_path / f"{name}_out").exists()
        manifest, _ = run([path], tmp_path / f"{name}_out", tokenizer_dir, skip_invalid_utf8=True)
        assert (manifest.num_documents, manifest.skipped_invalid_utf8) == (2, 1)


@pytest.mark.parametrize("name, encoding", [("docs.jsonl", "utf-16"), ("notes.txt.gz", "utf-16-be")])
def test_utf16_text_with_its_byte_order_mark_is_named_so(tmp_path, tokenizer_dir, abstracts, name, encoding):
    """What PowerShell 5's `>` writes: refused as invalid UTF-8 with the advice to skip such documents, then, skipped,
    as invalid JSON on line 2."""
    raw = tmp_path / name
    text = "".join(json.dumps({"text": abstract}) + "\n" for abstract in abstracts[:3])
    data = (codecs.BOM_UTF16_BE if encoding == "utf-16-be" else b"") + text.encode(encoding)  # "utf-16" writes its own
    raw.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    for skip in (False, True):
        with pytest.raises(UserError, match=rf"^{re.escape(str(raw))}: UTF-16 text \(it starts with UTF-16's byte-order "
                                            r"mark\); convert it to UTF-8, e\.g\. iconv -f UTF-16 -t UTF-8$"):
            run([raw], tmp_path / "out", tokenizer_dir, skip_invalid_utf8=skip)
    assert not (tmp_path / "out").exists()


def test_lone_surrogate_escape_counts_as_invalid_utf8(tmp_path, tokenizer_dir, abstracts):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:3])
    with open(raw, "a") as f:
        f.write('{"text": "broken \\udcff escape"}\n')
    with pytest.raises(UserError, match=r"docs\.jsonl:4: invalid UTF-8 \(lone surrogate \\udcff\)"):
        run([raw], tmp_path / "out", tokenizer_dir)
    assert run([raw], tmp_path / "out", tokenizer_dir, skip_invalid_utf8=True)[0].skipped_invalid_utf8 == 1


def cli_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ('{"body": "x"}\n', [], r"docs\.jsonl:1: no field 'text' \(fields: body\); choose one with --text-field$"),
        ('{"doc": {"text": "x"}}\n', ["--text-field", "doc.text"], r"docs\.jsonl:1: no field 'doc\.text' \(fields: doc\); "
         r"choose one with --text-field \(a nested field is not read: flatten the records first\)"),
        ('{"text": "x"}\n{"text": "y"}\n{"txt": "z"}\n', [], r"docs\.jsonl:3: no field 'text'"),
        ('{"text": "x"}\n{"text": 3}\n', [], r"docs\.jsonl:2: field 'text' is a int, expected a string"),
        ('{"text": "x"}\n{"text": "y"\n', [], r"docs\.jsonl:2: invalid JSON"),
        ('{"text": "short"}\n', [], r"do not fill one block of 32"),
        ('{"text": null}\n{"text": ""}\n{"text": "  "}\n', ["--text-field", "text"],
         r"no document to prepare: 3 were empty or null and 0 not valid UTF-8, all skipped; check the field read "
         r"from jsonl/parquet records \(--text-field text\)"),
        ('{"text": "x"}\n', ["--block-size", "16384"], r"--block-size 16384 exceeds the model's max positions \(8192"),
        ('{"text": "x"}\n', ["--max-docs", "0"], r"--max-docs 0: must be positive"),
    ],
)
def test_bad_jsonl_input(tmp_path, tokenizer_dir, capsys, content, extra, message):
    import re

    (tmp_path / "docs.jsonl").write_text(content)
    argv = [str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir),
            "--block-size", str(BLOCK), "--num-workers", "2", *extra]
    assert re.search(message, cli_error(argv, capsys))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_inputs_twice_an_output_that_holds_an_input_and_no_workers_are_refused(tmp_path, tokenizer_dir, abstracts,
                                                                               capsys):
    """An output that is an input or holds one was replaced under --overwrite (the raw corpus deleted); an input
    named twice was trained twice; --num-workers 0 meant every core and -4 one worker; an output under a file and
    a tokenizer folder without files were a traceback and a cut-off message."""
    (tmp_path / "raw").mkdir()
    raw = write_jsonl(tmp_path / "raw" / "docs.jsonl", abstracts[:30])
    common = ["--tokenizer", str(tokenizer_dir), "--block-size", str(BLOCK), "--num-workers", "1", "--overwrite"]
    before = raw.read_bytes()
    for out in (raw, tmp_path / "raw", tmp_path):
        assert "which replacing it would delete" in cli_error([str(raw), "-o", str(out), *common], capsys)
    assert raw.read_bytes() == before
    assert "given twice" in cli_error([str(raw), str(raw), "-o", str(tmp_path / "out"), *common], capsys)
    assert "given twice" in cli_error([str(tmp_path / "raw"), str(raw), "-o", str(tmp_path / "out"), *common], capsys)
    for workers in ("0", "-4"):
        assert f"--num-workers {workers}: must be 1 or more" in cli_error(
            [str(raw), "-o", str(tmp_path / "out"), *common[:4], "--num-workers", workers], capsys)
    assert "is a file, not a folder" in cli_error([str(raw), "-o", str(raw / "out"), *common], capsys)
    (tmp_path / "empty").mkdir()
    assert "the folder holds no tokenizer files (tokenizer.json): save the tokenizer into it" in cli_error(
        [str(raw), "-o", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "empty")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "raw"]
    assert run([tmp_path / "raw"], tmp_path / "raw" / "prepared", tokenizer_dir)[0].num_documents  # inside: fine
    shutil.copytree(tokenizer_dir, tmp_path / "kept" / "tokenizer")  # --overwrite deleted the tokenizer it read
    for out in (tmp_path / "kept" / "tokenizer", tmp_path / "kept"):
        assert "which replacing it would delete" in cli_error(
            [str(raw), "-o", str(out), *common[:1], str(tmp_path / "kept" / "tokenizer"), *common[2:]], capsys)
    assert sorted(p.name for p in (tmp_path / "kept" / "tokenizer").iterdir()) == sorted(p.name for p in Path(tokenizer_dir).iterdir())


def test_the_current_folder_or_one_above_it_is_refused_as_output(tmp_path, tokenizer_dir, abstracts, capsys,
                                                                 monkeypatch):
    """``-o .`` with the inputs elsewhere prepared everything, then failed with a traceback in the rename (the
    current folder has no name to move aside); a parent of the current folder would have been replaced whole."""
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:30])
    (tmp_path / "work" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "here")
    common = ["--tokenizer", str(tokenizer_dir), "--block-size", str(BLOCK), "--num-workers", "1", "--overwrite"]
    for out in (".", "..", str(tmp_path / "work")):
        assert cli_error([str(raw), "-o", out, *common], capsys) == (
            f"error: --output {out} is the current folder or holds it, which the output would replace whole: give "
            "--output a new folder of its own\n")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["docs.jsonl", "work", "work/here"]
    assert run([raw], Path("prepared"), tokenizer_dir)[0].num_documents  # a folder inside the current one: fine


def test_bad_files(tmp_path, tokenizer_dir, capsys):
    common = ["-o", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]
    assert "missing.jsonl: no such file or folder\n" in cli_error([str(tmp_path / "missing.jsonl"), *common], capsys)
    assert "*.jsonl: no such file or folder; a pattern is the shell's to expand: leave it unquoted, or give the folder " \
           "that holds the files\n" in cli_error([str(tmp_path / "*.jsonl"), *common], capsys)  # quoted: not expanded
    (tmp_path / "empty.jsonl").write_text("")
    assert "every input file is empty" in cli_error([str(tmp_path / "empty.jsonl"), *common], capsys)
    (tmp_path / "notes.csv").write_text("a,b\n")
    assert "unsupported input" in cli_error([str(tmp_path / "notes.csv"), *common], capsys)
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    assert "damaged or truncated gzip" in cli_error([str(tmp_path / "broken.jsonl.gz"), *common], capsys)
    (tmp_path / "docs.jsonl").write_text('{"text": "x"}\n')
    assert f"cannot load tokenizer '{tmp_path / 'nope'}': no such folder" in cli_error(  # not about hub repo ids
        [str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "nope")], capsys)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    assert "already exists" in cli_error([str(tmp_path / "docs.jsonl"), "-o", str(tmp_path / "taken"),
                                          "--tokenizer", str(tokenizer_dir)], capsys)
    assert not (tmp_path / "out").exists()


def test_cli_prints_progress_summary(tmp_path, tokenizer_dir, abstracts, capsys):
    raw = write_jsonl(tmp_path / "docs.jsonl", abstracts[:50])
    argv = [str(raw), "--output", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--block-size", "64"]
    assert main(argv) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("out: 49 documents") and "docs/s" in summary and "M tokens/s" in summary
    assert f"held out 1 documents → {Manifest.read(tmp_path / 'out').holdout_tokens:,} tokens in" in summary


def shown_progress(line_interval: float) -> float:
    """A ProgressBar over 400 documents, a quarter of them read (10 skipped as empty), for 0.3 s or more: the
    seconds it was shown."""
    counters = SharedCounters()
    counters.add(documents=90, empty=10, tokens=2_000_000)
    with ProgressBar(counters, total=400, label="pubmed", interval=0.01, line_interval=line_interval) as bar:
        time.sleep(0.3)
    return bar.elapsed


def test_a_log_file_gets_a_progress_line_every_interval(capsys):
    """tqdm draws nothing where stderr is not a terminal: a prepare of a large corpus in a batch job said nothing
    until its end, hours later."""
    seconds = shown_progress(line_interval=0.05)
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= seconds / 0.05, lines
    assert all(re.fullmatch(r"pubmed: 100 of 400 documents \(25\.0%\), 2,000,000 tokens, \d+\.\d\dM tokens/s, "
                            r"\d+:\d\d:\d\d left", line) for line in lines), lines


def test_a_terminal_gets_the_bar_and_no_lines(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    shown_progress(line_interval=0.05)
    drawn = sys.stderr.getvalue()
    assert "pubmed: " in drawn and "100/400" in drawn and "of 400 documents" not in drawn


def test_prepare_cli_runs_as_module(tmp_path, tokenizer_dir):
    import subprocess
    import sys

    (tmp_path / "docs.jsonl").write_text('{"text": "x"}\n')
    done = subprocess.run([sys.executable, "-m", "cpt_lightning.data.prepare", str(tmp_path / "docs.jsonl"),
                           "-o", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


@pytest.mark.parametrize("trained, held, shared", [([], [5, 9], (0, 2)), ([1, 2, 2, 7], [2, 3, 9], (1, 3)),
                                                   ([1, 2], [0, 3], (0, 2))],
                         ids=["no-training-document", "repeats-in-training", "outside-the-training-keys"])
def test_documents_shared_counts_the_held_out_keys_among_the_training_ones(tmp_path, trained, held, shared):
    from cpt_lightning.data.holdout import DOCUMENT_KEYS, KEY, documents_shared

    for folder, keys in (("training", trained), ("holdout", held)):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / DOCUMENT_KEYS, np.array(keys, KEY))
    assert documents_shared(tmp_path / "holdout", tmp_path / "training") == shared
    (tmp_path / "training" / DOCUMENT_KEYS).unlink()  # prepared before the keys were kept
    assert documents_shared(tmp_path / "holdout", tmp_path / "training") is None


@pytest.mark.parametrize("cut", ["holdout", "training"])
def test_a_cut_short_document_keys_file_is_named_with_the_folder_to_prepare_again(tmp_path, cut):
    from cpt_lightning.data.holdout import DOCUMENT_KEYS, KEY, documents_shared

    source = {"training": tmp_path / "pubmed", "holdout": tmp_path / "pubmed" / "holdout"}
    for folder in source.values():
        folder.mkdir(exist_ok=True)
        np.save(folder / DOCUMENT_KEYS, np.arange(1000, dtype=KEY))
    with open(source[cut] / DOCUMENT_KEYS, "r+b") as keys:
        keys.truncate(4000)  # a disk error mid-write
    with pytest.raises(UserError, match=rf"^{re.escape(str(source[cut] / DOCUMENT_KEYS))} cannot be read \(.+\): "
                                        rf"prepare {re.escape(str(tmp_path / 'pubmed'))} again"):
        documents_shared(source["holdout"], source["training"])


@pytest.mark.parametrize("vocab_size, dtype", [(50_368, np.uint16), (65_536, np.uint16), (65_537, np.uint32)])
def test_token_ids_are_stored_in_the_smallest_dtype_that_holds_the_largest(vocab_size, dtype):
    """Ids run 0 to vocab_size - 1: 65,536 of them fit 16 bits, one more would wrap the last to 0."""
    from cpt_lightning.data.encoding import TokenizerSpec

    spec = TokenizerSpec("t", "{}", vocab_size, separator_id=0, append_separator=False, model_max_length=None,
                         vocab_sha256="")
    assert spec.dtype == np.dtype(dtype) and np.array([vocab_size - 1]).astype(spec.dtype)[0] == vocab_size - 1


def test_a_vocabulary_past_16_bits_encodes_its_high_ids_whole():
    """The spec chose 32 bits for it, but only an encoding shows the documents are written in them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from cpt_lightning.data.encoding import DocumentEncoder, _spec

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "z": 70_000}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1),
                                                                                                    ("[SEP]", 2)])
    ids = DocumentEncoder(_spec("t", backend, {"sep": "[SEP]", "eos": None}, None))(["a z", "z"])
    assert ids.dtype == np.uint32 and ids.tolist() == [1, 3, 70_000, 2, 1, 70_000, 2]


def test_the_spec_of_a_tokenizer_with_sep_and_eos_and_gaps_in_its_ids():
    """Documents end with the SEP the post-processor already adds (not an EOS appended after it), and the vocabulary
    size counts up to the largest id, not the number of tokens, so every id is below it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from cpt_lightning.data.encoding import _spec

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "</s>": 3, "a": 4, "b": 10}  # ids 5–9 unused
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1),
                                                                                                    ("[SEP]", 2)])
    spec = _spec("t", backend, {"sep": "[SEP]", "eos": "</s>"}, None)
    assert (spec.separator_id, spec.append_separator, spec.vocab_size) == (2, False, 11)
    assert _spec("t", backend, {"sep": None, "eos": "</s>"}, None).append_separator  # an EOS the template lacks
