"""The run folder: where every file of a search lives, and how files are written there.

Multi-file and single-file outputs are written beside their destination and swapped in with a
rename, so a killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

import torch


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:05d}"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Blocking exclusive lock: the first worker trains/measures the dense model, the others wait
    and then load its ``base_model.pt`` / ``dense.json`` from the shared run folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write via a temporary file and rename: a crash or a full disk never leaves a half-written
    file where a resumed search or another worker would read it.

    The temporary file has a unique name in the destination's directory (same filesystem, so
    ``os.replace`` is atomic): workers sharing a run folder that write the same file at once
    each rename their own complete copy instead of truncating or renaming one shared ``.tmp``
    under each other. It is created exclusively (``open(..., "x")``) with the umask's ordinary
    permissions (``mkstemp``'s 0o600 would hide results from the other users of a shared run
    folder), fsynced before the rename (no empty file after a power cut), and removed if
    anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(6).hex()}.tmp")
        try:
            fh = open(tmp, "x")  # O_CREAT | O_EXCL, mode 0o666 & ~umask
            break
        except FileExistsError:  # 48 random bits collided: draw another name
            continue
    try:
        with fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if writing or renaming failed
    return path


def atomic_torch_save(obj: object, path: Path) -> Path:
    """``torch.save`` with the same unique-temporary-file, fsync and rename guarantees as
    :func:`atomic_write_text` (several workers may save the same checkpoint at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(6).hex()}.tmp")
        try:
            fh = open(tmp, "xb")  # O_CREAT | O_EXCL, mode 0o666 & ~umask
            break
        except FileExistsError:  # 48 random bits collided: draw another name
            continue
    try:
        with fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if saving or renaming failed
    return path
