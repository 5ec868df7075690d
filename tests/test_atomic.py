"""Writes that leave either the new version or the previous one, never half of either."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cpt_lightning.atomic import folder_beside, hard_links_work, link_beside, replace_folder, write_beside
from cpt_lightning.errors import UserError
from helpers import open_descriptors, without_exchange, without_flock


def test_a_full_disk_reported_by_torch_save_is_one_line_and_leaves_no_partial_file(tmp_path):
    """torch.save reports a full disk as a RuntimeError ("unexpected pos") caused by the OSError: only
    an OSError was caught, so the run ended in a traceback and the partial file kept the disk full."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def torch_save_on_a_full_disk(partial):
        partial.write_bytes(b"torn")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(UserError, match=r"could not write the checkpoint .*last.ckpt \(No space left on device; "
                                        r"free space on that disk\); the "
                                        r"previous checkpoint is intact$"):
        write_beside(target, torch_save_on_a_full_disk, "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and target.read_bytes() == b"previous"
    with pytest.raises(UserError, match=r"could not write the checkpoint .*step1.ckpt \(No space left on device; "
                                        r"free space on that disk\); "
                                        r"what was written before is intact$"):
        write_beside(tmp_path / "step1.ckpt", torch_save_on_a_full_disk, "checkpoint")  # the first: none before it


@pytest.mark.parametrize("failure", [KeyError("a bug"), KeyboardInterrupt()], ids=["bug", "ctrl-c"])
def test_a_failure_that_is_not_the_disks_keeps_its_traceback_and_leaves_no_partial_file(tmp_path, failure):
    """A Ctrl-C during a checkpoint save (no Exception) left ``.NAME.partial`` in the checkpoint folder."""
    def interrupted(partial):
        partial.write_bytes(b"torn")
        raise failure

    with pytest.raises(type(failure)):
        write_beside(tmp_path / "config.yaml", interrupted, "run config")
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_in_the_middle_of_torch_save_stays_a_ctrl_c(tmp_path):
    """torch.save closes its zip file after a KeyboardInterrupt mid-record and that close raises a RuntimeError
    ("unexpected pos"): a Ctrl-C during a checkpoint save ended cpt fit in that traceback, not Lightning's stop."""
    import io

    import torch

    class InterruptedFile(io.FileIO):
        writes = 0

        def write(self, data):
            InterruptedFile.writes += 1
            if InterruptedFile.writes == 3:
                raise KeyboardInterrupt
            return super().write(data)

    def torch_save(partial):
        with InterruptedFile(partial, "wb") as file:
            torch.save({"weights": torch.zeros(1000)}, file)

    with pytest.raises(KeyboardInterrupt):
        write_beside(tmp_path / "last.ckpt", torch_save, "checkpoint")
    assert list(tmp_path.iterdir()) == []


def fail_to_rename(folder: Path, error: BaseException, monkeypatch) -> None:
    """``folder``'s rename raises ``error``; every other rename is done."""
    rename = Path.rename

    def failing(self, target):
        if self == folder:
            raise error
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)


def test_the_only_copy_left_by_a_crash_between_the_renames_survives_a_failed_publish(tmp_path, monkeypatch):
    """A crash after moving ``out`` aside left only ``.out.old``: the next publish deleted it first, so a
    failing rename lost both versions."""
    ready, out, old = tmp_path / "ready", tmp_path / "out", tmp_path / ".out.old"
    ready.mkdir()
    old.mkdir()
    (old / "weights").write_text("previous")
    without_exchange(monkeypatch.setattr)  # where one step puts it in place, there is no failure between two
    fail_to_rename(ready, OSError(errno.EXDEV, "Invalid cross-device link"), monkeypatch)
    with pytest.raises(OSError):
        replace_folder(ready, out)
    assert (out / "weights").read_text() == "previous" and not old.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "two-renames"])
