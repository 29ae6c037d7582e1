"""Lock files: held while needed, gone from a finished run folder, and removing them is safe."""

from __future__ import annotations

import threading
import time

import pytest

from autoprune.errors import ConfigError
from autoprune.files import file_lock, lock_path, unlock_path
from autoprune.runfolder import RunFolder
from autoprune.study.study import run_lock


def test_locks_are_removed_on_release(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run_lock(run):
        assert run.lock.exists()
        with pytest.raises(ConfigError, match="another autoprune search is running"):
            with run_lock(run):
                pass
        with file_lock(run.prepare_lock):
            assert run.prepare_lock.exists()
        assert not run.prepare_lock.exists()
    assert not run.lock.exists()
    assert [p.name for p in run.root.iterdir()] == []


def test_a_waiter_on_a_removed_lock_file_takes_the_new_one(tmp_path):
    """B opened the lock file and waits while A holds it; A removes it and lets go. B must not
    run on the removed file while C locks a new file at the same path: one of them waits."""
    path = tmp_path / ".prepare.lock"
    a = lock_path(path)
    got_b = threading.Event()
    held_b = []

    def b() -> None:
        held_b.append(lock_path(path))
        got_b.set()

    t = threading.Thread(target=b)
    t.start()
    time.sleep(0.3)  # B has opened the file and blocks in flock
    unlock_path(path, a)
    assert got_b.wait(10)
    assert lock_path(path, blocking=False) is None  # C: B holds the file now at the path
    unlock_path(path, held_b[0])
    c = lock_path(path, blocking=False)
    assert c is not None
    unlock_path(path, c)
    t.join()
    assert not path.exists()


def test_a_lock_taken_with_busy_is_refused_at_once_and_left_to_its_holder(tmp_path):
    """One flock helper for both kinds: ``file_lock`` waits; with ``busy`` it refuses at once
    (the run-folder lock), and the refusal leaves the holder's lock file in place."""
    path = tmp_path / "x.lock"
    with file_lock(path):
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match="^someone has it$"):
            with file_lock(path, busy="someone has it"):
                pass
        assert time.perf_counter() - t0 < 5 and path.exists()
    with file_lock(path, busy="someone has it"):  # free again: taken
        assert path.exists()
    assert not path.exists()
