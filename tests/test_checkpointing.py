"""Checkpoints are complete or absent; kept every K tokens, at phase ends and at the end; disk checked first."""

import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from callbacks import NonFiniteGuard, ObjectiveSchedule, Phase, PhaseEndExport, PreemptionCheckpoint, TokenCheckpoint
from cpt_lightning.checkpointing import AtomicCheckpointIO, restore_interrupted_replacements
from cpt_lightning.errors import UserError
from cpt_lightning.export import read_checkpoint
from cpt_lightning.objectives import CausalLM, MaskedLM
from cpt_lightning.parallel import FSDP2
from cpt_lightning.start_checks import (check_a_start_that_saved_nothing, check_ckpt_path, requeued_ckpt_path,
                                        saved_last_checkpoints)
from cpt_lightning.training_cli import LIBRARY_NOTICES
from helpers import same_files, tiny_module
from test_bad_inputs import fit_config, own_mix, run  # noqa: F401 (a fixture)
from test_objective_schedule import ROWS, TOKENS_PER_STEP, PackedRows, StopAt


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()

    def disk_full(checkpoint, file):
        file.write(b"torn")  # half a file, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"could not write the checkpoint .*last.ckpt \(No space left on device; "
                                        r"free space on that disk\); the previous"):
        io.save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left behind


def test_a_disk_error_behind_another_exception_is_one_line_on_every_rank(tmp_path, monkeypatch):
    """FSDP2 turned a failed write into one line only when the failure *was* an OSError: torch.save
    raises a RuntimeError whose context is the OSError, which ended the run in a traceback (a
    gathered checkpoint written without AtomicCheckpointIO, a sharded checkpoint's meta.pt)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = FSDP2()
    strategy.reduce_boolean_decision = lambda decision, all=True: decision  # one process: its own verdict

    def torch_save_on_a_full_disk():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(UserError, match=r"could not write the checkpoint .*last.ckpt \(No space left on device; "
                                        r"free space on that disk\); what was written before is intact$"):
        strategy._write_on_every_rank(torch_save_on_a_full_disk, tmp_path / "last.ckpt")  # the first: none before it
    with pytest.raises(ZeroDivisionError):  # not a disk error: its own traceback
        strategy._write_on_every_rank(lambda: 1 / 0, tmp_path / "last.ckpt")
    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", lambda *args, **kwargs: torch_save_on_a_full_disk())
    gathered = FSDP2(save_distributed_checkpoint=False)  # Lightning's torch.save, the whole checkpoint on rank 0
    gathered.reduce_boolean_decision = strategy.reduce_boolean_decision
    with pytest.raises(UserError, match=r"could not write the checkpoint .*last.ckpt \(No space left on device; "
                                        r"free space on that disk\); what was written before is intact$"):
        gathered.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")


def test_a_write_that_failed_on_another_rank_stops_this_one_too(tmp_path):
    """Rank 0 alone writes a gathered checkpoint: when it fails, the ranks whose part succeeded must raise too
    (they would wait in the next collective), and say that another rank's error explains it."""
    strategy = FSDP2()
    other_rank_failed = True
    strategy.reduce_boolean_decision = lambda failed, all=True: (failed and other_rank_failed) if all else (
        failed or other_rank_failed)  # two ranks: this one's verdict and the other's
    with pytest.raises(UserError, match=r"could not write the checkpoint .*last.ckpt: another rank failed \(its error "
                                        r"says why\)$"):  # the first: none before it
        strategy._write_on_every_rank(lambda: None, tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"an earlier one")
    with pytest.raises(UserError, match=r"another rank failed \(its error says why\); the previous checkpoint is intact"):
        strategy._write_on_every_rank(lambda: None, tmp_path / "last.ckpt")
    other_rank_failed = False
    strategy._write_on_every_rank(lambda: None, tmp_path / "last.ckpt")
    with pytest.raises(ZeroDivisionError):  # failed here alone: this rank raises its own error
        strategy._write_on_every_rank(lambda: 1 / 0, tmp_path / "last.ckpt")


def test_fsdp2_passes_weights_only_to_lightnings_load(tmp_path, monkeypatch):
    """Checked for its architecture first, a checkpoint is then Lightning's to load, with the caller's
    ``weights_only``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    asked = []
    monkeypatch.setattr(ModelParallelStrategy, "load_checkpoint",
                        lambda self, path, weights_only=None: asked.append(weights_only) or {})
    FSDP2().load_checkpoint(tmp_path / "missing.ckpt", weights_only=False)  # no checkpoint: straight to Lightning
    assert asked == [False]


def test_a_full_disk_behind_a_sharded_writes_gathered_failures_is_one_line(tmp_path):
    """torch.distributed.checkpoint gathers the ranks' failures into one CheckpointException (a BaseException,
    not an OSError): the full disk of the rank that failed is what the user reads."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    strategy = FSDP2()
    strategy.reduce_boolean_decision = lambda decision, all=True: decision  # one process: its own verdict

    def shards_on_a_full_disk():
        raise CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left on device"),
                                                      traceback.StackSummary())})

    with pytest.raises(UserError, match=r"could not write the checkpoint .*step=4.ckpt \(No space left on device; "
                                        r"free space on that disk\)"):
        strategy._write_on_every_rank(shards_on_a_full_disk, tmp_path / "step=4.ckpt")


def test_a_sharded_save_is_published_whole_or_not_at_all(tmp_path, monkeypatch):
    """Each rank's shards go to a hidden folder renamed into place once all are written: a save that fails
    keeps the previous checkpoint, and shards left in that folder by a killed save never join the next one."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    def write_shards(strategy, checkpoint, path, storage_options=None):  # what torch.distributed.checkpoint writes
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_text(str(checkpoint["step"]))
        if checkpoint["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        (path / ".metadata").write_text(str(checkpoint["step"]))

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", write_shards)
    strategy = FSDP2(save_distributed_checkpoint=True)  # one process: its barriers and broadcasts return at once
    strategy.reduce_boolean_decision = lambda decision, all=True: decision
    target = tmp_path / "step=1.ckpt"
    strategy.save_checkpoint({"step": 1}, target)
    with pytest.raises(UserError, match=r"could not write the checkpoint .*step=1.ckpt \(No space left on device; "
                                        r"free space on that disk\)"):
        strategy.save_checkpoint({"step": 2}, target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"__0_0.distcp": "1", ".metadata": "1"}
    (tmp_path / ".step=1.ckpt.partial" / "__1_0.distcp").write_text("a killed save's shard of another rank")
    strategy.save_checkpoint({"step": 3}, target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"__0_0.distcp": "3", ".metadata": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt"]


def test_a_save_is_written_beside_its_target_and_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    """Lightning staged the file in $TMPDIR (a full copy across filesystems; a full $TMPDIR was reported
    as the checkpoint's disk) and never synced, so a power loss could publish an empty checkpoint."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 3, "w": torch.arange(4.0)}, target)
    assert torch.load(target)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert synced == [str(target.with_name(".last.ckpt.partial")), str(target.parent)]  # the data, then the rename
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_storage_options_are_refused_and_nothing_is_written(tmp_path):
    """AtomicCheckpointIO writes a local file: options meant for another storage would be silently dropped."""
    with pytest.raises(TypeError, match="AtomicCheckpointIO takes no storage_options"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt", storage_options={"s3": "bucket"})
    assert list(tmp_path.iterdir()) == []


def fit(tmp_path, tokenizer_dir, callbacks, phases, plugins=None, ckpt_path=None, schedule_first=True, model_config=None,
        **trainer_kwargs):
    """``limit_val_batches`` in ``trainer_kwargs``: validated on packed rows too (a sanity validation first)."""
    module = tiny_module(tokenizer_dir, learning_rate=1e-3, model_config=model_config or {})
    schedule = [ObjectiveSchedule(phases)]
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=schedule + callbacks if schedule_first else callbacks + schedule, plugins=plugins, default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    rows = lambda: torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS)  # noqa: E731
    trainer.fit(module, rows(), rows() if "limit_val_batches" in trainer_kwargs else None, ckpt_path=ckpt_path)
    return trainer


def steps_saved(folder):
    return sorted(global_step(path) for path in folder.glob("step*.ckpt"))


def global_step(checkpoint) -> int:
    return int(torch.load(checkpoint, weights_only=False)["global_step"])


def resumable(checkpoint) -> bool:
    """A whole checkpoint (optimizer, loops, callbacks), not Lightning's weights-only kind."""
    return {"optimizer_states", "loops", "callbacks"} <= torch.load(checkpoint, weights_only=False).keys()


def test_every_n_tokens_keep_last_phase_ends_and_end(tmp_path, tokenizer_dir, caplog):
    caplog.set_level(logging.INFO)
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_tokens=7 * TOKENS_PER_STEP // 2, keep_last=10)
    phases = [Phase(CausalLM(), tokens=6 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=5 * TOKENS_PER_STEP)]
    fit(tmp_path, tokenizer_dir, [checkpoint], phases, plugins=[AtomicCheckpointIO()])
    # every 3.5 steps' tokens, rounded up to whole steps: 4 (4, 8); the phase switch (6) and the end (11)
    assert steps_saved(tmp_path / "ckpt") == [4, 6, 8, 11]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 11
    # a log names each save (last.ckpt: a second name for the newest)
    assert saves_logged(caplog, tmp_path) == [(f"ckpt/step{step:09d}.ckpt", step) for step in (4, 6, 8, 11)]


def saves_logged(caplog, folder) -> list[tuple[str, int]]:
    """(path under ``folder``, step) of each ``[TokenCheckpoint] saved PATH (step N) in S s`` line."""
    saves = [re.fullmatch(r"\[TokenCheckpoint\] saved (.+) \(step (\d+)\) in \d+\.\d s", record.getMessage())
             for record in caplog.records if "[TokenCheckpoint]" in record.getMessage()]
    return [(str(Path(m[1]).relative_to(folder)), int(m[2])) for m in saves]


def test_a_last_ckpt_saved_whole_is_logged_too(tmp_path, tokenizer_dir, caplog):
    """Lightning's own checkpoint IO writes into the file it names: last.ckpt is saved whole, not linked."""
    caplog.set_level(logging.INFO)
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
    fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)])
    assert saves_logged(caplog, tmp_path) == [("ckpt/last.ckpt", 2), ("ckpt/step000000002.ckpt", 2),
                                              ("ckpt/last.ckpt", 4), ("ckpt/step000000004.ckpt", 4)]


@pytest.mark.parametrize("model_config, mismatch, remedy", [
    ({"num_hidden_layers": 2}, r"the model has no 'model.model.layers.2.attn.Wo.weight', '[^']+', '[^']+' and \d+ more", ""),
    ({"intermediate_size": 48}, r"'model.model.layers.0.mlp.Wi.weight' has shape \(128, 32\), the model expects \(96, 32\)",
     ""),
    # as a random model's run from before vocab_size defaulted to the tokenizer's size, resumed without the setting
    ({"vocab_size": 50432}, r"'model.model.embeddings.tok_embeddings.weight' has shape \(50368, 32\), the model expects "
                            r"\(50432, 32\)", r" \(model.init_args.model_config.vocab_size: 50368\)"),
    # and with another layer count too: the vocabulary alone would not make it fit
    ({"vocab_size": 50432, "num_hidden_layers": 2}, r"the model has no 'model.model.layers.2.attn.Wo.weight'", ""),
], ids=["fewer-layers", "narrower-mlp", "another-vocab", "another-vocab-and-fewer-layers"])
def test_a_resume_under_another_architecture_is_one_line_and_keeps_the_checkpoint(tmp_path, tokenizer_dir, model_config,
                                                                                  mismatch, remedy):
    """An edited ``model_config`` on resume: PyTorch listed every tensor that did not fit, in a traceback."""
    folder = tmp_path / "ckpt"
    fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)],
        [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP)])
    saved = (folder / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match=rf"ckpt/last.ckpt does not fit the model model.init_args builds \({mismatch}.*\): "
                                        rf"use the model settings it was trained with{remedy}$"):
        fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)],
            [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)], ckpt_path=folder / "last.ckpt", model_config=model_config)
    assert (folder / "last.ckpt").read_bytes() == saved and steps_saved(folder) == [2]