def test_a_file_where_the_folder_goes_is_replaced_and_nothing_is_left_aside(tmp_path, monkeypatch, exchange):
    if not exchange:
        without_exchange(monkeypatch.setattr)
    ready, out = tmp_path / "ready", tmp_path / "out"
    ready.mkdir()
    (ready / "model.safetensors").write_text("new")
    out.write_text("a file")
    replace_folder(ready, out)
    assert (out / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_folder_written_beside_gets_the_modes_the_umask_gives(tmp_path, umask):
    """mkdtemp makes 0700: a transplanted model only its owner could open."""
    previous = os.umask(umask)
    try:
        with folder_beside(tmp_path / "model", "model") as staging:
            (staging / "config.json").write_text("{}")
            os.chmod(staging / "config.json", 0o600)  # as safetensors writes its files
            (staging / "tokenizer").mkdir(mode=0o700)
            (staging / "tokenizer" / "vocab.txt").write_text("")
            os.chmod(staging / "tokenizer" / "vocab.txt", 0o600)
    finally:
        os.umask(previous)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model" / "tokenizer").stat().st_mode & 0o777 == 0o777 & ~umask  # and in subfolders
    assert (tmp_path / "model" / "tokenizer" / "vocab.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "two-renames"])
def test_a_stale_copy_left_by_a_crash_after_the_publish_is_replaced(tmp_path, monkeypatch, exchange):
    if not exchange:
        without_exchange(monkeypatch.setattr)
    """A crash after ``ready`` took ``out``'s place but before the old copy was deleted leaves both ``out`` and
    ``.out.old``: the next publish deletes the stale copy first (moving ``out`` onto it failed: not empty)."""
    ready, out, old = tmp_path / "ready", tmp_path / "out", tmp_path / ".out.old"
    for folder, weights in ((ready, "new"), (out, "current"), (old, "stale")):
        folder.mkdir()
        (folder / "weights").write_text(weights)
    replace_folder(ready, out)
    assert (out / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "two-renames"])
def test_a_symlinked_folder_is_replaced_without_touching_what_it_points_to(tmp_path, monkeypatch, exchange):
    if not exchange:
        without_exchange(monkeypatch.setattr)
    """``out`` may be a link to a folder on another disk: the link is replaced, the folder it points to is neither
    emptied nor left behind as a stale ``.out.old`` link (which a later publish could not move ``out`` onto)."""
    ready, out, elsewhere = tmp_path / "ready", tmp_path / "out", tmp_path / "elsewhere"
    for folder, weights in ((ready, "new"), (elsewhere, "linked")):
        folder.mkdir()
        (folder / "weights").write_text(weights)
    out.symlink_to(elsewhere, target_is_directory=True)
    replace_folder(ready, out)
    assert not out.is_symlink() and (out / "weights").read_text() == "new"
    assert (elsewhere / "weights").read_text() == "linked"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def _publish(out: Path, version: str, failed: list[str]) -> None:
    ready = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    for name in ("config.json", "model.safetensors"):
        (ready / name).write_text(version)
    try:
        replace_folder(ready, out)
    except OSError as err:
        failed.append(f"{out.name} {version}: {err.strerror}")
        shutil.rmtree(ready, ignore_errors=True)


def _replace_repeatedly(out: Path, tag: str, times: int, new_folders: int, together, failures) -> None:
    """``new_folders`` new folders first, each written by every writer at the same moment; then ``out`` again and
    again."""
    failed = []
    for i in range(new_folders):
        together.wait()
        _publish(out.with_name(f"new{i}"), tag, failed)
    for i in range(times):
        _publish(out, f"{tag}{i}", failed)
    failures.put(failed)  # once: a process is joined only after what it put is read


def _watch(out: Path, stop, failures) -> None:
    missing = 0
    while not stop.is_set():
        missing += not out.is_dir()
    failures.put([f"out was missing {missing} times"] if missing else [])


def test_two_commands_replacing_one_folder_at_once_both_succeed_and_it_is_never_missing(tmp_path):
    """Two `cpt export --overwrite` to one folder: with two renames each, one moved the other's new folder aside and
    failed on the name it wanted ("Directory not empty", a disk error that was none), and a reader between the
    renames found no folder. A few of every 300 replacements failed so, and 5 of 30 new folders written by two at
    once."""
    import multiprocessing

    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("first")
    context = multiprocessing.get_context("fork")
    failures, stop, together = context.Queue(), context.Event(), context.Barrier(2)
    watcher = context.Process(target=_watch, args=(out, stop, failures))
    writers = [context.Process(target=_replace_repeatedly, args=(out, tag, 1000, 500, together, failures))
               for tag in "AB"]
    watcher.start()
    for writer in writers:
        writer.start()
    found = failures.get(timeout=120) + failures.get(timeout=120)  # the writers'
    stop.set()
    found += failures.get(timeout=120)
    for process in [*writers, watcher]:
        process.join()
    assert found == [] and [writer.exitcode for writer in writers] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", *(f"new{i}" for i in range(500))])
    assert {p.read_text() for p in out.iterdir()} in ({"A999"}, {"B999"})
    assert all(len({p.read_text() for p in (tmp_path / f"new{i}").iterdir()}) == 1 for i in range(500))


def test_an_exchange_the_folders_permissions_refuse_is_done_by_two_renames(tmp_path, monkeypatch):
    """Exchanging two folders in different folders (`cpt prepare`'s, `cpt analyze`'s) rewrites the ".." of the one
    replaced, which needs write permission in it; the two renames need none, so a colleague's earlier prepared data
    (0755, in a group-writable folder) could be replaced before and raised PermissionError after."""
    without_exchange(monkeypatch.setattr, errno.EACCES)
    ready, out = tmp_path / "staging" / "data", tmp_path / "data"
    for folder, weights in ((ready, "new"), (out, "previous")):
        folder.mkdir(parents=True)
        (folder / "chunk-0.bin").write_text(weights)
    replace_folder(ready, out)
    assert (out / "chunk-0.bin").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["data", "staging"]


def test_a_folder_removed_between_finding_it_and_exchanging_it_is_taken_as_a_new_name(tmp_path, monkeypatch):
    """Another command deleted ``out`` in the instant between the two steps: the exchange found nothing to trade
    places with (ENOENT), which was raised though the name was free."""
    import cpt_lightning.atomic

    ready, out = tmp_path / "ready", tmp_path / "out"
    ready.mkdir()
    (ready / "weights").write_text("new")
    out.mkdir()
    real, calls = cpt_lightning.atomic._renameat2, []

    def out_removed_meanwhile(source, target, flags):
        calls.append(flags)
        if len(calls) == 1:
            return real(source, target, flags)  # EEXIST: ``out`` is there
        if len(calls) == 2:
            out.rmdir()  # removed by another command, just before the exchange
        return real(source, target, flags)

    monkeypatch.setattr(cpt_lightning.atomic, "_renameat2", out_removed_meanwhile)
    replace_folder(ready, out)
    assert (out / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert len(calls) == 3


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "two-renames"])
def test_a_folder_another_command_writes_in_the_instant_before_the_rename_is_kept(tmp_path, monkeypatch, exchange):
    """``replace=False`` (an export or transplant without --overwrite) checks ``out`` absent or empty first; another
    export landing between that check and the rename was replaced (where names cannot be exchanged too), the slower
    export silently winning. An empty folder there is still taken."""
    import cpt_lightning.atomic

    out, real = tmp_path / "export", cpt_lightning.atomic._renameat2

    def another_export_lands_first(source, target, flags):
        if not out.exists():
            out.mkdir()
            (out / "config.json").write_text("the other export")
        return real(source, target, flags) if exchange else False

    monkeypatch.setattr(cpt_lightning.atomic, "_renameat2", another_export_lands_first)
    with pytest.raises(UserError, match=r"export was written by another command while this export was made: that is "
                                        r"kept, and nothing of this export is left behind$"):
        with folder_beside(out, "export", replace=False) as staging:
            (staging / "config.json").write_text("this export")
    assert (out / "config.json").read_text() == "the other export" and sorted(p.name for p in tmp_path.iterdir()) == [
        "export"]
    monkeypatch.undo()
    (out / "config.json").unlink()
    with folder_beside(out, "export", replace=False) as staging:
        (staging / "config.json").write_text("this export")
    assert (out / "config.json").read_text() == "this export" and sorted(p.name for p in tmp_path.iterdir()) == [
        "export"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "two-renames"])
