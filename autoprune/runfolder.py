"""The run folder: where every file of a search lives, and what may be written or replaced there.

:class:`RunFolder` names every path; nothing else joins file names itself. The checks here run
before a command writes: the run folder and the files a search opens must be writable
(:func:`writable_dir`, :func:`writable_paths`), and a folder that a command replaces as a whole
(:func:`replaceable_dir`) is never the run folder, a folder holding it, its own files, or a
user's non-empty folder. How files are written there (atomic writes, folder swaps, locks) is
:mod:`autoprune.files`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from autoprune.errors import ConfigError

__all__ = ["WRITTEN_KEY", "RunFolder", "TrialFiles", "folder_entries", "read_record", "replaceable_dir", "writable_dir",
           "writable_paths"]


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