def test_a_resume_under_another_attention_or_dropout_is_warned_of(tmp_path, tokenizer_dir, recwarn):
    """Settings that change what the model computes but no weight's shape: a resume under them trained on with another
    attention, without a word (the exported config.json then describes the new attention for every step)."""
    folder = tmp_path / "ckpt"

    def run(steps, ckpt_path=None, model_config=None):
        recwarn.clear()
        fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)],
            [Phase(CausalLM(), tokens=steps * TOKENS_PER_STEP)], ckpt_path=ckpt_path, model_config=model_config or {})
        return [str(w.message) for w in recwarn if "was trained with another model_config" in str(w.message)]

    assert run(2) == []
    changed = {"local_attention": 32, "global_attn_every_n_layers": 3, "mlp_dropout": 0.1}
    assert run(4, folder / "last.ckpt", changed) == [
        f"{folder / 'last.ckpt'} was trained with another model_config: global layers [0, 2] → [0], local_attention 16 "
        "→ 32, mlp_dropout 0.0 → 0.1 (the checkpoint's → this config's). It goes on with this config's, which the "
        "export's config.json describes; to go on as trained, put the checkpoint's values in model.init_args.model_config"]
    assert run(6, folder / "last.ckpt", changed) == []  # step 4 was saved under them
    from cpt_lightning.model_loading import changed_compute_settings  # a 4.x checkpoint's key that 5.x renamed: no change

    assert changed_compute_settings({"global_rope_theta": 1e4}, {"rope_parameters": {"full_attention": {}}}) == []


def test_a_resume_with_another_tokenizer_is_refused_and_keeps_the_checkpoint(tmp_path, tokenizer_dir):
    """One of the same size (no weight's shape changes) trained on: its ids read the embeddings as other tokens, and the
    checkpoint's record of the tokenizer was overwritten, so the export that would have refused it passed."""
    from cpt_lightning.model_loading import TOKENIZER_RECORD

    folder = tmp_path / "ckpt"
    fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)],
        [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP)])
    checkpoint = torch.load(folder / "last.ckpt", weights_only=False)
    checkpoint[TOKENIZER_RECORD]["special_ids"]["sep"] = 3  # as trained with a tokenizer whose [SEP] is id 3
    torch.save(checkpoint, folder / "last.ckpt")
    saved = (folder / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder / 'last.ckpt'))} was trained with another tokenizer "
                                        rf"than model.init_args.tokenizer '{re.escape(str(tokenizer_dir))}': it differs "
                                        r"in its special-token ids \(sep 3 → \d+\); give the tokenizer the run trained "
                                        r"with$"):
        fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)],
            [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)], ckpt_path=folder / "last.ckpt")
    assert (folder / "last.ckpt").read_bytes() == saved


def test_the_vocab_size_hint_is_given_only_where_the_tokenizer_fits_the_trained_rows():
    """A checkpoint of 90 rows for a tokenizer of ids up to 94: vocab_size 90 would be refused in turn."""
    from cpt_lightning.model_loading import vocab_hint

    expected = {"m.tok_embeddings.weight": torch.Size([100, 4]), "m.decoder.bias": torch.Size([100])}
    saved = {"m.tok_embeddings.weight": torch.Size([90, 4]), "m.decoder.bias": torch.Size([90])}
    assert vocab_hint(expected, saved, tokenizer_rows=80) == " (model.init_args.model_config.vocab_size: 90)"
    assert vocab_hint(expected, saved, tokenizer_rows=95) == ""


def test_keep_last_keeps_the_newest(tmp_path, tokenizer_dir):
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, keep_last=2)
    fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=5 * TOKENS_PER_STEP)])
    assert steps_saved(tmp_path / "ckpt") == [4, 5]


def test_a_resumed_run_still_prunes_the_checkpoints_saved_before_it(tmp_path, tokenizer_dir):
    """ModelCheckpoint keys its state by ``every_n_train_steps``, which ``every_n_tokens`` sets only once
    the token clock runs: a resumed run found no state under the fresh key, forgot the checkpoints
    saved before the resume and never deleted them (``keep_last=2`` kept 4; 2 more per requeue)."""
    folder = tmp_path / "ckpt"

    def run(steps, ckpt_path=None):
        checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_tokens=2 * TOKENS_PER_STEP, keep_last=2)
        fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=steps * TOKENS_PER_STEP)], ckpt_path=ckpt_path,
            plugins=[AtomicCheckpointIO()])  # as the recipes save: the resume reads back what it wrote

    run(4)
    assert steps_saved(folder) == [2, 4]
    run(8, ckpt_path=folder / "last.ckpt")  # a longer budget: the run goes on from step 4
    assert steps_saved(folder) == [6, 8]


def test_a_resume_from_a_numbered_twin_never_prunes_it(tmp_path, tokenizer_dir):
    """``step…4-v1.ckpt`` (Lightning's twin of a step saved twice) sorts before ``step…4.ckpt``, so a resume from it
    with a smaller ``keep_last`` finds it beyond the newest kept: pruned, the file the run started from was gone."""
    folder = tmp_path / "ckpt"
    fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=2)],
        [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)])
    twin = shutil.copy(folder / "step000000004.ckpt", folder / "step000000004-v1.ckpt")
    fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=1)],
        [Phase(CausalLM(), tokens=6 * TOKENS_PER_STEP)], ckpt_path=twin)
    assert twin.exists() and steps_saved(folder) == [4, 6]


def test_a_fast_dev_run_across_a_phase_end_saves_nothing(tmp_path, tokenizer_dir):
    """A phase end saves at once, outside ModelCheckpoint's every-N path, which is where a fast_dev_run's saves are
    skipped: its files would make the real run in that folder refused as beside an earlier run's."""
    fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=100)],
        [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)], fast_dev_run=3)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_resume_with_another_keep_last_prunes_the_checkpoints_saved_before_it(tmp_path, tokenizer_dir):
    """The checkpoint's pruning state is keyed by the policy: resumed with another keep_last (what the disk check
    advises), the run forgot the checkpoints saved before it and never deleted them (keep_last=2 kept 5), and saved
    its last.ckpt as last-v1.ckpt."""
    folder = tmp_path / "ckpt"

    def run(steps, keep_last, ckpt_path=None):
        checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=keep_last)
        fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=steps * TOKENS_PER_STEP)], ckpt_path=ckpt_path)

    run(6, keep_last=3)
    assert steps_saved(folder) == [4, 5, 6]
    run(10, keep_last=2, ckpt_path=folder / "last.ckpt")
    assert steps_saved(folder) == [9, 10]
    # and last.ckpt is the run's: it stayed at step 6 beside a last-v1.ckpt, which export and validate never read
    assert global_step(folder / "last.ckpt") == 10 and not list(folder.glob("last-v*.ckpt"))
    run(12, keep_last=4, ckpt_path=folder / "last.ckpt")  # a larger keep_last keeps the earlier ones too
    assert steps_saved(folder) == [9, 10, 11, 12] and global_step(folder / "last.ckpt") == 12


class StopAfterStep(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_a_run_resumed_one_step_before_a_phase_end_saves_there(tmp_path, tokenizer_dir):
    """The phase end is found by comparing a step's phase with the previous one's; after a resume there was no
    previous one, so a run stopped at step 5 of a 6-step phase saved nothing at its end (the uninterrupted run: 6)."""
    phases = [Phase(CausalLM(), tokens=6 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=5 * TOKENS_PER_STEP)]
    folder = tmp_path / "ckpt"

    def checkpoints():
        return [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=5, keep_last=10)]

    fit(tmp_path, tokenizer_dir, checkpoints() + [StopAfterStep(5)], phases)
    assert steps_saved(folder) == [5]
    fit(tmp_path, tokenizer_dir, checkpoints(), phases, ckpt_path=folder / "last.ckpt")
    assert steps_saved(folder) == [5, 6, 10, 11]


def test_a_resume_sets_aside_the_checkpoints_of_later_steps(tmp_path, tokenizer_dir):
    """Killed between step 8's save and last.ckpt's, a run resumed from step 6: it saved its own step 8 as
    step000000008-v1.ckpt, and keep_last never pruned the first step 8 (three step files for keep_last=2)."""
    folder = tmp_path / "ckpt"

    def run(ckpt_path=None):
        checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=2)
        fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=10 * TOKENS_PER_STEP)], ckpt_path=ckpt_path)

    run()
    assert steps_saved(folder) == [8, 10]
    shutil.copy(folder / "step000000008.ckpt", folder / "last.ckpt")  # killed before last.ckpt became step 10's
    with pytest.warns(UserWarning, match=r"resumed at step 8 beside 1 checkpoint\(s\) of later steps \(step000000010.ckpt\)"):
        run(ckpt_path=folder / "last.ckpt")
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step000000008.ckpt", "step000000010.ckpt"]
    assert [p.name for p in (folder / "after-step000000008-set-aside").iterdir()] == ["step000000010.ckpt"]
    shutil.copy(folder / "step000000008.ckpt", folder / "last.ckpt")  # the same again: a folder of its own
    with pytest.warns(UserWarning, match=r"moved to .*after-step000000008-set-aside-2"):
        run(ckpt_path=folder / "last.ckpt")
    assert [p.name for p in (folder / "after-step000000008-set-aside").iterdir()] == ["step000000010.ckpt"]
    assert [p.name for p in (folder / "after-step000000008-set-aside-2").iterdir()] == ["step000000010.ckpt"]


def test_a_branch_into_the_parents_folders_sets_aside_what_the_parent_saved_later(tmp_path, tokenizer_dir):
    """A decay branched off step 4 of a 6+4-step run, in the same folders (a copied config that kept the
    run name): it overwrote the parent's last.ckpt (its step 10, the only copy after a preemption) and
    replaced the parent's final model export/phase1-mlm with its own."""
    folder, export = tmp_path / "ckpt", tmp_path / "export"

    def run(clm, mlm, ckpt_path=None):
        callbacks = [PhaseEndExport(str(export)), TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=5)]
        phases = [Phase(CausalLM(), tokens=clm * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=mlm * TOKENS_PER_STEP, lr="sqrt_decay")]
        fit(tmp_path, tokenizer_dir, callbacks, phases, ckpt_path=ckpt_path)

    run(6, 4)
    (folder / "step000000010.ckpt").unlink()  # as after a preemption: last.ckpt is the newest step's only copy
    with pytest.warns(UserWarning, match=r"resumed at step 4 beside 3 checkpoint\(s\) of later steps \(last.ckpt, "
                                         r"step000000006.ckpt, step000000008.ckpt\): moved to .*ckpt/after-step000000004"):
        run(4, 3, ckpt_path=folder / "step000000004.ckpt")
    aside = folder / "after-step000000004-set-aside"
    assert steps_saved(aside) == [6, 8] and global_step(aside / "last.ckpt") == 10
    assert steps_saved(folder) == [2, 4, 6, 7] and global_step(folder / "last.ckpt") == 7  # the branch's own
    # The branch's CLM phase ended at its checkpoint: its model there replaces the parent's phase0-clm (of step 6,
    # beside the branch's decay it read as its start), set aside at the start; the parent's phase1-mlm after it.
    parents = export / "after-step000000004-set-aside", export / "after-step000000004-set-aside-2"
    assert [sorted(p.name for p in aside.iterdir()) for aside in parents] == [["phase0-clm", "phase0-clm.ckpt"],
                                                                              ["phase1-mlm", "phase1-mlm.ckpt"]]
    assert global_step(parents[0] / "phase0-clm.ckpt") == 6 and global_step(parents[1] / "phase1-mlm.ckpt") == 10
    assert global_step(export / "phase1-mlm.ckpt") == 7 and global_step(export / "phase0-clm.ckpt") == 4
    # the set-aside card's snippets load the set-aside folder, not the branch's model that took its place
    card = (parents[1] / "phase1-mlm" / "README.md").read_text()
    assert f'"{parents[1] / "phase1-mlm"}"' in card
    assert f'"{export / "phase1-mlm"}"' not in card
    assert resumable(export / "phase0-clm.ckpt")  # what a decay branches off