def test_a_link_to_an_empty_folder_is_replaced_by_a_write_that_keeps_what_others_wrote(tmp_path, monkeypatch, exchange):
    """``replace=False`` takes over only an empty folder, and a link to one: the link was refused as "written by
    another command" (the empty folder it leads to cannot be removed through it)."""
    if not exchange:
        without_exchange(monkeypatch.setattr)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "export").symlink_to(tmp_path / "scratch", target_is_directory=True)
    with folder_beside(tmp_path / "export", "export", replace=False) as staging:
        (staging / "config.json").write_text("this export")
    assert not (tmp_path / "export").is_symlink() and (tmp_path / "export" / "config.json").read_text() == "this export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "scratch"] and not any((tmp_path / "scratch").iterdir())


def test_an_empty_folder_that_cannot_be_removed_is_said_as_such_not_as_another_commands(tmp_path, monkeypatch):
    """A mount point or a sticky folder (EBUSY, EPERM) was "written by another command while this export was made"."""
    out, rmdir = tmp_path / "export", Path.rmdir
    out.mkdir()

    def busy(self):
        if self != out:
            return rmdir(self)
        raise OSError(errno.EBUSY, "Device or resource busy", str(self))

    monkeypatch.setattr(Path, "rmdir", busy)
    with pytest.raises(UserError, match=r"^could not write the export .*export \(Device or resource busy.*\); nothing "
                                        r"of it is left behind$"):
        with folder_beside(out, "export", replace=False) as staging:
            (staging / "config.json").write_text("this export")


