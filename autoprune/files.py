"""How files are written, read and locked: atomic writes, whole-folder swaps, crash recovery, locks.

Multi-file and single-file outputs are written beside their destination and swapped in with a
rename, so a killed process never leaves a half-written file under the final name. Folders go
the same way (:func:`atomic_dir`): written into a hidden temporary sibling, then old → backup,
new → final, backup removed; the next writer of that folder finishes or undoes what a killed
one left (:func:`recover_dir`). Files written with :func:`atomic_torch_save` are read back
with :func:`torch_load`, weights-only unless the user trusts pickles. Where the files of a run
live is :mod:`autoprune.runfolder`'s job; this module knows nothing of that layout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import torch

from autoprune.errors import ConfigError, UntrustedPickle

__all__ = [
    "atomic_dir", "atomic_torch_save", "atomic_write_text", "file_lock", "lock_path", "recover_dir",
    "remove_dead_temp_files", "swap_interrupted", "temp_sibling", "torch_load", "unlock_path",
]


# --------------------------------------------------------------------------- locks
def lock_path(path: Path, blocking: bool = True) -> Optional[IO[str]]:
    """Take an exclusive ``flock`` on the file at ``path`` (created if missing); the open file
    holding it, or None when ``blocking`` is False and someone else holds it.

    Lock files are removed when released (:func:`unlock_path`), so no hidden ``.lock`` files stay
    in a finished run folder. That is safe only because every taker checks, once it holds the
    lock, that ``path`` still names the file it locked: a process that opened the file just
    before the holder removed it would otherwise lock the removed file while a third process
    locks a new one at the same path, and both would run. On a mismatch (file removed or
    replaced) the taker lets go and tries again on the file now there.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            return None
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()  # locked a file its holder removed: take the one at the path now


def unlock_path(path: Path, fh: IO[str]) -> None:
    """Release a lock taken by :func:`lock_path`, removing its file first, while still held, so
    that nobody can lock the file between its release and its removal."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


@contextlib.contextmanager
def file_lock(path: Path, busy: Optional[str] = None) -> Iterator[None]:
    """Exclusive lock on the file at ``path`` for the block, its file gone once released (see
    :func:`lock_path` for why that is safe).

    Without ``busy`` it waits: the first worker trains/measures the dense model, the others wait
    and then load its ``base_model.pt`` / ``dense.json`` from the shared run folder. With
    ``busy`` it does not wait: a lock someone holds is a :class:`ConfigError` with that message
    (a second search in one run folder must say so at once, not wait behind the first)."""
    fh = lock_path(path, blocking=busy is None)
    if fh is None:
        raise ConfigError(busy or f"{path}: locked")
    try:
        yield
    finally:
        unlock_path(path, fh)


# --------------------------------------------------------------------------- single files
def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
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
    return _atomic_write(path, "x", lambda fh: fh.write(text), encoding)


def atomic_torch_save(obj: object, path: Path) -> Path:
    """``torch.save`` with the same unique-temporary-file, fsync and rename guarantees as
    :func:`atomic_write_text` (several workers may save the same checkpoint at once)."""
    return _atomic_write(path, "xb", lambda fh: torch.save(obj, fh))


def _atomic_write(path: Path, mode: str, write: Callable[[IO[Any]], object], encoding: Optional[str] = None) -> Path:
    """The one write-then-rename: ``write`` fills an exclusively created temporary sibling
    (:func:`temp_sibling`), which is fsynced and renamed over ``path``, or removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_sibling(path)
        try:
            fh = open(tmp, mode, encoding=encoding)  # O_CREAT | O_EXCL, mode 0o666 & ~umask
            break
        except FileExistsError:  # 48 random bits collided: draw another name
            continue
    try:
        with fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if writing or renaming failed
    return path


def torch_load(path: Path, *, trust_pickle: bool, refusal: str) -> object:
    """The reading twin of :func:`atomic_torch_save`: ``torch.load`` with ``weights_only=True``
    (tensors and plain data only: a file cannot run code while it loads). A file that needs full
    unpickling is read with ``weights_only=False`` only when ``trust_pickle`` is set; otherwise
    :class:`UntrustedPickle` with ``f"{path}: {refusal}"``. Unreadable files are a ConfigError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A global outside torch's allow-list (any class, any callable): full pickle or damage.
        if not trust_pickle:
            raise UntrustedPickle(f"{path}: {refusal}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ConfigError(f"{path}: cannot be read ({' '.join(str(exc).split())[:200]}); the file is damaged or not a PyTorch file") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{path}: cannot be unpickled ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                          "the file is damaged, or the code it was pickled with is not importable here") from None


# --------------------------------------------------------------------------- whole folders
#: This machine in leftover names: a leftover is only removed when its writer can be seen dead,
#: which needs the same machine (workers on other machines may share the run folder).
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def temp_sibling(path: Path) -> Path:
    """A unique hidden name beside ``path`` for a file written by a library that takes a path
    (ONNX exporters): concurrent writers never share it, as with :func:`atomic_write_text`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(6).hex()}.tmp")