def test_a_branch_off_another_runs_checkpoint_is_named_in_its_model_card(tmp_path, tokenizer_dir):
    """The branch's decay card listed CLM tokens it never trained itself, with no word of the run that did;
    the record lasts through the branch's own requeues."""
    parent, branch = tmp_path / "parent", tmp_path / "branch"

    def run(root, clm, mlm, ckpt_path=None, stop_at=None):
        callbacks = [PhaseEndExport(str(root / "export")), TokenCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=2),
                     *([StopAt(stop_at)] if stop_at else [])]
        phases = [Phase(CausalLM(), tokens=clm * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=mlm * TOKENS_PER_STEP, lr="sqrt_decay")]
        fit(root, tokenizer_dir, callbacks, phases, ckpt_path=ckpt_path)

    run(parent, 6, 2)
    run(branch, 4, 2, ckpt_path=parent / "ckpt" / "step000000004.ckpt", stop_at=5)
    run(branch, 4, 2, ckpt_path=branch / "ckpt" / "last.ckpt")  # a requeue: its own checkpoint
    line = f"Branched off another run at step 4, from `{parent / 'ckpt' / 'step000000004.ckpt'}`"
    assert line in (branch / "export" / "phase1-mlm" / "README.md").read_text()
    assert "Branched off" not in (parent / "export" / "phase1-mlm" / "README.md").read_text()
    last = torch.load(branch / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and last["branched_from"] == [
        {"checkpoint": str(parent / "ckpt" / "step000000004.ckpt"), "step": 4}]


def test_only_a_checkpoint_outside_the_runs_folders_is_a_branch(tmp_path, tokenizer_dir):
    """A requeue resumes from the run's own folders (its log folder, or a checkpoint callback's dirpath elsewhere)."""
    module = tiny_module(tokenizer_dir)
    module.trainer = L.Trainer(logger=False, default_root_dir=tmp_path / "run",
                               callbacks=[TokenCheckpoint(dirpath=str(tmp_path / "scratch" / "milestones"), every_n_train_steps=2)])
    for own in (None, tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "scratch" / "milestones" / "step000000002.ckpt"):
        module.note_branch(own)
    assert module.branched_from == []
    parents = [tmp_path / "run_parent" / "checkpoints" / "step000000002.ckpt", tmp_path / "grandparent" / "last.ckpt"]
    for parent in parents:  # a sibling folder with a common prefix; then a branch of that branch
        module.note_branch(parent)
    assert module.branched_from == [{"checkpoint": str(parent), "step": 0} for parent in parents]


@pytest.mark.parametrize("schedule_first", [True, False], ids=["schedule_first", "schedule_last"])
def test_a_refused_branch_leaves_the_parents_folders_as_they_were(tmp_path, tokenizer_dir, schedule_first):
    """Later files are set aside at the end of the first micro-batch, after the ObjectiveSchedule's phase-history
    check wherever the YAML lists it (PhaseEndExport listed first moved the parent's models before the refusal)."""
    folder, export = tmp_path / "ckpt", tmp_path / "export"

    def run(clm, mlm, ckpt_path=None):
        callbacks = [PhaseEndExport(str(export), export=False), TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)]
        phases = [Phase(CausalLM(), tokens=clm * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=mlm * TOKENS_PER_STEP)]
        fit(tmp_path, tokenizer_dir, callbacks, phases, ckpt_path=ckpt_path, schedule_first=schedule_first)

    run(2, 4)
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"trained clm from token 0, then mlm from token"):
        run(4, 2, ckpt_path=folder / "step000000004.ckpt")  # step 4 was MLM: not a CLM phase of 4 steps
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before


def test_a_fresh_run_beside_an_earlier_runs_checkpoints_is_refused(tmp_path, tokenizer_dir):
    """Lightning saved the second run as last-v1.ckpt: last.ckpt, which export and --ckpt_path last read,
    stayed the first run's, and keep_last never pruned the first run's checkpoints."""
    folder = tmp_path / "ckpt"

    def run(ckpt_path=None):
        checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=1)
        fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)], ckpt_path=ckpt_path)

    run()
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(UserError, match=r"ckpt holds an earlier run's checkpoints \(last.ckpt, step000000004.ckpt\): "
                                        r"resume that run with --ckpt_path last, or give this one its own folder"):
        run()
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    (folder / "last.ckpt").rename(tmp_path / "last.ckpt")  # as after a kill between the step's save and last's
    with pytest.raises(UserError, match=r"resume that run with --ckpt_path .*ckpt/step000000004.ckpt, or give"):
        run()
    (tmp_path / "last.ckpt").rename(folder / "last.ckpt")
    saved = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir()}
    run(ckpt_path=folder / "last.ckpt")  # a resume is not refused
    # The run was finished: the resume trains nothing and rewrites no checkpoint (a requeued job reruns it).
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir()} == saved


def test_an_old_checkpoint_that_cannot_be_deleted_is_a_warning(tmp_path, tokenizer_dir, monkeypatch):
    """Only rank 0 deletes old checkpoints: an error there (NFS refuses to remove a folder a reader holds
    open) stopped the run on rank 0 alone, over housekeeping."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    remove = SingleDeviceStrategy.remove_checkpoint
    refused = []

    def held_open_once(self, filepath):
        if not refused:
            refused.append(filepath)
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        remove(self, filepath)

    monkeypatch.setattr(SingleDeviceStrategy, "remove_checkpoint", held_open_once)
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, keep_last=1)
    with pytest.warns(UserWarning, match=r"could not delete old checkpoint .*step000000001.ckpt \(Directory not empty\)"):
        fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)])
    assert steps_saved(tmp_path / "ckpt") == [1, 4]  # the refused one stays; the run trained to the end


def test_not_enough_disk_fails_before_the_first_step(tmp_path, tokenizer_dir, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1)
    with pytest.raises(UserError, match=r"has 0.0 GiB free but keeping 3 checkpoints"):
        fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=5 * TOKENS_PER_STEP)])
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


@pytest.mark.parametrize("kwargs", [
    {}, {"every_n_tokens": 10, "every_n_train_steps": 1}, {"every_n_train_steps": 1, "keep_last": 0},
    {"every_n_tokens": -64}, {"every_n_train_steps": -1}, {"every_n_tokens": 0}, {"every_n_train_steps": 0},
])
def test_bad_policy_is_refused(kwargs):
    """A zero interval was taken for "every step" (``(0 or 1) < 1`` let it through, and the step interval has a floor
    of 1): Lightning's ``every_n_train_steps: 0`` means "never", and writing the weights and AdamW moments after every
    optimizer step costs a large run more time than its training."""
    with pytest.raises(UserError, match="TokenCheckpoint"):
        TokenCheckpoint(**kwargs)


def test_later_files_that_cannot_be_moved_aside_stop_the_start_and_stay(tmp_path, monkeypatch):
    """Set aside, or refused: a run that only warned would go on and overwrite them."""
    from pathlib import Path

    from callbacks.set_aside import set_aside

    later = [tmp_path / "step000000008.ckpt", tmp_path / "last.ckpt"]
    for path in later:
        path.write_text(path.name)

    def refuse(self, target):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    refusal = set_aside(later, tmp_path, 4, "checkpoint(s) of later steps")
    assert refusal.startswith("could not move the checkpoint(s) of later steps (last.ckpt, step000000008.ckpt)")
    assert "Permission denied" in refusal and "move or delete them, then resume again" in refusal
    assert all(path.read_text() == path.name for path in later)


def test_the_disk_check_counts_the_adamw_moments_of_keep_last_plus_two_checkpoints(tmp_path, monkeypatch):
    """Each checkpoint holds the weights and AdamW's two moments; keep_last of them, last.ckpt and the one being
    written are on the disk at once. A smaller estimate passes a disk that fills up in the middle of the run."""
    parameters = torch.nn.Linear(10, 10)  # 110 fp32 parameters: 440 bytes, 1320 with the two moments
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, keep_last=2)
    needed = 1320 * (2 + 2)
    for free, refused in ((needed, False), (needed - 1, True)):
        monkeypatch.setattr(shutil, "disk_usage", lambda _, free=free: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
        assert (checkpoint._free_space_refusal(SimpleNamespace(ckpt_path=None), parameters) is not None) == refused, free


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "gathered"])
def test_the_disk_check_sizes_a_checkpoint_as_fsdp2_writes_it(tmp_path, tokenizer_dir, sharded):
    """A sharded checkpoint writes the tied decoder again under its own name (a torch.save file, once): counted once,
    the check passed disks 8% short for ModernBERT-base, 33% for this tiny model."""
    from callbacks.token_checkpoint import checkpoint_bytes

    module = tiny_module(tokenizer_dir)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=FSDP2(save_distributed_checkpoint=sharded), max_steps=-1,
                        max_epochs=-1, callbacks=[ObjectiveSchedule([Phase(CausalLM(), tokens=TOKENS_PER_STEP)])],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").is_dir() == sharded  # a folder of shards, or one gathered file
    written = sum(path.stat().st_size for path in [tmp_path / "last.ckpt", *(tmp_path / "last.ckpt").rglob("*")]
                  if path.is_file())
    estimate = checkpoint_bytes(trainer, module, sum(p.numel() * p.element_size() for p in module.parameters()))
    assert estimate <= written < 1.01 * estimate  # what else a checkpoint holds: its metadata, under 1%



def test_a_run_killed_while_exporting_its_first_phase_end_goes_on_from_that_phase_ends_checkpoint(tmp_path, tokenizer_dir):
    """The phase-end export comes before the step's checkpoints: a run killed while it exported its first phase end
    (before any periodic save) left that whole checkpoint alone. Its restart was refused with advice to resume from
    ``--ckpt_path last``, which it had not saved (a fresh start, refused again); resumed from the phase-end checkpoint,
    the HF folder the kill cut short was never written."""
    folder, export = tmp_path / "ckpt", tmp_path / "export"

    def run(ckpt_path=None):
        callbacks = [PhaseEndExport(str(export)), TokenCheckpoint(dirpath=str(folder), every_n_train_steps=100)]
        phases = [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=2 * TOKENS_PER_STEP)]
        fit(tmp_path, tokenizer_dir, callbacks, phases, ckpt_path=ckpt_path)

    run()
    for path in [*folder.iterdir(), export / "phase0-clm", export / "phase1-mlm", export / "phase1-mlm.ckpt"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # what a kill during phase0-clm's export leaves
    with pytest.raises(UserError, match=r"resume that run \(it saved no step checkpoint: --ckpt_path "
                                        rf"{re.escape(str(export / 'phase0-clm.ckpt'))}\)"):
        run()
    run(ckpt_path=export / "phase0-clm.ckpt")
    assert (export / "phase0-clm" / "model.safetensors").is_file()  # exported from the checkpoint it resumed
    assert global_step(export / "phase1-mlm.ckpt") == global_step(folder / "last.ckpt") == 4

@pytest.mark.parametrize("tokens_seen, models", [(0, 2), (150, 1), (200, 0)])
@pytest.mark.parametrize("export, on_this_disk, model_bytes", [(True, True, 1320 + 440), (False, True, 1320),
                                                               (True, False, 0)],
                         ids=["checkpoint-and-weights", "checkpoint-only", "on-another-disk"])
def test_the_disk_check_counts_the_phase_end_models_still_to_come(tmp_path, monkeypatch, tokens_seen, models, export,
                                                                  on_this_disk, model_bytes):
    """PhaseEndExport writes a whole checkpoint and an HF folder of the weights at each phase end, in the run's folder:
    a disk that passed the check filled at the end of the CLM phase (the base recipe: 9.5 GiB for 6.7 checked). With
    ``export: false`` it writes the checkpoint alone; on another disk it takes nothing of this one."""
    import callbacks.token_checkpoint as token_checkpoint

    parameters = torch.nn.Linear(10, 10)  # 440 bytes of weights, 1320 with the two AdamW moments
    parameters.tokens_seen = tokens_seen
    schedule = ObjectiveSchedule([Phase(CausalLM(), tokens=100), Phase(MaskedLM(), tokens=100)])
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, keep_last=2)
    phase_end = PhaseEndExport(str(tmp_path / "export"), export=export)
    trainer = SimpleNamespace(ckpt_path=None, callbacks=[schedule, checkpoint, phase_end])
    if not on_this_disk:
        monkeypatch.setattr(token_checkpoint, "same_disk", lambda path, other: False)
    needed = 1320 * (2 + 2) + models * model_bytes
    for free, refused in ((needed, False), (needed - 1, True)):
        monkeypatch.setattr(shutil, "disk_usage", lambda _, free=free: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
        refusal = checkpoint._free_space_refusal(trainer, parameters)
        assert (refusal is not None) == refused, free
    assert (f"and the {models} phase-end model(s) to come" in refusal) == bool(models and on_this_disk)


def test_a_requeued_job_goes_on_from_the_runs_last_checkpoint_or_from_where_its_first_job_started(tmp_path, capsys):
    """A requeue (time limit, preemption, node failure) resumed from ``last``: a branch requeued before its first save
    found none there and Lightning started it from step 0, retraining its parent's phases from the base model."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    trainer = SimpleNamespace(checkpoint_callbacks=[TokenCheckpoint(dirpath=str(folder), every_n_train_steps=1)],
                              is_global_zero=True, log_dir=str(tmp_path))
    parent = str(tmp_path / "parent" / "step000000002.ckpt")
    assert requeued_ckpt_path(trainer, parent) == parent
    assert requeued_ckpt_path(trainer, None) is None
    (folder / "step000000004.ckpt").write_bytes(b"x")
    (folder / "last.ckpt").write_bytes(b"x")
    assert requeued_ckpt_path(trainer, parent) == requeued_ckpt_path(trainer, None) == "last"
    assert "[requeued] resuming from last" in capsys.readouterr().err


