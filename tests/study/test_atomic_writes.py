"""Atomic writes into a shared run folder: concurrent writers of one file never collide on a
temporary name, a failed write leaves neither a temporary file nor a damaged destination, and
files get ordinary (umask) permissions."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from autoprune import files
from autoprune.files import atomic_torch_save, atomic_write_text


def _hammer(fn, n_threads: int = 4, n_writes: int = 150) -> list[BaseException]:
    """Run ``fn(thread, i)`` from several threads at once; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(t: int) -> None:
        start.wait()
        try:
            for i in range(n_writes):
                fn(t, i)
        except BaseException as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def test_concurrent_text_writers_of_one_file_do_not_collide(tmp_path: Path):
    """Defect 9: every writer used ``<name>.tmp``; one writer's rename moved the file another
    was still writing, whose rename then failed (FileNotFoundError) or installed a truncated file."""
    dest = tmp_path / "pareto.json"
    texts = {t: (f"{t}" * 20000) + "\n" for t in range(4)}
    errors = _hammer(lambda t, i: atomic_write_text(dest, texts[t]))
    assert errors == []
    assert dest.read_text() in texts.values()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.json"]


def test_concurrent_torch_savers_of_one_file_do_not_collide(tmp_path: Path):
    dest = tmp_path / "base_model.pt"
    objs = {t: {"w": torch.full((2000,), float(t))} for t in range(3)}
    errors = _hammer(lambda t, i: atomic_torch_save(objs[t], dest), n_threads=3, n_writes=60)
    assert errors == []
    got = torch.load(dest, weights_only=True)["w"]
    assert any(torch.equal(got, o["w"]) for o in objs.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base_model.pt"]


def test_failed_writes_leave_no_temporary_file_and_keep_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dest = tmp_path / "dense.json"
    atomic_write_text(dest, "old\n")
    ckpt = tmp_path / "model.pt"
    atomic_torch_save({"a": 1}, ckpt)

    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: None}, ckpt)  # a lambda does not pickle: fails mid-write
    with pytest.raises(TypeError):
        atomic_write_text(dest, b"not text")  # type: ignore[arg-type]

    def refuse(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(dest, "new\n")
    with pytest.raises(OSError, match="No space"):
        atomic_torch_save({"a": 2}, ckpt)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.json", "model.pt"]
    assert dest.read_text() == "old\n" and torch.load(ckpt, weights_only=True) == {"a": 1}


def test_written_files_get_umask_permissions(tmp_path: Path):
    """A unique temporary file must not make results private (mkstemp's 0o600): other users of a
    shared run folder read them."""
    old = os.umask(0o022)
    try:
        a = atomic_write_text(tmp_path / "a.json", "{}")
        b = atomic_torch_save({}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert a.stat().st_mode & 0o777 == 0o644 and b.stat().st_mode & 0o777 == 0o644


_POLLER = """
import os, sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
for path in sys.argv[1:]:
    print("ready", flush=True)
    while not os.path.exists(path):
        time.sleep(0.001)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # a reader polling for the first trial, as `autoprune status` or a test does
        try:
            optuna.load_study(study_name="autoprune", storage="sqlite:///" + path)
        except Exception:
            pass
"""


def test_a_reader_polling_a_new_study_file_does_not_break_its_creation(tmp_path: Path) -> None:
    """Optuna creates an SQLite file's tables one statement at a time; a reader that opened the
    file meanwhile created them too and the search failed ("table studies already exists"; 8 of
    10 creations before the fix). The schema is now built beside and linked into place."""
    import subprocess
    import sys
    import time

    import optuna

    from autoprune.config import SearchSettings
    from autoprune.study.storage import make_storage

    paths = [tmp_path / f"s{i}.db" for i in range(6)]
    poller = subprocess.Popen([sys.executable, "-c", _POLLER, *map(str, paths)], stdout=subprocess.PIPE, text=True)
    try:
        for p in paths:
            assert poller.stdout.readline().strip() == "ready"  # it waits for this file to appear
            rdb = make_storage(f"sqlite:///{p}", SearchSettings(), lambda *a: None, discard_unfinished=True)
            optuna.create_study(storage=rdb, study_name="autoprune", directions=["maximize", "minimize"], load_if_exists=True)
            rdb.engine.dispose()
    finally:
        poller.wait(timeout=60)
    assert poller.returncode == 0
    assert not list(tmp_path.glob(".*.partial"))
    for p in paths:
        assert optuna.load_study(study_name="autoprune", storage=f"sqlite:///{p}").directions
