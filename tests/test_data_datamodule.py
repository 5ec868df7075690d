"""PackedDataModule: weighted mix proportions, exact resume (loader and Lightning checkpoint), disjoint
ranks, and clear refusals for data the model cannot read."""

import copy
import json
import multiprocessing as mp
import re
import shutil
from itertools import islice

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cpt_lightning.data import PackedDataModule, Source, check_compatible, position_ids_from_separators
from cpt_lightning.data.manifest import Manifest
from cpt_lightning.errors import UserError

SEP = 50282


def datamodule(mix, **kwargs):
    kwargs.setdefault("micro_batch_size", 8)
    kwargs.setdefault("num_workers", 0)
    return PackedDataModule(mix.sources, **kwargs)


def rows(batches):
    return [row.tobytes() for batch in batches for row in batch["input_ids"].numpy()]


@pytest.fixture(scope="module")
def row_source(prepared_mix):
    """Which source every stored row comes from (rows are long enough to be unique)."""
    from litdata import StreamingDataset, TokensLoader

    owner = {}
    for name, path in prepared_mix.dirs.items():
        dataset = StreamingDataset(str(path), item_loader=TokensLoader(prepared_mix.block_size))
        for i in range(len(dataset)):
            owner[dataset[i].astype(np.int64).tobytes()] = name
    return owner


def test_batches_follow_the_contract(prepared_mix):
    dm = datamodule(prepared_mix)
    assert (dm.facts.vocab_size, dm.separator_id, dm.block_size) == (50368, SEP, 128)
    assert dm.facts.tokenizer.endswith("tokenizer")  # as recorded by cpt prepare
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "position_ids"}
    assert batch["input_ids"].shape == batch["position_ids"].shape == (8, 128)
    assert batch["input_ids"].dtype == batch["position_ids"].dtype == torch.long
    assert torch.equal(batch["position_ids"], position_ids_from_separators(batch["input_ids"], SEP))
    starts = batch["position_ids"] == 0
    after_sep = torch.zeros_like(starts)
    after_sep[:, 1:] = batch["input_ids"][:, :-1] == SEP
    after_sep[:, 0] = True
    assert torch.equal(starts, after_sep)
    assert (batch["input_ids"] == 50281).sum() > 0  # documents start with [CLS]


def test_batches_for_a_gpu_are_pinned(prepared_mix):
    """A pageable batch is copied to a GPU synchronously: the host waited for the previous micro-batch's work."""
    from types import SimpleNamespace

    dm = datamodule(prepared_mix)
    assert not dm.train_dataloader().pin_memory  # no trainer, or a CPU one: nothing to pin for
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert dm.train_dataloader().pin_memory


def test_mix_proportions_match_the_weights(prepared_mix, row_source):
    loader = datamodule(prepared_mix, seed=3).train_dataloader()
    seen = rows(b for _, b in zip(range(300), loader))
    counts = {name: 0 for name in prepared_mix.weights}
    for row in seen:
        counts[row_source[row]] += 1
    assert len(seen) == 2400 and len(set(seen)) == len(seen)  # no row twice within a pass
    for name, weight in prepared_mix.weights.items():
        assert abs(counts[name] / len(seen) - weight) < 0.04, counts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_mix_never_ends_and_reads_each_source_whole_before_any_of_it_repeats(prepared_mix, row_source, num_workers):
    """litdata's weighted mix ended its epoch when one source ran out, and the next epoch reshuffled every source: the
    others were read anew from a random start, so 0.82 passes of a large corpus read 59% of it. Here a worker that
    has read its share of a source starts that source's next, reshuffled pass while the others go on."""
    batches = list(islice(datamodule(prepared_mix, num_workers=num_workers).train_dataloader(), 1200))
    assert len(batches) == 1200 and {len(batch["input_ids"]) for batch in batches} == {8}  # 9,600 rows: 1.3 to 2.4 passes
    seen = rows(batches)
    for name in prepared_mix.weights:
        reads = [row for row in seen if row_source[row] == name]
        size = sum(owner == name for owner in row_source.values())
        assert len(reads) > 1.3 * size
        first = reads[:int(0.9 * size)]  # the workers' passes end a little apart
        assert len(set(first)) == len(first), name
        assert len(set(reads)) >= size - 8 * max(num_workers, 1), name  # but what drop_last leaves out of a pass


