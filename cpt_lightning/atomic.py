"""Files and folders that are either complete or absent: written beside their target, renamed into place.

A crash, a full disk or a preemption during a write leaves the previous version where it was, so a
checkpoint, a run config, prepared data or an export is never read half-written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import itertools
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from cpt_lightning.errors import FILE_SYSTEM_FIXES, UserError, found_in_chain
from cpt_lightning.folder_locks import release, try_lock


def hidden_beside(path: Path, kind: str) -> Path:
    """``.NAME.kind`` beside ``path``: where a new version is written (``partial``) and where the version it
    replaces waits until it is in place (``old``)."""
    return path.with_name(f".{path.name}.{kind}")


def write_beside(path: Path, write: Callable[[Path], None], what: str) -> None:
    """``write`` a hidden ``.NAME.partial`` beside ``path``, fsync it, rename it into place, fsync the folder.

    The folder sync makes the rename itself survive a power loss. A failed or interrupted write removes the
    partial file (it would keep a full disk full); when a disk error is behind it (``torch.save`` reports a
    full disk as a RuntimeError caused by one), it is a one-line UserError naming ``what`` and ``path``.
    """
    partial = hidden_beside(path, "partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)  # left by a kill: written into, a hard link (link_beside's) would write through
        write(partial)
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    except BaseException as err:  # a Ctrl-C during the write too: the partial file would stay behind
        partial.unlink(missing_ok=True)
        if isinstance(err.__context__, KeyboardInterrupt):  # torch.save's close raised over a Ctrl-C mid-write
            raise err.__context__ from None  # ("unexpected pos"): it stays a Ctrl-C, not a failed save
        refusal = disk_write_refusal(err, what, path) if isinstance(err, Exception) else None
        if refusal is None:
            raise
        raise refusal from err
    _sync_folder(path.parent)


def link_beside(source: Path, path: Path) -> bool:
    """Make ``path`` a second name for the file ``source``, or for each file of the folder ``source`` (hard links: the
    bytes are not written again), put into place as ``write_beside`` and ``replace_folder`` put a copy. False, with
    ``path`` as it was, where the file system refuses (no hard links on some network and FUSE mounts): the caller
    writes it instead, on every rank where a sharded checkpoint needs them all, so no error may leave here alone."""
    partial = hidden_beside(path, "partial")
    try:
        _remove(partial)  # a link killed midway: a file cannot be linked over
        if source.is_dir():
            shutil.copytree(source, partial, copy_function=os.link)
            replace_folder(partial, path)
        else:
            os.link(source, partial)
            os.replace(partial, path)
        _sync_folder(path.parent)
    except OSError:
        _remove(partial)
        return False
    return True


def hard_links_work(folder: Path) -> bool:
    """Whether the file system of ``folder`` (an existing folder) makes hard links: some network and FUSE mounts
    refuse them. Any error is a no: a caller on one rank alone must not raise."""
    try:
        descriptor, name = tempfile.mkstemp(prefix=".link-probe-", dir=folder)
        os.close(descriptor)
    except OSError:
        return False
    probe = Path(name)
    link = probe.with_name(f"{probe.name}-2")
    try:
        os.link(probe, link)
        return True
    except OSError:
        return False
    finally:
        for path in (probe, link):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def unused_path(named: Callable[[str], Path]) -> Path:
    """``named("")``, or ``named("-2")``, ``named("-3")``, ... : the first that does not exist yet."""
    for attempt in itertools.count(1):
        path = named("" if attempt == 1 else f"-{attempt}")
        if not path.exists():
            return path


def disk_write_refusal(err: BaseException | None, what: str, path: Path) -> UserError | None:
    """The one-line error for a write of ``what`` that failed on the disk, or None when no disk error is behind
    ``err``: an OSError anywhere in its chain (``torch.save`` raises a RuntimeError from it), or the Rust writers' own
    errors, which are none (safetensors' "I/O error: No space left on device (os error 28)", tokenizers' without
    the prefix). Written beside its target, the failed write left any earlier one as it was."""
    why = disk_error_text(err)
    if why is None:
        return None
    earlier = f"the previous {what} is intact" if path.exists() else "what was written before is intact"
    return UserError(f"could not write the {what} {path} ({why}); {earlier}")


def disk_error_text(err: BaseException | None) -> str | None:
    """Why the disk refused a write behind ``err``, with the fix where one is known ("No space left on device; free
    space on that disk"), or None."""
    disk_error = found_in_chain(err, OSError)
    if disk_error is not None:
        return _with_fix(disk_error.strerror or str(disk_error), disk_error.errno)
    if err is None:
        return None
    text = str(err)
    found = re.search(r"I/O error: (.+?) \(os error (\d+)\)", text) or re.match(r"([^()]+?) \(os error (\d+)\)$", text)
    return _with_fix(found[1], int(found[2])) if found else None


def _with_fix(why: str, number: int | None) -> str:
    fix = FILE_SYSTEM_FIXES.get(number)
    return f"{why}; {fix}" if fix else why


def local_paths(*names: str | Path | None) -> list[Path]:
    """The names that are files or folders here (a tokenizer or model may also be a Hub name): the sources an
    output must not hold."""
    return [Path(name) for name in names if name is not None and Path(name).exists()]


def check_output_folder(out: Path, name: str, sources: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output folder the work would destroy or fail on: one that is or holds a
    source (replacing it deleted the raw corpus, or the checkpoint being exported along with its run), one with
    a file on its path (a traceback once the work was done), or one whose nearest existing folder this user
    cannot write in."""
    targets = {Path(os.path.abspath(out)), out.resolve()}
    for source in sources:
        for path in {Path(os.path.abspath(source)), source.resolve()}:  # a symlink (last.ckpt) by both names
            if any(path == target or target in path.parents for target in targets):
                raise UserError(f"{name} {out} is or holds {source}, which replacing it would delete: "
                                f"give {name} a folder of its own")
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{name} {out}: {folder} is a file, not a folder; give another {name}")
            if not os.access(folder, os.W_OK | os.X_OK):  # refused once the work was done (an analysis: minutes)
                raise UserError(f"{name} {out}: this user cannot write in {folder}; give a folder of your own")
            return


def check_replaceable_folder(out: Path, name: str) -> None:
    """Refuse, before any work, to replace the current folder or one holding it: ``-o .`` failed with a
    traceback once the work was done (the current folder has no name to move aside), and a parent folder
    would have been moved away from under the command, its other files with it."""
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise UserError(f"{name} {out} is the current folder or holds it, which the output would replace whole: "
                        f"give {name} a new folder of its own")


def replace_folder(ready: Path, out: Path, replace: bool = True) -> None:
    """Rename the finished folder ``ready`` to ``out`` (``replace=False``: see ``put_in_place``).

    An earlier ``out`` trades places with ``ready`` in one step (``put_in_place``) and is deleted from there:
    ``out`` is one whole version at every moment, for a reader and after a kill, and two commands writing it at
    once each delete only the version theirs took the place of (with two renames, one moved the other's new folder
    aside and failed, "Directory not empty", or removed the previous version while neither new one landed).

    Where names cannot be exchanged (NFS, a kernel before 3.15), the earlier ``out`` is moved aside first and
    deleted only once ``ready`` is in place; if that rename fails, it is moved back. A ``.NAME.old`` without an
    ``out`` (a crash between the two renames) is the only copy of the previous version: it stays until ``ready``
    is in place.
    """
    old = hidden_beside(out, "old")
    if put_in_place(ready, out, replace):
        _remove(ready)  # the version replaced, if there was one
        _remove(old)  # stale, left by a crash between two renames: ``out`` is newer
        return
    if not replace and out.is_dir() and not out.is_symlink():  # onto an empty folder only: one filled since is kept
        try:
            ready.rename(out)
        except OSError as err:
            _raise_taken(err, out)
        _remove(old)
        return
    if out.exists():
        _remove(old)  # stale: ``out`` is the newer copy
        out.rename(old)
    try:
        ready.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    _remove(old)


_RENAME_NOREPLACE = 1  # renameat2(2)'s flags: the new name must not exist (EEXIST);
_RENAME_EXCHANGE = 2  # both names exist, and each comes to name what the other did
_AT_FDCWD = -100  # paths relative to the current folder, as os.rename takes them
# A file system or kernel without the flags; or an exchange between two folders, which needs write permission in the
# folder replaced (its ".." changes), where the two renames need none: the two renames say what they cannot do.
_TWO_RENAMES_INSTEAD = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM}


def put_in_place(ready: Path, out: Path, replace: bool = True) -> bool:
    """Give ``ready`` the name ``out`` in one step, ``out``'s earlier file or folder (a link: the link) coming to be
    named ``ready``; False, with nothing changed, where that cannot be done in one step (``_renameat2``).
    ``replace=False``: only an empty folder (or a link, which the caller checked leads to one) is taken over;
    anything else there (another command's, written since ``out`` was checked) is kept, and this is a
    FileExistsError."""
    while True:
        try:
            return _renameat2(ready, out, _RENAME_NOREPLACE)
        except FileExistsError:  # there already, or put there meanwhile by another writer
            if not replace and not out.is_symlink():
                try:
                    out.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as err:
                    _raise_taken(err, out)
                continue
        try:
            return _renameat2(ready, out, _RENAME_EXCHANGE)
        except FileNotFoundError:  # ``out`` gone meanwhile (``ready`` missing: the first rename raises it)
            continue


def _raise_taken(err: OSError, out: Path):
    """A FileExistsError where ``err`` says ``out`` holds something (not empty, not a folder); ``err`` otherwise."""
    if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out)) from None
    raise err


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux's ``renameat2``, which Python's os module lacks; False, with nothing changed, where the C library, kernel
    or file system cannot (``_TWO_RENAMES_INSTEAD``)."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    number = ctypes.get_errno()
    if number in _TWO_RENAMES_INSTEAD:
        return False
    raise OSError(number, os.strerror(number), str(source), None, str(target))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def folder_beside(out: Path, what: str, replace: bool = True):
    """Yield a new hidden folder beside ``out`` to write into; when the block succeeds it gets the modes the
    umask gives new files and folders and replaces ``out`` (``replace_folder``); when it fails it is removed
    and ``out`` is untouched (a full disk: a one-line UserError naming ``what``). ``replace=False``: ``out`` was
    checked absent or empty, and what another command wrote there meanwhile is kept, not this (two exports to
    one new folder both succeeded, the slower replacing the other)."""
    kept = f"the earlier {what} is intact" if out.is_dir() and any(out.iterdir()) else "nothing of it is left behind"
    with staging_beside(out) as staging, disk_errors_refused(f"the {what} {out}", kept):
        yield staging
        _open_as_umask_allows(staging)
        written_meanwhile = UserError(f"{out} was written by another command while this {what} was made: that is "
                                      f"kept, and nothing of this {what} is left behind")
        if not replace and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise written_meanwhile
        try:
            replace_folder(staging, out, replace)
            return
        except FileExistsError:  # written in the instant since
            pass
        raise written_meanwhile  # outside the handler: its error in the chain would read as the disk's


@contextlib.contextmanager
def disk_errors_refused(what: str, kept: str):
    """A disk error in the block (``disk_error_text``) as one line, ``could not write WHAT (why); KEPT``; any other
    error as it is."""
    try:
        yield
    except Exception as err:
        if (why := disk_error_text(err)) is None:
            raise
        raise UserError(f"could not write {what} ({why}); {kept}") from err


@contextlib.contextmanager
def staging_beside(target: Path):
    """Yield a new hidden folder ``.TARGET.tmp-XXXXXXXX`` beside ``target``, locked while the block writes in it
    and removed with whatever is left in it after; earlier ones whose writer died are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_INFIX}", dir=target.parent))
    writing = try_lock(staging, shared=False)  # tells a later write of ``target`` that this folder is not abandoned
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        release(writing)


STAGING_INFIX = ".tmp-"  # .OUT.tmp-XXXXXXXX: where staging_beside writes
ABANDONED_AFTER_S = 60  # a staging folder unlocked and unchanged this long: its writer is gone, not just starting


def _remove_abandoned_staging(out: Path) -> None:
    """Delete the staging folders of earlier writes of ``out`` whose process died without cleaning up (a SIGKILL,
    the OOM killer, a node lost): each held a model's weights, hidden. One being written holds its lock and stays;
    so does one changed in the last minute (its writer may be between creating and locking it) and any on a file
    system without locks, where being written cannot be told from abandoned."""
    for folder in out.parent.glob(f".{glob.escape(out.name)}{STAGING_INFIX}*"):
        if not folder.is_dir() or folder.is_symlink() or time.time() - folder.stat().st_mtime < ABANDONED_AFTER_S:
            continue
        if not isinstance(lock := try_lock(folder, shared=False), bool):
            shutil.rmtree(folder, ignore_errors=True)
            release(lock)


def remove_abandoned_partials(folder: Path, names: str) -> None:
    """Delete the hidden ``.NAME.partial`` files and folders (``NAME`` matching the glob ``names``) that a writer
    killed mid-write left (a SIGKILL, the OOM killer, a node lost): each as large as what it was writing, never read
    again. One changed in the last ``ABANDONED_AFTER_S`` may be a live writer's and stays."""
    for partial in folder.glob(f".{names}.partial"):
        try:
            inside = partial.rglob("*") if partial.is_dir() and not partial.is_symlink() else ()
            changed = max(path.lstat().st_mtime for path in [partial, *inside])
        except OSError:  # renamed into place or removed meanwhile: a live writer's
            continue
        if time.time() - changed >= ABANDONED_AFTER_S:
            try:
                _remove(partial)
            except OSError as err:  # housekeeping: not a reason to stop a run (on one rank alone)
                warnings.warn(f"could not remove {partial}, left by a write killed midway ({err.strerror}): delete "
                              "it to free its space", stacklevel=2)


def _open_as_umask_allows(folder: Path) -> None:
    """``mkdtemp`` makes the folder 0700 and safetensors writes 0600: give the folder the modes any new
    folder and file get here (0755 / 0644 under umask 022), so colleagues can read and evaluate it."""
    probe = folder / ".umask-probe"  # a probe, not os.umask(): that would change the mode for every thread
    probe.mkdir()
    folder_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    probe.touch()
    file_mode = probe.stat().st_mode & 0o777
    probe.unlink()
    folder.chmod(folder_mode)
    for path in folder.rglob("*"):
        path.chmod(folder_mode if path.is_dir() else file_mode)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
