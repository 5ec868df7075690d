"""The run-folder and data-folder locks: a guard where flock works, never a refusal where it does not, and no
descriptor or lock kept past its use."""

import errno
import fcntl
import os

import pytest

from cpt_lightning.errors import UserError
from cpt_lightning.folder_locks import lock_for_reading, lock_run_folder, release, try_lock
from helpers import open_descriptors, without_flock


@pytest.fixture
def held_elsewhere():
    """Holds a folder's exclusive lock through a descriptor of its own, as another process's cpt prepare would."""
    descriptors = []

    def hold(folder):
        descriptors.append(os.open(folder, os.O_RDONLY))
        fcntl.flock(descriptors[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)

    yield hold
    for descriptor in descriptors:
        os.close(descriptor)


def test_a_folder_without_flock_is_in_use_by_no_one(tmp_path, monkeypatch):
    """Every cpt fit (and every prepared source read) would be refused as in use on such a file system."""
    without_flock(monkeypatch)
    assert lock_run_folder(tmp_path)[1] is None
    assert lock_for_reading([tmp_path]) == [True]


def test_a_folder_that_cannot_be_opened_is_not_locked_against(tmp_path, monkeypatch):
    """A folder one may enter but not list (mode 0711; as root chmod cannot show it, so open is made to refuse)."""
    import cpt_lightning.folder_locks as folder_locks

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(folder_locks.os, "open", refused)
    assert lock_for_reading([tmp_path]) == [True]


def test_a_refused_lock_keeps_no_descriptor(tmp_path, held_elsewhere):
    held_elsewhere(tmp_path)
    before = open_descriptors()
    assert try_lock(tmp_path, shared=True) is False
    assert open_descriptors() == before


def test_a_refused_read_lock_frees_those_taken_before_it(tmp_path, held_elsewhere):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    held_elsewhere(second)
    with pytest.raises(UserError, match="being prepared again"):
        lock_for_reading([first, second])
    lock = try_lock(first, shared=False)  # a prepare of the first source may go on
    assert lock is not False
    release(lock)