def test_a_source_without_a_micro_batch_for_each_loader_worker_is_refused(prepared_mix, row_source):
    """A worker reads a source in passes of its share: with less than a micro-batch, a pass holds no whole batch."""
    smallest = sum(owner == "case_reports" for owner in row_source.values())
    batches = islice(datamodule(prepared_mix, micro_batch_size=smallest // 2, num_workers=2).train_dataloader(), 3)
    assert [len(batch["input_ids"]) for batch in batches] == [smallest // 2] * 3
    with pytest.raises(UserError, match=f"'case_reports' holds {smallest} rows of 128 tokens, fewer than one micro-batch "
                                        f"of {smallest // 2 + 1} for each of the 2 loader workers × processes that share "
                                        "it: lower data.init_args.micro_batch_size or num_workers, or prepare more data"):
        datamodule(prepared_mix, micro_batch_size=smallest // 2 + 1, num_workers=2).train_dataloader()


def test_a_source_without_a_micro_batch_for_each_process_is_refused(prepared_mix, row_source, monkeypatch):
    """Each process reads its own share of a source too: counted by loader workers alone, a source enough for one
    GPU passed the check on two."""
    from litdata.utilities.env import _DistributedEnv

    smallest = sum(owner == "case_reports" for owner in row_source.values())
    datamodule(prepared_mix, micro_batch_size=smallest // 2 + 1, num_workers=1).train_dataloader()
    monkeypatch.setattr(_DistributedEnv, "detect", classmethod(lambda cls: _DistributedEnv(2, 0, 1)))
    with pytest.raises(UserError, match=f"'case_reports' holds {smallest} rows of 128 tokens, fewer than one micro-batch "
                                        f"of {smallest // 2 + 1} for each of the 2 loader workers × processes"):
        datamodule(prepared_mix, micro_batch_size=smallest // 2 + 1, num_workers=1).train_dataloader()



def test_rows_cut_shorter_than_prepared_are_counted_per_chunk(prepared_mix):
    """litdata cuts each chunk into rows on its own: rows shorter than the prepared ones leave each chunk's tail
    unread. Counted from the whole token count, a source a row short of a micro-batch per worker passed the check
    and gave no batch: the fit hung at its first step."""
    folder = prepared_mix.dirs["case_reports"]
    dims = [chunk["dim"] for chunk in json.loads((folder / "index.json").read_text())["chunks"]]
    block = next(size for size in range(prepared_mix.block_size - 1, 2, -1) if sum(dim // size for dim in dims) < sum(dims) // size)
    readable = sum(dim // block for dim in dims)
    batches = islice(datamodule(prepared_mix, block_size=block, micro_batch_size=readable).train_dataloader(), 2)
    assert [len(batch["input_ids"][0]) for batch in batches] == [block] * 2
    with pytest.raises(UserError, match=f"'case_reports' holds {readable} rows of {block} tokens, fewer than one "
                                        f"micro-batch of {readable + 1} for each of the 1 loader"):
        datamodule(prepared_mix, block_size=block, micro_batch_size=readable + 1).train_dataloader()

def test_seed_decides_the_order(prepared_mix, row_source):
    first = rows(b for _, b in zip(range(3), datamodule(prepared_mix, seed=1).train_dataloader()))
    again = rows(b for _, b in zip(range(3), datamodule(prepared_mix, seed=1).train_dataloader()))
    other = rows(b for _, b in zip(range(3), datamodule(prepared_mix, seed=2).train_dataloader()))
    assert first == again and first != other
    pubmed = [[row for row in seen if row_source[row] == "pubmed"][:5] for seen in (first, other)]
    assert pubmed[0] != pubmed[1]  # each source's own shuffle follows the seed, not only the draws between sources


def test_seed_decides_the_draws_between_sources(prepared_mix):
    """Unshuffled sources: only the weighted draws between them can make two seeds' rows differ."""
    first, other = (rows(b for _, b in zip(range(3), datamodule(prepared_mix, seed=seed, shuffle=False).train_dataloader()))
                    for seed in (1, 2))
    assert first != other


def test_shuffle_draws_rows_from_all_over_a_chunk(prepared_mix):
    """litdata shuffles the chunks, then the rows inside each: with its default window (256 rows, 2M tokens at
    block 8192) a batch held neighbouring blocks of the same few documents."""
    pubmed = [Source("pubmed", str(prepared_mix.dirs["pubmed"]))]
    size = Manifest.read(pubmed[0].path).num_tokens // prepared_mix.block_size
    stored = rows(islice(PackedDataModule(pubmed, micro_batch_size=1, shuffle=False, num_workers=0).train_dataloader(), size))
    index = {row: i for i, row in enumerate(stored)}
    shuffled = rows(b for _, b in zip(range(4), PackedDataModule(pubmed, micro_batch_size=8, num_workers=0).train_dataloader()))
    first = [index[row] for row in shuffled]
    assert len(stored) > 1000 and max(first) - min(first) > 256, first  # chunks of ~1200 rows here


def saved_after(prepared_mix, stop_after, num_workers):
    """The state a loader saves after reading ``stop_after`` batches."""
    loader = datamodule(prepared_mix, num_workers=num_workers).train_dataloader()
    batches = iter(loader)
    for _ in range(stop_after):
        next(batches)
    state = loader.state_dict()
    del batches
    return state


def restored_after(prepared_mix, stop_after, num_workers):
    """A new loader restored from the state another saved after reading ``stop_after`` batches."""
    restored = datamodule(prepared_mix, num_workers=num_workers).train_dataloader()
    restored.load_state_dict(saved_after(prepared_mix, stop_after, num_workers))
    return restored


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [0, 1, 4, 7])
def test_restored_loader_continues_with_the_exact_next_batch(prepared_mix, stop_after, num_workers):
    loader = datamodule(prepared_mix, num_workers=num_workers).train_dataloader()
    reference = rows(b for _, b in zip(range(stop_after + 5), loader))
    restored = restored_after(prepared_mix, stop_after, num_workers=num_workers)
    assert rows(b for _, b in zip(range(5), restored)) == reference[stop_after * 8:]


def test_a_position_saved_after_a_resume_resumes_exactly_again(prepared_mix):
    """Preempted twice: the state saved one batch after a resume must still hold the rows every other
    worker read before it, or those workers start their share over and repeat it."""
    reference = rows(b for _, b in zip(range(10), datamodule(prepared_mix, num_workers=2).train_dataloader()))
    restored = restored_after(prepared_mix, 4, num_workers=2)
    batches = iter(restored)
    seen = rows([next(batches)])
    state = restored.state_dict()
    del batches
    again = datamodule(prepared_mix, num_workers=2).train_dataloader()
    again.load_state_dict(state)
    assert seen + rows(b for _, b in zip(range(5), again)) == reference[4 * 8:]


def test_a_position_saved_before_a_resumed_run_trains_a_step_resumes_where_it_was(prepared_mix):
    """A SIGTERM in the first step after a resume saves the position the loader was restored to (Lightning holds the
    batch it fetched ahead, so no batch was trained since): saved as none, the stream restarted at its first rows."""
    from types import SimpleNamespace

    def trained_loader():  # as under a Trainer: one batch fetched ahead and left out of the saved position
        dm = datamodule(prepared_mix)
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
        return dm.train_dataloader()

    reference = rows(islice(trained_loader(), 8))
    first = trained_loader()
    batches = iter(first)
    for _ in range(5):  # 4 trained, the 5th held
        next(batches)
    state = first.state_dict()
    del batches
    resumed = trained_loader()
    resumed.load_state_dict(copy.deepcopy(state))
    batches = iter(resumed)
    assert rows([next(batches)]) == reference[4 * 8:5 * 8]  # held: none trained since the resume
    state = resumed.state_dict()
    del batches
    again = trained_loader()
    again.load_state_dict(state)
    assert rows(islice(again, 3)) == reference[4 * 8:7 * 8]


@pytest.mark.parametrize("under_a_trainer", [False, True])
def test_a_position_saved_again_before_a_restored_loader_yields_resumes_at_the_same_batch(prepared_mix, under_a_trainer):
    """litdata's restore moves its last worker on by one; saved again before any batch came (the loader not yet
    iterated, or no batch trained since the restore), that live position was saved: the resume took each worker's
    turn a batch late, its rows permuted, and every such save moved it on again."""
    from types import SimpleNamespace

    def loader():
        dm = datamodule(prepared_mix, num_workers=2)
        if under_a_trainer:  # one batch fetched ahead and left out of the saved position
            dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
        return dm.train_dataloader()

    reference = rows(islice(loader(), 9))
    first = loader()
    batches = iter(first)
    for _ in range(3 + under_a_trainer):
        next(batches)
    state = first.state_dict()
    del batches
    for _ in range(2):  # restored and saved again twice, reading nothing
        restored = loader()
        restored.load_state_dict(copy.deepcopy(state))
        state = restored.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert rows(islice(resumed, 5)) == reference[3 * 8:8 * 8]


@pytest.mark.parametrize("num_workers", [0, 3])
def test_restore_where_loader_workers_start_a_sources_next_pass(prepared_mix, row_source, num_workers):
    """Each worker starts a source's next pass on its own, in which the rows are dealt out to the workers anew: a
    position saved before, across or after the batches where the workers do so resumes at the next batch."""
    reference = rows(islice(datamodule(prepared_mix, num_workers=num_workers).train_dataloader(), 560))
    seen = set()  # the batch with the first pubmed row read twice: a worker is in its second pass by then
    repeat = next(i // 8 for i, row in enumerate(reference) if row_source[row] == "pubmed" and (row in seen or seen.add(row)))
    assert 450 < repeat < 550, repeat  # 2,436 pubmed rows at 60% of 8-row batches: ≈ 507 batches a pass
    for stop_after in (repeat - 30, repeat - 1, repeat, repeat + 4):
        restored = restored_after(prepared_mix, stop_after, num_workers=num_workers)
        rest = rows(islice(restored, 5))
        assert rest == reference[stop_after * 8:(stop_after + 5) * 8], f"resumed after batch {stop_after} (repeat at {repeat})"


def test_a_position_saved_in_a_later_loader_epoch_by_the_previous_loader_resumes_exactly(prepared_mix):
    """Before sources read passes of their own, a position saved with loader workers after a resume in the loader's
    second epoch gave every source epoch 1: the counts were replayed in the first epoch's shuffle."""
    def in_second_epoch(loader, batches):
        next(iter(loader))  # a loader epoch (a new iter without a restore starts the next)
        return islice(loader, batches)

    reference = rows(in_second_epoch(datamodule(prepared_mix, num_workers=2).train_dataloader(), 15))
    loader = datamodule(prepared_mix, num_workers=2).train_dataloader()
    batches = iter(in_second_epoch(loader, 10))
    for _ in range(10):
        next(batches)
    state = loader.state_dict()
    del batches
    assert state["current_epoch"] == 2
    for source in state["dataset"].values():
        source["current_epoch"] = 1  # as the previous loader wrote it
    restored = datamodule(prepared_mix, num_workers=2).train_dataloader()
    restored.load_state_dict(state)
    assert rows(islice(restored, 5)) == reference[10 * 8:]


def test_a_source_prepared_again_from_its_documents_in_another_order_is_refused(sample_corpus, tmp_path):
    """The digest a position saves was the index's alone (chunk names, sizes, rows): the same documents in another
    order, prepared again into the folder (a sorted corpus shuffled, as docs/data.md advises, after a first run),
    have the same index, and the saved counts resumed into other rows without a word. The chunks' content is in it
    now: the same text prepared again the same way resumes; a folder prepared before it was recorded digests its
    index alone, as the checkpoints of then saved."""
    import hashlib
    import os

    from cpt_lightning.data.manifest import index_digest
    from cpt_lightning.data.prepare import prepare

    documents = sample_corpus.raw["medical_qa"].read_text(encoding="utf-8").splitlines()[:200]
    raw, folder = tmp_path / "qa.jsonl", tmp_path / "qa"

    def prepared_from(lines, mtime):
        raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.utime(raw, (mtime, mtime))  # the fingerprint's inputs are path, size and time: it is prepared again
        prepare([str(raw)], str(folder), str(sample_corpus.tokenizer_dir), 128, num_workers=1, holdout_tokens=0,
                overwrite=True, progress=False)
        return {key: value for key, value in json.loads((folder / "index.json").read_text()).items()
                if key != "updated_at"}

    def loader():
        return PackedDataModule([Source("qa", str(folder), 1.0)], micro_batch_size=4).train_dataloader()

    layout = prepared_from(documents, 1_000_000_000)
    reference = rows(islice(loader(), 6))
    saving = loader()
    batches = iter(saving)
    for _ in range(3):
        next(batches)
    state = saving.state_dict()
    del batches
    assert prepared_from(documents[::-1], 1_000_000_100) == layout  # the index cannot tell
    shuffled = loader()
    with pytest.raises(UserError, match=f"{re.escape(str(folder))} holds other chunks than those the checkpoint's "
                                        "position in the training mix counts there"):
        shuffled.load_state_dict(copy.deepcopy(state))
    assert prepared_from(documents, 1_000_000_200) == layout  # the same text, prepared again the same way
    resumed = loader()
    resumed.load_state_dict(copy.deepcopy(state))
    assert rows(islice(resumed, 3)) == reference[3 * 4:]

    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["chunks_sha256"]  # as cpt prepare wrote it before 2026-12-06
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert index_digest(str(folder)) == hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def test_a_source_copied_to_another_folder_resumes_exactly_there(prepared_mix, tmp_path):
    """Clusters copy the prepared data to node-local scratch at each job's start, so every resume reads it from another
    folder: the position was refused as another source's. A copy holds the same chunks (index.json, its time stamp
    aside) and resumes where it was; other chunks, in another folder or refilled into the same one (read without a
    word before), or a checkpoint without their digest in another folder, are refused."""
    reference = rows(islice(datamodule(prepared_mix, num_workers=2).train_dataloader(), 15))
    state = saved_after(prepared_mix, 10, num_workers=2)

    def resumed_with(pubmed_folder, saved=state):
        sources = [Source(s.name, str(pubmed_folder) if s.name == "pubmed" else s.path, s.weight)
                   for s in prepared_mix.sources]
        restored = PackedDataModule(sources, micro_batch_size=8, num_workers=2).train_dataloader()
        restored.load_state_dict(copy.deepcopy(saved))
        return rows(islice(restored, 5))

    assert prepared_mix.sources[0].name == "pubmed"
    scratch = shutil.copytree(prepared_mix.dirs["pubmed"], tmp_path / "scratch" / "pubmed")
    assert resumed_with(scratch) == reference[10 * 8:]
    other = shutil.copytree(prepared_mix.dirs["medical_qa"], tmp_path / "scratch" / "medical_qa")
    with pytest.raises(UserError, match=f"{re.escape(str(other))} holds other chunks than those the checkpoint's "
                                        "position in the training mix counts in .*pubmed \\(prepared again"):
        resumed_with(other)
    index = json.loads((scratch / "index.json").read_text())
    (scratch / "index.json").write_text(json.dumps({**index, "updated_at": "1800000000.0"}))  # prepared again alike
    assert resumed_with(scratch) == reference[10 * 8:]
    state_in_scratch = copy.deepcopy(state)
    state_in_scratch["dataset"]["0"]["input_dir_path"] = str(scratch)
    shutil.rmtree(scratch)
    shutil.copytree(prepared_mix.dirs["medical_qa"], scratch)  # the same folder, refilled with other data
    with pytest.raises(UserError, match="scratch/pubmed holds other chunks than those the checkpoint's position in "
                                        "the training mix counts there"):
        resumed_with(scratch, state_in_scratch)
    shutil.rmtree(scratch)
    shutil.copytree(prepared_mix.dirs["pubmed"], scratch)
    without_digests = copy.deepcopy(state)
    for source in without_digests["dataset"].values():
        del source["cpt_index_sha256"]
    with pytest.raises(UserError, match="which may be a copy, which a checkpoint saved before 2026-12-04 cannot tell"):
        resumed_with(scratch, without_digests)
    assert resumed_with(prepared_mix.dirs["pubmed"], without_digests) == reference[10 * 8:]  # in place, as before


def test_a_position_saved_on_other_nodes_of_the_same_processes_resumes_exactly(prepared_mix):
    """Every pass deals as on one node, so 2 nodes × 2 GPUs read the rows 1 node × 4 does: a resume across them was
    refused as another layout, and resume_on_another_layout started new passes, reading rows again."""
    reference = rows(islice(datamodule(prepared_mix, num_workers=2).train_dataloader(), 8))
    state = saved_after(prepared_mix, 5, num_workers=2)
    for source in state["dataset"].values():
        source["initial_num_nodes"] = 2  # as if saved by the same processes on two nodes
    restored = datamodule(prepared_mix, num_workers=2).train_dataloader()
    restored.load_state_dict(state)
    assert rows(islice(restored, 3)) == reference[5 * 8:]


@pytest.mark.parametrize("change", [{"num_workers": 1}, {"micro_batch_size": 4}, {"world_size": 2}])
def test_resuming_on_another_layout_names_what_to_keep(prepared_mix, change):
    loader = datamodule(prepared_mix, num_workers=2).train_dataloader()
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    del batches
    for key, value in change.items():  # as if 2 processes had saved it
        if key == "world_size":
            for source in state["dataset"].values():
                source[key] = value
    change = {key: value for key, value in change.items() if key != "world_size"}
    restored = datamodule(prepared_mix, **{"num_workers": 2, **change}).train_dataloader()
    with pytest.raises(UserError, match=r"saved by \d process\(es\) on \d node\(s\) × 2 loader worker\(s\) × micro-batch 8; this "
                       r"run has 1 process\(es\) on 1 node\(s\) × \d loader worker\(s\) × micro-batch \d\. Resume with the same "
                       r"processes \(trainer\.devices × trainer\.num_nodes; the nodes alone may differ\).* or set "
                       r"data\.init_args\.resume_on_another_layout: true"):
        restored.load_state_dict(state)


def dealt(dataset, epoch: int, worker: int, world=(1, 0, 1), workers: int = 2, micro_batch: int = 8) -> int:
    """The rows litdata's shuffler deals ``worker`` in pass ``epoch`` of ``dataset`` (world: processes, rank, nodes)."""
    from litdata.utilities.env import _DistributedEnv, _WorkerEnv

    shuffler = dataset._create_shuffler(dataset._create_cache(_WorkerEnv(workers, 0)))
    _, intervals = shuffler.get_chunks_and_intervals_per_workers(_DistributedEnv(*world), workers, micro_batch, epoch)
    return sum(end - start for _, start, end, _ in intervals[world[1] * workers + worker])


@pytest.mark.parametrize("network_file_system", [False, True], ids=["local-disk", "network-file-system"])
@pytest.mark.parametrize("nodes", [1, 2])
def test_every_pass_deals_each_row_to_one_reader_and_every_reader_the_same_share(prepared_mix, monkeypatch,
                                                                                network_file_system, nodes):
    """litdata dealt whole chunks on a network file system (its WindowShuffle, chosen for NFS, Lustre, GPFS, ...
    mounts: 2 of 4 readers got pubmed's two chunks, the others nothing, so their ranks' mixes ended), and on two
    nodes, from the second pass on, each node the chunks it had touched in the first (a chunk split between the
    nodes was read by both). Every pass now deals every row once, the same rows to each process, a worker's share
    within a micro-batch of another's, less under a micro-batch per reader."""
    if network_file_system:
        monkeypatch.setenv("LITDATA_POSIX_FAST", "1")  # what litdata chooses for NFS, Lustre, GPFS, ... mounts
    from litdata.utilities.env import _DistributedEnv, _WorkerEnv

    for source in datamodule(prepared_mix, num_workers=2).train_dataloader().dataset._datasets:
        cache = source._create_cache(_WorkerEnv(2, 0))
        shuffler, stored = source._create_shuffler(cache), sum(chunk[-1] - chunk[0] for chunk in cache.get_chunk_intervals())
        passes = []
        for epoch in (1, 2, 3):
            _, intervals = shuffler.get_chunks_and_intervals_per_workers(_DistributedEnv(2, 0, nodes), 2, 8, epoch)
            dealt_rows = [[row for _, start, end, _ in reader for row in range(start, end)] for reader in intervals]
            every = [row for reader in dealt_rows for row in reader]
            shares = [len(reader) for reader in dealt_rows]  # two processes × two workers
            assert shares[0] + shares[1] == shares[2] + shares[3] and max(shares) - min(shares) <= 8
            assert len(every) == len(set(every)) > stored - 4 * 8
            passes.append(every)
        assert passes[0] != passes[1]  # each pass shuffled anew


@pytest.mark.parametrize("network_file_system", [False, True], ids=["local-disk", "network-file-system"])
def test_resume_on_another_layout_goes_on_from_the_pass_after_every_sources_furthest(prepared_mix, monkeypatch,
                                                                                     network_file_system):
    """Two loader workers saved, one resumes (as a lost node would have it): worker 1 had read its share of pubmed's
    first pass and a batch into the second, so the run goes on at the third, every source from a pass start, on any
    file system (litdata's whole-chunk dealing there, 1,192 rows where whole batches give 1,216, is not used)."""
    if network_file_system:
        monkeypatch.setenv("LITDATA_POSIX_FAST", "1")  # what litdata chooses for NFS, Lustre, GPFS, ... mounts
    loader = datamodule(prepared_mix, num_workers=2).train_dataloader()
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    del batches
    pubmed, epoch = loader.dataset._datasets[0], state["current_epoch"]
    shares = [dealt(pubmed, epoch + p, worker=1) for p in (0, 1)]
    assert shares[0] == 1216
    for read, goes_on_at in ((shares[0] + 8, epoch + 2), (shares[0] + shares[1], epoch + 2),
                             (shares[0] + shares[1] + 8, epoch + 3)):
        state["num_samples_yielded"][1] = [read, 0, 0]  # source 0: pubmed
        restored = datamodule(prepared_mix, num_workers=1, resume_on_another_layout=True).train_dataloader()
        with pytest.warns(UserWarning, match=r"saved by 1 process\(es\) on 1 node\(s\) × 2 loader worker\(s\) × micro-batch "
                                             r"8; this run has 1 process\(es\) on 1 node\(s\) × 1 loader worker\(s\) × "
                                             rf"micro-batch 8: each source starts a new pass \(loader epoch {goes_on_at}\)"):
            restored.load_state_dict(state)
    first = next(iter(restored))
    fresh = datamodule(prepared_mix, num_workers=1).train_dataloader()
    fresh.current_epoch = epoch + 2  # its next iteration is the one after, from the start
    assert restored.current_epoch == epoch + 3 and rows([first]) == rows([next(iter(fresh))])


@pytest.mark.parametrize("change, refusal", [
    ({"seed": 43}, "saved with data.init_args.seed 42; this run has 43"),
    ({"shuffle": False}, "saved with data.init_args.shuffle True; this run has False"),
    ({"sources": "reordered"}, "holds other chunks than those the checkpoint's position in the training mix counts in"),
    ({"sources": "one fewer"}, "this run's data.init_args.sources has 2"),
    ({"block_size": "half"}, "counts rows of {block} tokens (data.init_args.block_size); this run cuts rows of {half}"),
])
def test_resuming_with_another_data_order_names_the_setting(prepared_mix, change, refusal):
    """Checked by litdata only in each loader worker once the checkpoint was restored: a traceback per worker."""
    if change.get("block_size") == "half":
        change = {"block_size": prepared_mix.block_size // 2}
        refusal = refusal.format(block=prepared_mix.block_size, half=prepared_mix.block_size // 2)
    loader = datamodule(prepared_mix, num_workers=2).train_dataloader()
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    del batches
    if change.get("sources") == "reordered":
        change = {"sources": prepared_mix.sources[::-1]}
    elif change.get("sources") == "one fewer":
        change = {"sources": prepared_mix.sources[:2]}
    sources = change.pop("sources", prepared_mix.sources)
    restored = PackedDataModule(sources, micro_batch_size=8, num_workers=2, **change).train_dataloader()
    with pytest.raises(UserError, match=re.escape(refusal)):
        restored.load_state_dict(state)


def _rank_rows(rank, mix_sources, store, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dm = PackedDataModule(mix_sources, micro_batch_size=4, num_workers=1)
    with open(out, "w") as f:
        json.dump([row.hex() for row in rows(islice(dm.train_dataloader(), 300))], f)  # under a pass of each source
    torch.distributed.destroy_process_group()


def test_two_ranks_get_disjoint_rows(prepared_mix, tmp_path):
    ctx = mp.get_context("fork")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_rank_rows, args=(r, prepared_mix.sources, tmp_path / "store", outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    rank0, rank1 = (json.loads(o.read_text()) for o in outs)
    assert len(rank0) == len(rank1) == 1200
    assert len(set(rank0)) == len(rank0) and set(rank0).isdisjoint(rank1)


def same_source_patterns(a: list[str], b: list[str], rows_per_batch: int) -> float:
    """The share of batches in which two row streams drew their rows from the same sources in the same order."""
    batches = min(len(a), len(b)) // rows_per_batch
    chunks = [(a[i * rows_per_batch:(i + 1) * rows_per_batch], b[i * rows_per_batch:(i + 1) * rows_per_batch]) for i in range(batches)]
    return sum(x == y for x, y in chunks) / batches


def test_loader_workers_and_epochs_draw_their_own_sources(prepared_mix, row_source):
    loader = datamodule(prepared_mix, num_workers=2).train_dataloader()
    epochs = [[row_source[r] for r in rows(b for _, b in zip(range(40), loader))] for _ in range(2)]
    even, odd = ([row for i in range(0, 40, 2) for row in epochs[0][8 * (i + k):8 * (i + k + 1)]] for k in (0, 1))
    # by chance 0.44⁸ ≈ 0.1% of 8-row batches match; with litdata's one seed, all of them did
    assert same_source_patterns(even, odd, rows_per_batch=8) < 0.15  # batches alternate between the two workers
    assert same_source_patterns(*epochs, rows_per_batch=8) < 0.15


def test_smaller_block_size_recuts_the_same_chunks(prepared_mix):
    pubmed = [Source("pubmed", str(prepared_mix.dirs["pubmed"]))]
    full = next(iter(PackedDataModule(pubmed, micro_batch_size=1, shuffle=False, num_workers=0).train_dataloader()))
    half = next(iter(PackedDataModule(pubmed, micro_batch_size=2, shuffle=False, num_workers=0,
                                      block_size=64).train_dataloader()))
    assert half["input_ids"].shape == (2, 64)
    assert torch.equal(half["input_ids"].reshape(1, 128), full["input_ids"])
    assert half["position_ids"][1, 0] == 0  # a new row restarts positions even inside a document


def test_validation_reads_every_row_once(prepared_mix, row_source):
    """In stored order, so that limit_val_batches keeps the same rows whatever the seed."""
    val = [Source("qa", str(prepared_mix.dirs["medical_qa"]))]
    dm = PackedDataModule(prepared_mix.sources, micro_batch_size=10, num_workers=0, val_sources=val)
    (loader,) = dm.val_dataloader()
    batches = list(loader)
    seen = rows(batches)
    assert seen == [row for row, name in row_source.items() if name == "medical_qa"]  # each once, in stored order
    for batch in batches:  # validation rows are separated into documents like training rows
        assert torch.equal(batch["position_ids"], position_ids_from_separators(batch["input_ids"], SEP))
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert is_overridden("val_dataloader", dm, L.LightningDataModule)
    assert not is_overridden("val_dataloader", datamodule(prepared_mix), L.LightningDataModule)


def test_the_mix_plan_says_how_often_the_phases_read_each_source(prepared_mix):
    """A weighted mix repeats a small source and leaves part of a large one unread: said before training."""
    dm = datamodule(prepared_mix)
    tokens = 10_000_000
    plan = dm.mix_plan(tokens)
    assert plan.startswith("[data] the phases' 10,000,000 training tokens read ")
    for source in prepared_mix.sources:
        prepared = Manifest.read(source.path).num_tokens
        share = source.weight / sum(s.weight for s in prepared_mix.sources)
        assert (f"{source.name} {share:.0%} ≈ {round(share * tokens):,} of its {prepared:,} tokens, "
                f"{share * tokens / prepared:.2f} passes") in plan
    resumed = dm.mix_plan(tokens, seen=6_000_000)  # a branch's mix reads only what is left
    assert resumed.startswith("[data] the phases' 4,000,000 left of 10,000,000 (resumed at 6,000,000) training tokens read ")
    first = prepared_mix.sources[0]
    share = first.weight / sum(s.weight for s in prepared_mix.sources)
    prepared = Manifest.read(first.path).num_tokens  # the passes over what is left, not over the whole run
    assert f"{first.name} {share:.0%} ≈ {round(share * 4_000_000):,} of its {prepared:,} tokens, " \
           f"{share * 4_000_000 / prepared:.2f} passes" in resumed
    assert plan.endswith("passes (each loader worker reads its share of a source's pass whole, reshuffled, before any of it repeats)")
    scaled = PackedDataModule([Source(s.name, s.path, 5 * s.weight) for s in prepared_mix.sources], micro_batch_size=8)
    assert scaled.mix_plan(tokens) == plan  # weights are shares of their sum
    past = dm.mix_plan(tokens, seen=12_000_000)  # a run that trains on past its phases, resumed there: not "0 left"
    assert past.startswith("[data] the phases' 10,000,000 training tokens were all read before this resume (at 12,000,000)")
    assert f"{first.name} {share:.0%}" in past and "passes" not in past


@pytest.mark.parametrize(("num_workers", "per_source"), [(0, 0), (1, 1), (4, 1)])
def test_each_validation_source_has_a_loader_of_its_own(prepared_mix, row_source, num_workers, per_source):
    """One loader per source, in the order named, so each source's figures are its own, with one persistent worker
    at most: 2 workers of a loader each ended their share with a short batch, and the batches past the loader's
    length, where Lightning's loop stops, went unvalidated. Micro-batch 3: no worker's share a whole number of them."""
    names = ("case_reports", "medical_qa")
    val = [Source(f"{name}_val", str(prepared_mix.dirs[name])) for name in names]
    dm = PackedDataModule(prepared_mix.sources, micro_batch_size=3, num_workers=num_workers, val_sources=val)
    assert dm.val_source_names == ["case_reports_val", "medical_qa_val"]
    loaders = dm.val_dataloader()
    assert [loader.num_workers for loader in loaders] == [per_source, per_source]
    for name, loader in zip(names, loaders):
        batches = list(loader)
        seen = rows(batches)
        assert {row_source[row] for row in seen} == {name}
        assert len(seen) == len(set(seen)) == sum(owner == name for owner in row_source.values())
        assert len(batches) == len(loader)  # every batch within what Lightning's loop reads


def test_a_training_folder_given_as_validation_source_is_a_warning(prepared_mix):
    """Validation on the rows the run trains on draws a curve that looks held out."""
    with pytest.warns(UserWarning, match=r"val_sources 'qa' is the training source .*medical_qa: its loss is not held "
                                         r"out \(cpt prepare held out .*medical_qa/holdout for this\)"):
        PackedDataModule(prepared_mix.sources, val_sources=[Source("qa", str(prepared_mix.dirs["medical_qa"]))])


def test_every_evaluation_reads_the_same_rows_from_workers_kept_between_them(prepared_mix):
    """The loader keeps its worker from one evaluation to the next (no start-up each time) and each evaluation,
    also one that ``limit_val_batches`` cut short, starts again from the first row."""
    val = [Source("qa", str(prepared_mix.dirs["medical_qa"]))]
    (loader,) = PackedDataModule(prepared_mix.sources, micro_batch_size=4, num_workers=1, val_sources=val).val_dataloader()
    assert loader.persistent_workers
    first = rows(list(loader))
    cut_short = iter(loader)
    assert rows([next(cut_short)]) == first[:4]
    assert rows(list(loader)) == first and len(first) > 4


@pytest.mark.parametrize("world_size", [2, 8])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_on_many_ranks_keeps_all_but_a_few_rows_in_equal_batches(prepared_mix, row_source, monkeypatch,
                                                                               world_size, num_workers):
    """Each rank builds its loader in its own process: simulated here by the world litdata reads."""
    from litdata.utilities.env import _DistributedEnv

    val = [Source(f"{name}_val", str(prepared_mix.dirs[name])) for name in ("medical_qa", "case_reports")]
    batches, seen = [], []
    for rank in range(world_size):
        monkeypatch.setattr(_DistributedEnv, "detect", classmethod(lambda cls, r=rank: cls(world_size, r, 1)))
        dm = PackedDataModule(prepared_mix.sources, micro_batch_size=16, num_workers=num_workers, val_sources=val)
        rank_batches = [list(loader) for loader in dm.val_dataloader()]
        batches.append([len(source_batches) for source_batches in rank_batches])
        seen += [row for source_batches in rank_batches for row in rows(source_batches)]
    held_out = sum(name in ("medical_qa", "case_reports") for name in row_source.values())
    # no rank waits for another in a collective
    assert all(counts == batches[0] for counts in batches) and min(batches[0]) > 0
    assert len(seen) == len(set(seen)) and held_out - 2 * (world_size - 1) <= len(seen) <= held_out


def test_a_validation_source_of_fewer_rows_than_processes_is_refused(prepared_mix, monkeypatch):
    """Each process reads rows // processes rows of a source: with fewer rows than processes none reads it, and
    litdata stopped the run with a bare AssertionError when the source's loader was built (a loader per source;
    the mixed loader hid a small source among the others)."""
    from litdata.utilities.env import _DistributedEnv


    holdout = prepared_mix.dirs["medical_qa"] / "holdout"
    rows = Manifest.read(holdout).num_tokens // prepared_mix.block_size
    val = [Source("pubmed_val", str(prepared_mix.dirs["pubmed"] / "holdout")), Source("qa_val", str(holdout))]
    for world_size in (rows, rows + 1):
        monkeypatch.setattr(_DistributedEnv, "detect", classmethod(lambda cls, w=world_size: cls(w, 0, 1)))
        dm = PackedDataModule(prepared_mix.sources, micro_batch_size=4, num_workers=0, val_sources=val)
        if world_size == rows:  # one row each: read
            dm.setup("fit")
            assert all(len(list(loader)) for loader in dm.val_dataloader())
            continue
        for stage in ("fit", "validate"):  # when the run starts, not at its first validation
            with pytest.raises(UserError, match=rf"^data.init_args.val_sources 'qa_val' holds {rows} rows of "
                                                rf"{prepared_mix.block_size} tokens, fewer than the {rows + 1} processes"):
                dm.setup(stage)


def test_refuses_data_it_cannot_mix_or_feed(prepared_mix, tmp_path):
    with pytest.raises(UserError, match="not a prepared source .*run `cpt prepare`"):
        PackedDataModule([Source("x", str(tmp_path / "missing"))])
    with pytest.raises(UserError, match="larger than the prepared block size 128"):
        datamodule(prepared_mix, block_size=256)
    with pytest.raises(UserError, match="weight"):
        PackedDataModule([Source("pubmed", str(prepared_mix.dirs["pubmed"]), 0.0)])
    other = tmp_path / "other"
    shutil.copytree(prepared_mix.dirs["medical_qa"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(tokenizer="some/other-tokenizer", vocab_sha256="0" * 64)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="'pubmed' and 'other' were prepared with different tokenizers"):
        PackedDataModule([Source("pubmed", str(prepared_mix.dirs["pubmed"])), Source("other", str(other))])
    with pytest.raises(UserError, match="source name 'pubmed' is used twice"):  # it hid the tokenizer mismatch
        PackedDataModule([Source("pubmed", str(prepared_mix.dirs["pubmed"])), Source("pubmed", str(other))])
    with pytest.raises(UserError, match="source name 'pubmed' is used twice"):
        PackedDataModule(prepared_mix.sources, val_sources=[Source("pubmed", str(prepared_mix.dirs["pubmed"]))])


def copy_with_manifest(folder, to, **changes):
    shutil.copytree(folder, to)
    manifest = json.loads((to / "manifest.json").read_text())
    manifest.update(changes)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def test_sources_with_another_separator_or_block_size(prepared_mix, tmp_path):
    """One separator id splits every row into documents: a source separated by another id would run its
    documents together; rows are cut at the training sources' smallest prepared block size unless a smaller one is
    asked (a validation source prepared shorter used to cut every training row to its length, silently)."""
    pubmed = Source("pubmed", str(prepared_mix.dirs["pubmed"]))
    eos = copy_with_manifest(prepared_mix.dirs["medical_qa"], tmp_path / "eos", separator_id=50279)
    with pytest.raises(UserError, match="'pubmed' and 'eos' were prepared with different tokenizers .*separator_id differs"):
        PackedDataModule([pubmed, Source("eos", str(eos))])
    short = copy_with_manifest(prepared_mix.dirs["medical_qa"], tmp_path / "short", block_size=64)
    assert PackedDataModule([pubmed, Source("short", str(short))]).block_size == 64
    with pytest.raises(UserError, match=r"larger than the prepared block size 64 \(source 'short'\)"):
        PackedDataModule([pubmed, Source("short", str(short))], block_size=128)
    # a validation source is read at the training rows' length: it never shortens them, and a shorter one is named
    assert PackedDataModule([pubmed], val_sources=[Source("short", str(short))], block_size=64).block_size == 64
    for block_size in (None, 128):
        with pytest.raises(UserError, match=r"val_sources 'short' was prepared with --block-size 64, shorter than "
                                            r"the training rows \(128 tokens\)"):
            PackedDataModule([pubmed], val_sources=[Source("short", str(short))], block_size=block_size)
    with pytest.raises(UserError, match="block_size=1: must be at least 2"):  # a row must hold a token and its target
        PackedDataModule([pubmed], block_size=1)


def test_a_manifest_says_why_a_folder_is_not_a_prepared_source(prepared_mix, tmp_path):
    """A missing folder, a folder without manifest.json (a raw corpus given by mistake), a manifest of another
    format version: each is named, with the step that fixes it."""

    with pytest.raises(UserError, match=r"missing: not a prepared source \(no such folder\); run `cpt prepare`"):
        Manifest.read(tmp_path / "missing")
    (tmp_path / "raw").mkdir()
    with pytest.raises(UserError, match=r"raw: not a prepared source \(no manifest.json\); run `cpt prepare`"):
        Manifest.read(tmp_path / "raw")
    newer = copy_with_manifest(prepared_mix.dirs["medical_qa"], tmp_path / "newer", version=2)
    with pytest.raises(UserError, match=r"not a cpt-lightning/packed-tokens v1 manifest; prepare the source again"):
        Manifest.read(newer)


def test_only_a_sources_finished_holdout_subfolder_reads_as_a_holdout(prepared_mix, tmp_path):
    """``cpt prepare`` names a holdout ``<source>/holdout`` and writes its manifest last: a source whose own name
    ends in "holdout" is not one, nor is a holdout folder without its manifest (a prepare stopped midway)."""
    from dataclasses import replace

    from cpt_lightning.data.manifest import holdout_folder

    manifest = Manifest.read(prepared_mix.dirs["pubmed"])
    assert replace(manifest, source="corpora/pubmed/holdout").is_holdout
    assert not replace(manifest, source="corpora/pubmed_holdout").is_holdout
    (tmp_path / "holdout").mkdir()
    assert holdout_folder(tmp_path) is None
    manifest.write(tmp_path / "holdout")
    assert holdout_folder(tmp_path) == tmp_path / "holdout"


def test_a_prepared_folder_named_like_a_parquet_file_is_read_as_a_folder(prepared_mix, tmp_path, modernbert_tokenizer):
    """``cpt prepare pubmed.parquet -o prepared/pubmed.parquet`` worked, and training on it failed at the first batch:
    litdata reads a path ending in .parquet as a Parquet file, and looked for the index in ``prepared/``."""
    from cpt_lightning.analysis.probe import prepared_rows

    named = shutil.copytree(prepared_mix.dirs["pubmed"], tmp_path / "pubmed.parquet")
    sources = [Source(s.name, str(named) if s.name == "pubmed" else s.path, s.weight) for s in prepared_mix.sources]
    reference = rows(islice(datamodule(prepared_mix).train_dataloader(), 3))
    assert rows(islice(PackedDataModule(sources, micro_batch_size=8, num_workers=0).train_dataloader(), 3)) == reference
    block = Manifest.read(named).block_size
    probe = [prepared_rows(folder, modernbert_tokenizer, block, 4) for folder in (named, prepared_mix.dirs["pubmed"])]
    assert len(probe[0]) == 4 and torch.equal(*probe)  # cpt analyze's probe too


def test_validation_sources_are_checked_like_training_ones(prepared_mix, tmp_path):
    other = copy_with_manifest(prepared_mix.dirs["medical_qa"], tmp_path / "other", vocab_sha256="0" * 64)
    with pytest.raises(UserError, match="'pubmed' and 'other' were prepared with different tokenizers"):
        PackedDataModule(prepared_mix.sources, val_sources=[Source("other", str(other))])
    with pytest.raises(UserError, match="not a prepared source"):
        PackedDataModule(prepared_mix.sources, val_sources=[Source("gone", str(tmp_path / "gone"))])


def test_check_compatible_names_the_field_to_fix(prepared_mix, modernbert_tokenizer):
    dm = datamodule(prepared_mix)
    dm.check_compatible(50368, 512, modernbert_tokenizer)
    with pytest.raises(ValueError, match="embeddings hold 30522: fix model vocab_size"):
        check_compatible(dm.facts, 30522, 512)
    with pytest.raises(ValueError, match="embeddings hold 50367"):  # one row short: the last id would index past it
        check_compatible(dm.facts, 50367, 512)
    with pytest.raises(ValueError, match="block_size=128 exceeds the model's max_position_embeddings=64"):
        dm.check_compatible(50368, 64)
    dm.check_compatible(50368, 128)  # a row as long as the model's positions fits (the recipes: 8192 and 8192)
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(modernbert_tokenizer.name_or_path)
    other.add_tokens(["[new-token]"])
    with pytest.raises(ValueError, match="vocabulary differs from the model's tokenizer"):
        dm.check_compatible(50400, 512, other)
    with pytest.raises(ValueError, match="vocabulary differs"):  # not "fix model vocab_size": it would not help
        dm.check_compatible(30522, 512, other)
    cls_as_sep = AutoTokenizer.from_pretrained(modernbert_tokenizer.name_or_path, sep_token="[CLS]")  # same vocabulary
    with pytest.raises(ValueError, match="separates documents with id 50282 but the model's tokenizer uses sep_token_id=50281"):
        dm.check_compatible(50368, 512, cls_as_sep)
    no_sep = copy.deepcopy(modernbert_tokenizer)  # the same vocabulary: it trained on [SEP]-framed rows and exported
    no_sep.sep_token = None  # a config without sep or cls id, its texts no longer wrapped
    with pytest.raises(ValueError, match="separates documents with id 50282 but the model's tokenizer has neither a SEP "
                                         "nor an EOS token: prepare the data with the model's tokenizer, or fix "):
        dm.check_compatible(50368, 512, no_sep)
    no_sep.eos_token = "[SEP]"  # cpt prepare's choice where there is no SEP token
    dm.check_compatible(50368, 512, no_sep)


def test_config_builds_it_the_way_lightning_cli_does(prepared_mix):
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = {"data": {"class_path": "cpt_lightning.data.PackedDataModule", "init_args": {
        "sources": [{"name": n, "path": str(p), "weight": prepared_mix.weights[n]} for n, p in prepared_mix.dirs.items()],
        "block_size": 64, "micro_batch_size": 4}}}
    dm = parser.instantiate_classes(parser.parse_object(config)).data
    assert isinstance(dm, PackedDataModule) and dm.block_size == 64
    assert [s.weight for s in dm.sources] == [0.6, 0.2, 0.2] and isinstance(dm.sources[0], Source)


class Recorder(L.LightningModule):
    """Trains nothing; records the rows of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(rows([batch]))
        return self.weight.sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(prepared_mix, root, max_steps, ckpt_path=None):
    module = Recorder()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints], default_root_dir=root)
    trainer.fit(module, datamodule=datamodule(prepared_mix, num_workers=2, micro_batch_size=4), ckpt_path=ckpt_path)
    return module.seen


def test_lightning_checkpoint_resumes_at_the_next_unseen_batch(prepared_mix, tmp_path):
    """Lightning prefetches a batch before saving; the resumed run must still start with that batch."""
    straight = fit(prepared_mix, tmp_path / "straight", max_steps=9)
    first = fit(prepared_mix, tmp_path / "run", max_steps=5)
    resumed = fit(prepared_mix, tmp_path / "run", max_steps=9, ckpt_path=str(tmp_path / "run" / "epoch=0-step=5.ckpt"))
    assert len(straight) == 9 and len(first) == 5 and len(resumed) == 4
    assert first == straight[:5]
    assert resumed == straight[5:]


def test_a_source_under_home_is_found(prepared_mix, tmp_path, monkeypatch):
    """A YAML path or --opt=~/x reaches the datamodule unexpanded by any shell: "not a prepared source (no such
    folder)" for a folder that is there."""
    import os

    monkeypatch.setenv("HOME", str(tmp_path))
    os.symlink(prepared_mix.dirs["pubmed"], tmp_path / "pubmed")
    assert PackedDataModule([Source("pubmed", "~/pubmed")], num_workers=0).sources[0].path == str(tmp_path / "pubmed")


@pytest.mark.parametrize("weight", [0, -0.6, float("inf"), float("nan")])
def test_a_weight_that_is_not_positive_and_finite_is_refused_naming_the_source(prepared_mix, weight):
    """``weight: .inf`` passed the check and made every weight nan in the loader workers."""
    sources = [Source(s.name, s.path, weight if s.name == "medical_qa" else s.weight) for s in prepared_mix.sources]
    with pytest.raises(UserError, match=rf"source 'medical_qa' has weight {weight}: weights must be positive and finite"):
        PackedDataModule(sources)