def _dir_sibling(dest: Path, kind: str) -> Path:
    """``.NAME.<time ns>-<host>-<pid>-<random>.<kind>``: unique, ordered by creation (the newest
    backup is the one to restore), and naming the writer so that a later one can tell whether
    it died (``kind``: ``tmp`` = being written, ``old`` = the previous folder during a swap)."""
    return dest.with_name(f".{dest.name}.{time.time_ns()}-{_HOST}-{os.getpid()}-{os.urandom(6).hex()}.{kind}")


def _leftovers(dest: Path) -> list[tuple[int, str, Path]]:
    """(time ns, kind, path) of the temporary and backup siblings of ``dest`` whose writer is
    dead (same machine, process gone); live writers' and other machines' are not listed."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)-(\w+)-(\d+)-[0-9a-f]{{12}}\.(tmp|old)$")
    found = []
    try:
        names = os.listdir(dest.parent)
    except FileNotFoundError:
        return []
    for name in names:
        m = pattern.match(name)
        if m is None or m.group(2) != _HOST:
            continue
        if _dead(int(m.group(3))):
            found.append((int(m.group(1)), m.group(4), dest.parent / name))
    return sorted(found)


def _dead(pid: int) -> bool:
    """Whether process ``pid`` of this machine is gone (a reused pid counts as alive: its
    leftover then waits for a later writer)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's live process
    return False


#: The temporary files of atomic_write_text, atomic_torch_save and temp_sibling.
_FILE_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]{12}\.tmp$")


def remove_dead_temp_files(root: Path) -> int:
    """Remove the temporary files that killed processes left anywhere under ``root`` (a
    ``.model.pt.<pid>-<random>.tmp`` beside a trial's files); returns how many. Their names hold
    no machine, so call this only where no other machine writes (the single-machine search,
    under its run-folder lock); live processes' files stay."""
    removed = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            m = _FILE_TEMP.match(name)
            if m and _dead(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    return removed


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_dir(dest: Path) -> None:
    """Undo what a killed writer of ``dest`` (:func:`atomic_dir`) left, the same way every time:
    killed between its two renames (``dest`` missing, its backup there), the previous folder is
    put back; its unfinished new folder and finished backups are removed. Leftovers of live
    writers, and of other machines (whose processes cannot be checked), stay."""
    dest = Path(dest)
    leftovers = _leftovers(dest)
    if not os.path.lexists(dest):
        backups = [p for _, kind, p in leftovers if kind == "old"]
        if backups:
            with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
                os.rename(backups[-1], dest)  # fails only if another writer got there first
    for _, _, path in leftovers:
        if path.exists() or path.is_symlink():
            _remove(path)


def _fsync_tree(root: Path) -> None:
    """Flush every file of a new folder before it is renamed in: after a power cut the folder
    is there complete or not at all, never with empty files."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``: the previous ``dest`` is renamed to a backup first and removed
    last. Another writer swapping in at the same time: the last rename wins, whole."""
    backups: list[Path] = []
    try:
        for _ in range(100):
            if os.path.lexists(dest):
                backup = _dir_sibling(dest, "old")
                try:
                    os.rename(dest, backup)
                except FileNotFoundError:
                    continue  # another writer moved it away meanwhile
                backups.append(backup)
            try:
                os.rename(new, dest)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another writer renamed its folder in between our two renames: move it aside too
        else:
            raise OSError(errno.EBUSY, f"{dest}: other writers kept replacing it")
    except BaseException:
        if backups and not os.path.lexists(dest):
            with contextlib.suppress(OSError):
                os.rename(backups.pop(), dest)  # the previous folder, back under its name
        raise
    finally:
        _fsync_dir(dest.parent)
        for backup in backups:
            _remove(backup)


@contextlib.contextmanager
def atomic_dir(dest: Path, guard: Optional[Callable[[], Any]] = None) -> Iterator[Path]:
    """Write a whole folder at once: yields an empty hidden sibling of ``dest`` to fill; when the
    block ends without an error it replaces ``dest`` (see :func:`_swap_in`), otherwise it is
    removed and ``dest`` is untouched. Readers of ``dest`` see the previous folder or the new
    one, never a mix (a killed writer's leftovers are cleaned by the next one: :func:`recover_dir`).
    ``guard`` runs right before the swap and may refuse it by raising (``dest`` may have changed
    since it was first checked, e.g. a user added a file while a bundle was being written)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = _dir_sibling(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if guard is not None:
            guard()
        _fsync_tree(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_interrupted(dest: Path) -> bool:
    """True when ``dest`` is missing because its writer died between its two renames (its
    backup is still there): the next writer restores it (:func:`recover_dir`)."""
    dest = Path(dest)
    return not os.path.lexists(dest) and any(kind == "old" for _, kind, _ in _leftovers(dest))
