"""The run folder: where every file of a search lives, and how files are written there.

Multi-file and single-file outputs are written beside their destination and swapped in with a
rename, so a killed process never leaves a half-written file under the final name. Folders go
the same way (:func:`atomic_dir`): written into a hidden temporary sibling, then old → backup,
new → final, backup removed; the next writer of that folder finishes or undoes what a killed
one left (:func:`recover_dir`). Folders that a command replaces as a whole are checked first
(:func:`replaceable_dir`): never the run folder, a folder holding it, its own files, or a
user's non-empty folder.
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional

import torch

from autoprune.errors import ConfigError, UntrustedPickle


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


def writable_paths(paths: Iterable[Path], option: str) -> None:
    """Existing files and folders inside a run folder that a search writes to must be writable
    (``option``: the flag that named the run folder).

    A writable run folder is not enough: a read-only (or ``chattr +i``) ``study.db`` otherwise
    surfaces after the dense model trained, as "not an Optuna SQLite database ... move it away"
    (advice that loses the study), and a read-only ``trials/`` fails every trial one by one.
    """
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise ConfigError(f"{path}: read-only, but a search in this run folder writes to it; make it writable "
                              f"(chmod u+w; chattr -i if immutable), or copy the run folder and pass the copy as {option}")


@dataclass(frozen=True)
class TrialFiles:
    """The files of one trial: ``trials/NNNNN/``."""

    root: Path

    @property
    def model(self) -> Path:
        """The fine-tuned model, what export and the final stage start from."""
        return self.root / "model.pt"

    @property
    def onnx(self) -> Path:
        """The file latency was measured on."""
        return self.root / "model.onnx"

    @property
    def final_model(self) -> Path:
        return self.root / "model_final.pt"

    @property
    def final_onnx(self) -> Path:
        return self.root / "model_final.onnx"


@dataclass(frozen=True)
class RunFolder:
    """Every path in a run folder, in one place.

    Code asks this object for a file instead of joining names itself, and nothing works back from
    a file to its run folder: with ``--out X/trials`` everything lives under ``X/trials``.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- the study and the locks around it
    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def lock(self) -> Path:
        """Held by the single-machine (SQLite) search for its whole run."""
        return self.root / ".lock"

    @property
    def prepare_lock(self) -> Path:
        """Held while the dense model is trained and measured (workers sharing the folder wait)."""
        return self.root / ".prepare.lock"

    @property
    def export_lock(self) -> Path:
        """Held while the front is written (workers sharing the folder finish together)."""
        return self.root / ".export.lock"

    @property
    def log(self) -> Path:
        """Library log records and warnings of the searches in this folder (:mod:`autoprune.runlog`)."""
        return self.root / "autoprune.log"

    def written_in_place(self, local_study: bool) -> list[Path]:
        """What a search opens for writing where it is (databases, lock files) or creates files in
        (folders): a read-only one must stop the search before it trains (see writable_paths).
        ``local_study``: the study is this folder's SQLite ``study.db``."""
        files = [self.lock, self.prepare_lock, self.export_lock, self.latency_cache, self.log]
        folders = [self.trial(0).root.parent, self.dense_onnx.parent, self.predictor("x").parent, self.staircases("x").parent,
                   self.pareto_dir]
        return [*files, *([self.study_db] if local_study else []), *folders]

    # -- the dense model and what is computed from it once per run
    @property
    def base_model(self) -> Path:
        return self.root / "base_model.pt"

    @property
    def dense_json(self) -> Path:
        return self.root / "dense.json"

    @property
    def dense_onnx(self) -> Path:
        return self.root / "dense" / "model.onnx"

    @property
    def sensitivity(self) -> Path:
        return self.root / "sensitivity.json"

    @property
    def flops_savings(self) -> Path:
        return self.root / "flops_savings.json"

    @property
    def budget_calibration(self) -> Path:
        """Budget mode: the measured points of the MACs → ms line trials are aimed with."""
        return self.root / "budget" / "calibration.json"

    def budget_model(self, label: str) -> Path:
        """Budget mode: where a calibration model is exported to be measured."""
        return self.root / "budget" / label / "model.onnx"

    @property
    def proxy_fidelity(self) -> Path:
        """Kendall τ of trial (short fine-tune) vs final-stage accuracy over the front models."""
        return self.root / "proxy_fidelity.json"

    @property
    def unprunable(self) -> Path:
        """Groups left out of the search because pruning them breaks the model, with the reason."""
        return self.root / "unprunable.json"

    # -- measurement caches (shared by the workers of one folder)
    @property
    def latency_cache(self) -> Path:
        return self.root / "latency_cache.sqlite"

    def predictor(self, profile_key: str) -> Path:
        """Calibration points of the latency predictor (measure/predictor.py) for one profile."""
        return self.root / "predictor" / f"{profile_key}.json"

    def staircases(self, fingerprint_key: str) -> Path:
        """Latency staircases of one device fingerprint (measure/staircase.py)."""
        return self.root / "staircases" / f"{fingerprint_key}.json"

    @property
    def allowed_widths(self) -> Path:
        """The learned widths per group this run's search uses, pinned by the first measurement."""
        return self.root / "staircases" / "allowed_widths.json"

    # -- trials and the final stage
    def trial(self, number: int) -> TrialFiles:
        return TrialFiles(self.root / "trials" / f"{number:05d}")

    @property
    def final_json(self) -> Path:
        return self.root / "final.json"

    # -- results
    @property
    def pareto_dir(self) -> Path:
        return self.root / "pareto"

    @property
    def pareto_json(self) -> Path:
        return self.root / "pareto.json"

    @property
    def pareto_csv(self) -> Path:
        return self.root / "pareto.csv"

    @property
    def pareto_png(self) -> Path:
        return self.root / "pareto.png"

    @property
    def pareto_html(self) -> Path:
        return self.root / "pareto.html"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def remeasure_dir(self) -> Path:
        return self.root / "remeasure"

    def remeasure(self, profile_name: str) -> Path:
        return self.remeasure_dir / f"{profile_name}.json"

    # -- deployment
    @property
    def picked(self) -> Path:
        return self.root / "picked"

    def export(self, number: int) -> Path:
        return self.root / "export" / f"trial_{number:05d}"

    # -- what the search itself writes and reads back
    @property
    def front_journal(self) -> Path:
        """The rows of ``pareto/`` inside it, written before the folder is swapped in and removed
        once ``pareto.json`` holds them: a search killed between the two leaves readers the rows
        that match the folder (``results.front.load_front`` prefers this file)."""
        return self.pareto_dir / ".pareto.json"

    def own_entries(self) -> frozenset[str]:
        """Top-level names the search writes and reads back (study, locks, dense model, caches,
        trials, final stage, front, report, re-measures). No ``--dest`` may replace them or lie
        inside them; ``picked/`` and ``export/`` are outputs that pick/export may replace."""
        paths = (self.study_db, self.lock, self.prepare_lock, self.export_lock, self.log, self.base_model, self.dense_json,
                 self.dense_onnx, self.sensitivity, self.flops_savings, self.latency_cache, self.predictor("x"),
                 self.staircases("x"),
                 self.trial(0).root, self.final_json, self.proxy_fidelity, self.budget_calibration, self.unprunable,
                 self.pareto_dir, self.pareto_json, self.pareto_csv,
                 self.pareto_png, self.pareto_html, self.report_html, self.remeasure_dir)
        return frozenset(p.relative_to(self.root).parts[0] for p in paths)


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
def file_lock(path: Path) -> Iterator[None]:
    """Blocking exclusive lock: the first worker trains/measures the dense model, the others wait
    and then load its ``base_model.pt`` / ``dense.json`` from the shared run folder. The lock
    file is gone once released (see :func:`lock_path` for why that is safe)."""
    fh = lock_path(path)
    assert fh is not None
    try:
        yield
    finally:
        unlock_path(path, fh)


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


