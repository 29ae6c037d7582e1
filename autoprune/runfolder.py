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

from autoprune.errors import ConfigError


def writable_dir(path: str | Path, option: str) -> Path:
    """Create folder ``path`` (``option`` is the flag that named it) or say why it cannot be used:
    an OSError from deep inside a search would otherwise end in a traceback, minutes later."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: {option} names a file, not a folder; pass a new or existing folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: {option} cannot be created ({exc.strerror or exc}); pass a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: {option} is not writable; pass a folder you can write to")
    return path


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
    file where a resumed search or another worker would read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: object, path: Path) -> Path:
    """``torch.save`` with the same write-then-rename guarantee as :func:`atomic_write_text`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