def test_a_kill_after_the_exchange_leaves_the_new_version_in_place(tmp_path, monkeypatch):
    """Killed before it deleted the version it replaced: ``out`` is the new one, the previous one waits under the
    staging name, which the next write of ``out`` removes (as staging a kill left)."""
    import cpt_lightning.atomic

    ready, out = tmp_path / "ready", tmp_path / "out"
    for folder, weights in ((ready, "new"), (out, "previous")):
        folder.mkdir()
        (folder / "weights").write_text(weights)

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(cpt_lightning.atomic, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(ready, out)
    assert (out / "weights").read_text() == "new" and (ready / "weights").read_text() == "previous"


def test_an_interrupted_folder_write_leaves_the_previous_folder_and_no_staging(tmp_path):
    """Ctrl-C (or SIGINT from a scheduler) during an export is no Exception: it must clean up all the same."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with folder_beside(tmp_path / "model", "model") as staging:
            (staging / "config.json").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "config.json").read_text() == "previous"


@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-earlier-folder", "new"])
def test_a_full_disk_during_a_folder_write_is_one_line(tmp_path, earlier):
    """safetensors reports a full disk in an error of its own, no OSError: `cpt export` ended in a traceback."""
    from safetensors import SafetensorError

    if earlier:
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("previous")
    kept = "the earlier export is intact" if earlier else "nothing of it is left behind"
    for failure in (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                    Exception("No space left on device (os error 28)"),  # tokenizers' save of tokenizer.json
                    OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(UserError, match=rf"^could not write the export {tmp_path / 'model'} \(No space left on "
                                            rf"device; free space on that disk\); {kept}$"):
            with folder_beside(tmp_path / "model", "export"):
                raise failure
        assert sorted(p.name for p in tmp_path.iterdir()) == (["model"] if earlier else [])
    with pytest.raises(ValueError, match="a bug"):  # not the disk's: as it was raised
        with folder_beside(tmp_path / "model", "export"):
            raise ValueError("a bug")


def test_writes_leave_no_file_descriptor_open(tmp_path):
    """A checkpoint (and run config) is written thousands of times in a long run: one descriptor left open per
    write (the folder's, opened to sync the rename) ends the run at the process's limit of open files."""
    before = open_descriptors()
    for _ in range(5):
        write_beside(tmp_path / "last.ckpt", lambda partial: partial.write_bytes(b"checkpoint"), "checkpoint")
    assert open_descriptors() == before
    aged_staging_folder(tmp_path / "model")  # its lock is taken to remove it, then freed
    for _ in range(3):  # a phase-end export per phase, each staged under a lock of its own
        with folder_beside(tmp_path / "model", "export") as staging:
            (staging / "model.safetensors").write_bytes(b"weights")
    assert open_descriptors() == before


def aged_staging_folder(out: Path) -> Path:
    """A staging folder of ``out`` left an hour ago: its writer killed, or alive writing one large file."""
    staging = out.parent / f".{out.name}.tmp-abcdefgh"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"weights")
    hour_ago = time.time() - 3600
    os.utime(staging, (hour_ago, hour_ago))
    return staging


def test_without_flock_an_old_staging_folder_may_be_a_live_writers_and_is_kept(tmp_path, monkeypatch):
    without_flock(monkeypatch)
    staging = aged_staging_folder(tmp_path / "model")
    with folder_beside(tmp_path / "model", "export") as new:
        (new / "model.safetensors").write_bytes(b"new")
    assert (staging / "model.safetensors").exists()


def test_write_beside_makes_the_folder_it_writes_in(tmp_path):
    write_beside(tmp_path / "checkpoints" / "last.ckpt", lambda partial: partial.write_text("x"), "checkpoint")
    assert (tmp_path / "checkpoints" / "last.ckpt").read_text() == "x"


def test_a_ctrl_c_in_the_publish_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    without_exchange(monkeypatch.setattr)  # where names are exchanged, there is one step and nothing between
    ready, out = tmp_path / "ready", tmp_path / "out"
    ready.mkdir()
    out.mkdir()
    (out / "w").write_text("previous")
    fail_to_rename(ready, KeyboardInterrupt(), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(ready, out)
    assert (out / "w").read_text() == "previous"


def test_an_output_folder_holding_a_link_to_a_source_is_refused(tmp_path):
    """A run folder whose last.ckpt links to the checkpoint in a store: replacing it would delete what it exports."""
    from cpt_lightning.atomic import check_output_folder

    store, run = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    run.mkdir()
    (store / "step5.ckpt").write_text("checkpoint")
    (run / "last.ckpt").symlink_to(store / "step5.ckpt")
    with pytest.raises(UserError, match="is or holds"):
        check_output_folder(run, "OUT_DIR", [run / "last.ckpt"])


def test_an_output_in_a_folder_this_user_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch):
    """Found only when the output was written: after a whole analysis, or the first objective of a bench."""
    from cpt_lightning.atomic import check_output_folder

    shared = tmp_path / "shared"
    shared.mkdir()
    readable_only = {shared}  # as another user's folder (the tests may run as root, whom no mode stops)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) not in readable_only and access(path, mode))
    for out in (shared, shared / "analysis", shared / "a" / "b"):
        with pytest.raises(UserError, match=rf"^--out {out}: this user cannot write in {shared}; give a folder of "
                                            "your own$"):
            check_output_folder(out, "--out")
    check_output_folder(tmp_path / "mine" / "analysis", "--out")


WRITER = """
import sys, time
from pathlib import Path
from cpt_lightning.atomic import folder_beside
with folder_beside(Path(sys.argv[1]), "export") as staging:
    (staging / "model.safetensors").write_bytes(b"weights")
    print(staging, flush=True)
    time.sleep(60)
"""


def test_a_staging_folder_whose_writer_was_killed_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    """A SIGKILL (the OOM killer, a preemption's last word) during an export left its hidden ``.OUT.tmp-*`` folder
    of weights behind, one per try; the next write of OUT removes it once it has been left a minute, but not one
    another process is writing, however long it has not changed."""
    out = tmp_path / "model"
    writers, staged = [], []
    try:
        for _ in range(2):  # one after the other: each removes nothing of the other's
            writers.append(subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True))
            staged.append(Path(writers[-1].stdout.readline().strip()))
        live, killed = staged
        writers[1].kill()
        writers[1].wait()
        hour_ago = time.time() - 3600
        for folder in staged:
            os.utime(folder, (hour_ago, hour_ago))
        with folder_beside(out, "export") as staging:
            (staging / "model.safetensors").write_bytes(b"new")
        assert not killed.exists() and (live / "model.safetensors").exists()
        assert (out / "model.safetensors").read_bytes() == b"new"
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_link_beside_replaces_a_name_with_a_second_name_for_another(tmp_path, monkeypatch, folder):
    """What last.ckpt is made of: the newest step's checkpoint under a second name (a sharded one's, file by file),
    put in place whole; where hard links are refused, False and the earlier one as it was."""
    def make(path, text):
        (path / "shards").mkdir(parents=True) if folder else None
        file(path).write_text(text)

    def file(path):
        return path / "shards" / "0" if folder else path

    source, out = tmp_path / "step2", tmp_path / "last"
    make(source, "new")
    make(out, "old")
    (tmp_path / ".last.partial").write_text("left by a link killed midway")
    assert link_beside(source, out)
    assert file(out).samefile(file(source)) and sorted(p.name for p in tmp_path.iterdir()) == ["last", "step2"]
    shutil.rmtree(source) if folder else source.unlink()  # keep_last deletes the step's checkpoint: last keeps it
    assert file(out).read_text() == "new"

    def refused(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    make(source, "newer")
    monkeypatch.setattr(os, "link", refused)
    assert not link_beside(source, out)
    assert file(out).read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last", "step2"]


def test_a_write_beside_a_partial_left_as_a_hard_link_leaves_the_linked_file_as_it_was(tmp_path):
    """A kill between link_beside's link and its rename leaves .last.ckpt.partial naming the step's checkpoint: the
    next whole save of last.ckpt opened that name and wrote the later step into the step's file."""
    step, last = tmp_path / "step4.ckpt", tmp_path / "last.ckpt"
    step.write_text("step 4")
    os.link(step, tmp_path / ".last.ckpt.partial")
    write_beside(last, lambda partial: partial.write_text("step 5"), "checkpoint")
    assert step.read_text() == "step 4" and last.read_text() == "step 5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step4.ckpt"]


def test_hard_links_work_leaves_nothing_behind(tmp_path, monkeypatch):
    assert hard_links_work(tmp_path) and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "link", lambda source, target: (_ for _ in ()).throw(OSError(errno.EPERM, "refused")))
    assert not hard_links_work(tmp_path) and list(tmp_path.iterdir()) == []
    assert not hard_links_work(tmp_path / "missing")  # no error on one rank alone

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert not hard_links_work(tmp_path)