def test_a_start_record_holds_while_the_runs_last_checkpoint_is_the_one_it_found(tmp_path, monkeypatch):
    """``start_record``: the requeue of a rollback (a start from a checkpoint beside a later last.ckpt) starts from its
    checkpoint until a save replaces last.ckpt; a record of another checkpoint, or one cut short, holds nothing."""
    from cpt_lightning.start_record import RECORD_NAME, record_the_start

    folder = tmp_path / "ckpt"
    folder.mkdir()
    trainer = SimpleNamespace(checkpoint_callbacks=[TokenCheckpoint(dirpath=str(folder), every_n_train_steps=1)],
                              is_global_zero=True, log_dir=str(tmp_path))
    for name in ("step000000002.ckpt", "step000000004.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    rollback = Path("ckpt") / "step000000002.ckpt"  # as typed, relative to the job's folder
    assert record_the_start(tmp_path, "last", saved_last_checkpoints(trainer)) is None
    assert not (tmp_path / RECORD_NAME).exists()
    assert record_the_start(tmp_path, rollback, saved_last_checkpoints(trainer)) is None
    assert requeued_ckpt_path(trainer, str(rollback)) == str(rollback)
    assert requeued_ckpt_path(trainer, str(tmp_path / rollback)) == str(tmp_path / rollback)
    assert requeued_ckpt_path(trainer, str(folder / "step000000004.ckpt")) == "last"
    assert requeued_ckpt_path(trainer, None) == "last"
    record = (tmp_path / RECORD_NAME).read_text()
    (tmp_path / RECORD_NAME).write_text(record[:-1])
    assert requeued_ckpt_path(trainer, str(rollback)) == "last"
    (tmp_path / RECORD_NAME).write_text(record)
    (folder / "last.ckpt.tmp").write_bytes(b"y")
    os.replace(folder / "last.ckpt.tmp", folder / "last.ckpt")  # a save
    assert requeued_ckpt_path(trainer, str(rollback)) == "last"



def test_resuming_last_where_none_is_saved_starts_afresh_unless_the_last_start_was_from_a_checkpoint(tmp_path):
    """A first submission's `--ckpt_path last` finds nothing and starts the run, as does a fresh start killed
    before its first save; a start from a checkpoint (a branch, a rollback) is refused (tests/test_bad_inputs.py)."""
    folder = tmp_path / "checkpoints"
    trainer = SimpleNamespace(checkpoint_callbacks=[TokenCheckpoint(dirpath=str(folder), every_n_train_steps=1)],
                              log_dir=str(tmp_path), logger=object())
    check_a_start_that_saved_nothing(trainer)  # no run here yet
    for started_from in (None, "last"):  # a fresh start; a resume, once it found a last.ckpt
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"ckpt_path": started_from}))
        check_a_start_that_saved_nothing(trainer)
    parent = str(tmp_path / "parent" / "step000000002.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"ckpt_path": parent}))
    with pytest.raises(UserError, match=f"its last start, from {re.escape(parent)} "):
        check_a_start_that_saved_nothing(trainer)
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"x")  # the branch saved: it goes on from there
    check_a_start_that_saved_nothing(trainer)



def test_a_branch_is_not_told_that_its_parents_checkpoint_records_are_not_reloaded(tmp_path):
    """Lightning warned at every branch into a folder of its own that the parent's records "won't be reloaded", as if
    something were lost: TokenCheckpoint keeps and prunes its own folder's checkpoints (cpt's CLI filters it)."""
    parent = TokenCheckpoint(dirpath=str(tmp_path / "parent"), every_n_train_steps=1)
    branch = TokenCheckpoint(dirpath=str(tmp_path / "branch"), every_n_train_steps=1)
    with pytest.warns(UserWarning) as said:
        branch.load_state_dict(parent.state_dict())
    assert [w for w in said if not any(re.match(message, str(w.message)) for _, message in LIBRARY_NOTICES)] == []


