"""The run folder: where every file of a search lives, and how files are written there.

Multi-file and single-file outputs are written beside their destination and swapped in with a
rename, so a killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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

    def written_in_place(self, local_study: bool) -> list[Path]:
        """What a search opens for writing where it is (databases, lock files) or creates files in
        (folders): a read-only one must stop the search before it trains (see writable_paths).
        ``local_study``: the study is this folder's SQLite ``study.db``."""
        files = [self.lock, self.prepare_lock, self.export_lock, self.latency_cache]
        folders = [self.trial(0).root.parent, self.dense_onnx.parent, self.lut("x").parent, self.pareto_dir]
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

    # -- measurement caches (shared by the workers of one folder)
    @property
    def latency_cache(self) -> Path:
        return self.root / "latency_cache.sqlite"

    def lut(self, profile_key: str) -> Path:
        return self.root / "lut" / f"{profile_key}.json"

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