#: Name of the list of files autoprune wrote into a folder, inside that folder's own record
#: (a bundle's model_card.json, an export's metadata.json): what a later pick/export may replace.
WRITTEN_KEY = "written_files"


def folder_entries(folder: Path) -> list[str]:
    """Every file, link and empty folder under ``folder``, as sorted paths relative to it
    (links are entries, never followed)."""
    out: list[str] = []
    for dirpath, dirs, files in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        for d in list(dirs):
            full = Path(dirpath) / d
            if full.is_symlink() or not any(full.iterdir()):
                out.append(str(rel / d))
        out.extend(str(rel / f) for f in files)
    return sorted(out)


def read_record(folder: Path, marker: str, schema_check: Callable[[Any], bool]) -> Optional[dict[str, Any]]:
    """``folder/marker`` as a dict if it is autoprune's own record (``schema_check`` says so), else None."""
    import json

    path = folder / marker
    if path.is_symlink() or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and schema_check(obj) else None


def replaceable_dir(dest: Path, run: RunFolder, marker: str, what: str, option: str,
                    recorded: Callable[[Path], Optional[set[str]]]) -> Path:
    """``dest`` (absolute, links resolved) if a new ``what`` may replace it as a whole, else a
    ConfigError naming the way out.

    Replacing removes what was there, so ``dest`` must not be the run folder or hold it, must not
    lie inside the run's own files (``pareto/``, ``trials/``, ...; see
    :meth:`RunFolder.own_entries`), and, if it is a non-empty folder, must be a previous
    ``what`` holding nothing but what autoprune wrote there: ``recorded(folder)`` gives the files
    its record (``marker``) lists, or None when ``marker`` is not autoprune's. A file with the
    marker's name is not enough (a user's project may have a ``model_card.json``), and a file the
    user added to a bundle is never removed: such a folder is refused, naming the files.
    """
    given = Path(dest)
    real = given.expanduser().resolve()
    root = run.root.resolve()
    if real == root or root.is_relative_to(real):
        raise ConfigError(f"{given}: {option} is the run folder {run.root} or holds it, and would be replaced; "
                          f"pass a new folder, e.g. {run.picked if what == 'bundle' else run.root / 'export'}")
    if real.is_relative_to(root):
        top = real.relative_to(root).parts[0]
        if top in run.own_entries():
            raise ConfigError(f"{given}: {option} lies in the run's own {top!r}, which the search reads back; "
                              f"pass a folder outside it")
    if given.exists() and not given.is_dir():
        raise ConfigError(f"{given}: {option} names a file, not a folder; pass a folder for the {what}")
    if given.is_dir():
        entries = folder_entries(given)
        if entries:
            ours = recorded(given)
            if ours is None:
                raise ConfigError(f"{given}: {option} is a non-empty folder that is not a previous {what} (no {marker} "
                                  f"written by autoprune); it would be replaced as a whole, so pass a new or empty folder")
            extra = [e for e in entries if e not in ours]
            if extra:
                shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                raise ConfigError(f"{given}: {option} is a previous {what}, but it also holds files autoprune did not write "
                                  f"({shown}); move them out or pass a new folder: replacing the {what} would delete them")
    return real