@pytest.mark.parametrize("sharded", [False, True], ids=["files", "sharded-folders"])
def test_a_resume_under_another_policy_replaces_the_folders_last_checkpoint(tmp_path, sharded):
    """Lightning keys the last.ckpt it replaces by the policy: under another keep_last or cadence it saved
    last-v1.ckpt beside the folder's last.ckpt (for the recipes' sharded checkpoints, a folder, too)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("step000000004.ckpt", "last.ckpt"):
        if sharded:
            (folder / name).mkdir()
            (folder / name / ".metadata").write_bytes(bytes(320))
        else:
            (folder / name).write_bytes(bytes(1320))
    checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=5)
    checkpoint._start_step = 4
    checkpoint._adopt_checkpoints_up_to_start()
    assert checkpoint.last_model_path == str(folder / "last.ckpt")


@pytest.mark.parametrize("linked", [False, True], ids=["whole-last", "linked-last"])
@pytest.mark.parametrize("sharded", [False, True], ids=["files", "sharded-folders"])
def test_a_resume_counts_the_room_its_own_checkpoints_take(tmp_path, monkeypatch, sharded, linked):
    """A run that fit on its disk when it started is not refused when requeued: its kept checkpoints and last.ckpt
    are part of the keep_last + 2 it needs, not more (they were counted against the free space, so the resume of
    a run on a tight quota failed at every requeue, though it had all the room it had at the start). A last.ckpt
    that is the newest step's file under a second name takes no room of its own, and is not counted as such."""
    parameters = torch.nn.Linear(10, 10)  # 1320 bytes a checkpoint with the two AdamW moments
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("step000000002.ckpt", "step000000004.ckpt", "last.ckpt"):
        if linked and name == "last.ckpt":
            shutil.copytree(folder / "step000000004.ckpt", folder / name, copy_function=os.link) if sharded else (
                os.link(folder / "step000000004.ckpt", folder / name))
        elif sharded:  # FSDP2's save_distributed_checkpoint: a folder of shards and metadata
            (folder / name).mkdir()
            (folder / name / "__0_0.distcp").write_bytes(bytes(1000))
            (folder / name / ".metadata").write_bytes(bytes(320))
        else:
            (folder / name).write_bytes(bytes(1320))
    checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=2)
    checkpoint._start_step = 4  # resumed from last.ckpt, of step 4
    resumed = SimpleNamespace(ckpt_path=folder / "last.ckpt")
    on_disk = 2 if linked else 3
    for free, refused in (((4 - on_disk) * 1320, False), ((4 - on_disk) * 1320 - 1, True)):  # (2 + 2) checkpoints
        monkeypatch.setattr(shutil, "disk_usage", lambda _, free=free: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
        assert (checkpoint._free_space_refusal(resumed, parameters) is not None) == refused, free


def test_a_rollback_does_not_count_the_later_steps_checkpoints_as_room(tmp_path, monkeypatch):
    """Resumed from step 2 beside checkpoints of steps 4 and 6: those are set aside, still on the disk, never
    replaced by this run's saves, so the room they take is not room the run has (counted, a run passed the check
    and filled the disk mid-run)."""
    parameters = torch.nn.Linear(10, 10)  # 1320 bytes a checkpoint with the two AdamW moments
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("step000000002.ckpt", "step000000004.ckpt", "step000000006.ckpt"):
        (folder / name).write_bytes(bytes(1320))
    checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=2)
    checkpoint._start_step = 2
    rollback = SimpleNamespace(ckpt_path=folder / "step000000002.ckpt")
    for free, refused in ((3 * 1320, False), (3 * 1320 - 1, True)):  # (2 + 2) checkpoints: its own 1 and 3 more
        monkeypatch.setattr(shutil, "disk_usage", lambda _, free=free: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
        assert (checkpoint._free_space_refusal(rollback, parameters) is not None) == refused, free


def test_without_last_ckpt_the_refusal_names_the_newest_checkpoint_to_resume_from(tmp_path):
    """After a kill between a step's save and last.ckpt's, --ckpt_path last starts afresh: the refusal of a
    fresh run names the checkpoint to resume from instead, the newest one (not the oldest kept)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for step in (4, 6, 10, 8):
        (folder / f"step{step:09d}.ckpt").write_bytes(b"")
    refusal = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)._earlier_run_refusal(SimpleNamespace(ckpt_path=None))
    assert f"resume that run with --ckpt_path {folder / 'step000000010.ckpt'}, or give" in refusal
    assert "(step000000004.ckpt, step000000006.ckpt, step000000008.ckpt, ...)" in refusal  # the first three of four
    (folder / "step000000004.ckpt").unlink()
    refusal = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)._earlier_run_refusal(SimpleNamespace(ckpt_path=None))
    assert "(step000000006.ckpt, step000000008.ckpt, step000000010.ckpt): resume" in refusal


def sharded_save(folder, step: int, whole: bool = True):
    """What FSDP2 writes for a checkpoint: shards, DCP's .metadata, then Lightning's meta.pt (torn unless whole)."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True)
    with warnings.catch_warnings():  # torch's note that it saves without a process group
        warnings.simplefilter("ignore")
        dcp.save({"step": torch.tensor(step)}, checkpoint_id=str(folder))
    torch.save({"global_step": step}, folder / "meta.pt")
    if not whole:  # killed while meta.pt was being written
        (folder / "meta.pt").write_bytes((folder / "meta.pt").read_bytes()[:100])


@pytest.mark.parametrize("new_save", ["whole", "torn", "absent"])
def test_a_save_killed_between_its_two_renames_is_put_back_where_last_is_looked_for(tmp_path, new_save):
    """A sharded save moves last.ckpt aside, then renames the new one into place: a kill between the two left
    no last.ckpt, so `--ckpt_path last` started afresh. Where Lightning looks for it, the new save comes back
    when it is whole (its meta.pt loads), otherwise the previous one; a fresh run's refusal says `last`."""
    folder = tmp_path / "ckpt"
    sharded_save(folder / ".last.ckpt.old", step=10)
    if new_save != "absent":
        sharded_save(folder / ".last.ckpt.partial", step=12, whole=new_save == "whole")
    sharded_save(folder / "step000000012.ckpt", step=12)
    checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)
    with pytest.warns(UserWarning, match=r"last.ckpt: a save was killed between moving the previous one aside") as said:
        found = checkpoint._find_last_checkpoints(SimpleNamespace())
    assert found == {str(folder / "last.ckpt")}
    restored = 12 if new_save == "whole" else 10
    assert torch.load(folder / "last.ckpt" / "meta.pt", weights_only=False) == {"global_step": restored}
    assert ("(.last.ckpt.partial)" if restored == 12 else "(.last.ckpt.old)") in str(said[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to restore: no second warning, no change
        checkpoint._find_last_checkpoints(SimpleNamespace())
    assert torch.load(folder / "last.ckpt" / "meta.pt", weights_only=False) == {"global_step": restored}

    shutil.rmtree(folder / ".last.ckpt.old", ignore_errors=True)  # the same kill, seen by a fresh run's refusal
    (folder / "last.ckpt").rename(folder / ".last.ckpt.old")
    with pytest.warns(UserWarning, match="restored"):
        refusal = checkpoint._earlier_run_refusal(SimpleNamespace(ckpt_path=None))
    assert "resume that run with --ckpt_path last," in refusal and (folder / "last.ckpt").is_dir()


def test_lightnings_own_checkpoint_names_pass_to_lightning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of those names here: Lightning finds them, not the path
    for name in ("last", "hpc"):  # hpc: the checkpoint of Lightning's own SLURM requeue (best: tests/test_bad_inputs.py)
        check_ckpt_path(name)


def test_a_run_folder_whose_config_names_no_logger_takes_any_checkpoint(tmp_path, monkeypatch):
    from cpt_lightning import export
    from cpt_lightning.start_checks import check_a_checkpoint_for_the_runs_curves

    saved = "trainer:\n  logger:\n    class_path: TensorBoardLogger\n    init_args: {name: demo, version: seed2}\n"
    monkeypatch.setattr(export, "read_checkpoint", lambda path, weights: SimpleNamespace(records={"run_config": saved}))
    trainer = SimpleNamespace(log_dir=str(tmp_path), logger=object(), checkpoint_callbacks=[])
    (tmp_path / "config.yaml").write_text("trainer:\n  logger: true\n")
    check_a_checkpoint_for_the_runs_curves(trainer, "x.ckpt")
    (tmp_path / "config.yaml").write_text(saved.replace("seed2", "seed3"))
    with pytest.raises(UserError, match="is a checkpoint of run 'demo/seed2'"):
        check_a_checkpoint_for_the_runs_curves(trainer, "x.ckpt")


def test_a_run_folder_takes_no_validation_earlier_than_the_runs_newest_checkpoint(tmp_path, monkeypatch):
    """TensorBoard's viewer keeps one try of a curve: a point logged at an earlier step than the curve's last (an
    earlier checkpoint's, the base model's at step 0) dropped every later one of the run's from its charts."""
    from cpt_lightning import export
    from cpt_lightning.start_checks import check_a_checkpoint_for_the_runs_curves

    steps = {"step000000002.ckpt": 2, "last.ckpt": 4}
    monkeypatch.setattr(export, "read_checkpoint",
                        lambda path, weights: SimpleNamespace(records={"global_step": steps[Path(path).name]}))
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    trainer = SimpleNamespace(log_dir=str(tmp_path), logger=object(),
                              checkpoint_callbacks=[TokenCheckpoint(dirpath=str(folder), every_n_train_steps=1)])
    (tmp_path / "config.yaml").write_text("trainer:\n  logger: true\n")
    for ckpt_path in (None, str(folder / "step000000002.ckpt")):  # no last.ckpt yet: nothing to drop
        check_a_checkpoint_for_the_runs_curves(trainer, ckpt_path)
    (folder / "last.ckpt").write_bytes(b"x")
    check_a_checkpoint_for_the_runs_curves(trainer, str(folder / "last.ckpt"))  # the newest, named
    with pytest.raises(UserError, match=r"^the weights as they load \(step 0\) is earlier than the run in .*, saved at "
                                        "step 4"):
        check_a_checkpoint_for_the_runs_curves(trainer, None)
    with pytest.raises(UserError, match=r"step000000002.ckpt \(step 2\) is earlier"):
        check_a_checkpoint_for_the_runs_curves(trainer, str(folder / "step000000002.ckpt"))


def test_a_ckpt_path_named_after_a_kill_mid_rename_is_put_back(tmp_path):
    """`--ckpt_path RUN/checkpoints/last.ckpt`, named rather than `last`, finds it put back too."""
    sharded_save(tmp_path / ".last.ckpt.old", step=10)
    sharded_save(tmp_path / ".last.ckpt.partial", step=12)
    with pytest.warns(UserWarning, match=r"restored the save that was replacing it \(.last.ckpt.partial\)"):
        check_ckpt_path(str(tmp_path / "last.ckpt"))
    assert torch.load(tmp_path / "last.ckpt" / "meta.pt", weights_only=False) == {"global_step": 12}


@pytest.mark.parametrize("whole", [True, False])
def test_a_reader_of_a_checkpoint_killed_mid_rename_is_told_which_version_to_put_back(tmp_path, whole):
    """cpt export / analyze / evaluate of that last.ckpt said "no such checkpoint" (a reader renames nothing: the
    run may be live): it names the version that stands for it now, and what puts it back."""
    sharded_save(tmp_path / ".last.ckpt.old", step=10)
    sharded_save(tmp_path / ".last.ckpt.partial", step=12, whole=whole)
    with pytest.raises(UserError) as refused:
        read_checkpoint(tmp_path / "last.ckpt", weights=False)
    waiting, which = (".last.ckpt.partial", "the new save, whole") if whole else (".last.ckpt.old", "the one it was replacing")
    assert str(refused.value) == (
        f"{tmp_path / 'last.ckpt'}: a save was killed while replacing this checkpoint; {which} waits in "
        f"{tmp_path / waiting}: rename it to last.ckpt (the run's `cpt fit ... --ckpt_path last` does it when it resumes)")
    assert not (tmp_path / "last.ckpt").exists()  # nothing renamed by a reader


def test_a_rank_finding_last_restored_by_another_meanwhile_goes_on(tmp_path, monkeypatch, recwarn):
    """Every rank looks for last.ckpt; one whose rename comes second finds the checkpoint restored and leaves it."""
    sharded_save(tmp_path / ".last.ckpt.old", step=10)
    sharded_save(tmp_path / ".last.ckpt.partial", step=12)
    rename = type(tmp_path).rename

    def another_rank_first(path, target):
        monkeypatch.undo()
        rename(tmp_path / ".last.ckpt.partial", tmp_path / "last.ckpt")  # between this rank's look and its rename
        return rename(path, target)

    monkeypatch.setattr(type(tmp_path), "rename", another_rank_first)
    restore_interrupted_replacements(tmp_path)
    assert torch.load(tmp_path / "last.ckpt" / "meta.pt", weights_only=False) == {"global_step": 12}
    assert not recwarn.list  # the rank that restored it says so, not this one


def test_a_failed_rename_that_restored_nothing_is_raised(tmp_path, monkeypatch):
    """Only another rank's rename, which restored ``NAME`` first, may fail quietly: a rename refused (permissions,
    another file system) with ``NAME`` still missing, skipped, left ``--ckpt_path last`` nothing to find and the
    run started afresh."""
    sharded_save(tmp_path / ".last.ckpt.old", step=10)
    sharded_save(tmp_path / ".last.ckpt.partial", step=12)

    def refused(self, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "rename", refused)
    with pytest.raises(PermissionError):
        restore_interrupted_replacements(tmp_path)


def test_a_leftover_beside_a_published_checkpoint_stays_for_the_next_save_to_remove(tmp_path):
    """A kill while the previous version was being deleted, after the new one was published; a checkpoint after
    it that a kill left between its renames is still put back."""
    sharded_save(tmp_path / ".last.ckpt.old", step=10)
    sharded_save(tmp_path / "last.ckpt", step=12)
    sharded_save(tmp_path / ".step000000014.ckpt.old", step=14)  # sorted after the leftover: killed mid-rename
    with pytest.warns(UserWarning, match=r"step000000014.ckpt: a save was killed between"):
        restore_interrupted_replacements(tmp_path)
    assert torch.load(tmp_path / "last.ckpt" / "meta.pt", weights_only=False) == {"global_step": 12}
    assert (tmp_path / ".last.ckpt.old").is_dir()
    assert torch.load(tmp_path / "step000000014.ckpt" / "meta.pt", weights_only=False) == {"global_step": 14}


def test_a_sharded_checkpoint_whose_metadata_is_garbled_is_one_line(tmp_path):
    """A disk fault in DCP's .metadata raises an UnpicklingError or EOFError, not a ValueError."""
    from cpt_lightning.checkpointing import damage

    sharded_save(tmp_path / "last.ckpt", step=4)
    (tmp_path / "last.ckpt" / ".metadata").write_bytes(b"garbage")
    assert damage(tmp_path / "last.ckpt") == "a sharded checkpoint whose .metadata cannot be read (UnpicklingError)"
    with pytest.raises(UserError, match=r"\.metadata cannot be read \(UnpicklingError\)"):
        check_ckpt_path(tmp_path / "last.ckpt")


def test_numbered_twins_of_later_steps_are_set_aside_too(tmp_path):
    """A folder resumed before later checkpoints were set aside holds Lightning's twins (step…-v1.ckpt, the
    resumed run's own save of a step beside the first run's): those of later steps go with the others."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("step000000004.ckpt", "step000000004-v1.ckpt", "step000000006.ckpt", "step000000006-v1.ckpt"):
        (folder / name).write_bytes(b"")
    checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)
    checkpoint._start_step = 4
    with pytest.warns(UserWarning, match=r"resumed at step 4 beside 2 checkpoint\(s\) of later steps"):
        assert checkpoint._set_aside_checkpoints_after(SimpleNamespace(ckpt_path=folder / "step000000004.ckpt")) is None
    assert sorted(p.name for p in (folder / "after-step000000004-set-aside").iterdir()) == [
        "step000000006-v1.ckpt", "step000000006.ckpt"]
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["step000000004-v1.ckpt", "step000000004.ckpt"]


@pytest.mark.parametrize("last", ["same-step", "not-a-checkpoint"])
def test_a_last_ckpt_of_no_later_step_stays_where_it_is(tmp_path, recwarn, last):
    """Only a last.ckpt of a later step is set aside: one of the step the run starts from (a resume from
    step…4.ckpt beside it) stays, and a file read_checkpoint cannot read is left as Lightning leaves it
    (the start goes on; the next save replaces it)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"state_dict": {}, "global_step": 4}, folder / "step000000004.ckpt")
    if last == "same-step":
        shutil.copy(folder / "step000000004.ckpt", folder / "last.ckpt")
    else:
        (folder / "last.ckpt").write_bytes(b"torn")
    checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2)
    checkpoint._start_step = 4
    assert checkpoint._set_aside_checkpoints_after(SimpleNamespace(ckpt_path=folder / "step000000004.ckpt")) is None
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step000000004.ckpt"] and not recwarn.list


def test_two_checkpoint_policies_run_side_by_side(tmp_path):
    """Rolling checkpoints and rarer milestones (two TokenCheckpoints of the same keep_last): their states are
    keyed by their whole policy, or Lightning refuses the second as a duplicate of the first."""
    rolling = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_tokens=10**9)
    milestones = TokenCheckpoint(dirpath=str(tmp_path / "milestones"), every_n_tokens=10**10)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[rolling, milestones])
    assert rolling.state_key != milestones.state_key and trainer.checkpoint_callbacks == [rolling, milestones]


def test_a_sigterm_mid_step_finishes_the_step_then_saves_last_ckpt(tmp_path, tokenizer_dir):
    """In process, what tests/test_resume.py checks end to end: the signal arrives after micro-batch 1 of 2 of
    step 1; the run stops once step 1 is whole (a checkpoint holds no accumulated gradients), saves last.ckpt
    where --ckpt_path last looks and hands its path to cpt fit's exit message."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from recorders import SigtermAt

    def ignored(signum, frame):  # a SIGTERM the run does not take over must not end pytest
        pass

    before = signal.signal(signal.SIGTERM, ignored)
    try:
        checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1000)
        with pytest.raises(SIGTERMException) as stopped:
            fit(tmp_path, tokenizer_dir, [checkpoint, PreemptionCheckpoint(), SigtermAt(step=1)],
                [Phase(CausalLM(), tokens=4 * 2 * TOKENS_PER_STEP)], accumulate_grad_batches=2)
        assert signal.getsignal(signal.SIGTERM) is ignored  # the run's handler is gone with the run
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped.value.saved_checkpoint == tmp_path / "ckpt" / "last.ckpt"
    assert global_step(tmp_path / "ckpt" / "last.ckpt") == 2 and steps_saved(tmp_path / "ckpt") == []
    assert resumable(tmp_path / "ckpt" / "last.ckpt")


def swallowed_ctrl_c():
    """A SIGINT while a finalizer runs (a validation loader's workers being shut down): Python prints the
    KeyboardInterrupt as ignored and goes on."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass


@pytest.mark.parametrize("during", ["training", "validation"])
def test_a_ctrl_c_a_finalizer_swallowed_stops_the_run_at_the_next_batch(tmp_path, tokenizer_dir, during):
    """A SIGINT to the main process alone while a validation loader's workers shut down was lost: the run trained
    to its end and exited 0."""
    batches, watch = [], L.Callback()
    watch.on_train_batch_start = lambda trainer, *_: batches.append(("training", trainer.global_step))
    watch.on_validation_batch_start = lambda trainer, *_: batches.append(("validation", trainer.global_step))
    if during == "training":
        watch.on_train_batch_end = lambda trainer, *_: trainer.global_step == 1 and swallowed_ctrl_c()
    else:
        watch.on_validation_batch_end = lambda trainer, *_: not trainer.sanity_checking and swallowed_ctrl_c()
    fit(tmp_path, tokenizer_dir, [PreemptionCheckpoint()], [Phase(CausalLM(), tokens=TOKENS_PER_STEP)])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back after the run
    try:
        with pytest.raises(SystemExit) as stopped:  # Lightning's exit on a KeyboardInterrupt
            fit(tmp_path, tokenizer_dir, [PreemptionCheckpoint(), watch], [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)],
                limit_val_batches=2, val_check_interval=1, num_sanity_val_steps=0, check_val_every_n_epoch=None)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores it from the interrupt on
    assert stopped.value.code == 1  # the batch after the swallowed interrupt, a validation one, did not run
    assert batches == [("training", 0), ("validation", 1)][:2 if during == "validation" else 1]


@pytest.mark.parametrize("when", ["train_start", "sanity_validation"])
def test_a_sigterm_before_training_starts_stops_at_the_first_step_boundary(tmp_path, tokenizer_dir, when):
    """A SIGTERM between Lightning's handler taking over and the callback's (the restore, the loaders' start):
    Lightning's flag stopped the run after micro-batch 0 of 2 and saved half an optimizer step (global_step 0).
    During the sanity validation before training, it stopped that validation and saved at global_step 0."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from recorders import SigtermAtTrainStart, SigtermInSanityCheck

    signaller, validation = {"train_start": (SigtermAtTrainStart(), {}),
                             "sanity_validation": (SigtermInSanityCheck(), {"limit_val_batches": 2})}[when]
    before = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1000)
        with pytest.raises(SIGTERMException) as stopped:
            fit(tmp_path, tokenizer_dir, [checkpoint, signaller, PreemptionCheckpoint()],
                [Phase(CausalLM(), tokens=4 * 2 * TOKENS_PER_STEP)], accumulate_grad_batches=2, **validation)
    finally:
        signal.signal(signal.SIGTERM, before)
    saved = torch.load(stopped.value.saved_checkpoint, weights_only=False)
    micro_batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert (saved["global_step"], micro_batches) == (1, 2)


def test_a_sigterm_during_a_fast_dev_run_saves_nothing_over_the_run(tmp_path, tokenizer_dir):
    """``fast_dev_run`` is Lightning's smoke test of a config, run beside the real run and promised to write
    nothing; PreemptionCheckpoint's save on SIGTERM wrote its last.ckpt over the run's. The exit message then
    says a fast_dev_run saved nothing (not that the config lacks a PreemptionCheckpoint)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cpt_lightning.cli import preempted_message
    from recorders import SigtermAt

    (tmp_path / "ckpt").mkdir()
    runs_last = tmp_path / "ckpt" / "last.ckpt"
    runs_last.write_bytes(b"the run's own last checkpoint")
    before = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with pytest.raises(SIGTERMException) as stopped:
            fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1),
                                          PreemptionCheckpoint(), SigtermAt(step=1)],
                [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)], fast_dev_run=3)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert runs_last.read_bytes() == b"the run's own last checkpoint" and sorted(tmp_path.rglob("*.ckpt")) == [runs_last]
    assert not hasattr(stopped.value, "saved_checkpoint")
    message = preempted_message(None, stopped.value.saves_nothing)
    assert "fast_dev_run" in message and "PreemptionCheckpoint" not in message


def test_a_sigterm_during_validate_keeps_the_runs_last_checkpoint(tmp_path, tokenizer_dir):
    """A SIGTERM in `cpt validate` (a preemptible queue, a kill) saved the validating trainer's step-0 state, without an
    optimizer, as the run's last.ckpt, and said to resume from it: `--ckpt_path last` then trained the run from step 0
    with its finished weights and a fresh AdamW, setting its real checkpoints aside."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cpt_lightning.cli import preempted_message
    from recorders import SigtermInValidation

    trainer = fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)],
                  [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)])
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    validating = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                           default_root_dir=tmp_path, callbacks=[TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2),
                                                                 PreemptionCheckpoint(), SigtermInValidation()])
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with pytest.raises(SIGTERMException) as stopped:
            validating.validate(trainer.lightning_module, torch.utils.data.DataLoader(PackedRows(), batch_size=ROWS),
                                ckpt_path=str(last))
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert last.read_bytes() == before and global_step(last) == 4 and not hasattr(stopped.value, "saved_checkpoint")
    assert preempted_message(None, stopped.value.saves_nothing) == (
        "preempted (SIGTERM) during cpt validate: it saves nothing, so rerun it as it was")


def test_a_sigterm_in_the_last_step_ends_the_run_as_finished(tmp_path, tokenizer_dir):
    """The schedule had ended the run at that step, yet the signal stopped it as preempted: its end-of-run checkpoint
    was never saved and it exited 143, so a requeue script requeued a finished job."""
    from recorders import SigtermAt

    handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2),
                                      PreemptionCheckpoint(), SigtermAt(step=2)],
            [Phase(CausalLM(), tokens=3 * 2 * TOKENS_PER_STEP)], accumulate_grad_batches=2)  # 3 steps: 0, 1, 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert steps_saved(tmp_path / "ckpt") == [2, 3] and global_step(tmp_path / "ckpt" / "last.ckpt") == 3


def test_a_ctrl_c_says_what_resumes_and_how_to_stop_keeping_the_steps(caplog):
    """Lightning turns Ctrl-C into "Detected KeyboardInterrupt, attempting graceful shutdown", exit 1, and saves
    nothing: the run's steps since its newest checkpoint are gone without a word on where it resumes."""
    import logging

    from lightning.pytorch.trainer.states import TrainerFn

    trainer = SimpleNamespace(global_step=66, checkpoint_callback=None, save_checkpoint=None,  # a save would fail
                              state=SimpleNamespace(fn=TrainerFn.FITTING))
    with caplog.at_level(logging.INFO):
        PreemptionCheckpoint().on_exception(trainer, None, KeyboardInterrupt())
        trainer.state.fn = TrainerFn.VALIDATING  # cpt validate: no resume to speak of
        PreemptionCheckpoint().on_exception(trainer, None, KeyboardInterrupt())
    assert caplog.messages == [
        "[PreemptionCheckpoint] Ctrl-C at step 66: nothing is saved on an interrupt (the step may be half done); "
        "--ckpt_path last resumes from the run's newest checkpoint, if it saved one, and trains the steps since again. To stop and keep "
        "them: SIGTERM (kill PID), which finishes the step, saves last.ckpt and exits 143",
        "[PreemptionCheckpoint] Ctrl-C: cpt validate saves nothing, so rerun it as it was"]


def test_a_run_stopped_by_another_error_saves_no_checkpoint(tmp_path, tokenizer_dir):
    """Only SIGTERM saves on the way out: NonFiniteGuard's stop (or a crash mid-step) leaves last.ckpt the newest
    checkpoint saved before it (a save of a half-done step could hold anything)."""
    from test_non_finite_guard import NaNAtSteps

    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
    with pytest.raises(UserError, match="2 consecutive non-finite updates"):
        fit(tmp_path, tokenizer_dir, [checkpoint, PreemptionCheckpoint(), NonFiniteGuard(max_consecutive=2)],
            [Phase(NaNAtSteps([2, 3]), tokens=6 * TOKENS_PER_STEP)])
    assert global_step(tmp_path / "ckpt" / "last.ckpt") == 2 and steps_saved(tmp_path / "ckpt") == [2]


def test_a_preemption_callback_reused_for_another_fit_starts_unsignalled():
    """A script or notebook that fits again with the same callbacks after a preempted fit: the old signal must
    not stop the new fit at its first step."""
    callback = PreemptionCheckpoint()
    trainer = SimpleNamespace(global_step=0, should_stop=False, _signal_connector=SimpleNamespace(received_sigterm=False),
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    before = signal.getsignal(signal.SIGTERM)
    try:
        callback.on_train_start(trainer, None)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the first fit is preempted: its handler notes it,
        signal.signal(signal.SIGTERM, before)  # and the fit stops (Lightning puts the handlers back)
        callback.on_train_start(trainer, None)  # the second fit
        callback.on_train_batch_start(trainer, None, None, 0)
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert not trainer._signal_connector.received_sigterm
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_requeued_fit_starts_where_its_first_job_did_then_goes_on_from_last(tmp_path, own_mix, tokenizer_dir, capsys,
                                                                              monkeypatch):
    """Through `cpt fit`: requeued before any save it starts as its first job did; after, from the run's last.ckpt
    (a fresh start there would be refused beside the run's checkpoints)."""
    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    monkeypatch.setenv("CPT_REQUEUED", "1")
    code, err = run(["fit", "--config", str(config)], capsys)
    assert code == 0 and "[requeued] resuming from the start (nothing saved yet)" in err, err[-2000:]
    code, err = run(["fit", "--config", str(config)], capsys)
    assert code == 0 and "[requeued] resuming from last" in err, err[-2000:]


def test_a_requeued_rollback_killed_before_its_first_step_starts_from_its_checkpoint_again(
        tmp_path, own_mix, tokenizer_dir, capsys, monkeypatch):
    """A rollback in its own run folder sets the later steps' last.ckpt aside only once its first micro-batch has
    passed every check: killed before (a node lost while the checkpoint restored), its requeue went on from that
    last.ckpt, the rollback undone without a word. Once it has saved, a requeue goes on from its own last.ckpt, even
    when its --ckpt_path is gone (it was refused as no such file)."""
    import cpt_lightning.module

    def every_step(config):
        for callback in config["trainer"]["callbacks"]:
            if callback["class_path"].endswith("TokenCheckpoint"):
                callback["init_args"] = {"every_n_train_steps": 1, "keep_last": 4}

    config = fit_config(tmp_path, own_mix, tokenizer_dir, every_step)
    code, err = run(["fit", "--config", str(config)], capsys)
    assert code == 0, err[-2000:]
    (folder,) = {path.parent for path in tmp_path.rglob("last.ckpt")}
    rollback = folder / "step000000002.ckpt"
    monkeypatch.setattr(cpt_lightning.module.EncoderPretraining, "training_step", Killed.raise_it)
    with pytest.raises(Killed):
        run(["fit", "--config", str(config), "--ckpt_path", str(rollback)], capsys)
    monkeypatch.undo()
    monkeypatch.setenv("CPT_REQUEUED", "1")
    code, err = run(["fit", "--config", str(config), "--ckpt_path", str(rollback)], capsys)
    assert code == 0 and f"[requeued] resuming from {rollback}" in err, err[-2000:]
    aside = folder / "after-step000000002-set-aside"
    assert sorted(path.name for path in aside.iterdir()) == ["last.ckpt", "step000000003.ckpt", "step000000004.ckpt"]
    assert read_checkpoint(folder / "last.ckpt", weights=False).records["global_step"] == 4
    rollback.unlink()  # as keep_last prunes it: the job's own --ckpt_path is no longer checked, last.ckpt is
    code, err = run(["fit", "--config", str(config), "--ckpt_path", str(rollback)], capsys)
    assert code == 0 and "[requeued] resuming from last" in err, err[-2000:]


def test_a_run_config_or_start_record_whose_write_was_killed_is_removed_when_the_run_starts_again(
        tmp_path, own_mix, tokenizer_dir, capsys):
    """Only the checkpoints' hidden .partial files were removed at a start: a kill while the run's config, a replaced
    config or the start record was written left theirs for good."""
    from cpt_lightning.start_record import RECORD_NAME

    config = fit_config(tmp_path, own_mix, tokenizer_dir)
    code, err = run(["fit", "--config", str(config)], capsys)
    assert code == 0, err[-2000:]
    (folder,) = {path.parent for path in tmp_path.rglob("hparams.yaml")}
    abandoned = [folder / f".{name}.partial" for name in ("config.yaml", "config-before-step000000002.yaml", RECORD_NAME)]
    live = folder / ".config-before-step000000003.yaml.partial"
    for path in [*abandoned, live]:
        path.write_text("x")
    aged(*abandoned)
    code, err = run(["fit", "--config", str(config), "--ckpt_path", "last"], capsys)
    assert code == 0, err[-2000:]
    assert not any(path.exists() for path in abandoned) and live.exists()


def test_a_damaged_sharded_checkpoint_is_named_with_the_newest_whole_one(tmp_path):
    """A sharded last.ckpt (the recipes') with a shard cut short or gone, or its meta.pt torn: --ckpt_path last gave
    torch's distributed-reader traceback on every rank (about 190 lines); a file cut short already had one line."""
    import torch.distributed.checkpoint as dcp

    from cpt_lightning.checkpointing import damage
    from cpt_lightning.errors import UserError

    def sharded(folder):
        dcp.save({"weight": torch.arange(4096.0)}, checkpoint_id=str(folder))
        torch.save({"global_step": 4}, folder / "meta.pt")
        return folder

    checkpoints = tmp_path / "checkpoints"
    whole = sharded(checkpoints / "step000000004.ckpt")
    assert damage(whole) is None
    (shard,) = sharded(checkpoints / "last.ckpt").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:-1])  # one byte short is short
    assert damage(checkpoints / "last.ckpt") == f"a sharded checkpoint with shards missing or cut short ({shard.name})"
    with pytest.raises(UserError, match=rf"^--ckpt_path {checkpoints / 'last.ckpt'}: a sharded checkpoint with shards "
                                        rf"missing or cut short \({shard.name}\); resume from --ckpt_path {whole}$"):
        check_ckpt_path(checkpoints / "last.ckpt")
    shard.unlink()
    assert "missing or cut short" in damage(checkpoints / "last.ckpt")
    (whole / "meta.pt").write_bytes(b"torn")  # now none is whole
    assert "without a whole .metadata and meta.pt" in damage(whole)
    with pytest.raises(UserError, match="resume from a checkpoint of the run that is whole$"):
        check_ckpt_path(checkpoints / "last.ckpt")


class Killed(Exception):
    """A hard kill, at one save or one step."""

    @classmethod
    def raise_it(cls, *args, **kwargs):
        raise cls


def killed_run(tmp_path, tokenizer_dir, monkeypatch, kill_at, links=True, plugins=None):
    """A run saving every 2 steps of 6 (keep_last 1) whose ``_save_checkpoint`` of ``kill_at`` (step, file name) is a
    hard kill, or, with ``kill_at`` a step alone, its deletion of the oldest checkpoint; then ``--ckpt_path last``.
    Returns the saves (step, file name) of both runs."""
    folder = tmp_path / "ckpt"
    saves, save, remove = [], TokenCheckpoint._save_checkpoint, TokenCheckpoint._remove_checkpoint
    killed = []

    def kill(at):
        if at == kill_at and not killed:
            killed.append(at)
            raise Killed

    def saving(self, trainer, filepath):
        saves.append((trainer.global_step, os.path.basename(filepath)))
        kill(saves[-1])
        save(self, trainer, filepath)

    def removing(self, trainer, filepath):
        kill(trainer.global_step)
        remove(self, trainer, filepath)

    def refused(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(TokenCheckpoint, "_save_checkpoint", saving)
    monkeypatch.setattr(TokenCheckpoint, "_remove_checkpoint", removing)
    if not links:
        monkeypatch.setattr(os, "link", refused)

    def run(ckpt_path=None):
        checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=1)
        fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=6 * TOKENS_PER_STEP)], ckpt_path=ckpt_path,
            plugins=plugins if plugins is not None else [AtomicCheckpointIO()])

    with pytest.raises(Killed):
        run()
    killed_at = len(saves)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpoint\\(s\\) of later steps")  # nothing trained twice
        run(ckpt_path=folder / "last.ckpt")
    assert steps_saved(folder) == [6] and global_step(folder / "last.ckpt") == 6
    return saves[:killed_at], saves[killed_at:]


def test_a_kill_while_a_step_is_saved_resumes_from_the_step_before(tmp_path, tokenizer_dir, monkeypatch):
    """The step's file is written, then last.ckpt is made a second name for it: a kill while the step's file is
    written leaves last.ckpt the previous step's, whole."""
    first, resumed = killed_run(tmp_path, tokenizer_dir, monkeypatch, kill_at=(4, "step000000004.ckpt"))
    assert first == [(2, "step000000002.ckpt"), (2, "last.ckpt"), (4, "step000000004.ckpt")]
    assert resumed[0] == (4, "step000000004.ckpt")  # from step 2 on


def test_a_kill_while_the_oldest_checkpoint_is_deleted_resumes_from_the_step_saved(tmp_path, tokenizer_dir,
                                                                                 monkeypatch):
    """last.ckpt names the step's file before Lightning deletes the oldest one (1.7 GiB, 0.5 s and more): made
    after it, a kill then left last.ckpt a step behind, and the resume trained the step again."""
    first, resumed = killed_run(tmp_path, tokenizer_dir, monkeypatch, kill_at=4)
    assert first[-2:] == [(4, "step000000004.ckpt"), (4, "last.ckpt")]
    assert resumed[0] == (6, "step000000006.ckpt")  # from step 4 on


@pytest.mark.parametrize("why", ["no-hard-links", "lightnings-io"])
def test_where_last_ckpt_is_saved_whole_it_comes_first(tmp_path, tokenizer_dir, monkeypatch, why):
    """Saved whole (the file system refuses hard links, or Lightning's own checkpoint IO, which writes into the
    file a name holds when $TMPDIR is on another disk: into the step's file, had last.ckpt named it), last.ckpt comes
    before the step's file: a kill between the two resumes from that step. The folder is tried for links at the
    start, and nothing of the try is left."""
    links, plugins = (False, None) if why == "no-hard-links" else (True, [])
    first, resumed = killed_run(tmp_path, tokenizer_dir, monkeypatch, kill_at=(4, "step000000004.ckpt"), links=links,
                                plugins=plugins)
    assert first == [(2, "last.ckpt"), (2, "step000000002.ckpt"), (4, "last.ckpt"), (4, "step000000004.ckpt")]
    assert resumed[0] == (6, "last.ckpt")  # from step 4 on
    folder = tmp_path / "ckpt"
    assert not same_files(folder / "last.ckpt", folder / "step000000006.ckpt") and resumable(folder / "last.ckpt")
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "step000000006.ckpt"]


def recorded_saves(monkeypatch) -> list[tuple[int, str]]:
    """The (step, file name) of every TokenCheckpoint save from now on, in order."""
    saves, save = [], TokenCheckpoint._save_checkpoint

    def saving(self, trainer, filepath):
        saves.append((trainer.global_step, os.path.basename(filepath)))
        save(self, trainer, filepath)

    monkeypatch.setattr(TokenCheckpoint, "_save_checkpoint", saving)
    return saves


@pytest.mark.parametrize("plugins", [[AtomicCheckpointIO()], []], ids=["linked-last", "whole-last"])
def test_the_save_after_a_phase_end_save_moves_last_ckpt_on_too(tmp_path, tokenizer_dir, monkeypatch, plugins):
    """Each save makes last.ckpt that step's, the phase end's and the next one's alike: left a save behind, a kill
    before the end would resume from the phase end and train the steps after it again."""
    saves = recorded_saves(monkeypatch)
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, keep_last=10)
    phases = [Phase(CausalLM(), tokens=6 * TOKENS_PER_STEP), Phase(MaskedLM(), tokens=5 * TOKENS_PER_STEP)]
    fit(tmp_path, tokenizer_dir, [checkpoint], phases, plugins=plugins)
    assert sorted(name for step, name in saves if step in (6, 8)) == ["last.ckpt", "last.ckpt", "step000000006.ckpt",
                                                                      "step000000008.ckpt"]


def test_a_link_refused_mid_run_puts_last_ckpt_first_from_then_on(tmp_path, tokenizer_dir, monkeypatch):
    """The folder took links at the start and refuses them later (a mount that changes under the run): the first
    refusal makes the run save whole from then on, so last.ckpt comes before the step's file, as where links never
    worked; tried again at each save, it kept coming after, and a kill between the two left it a step behind."""
    import callbacks.token_checkpoint as token_checkpoint

    saves, links = recorded_saves(monkeypatch), []
    monkeypatch.setattr(token_checkpoint, "link_beside", lambda source, path: (links.append(path.name), False)[1])
    checkpoint = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, keep_last=1)
    fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)],
        plugins=[AtomicCheckpointIO()])
    assert links == ["last.ckpt"]  # tried once
    assert saves == [(2, "step000000002.ckpt"), (2, "last.ckpt"), (4, "last.ckpt"), (4, "step000000004.ckpt")]
    assert resumable(tmp_path / "ckpt" / "last.ckpt") and global_step(tmp_path / "ckpt" / "last.ckpt") == 4


FSDP2_SAVE = FSDP2.save_checkpoint


def test_a_single_device_checkpoint_resumes_under_fsdp2_with_each_parameters_own_moments(tmp_path, tokenizer_dir):
    """A single-device or DDP file numbers AdamW's state in the param groups' order (decay, then no decay), where
    Lightning's load under FSDP2 read the model's order: the resume ended in torch's size error (moving a run from
    one GPU to FSDP2 on several), and between parameters of one shape it would swap their moments."""
    def weights(trainer) -> dict[str, torch.Tensor]:
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for name, p in trainer.lightning_module.named_parameters()}

    phases = [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)]
    saving = TokenCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
    fit(tmp_path / "a", tokenizer_dir, [saving, StopAt(2)], phases, plugins=[AtomicCheckpointIO()])
    checkpoint = tmp_path / "ckpt" / "step000000002.ckpt"
    as_saved = weights(fit(tmp_path / "b", tokenizer_dir, [], phases, ckpt_path=checkpoint))
    sharded = weights(fit(tmp_path / "c", tokenizer_dir, [], phases, accelerator="cpu", devices=1,
                          strategy=FSDP2(save_distributed_checkpoint=False), ckpt_path=checkpoint))
    assert as_saved.keys() == sharded.keys()
    for name, weight in as_saved.items():  # the same two steps from the same state
        torch.testing.assert_close(sharded[name], weight, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded-folder"])
def test_a_checkpoint_is_written_once_and_last_ckpt_is_a_second_name_for_it(tmp_path, tokenizer_dir, monkeypatch,
                                                                           sharded):
    """last.ckpt was written whole after the step's file: each save twice (1.7 GiB for ModernBERT-base with AdamW's
    moments), and the room of one checkpoint more on the disk. It is now the step's file by a hard link (a sharded
    checkpoint's, file by file), and stays whole when keep_last deletes that step's file."""
    folder = tmp_path / "ckpt"
    written = []
    monkeypatch.setattr(FSDP2, "save_checkpoint", lambda self, checkpoint, filepath, storage_options=None: (
        written.append(os.path.basename(filepath)), FSDP2_SAVE(self, checkpoint, filepath, storage_options))[1])
    strategy = FSDP2(save_distributed_checkpoint=sharded)
    checkpoint = TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=1)
    fit(tmp_path, tokenizer_dir, [checkpoint], [Phase(CausalLM(), tokens=4 * TOKENS_PER_STEP)],
        accelerator="cpu", devices=1, strategy=strategy, plugins=None if sharded else [AtomicCheckpointIO()])
    assert written == ["step000000002.ckpt", "step000000004.ckpt"]
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "step000000004.ckpt"]
    assert same_files(folder / "last.ckpt", folder / "step000000004.ckpt")
    trainer = fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=2, keep_last=1)],
                  [Phase(CausalLM(), tokens=6 * TOKENS_PER_STEP)], accelerator="cpu", devices=1,
                  strategy=FSDP2(save_distributed_checkpoint=sharded), ckpt_path=folder / "last.ckpt",
                  plugins=None if sharded else [AtomicCheckpointIO()])
    assert trainer.global_step == 6 and written[2:] == ["step000000006.ckpt"]  # resumed from step 4, whole
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "step000000006.ckpt"]



@pytest.fixture(scope="module")
def two_steps_saved(tmp_path_factory, tokenizer_dir):
    """A run's checkpoint folder with steps 1 and 2 (and last.ckpt), as the recipes save them."""
    root = tmp_path_factory.mktemp("two_steps")
    fit(root, tokenizer_dir, [TokenCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=1, keep_last=2)],
        [Phase(CausalLM(), tokens=2 * TOKENS_PER_STEP)], plugins=[AtomicCheckpointIO()])
    return root / "ckpt"


def test_a_checkpoint_whose_bytes_fail_their_crc_is_refused_by_resume_and_export(two_steps_saved, tmp_path):
    """A block zeroed by a disk or copy fault keeps the file's length and its zip directory: torch.load checks no CRC,
    so the run resumed and cpt export exported zeros, without a word."""
    from cpt_lightning.checkpointing import damage

    damaged = tmp_path / "step000000002.ckpt"
    shutil.copy(two_steps_saved / "step000000002.ckpt", damaged)
    shutil.copy(two_steps_saved / "step000000001.ckpt", tmp_path)
    with open(damaged, "r+b") as file:
        file.seek(damaged.stat().st_size // 2)
        file.write(bytes(4096))
    assert damage(tmp_path / "step000000001.ckpt") is None
    fault = r"damaged \(\S+/data/\d+ in it fails its CRC check: a disk or copy fault\)"
    assert re.fullmatch(fault, damage(damaged))
    with pytest.raises(UserError, match=rf"^{re.escape(str(damaged))}: {fault}; give another of the run's checkpoints"):
        read_checkpoint(damaged)
    assert read_checkpoint(damaged, weights=False).records["global_step"] == 2  # records alone: no CRC read
    with pytest.raises(UserError, match=rf"^--ckpt_path {re.escape(str(damaged))}: {fault}; resume from --ckpt_path "
                                        rf"{re.escape(str(tmp_path / 'step000000001.ckpt'))}$"):
        check_ckpt_path(damaged)


def test_a_pytorch_file_that_is_no_lightning_checkpoint_is_refused_as_ckpt_path(two_steps_saved, tmp_path):
    """A saved state_dict (or pytorch_model.bin) ended in Lightning's KeyError traceback; a zip torch did not write
    in torch's RuntimeError."""
    weights, other_zip = tmp_path / "weights.ckpt", tmp_path / "other.ckpt"
    torch.save(torch.load(two_steps_saved / "last.ckpt", weights_only=False)["state_dict"], weights)
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    with pytest.raises(UserError, match=rf"^--ckpt_path {weights}: a PyTorch file but not a Lightning checkpoint \(no "
                                        r"'state_dict' and 'pytorch-lightning_version'\); give a .ckpt file cpt fit "
                                        r"saved, or last \(weights alone start a fresh run"):
        check_ckpt_path(weights)
    with pytest.raises(UserError, match=rf"^--ckpt_path {other_zip}: not a checkpoint PyTorch can load \(\w+: .+\); "):
        check_ckpt_path(other_zip)
    for saved in ({"state_dict": {}, "epoch": 3}, {"pytorch-lightning_version": "2.6.0"}):  # a plain loop's; no weights
        torch.save(saved, tmp_path / "x.ckpt")
        with pytest.raises(UserError, match="a PyTorch file but not a Lightning checkpoint"):
            check_ckpt_path(tmp_path / "x.ckpt")
    check_ckpt_path(two_steps_saved / "last.ckpt")
    sharded_save(tmp_path / "step000000004.ckpt", 4)
    check_ckpt_path(tmp_path / "step000000004.ckpt")


def test_non_finite_weights_are_named_not_blamed_on_an_untied_decoder(two_steps_saved, tokenizer_dir):
    """NaN != NaN: the tie check said the decoder was untied during training, for a run that diverged."""
    from cpt_lightning.export import load_tokenizer, rebuild_model

    checkpoint = read_checkpoint(two_steps_saved / "last.ckpt")
    for value in (float("nan"), float("-inf")):
        checkpoint.weights["model.embeddings.tok_embeddings.weight"][3, 1] = value
        with pytest.raises(UserError, match=r"last.ckpt: 'model.embeddings.tok_embeddings.weight' holds NaN or "
                                            r"infinite values \(a run that diverged before this checkpoint\): give an "
                                            r"earlier one$"):
            rebuild_model(checkpoint, load_tokenizer(checkpoint, None))


def test_saves_killed_mid_write_are_removed_when_the_run_starts_again(tmp_path, tokenizer_dir):
    """A SIGKILL mid-save left a hidden checkpoint-sized .NAME.partial for good, outside the disk check; one changed
    in the last minute may be a live save's and stays."""
    folder, export = tmp_path / "ckpt", tmp_path / "export"
    abandoned = [folder / ".step000000006.ckpt.partial", export / ".phase0-clm.ckpt.partial"]
    sharded = folder / ".last.ckpt.partial"  # an FSDP2 save's folder
    (sharded / "shards").mkdir(parents=True)
    export.mkdir()
    live = folder / ".step000000008.ckpt.partial"
    for path in [*abandoned, live, sharded / "shards" / "__0_0.distcp"]:
        path.write_bytes(b"x" * 100)
    aged(*abandoned, sharded, sharded / "shards", sharded / "shards" / "__0_0.distcp")
    fit(tmp_path, tokenizer_dir, [TokenCheckpoint(dirpath=str(folder), every_n_train_steps=5),
                                  PhaseEndExport(dirpath=str(export), export=False)],
        [Phase(CausalLM(), tokens=1 * TOKENS_PER_STEP)])
    assert not any(path.exists() for path in [*abandoned, sharded]) and live.exists()
    assert steps_saved(folder) == [1] and (export / "phase0-clm.ckpt").is_file()


def aged(*paths):
    """As a save killed more than a minute ago left them."""
    from cpt_lightning.atomic import ABANDONED_AFTER_S

    long_ago = time.time() - ABANDONED_AFTER_S - 5
    for path in paths:
        os.utime(path, (long_ago, long_ago))


def test_a_replacement_killed_between_its_renames_is_put_back_before_leftovers_are_removed(tmp_path):
    """The whole new save waiting as .last.ckpt.partial beside the previous one moved aside is last.ckpt, not
    removed as an abandoned write."""
    from cpt_lightning.checkpointing import remove_abandoned_saves

    new, previous = tmp_path / ".last.ckpt.partial", tmp_path / ".last.ckpt.old"
    sharded_save(new, 8)
    sharded_save(previous, 4)
    aged(*new.rglob("*"), new, *previous.rglob("*"), previous)
    with pytest.warns(UserWarning, match="restored the save that was replacing it"):
        remove_abandoned_saves(tmp_path)
    assert global_step(tmp_path / "last.ckpt" / "meta.pt") == 8


def test_a_sharded_save_still_writing_its_shards_and_other_partials_stay(tmp_path):
    """A shard written into a folder made long ago changes the file, not the folder: the save is live."""
    from cpt_lightning.checkpointing import remove_abandoned_saves

    live, other = tmp_path / ".step000000008.ckpt.partial", tmp_path / ".dataset.partial"  # not a checkpoint's
    live.mkdir()
    other.mkdir()
    (live / "__0_0.distcp").write_bytes(b"x" * 100)
    aged(live, other)
    remove_abandoned_saves(tmp_path)
    assert (live / "__0_0.distcp").exists() and other.exists()


def test_an_abandoned_save_that_cannot_be_removed_is_a_warning(tmp_path, monkeypatch):
    """It ran on rank 0 alone: an error there was a traceback while the other ranks waited."""
    from cpt_lightning.checkpointing import remove_abandoned_saves

    stuck = tmp_path / ".step000000006.ckpt.partial"
    stuck.write_bytes(b"x")
    aged(stuck)

    def refused(path, missing_ok=False):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr("pathlib.Path.unlink", refused)
    with pytest.warns(UserWarning, match=rf"could not remove {stuck}, left by a write killed midway \(Operation not "
                                         r"permitted\): delete it to free its space"):
        remove_abandoned_saves(tmp_path)


def test_checkpoints_whole_or_without_crcs_pass_and_a_garbled_zip_directory_is_named(tmp_path):
    from cpt_lightning.checkpointing import damage

    saved = {"state_dict": {"model.a": torch.ones(100)}, "pytorch-lightning_version": "2"}
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(saved, tmp_path / "no_crc.ckpt")  # torch.load reads it: nothing to check it by
    finally:
        torch.serialization.set_crc32_options(True)
    assert damage(tmp_path / "no_crc.ckpt") is None
    garbled = tmp_path / "step000000004.ckpt"
    torch.save(saved, garbled)
    data = bytearray(garbled.read_bytes())
    entry = data.rfind(b"PK\x01\x02")  # the last entry of the zip's central directory
    data[entry:entry + 4] = bytes(4)
    garbled.write_bytes(data)
    assert damage(garbled).startswith("damaged (its zip directory cannot be read: ")
