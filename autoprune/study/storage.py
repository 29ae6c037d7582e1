"""Where a study lives: Optuna RDB storages (SQLite in the run folder, PostgreSQL for workers).

Opening a storage (driver selection, heartbeats), refusing files that are not studies, keeping
passwords out of anything written or printed, and the dense model's weights hash that every
worker of a study must share.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
import torch.nn as nn
from optuna.trial import TrialState

from autoprune.config import SearchSettings
from autoprune.errors import ConfigError
from autoprune.runfolder import RunFolder
from autoprune.train.checkpoint import weights_hash


# --------------------------------------------------------------------------- storage
def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` → the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; autoprune's ``postgres`` extra
    installs psycopg2-binary, so pick whichever driver can be imported.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            for module, dialect in (("psycopg2", "postgresql+psycopg2://"), ("psycopg", "postgresql+psycopg://")):
                try:
                    __import__(module)
                    return dialect + rest
                except ImportError:
                    continue
            raise ConfigError(
                f"storage {redact_url(url)}: no PostgreSQL driver installed; run pip install 'autoprune[postgres]' "
                "(psycopg2-binary)"
            )
    return url


#: What a run folder is good for when its study.db is lost or unreadable (tested claim by claim
#: in tests/e2e/test_nothing_lost.py): the exported front is self-contained, the rest needs the study.
WITHOUT_STUDY = (
    "it is corrupt or not a study, and only a backup of it brings the study back. Without it, 'autoprune pick' "
    "and 'autoprune remeasure' still work (they read pareto.json) and each pareto/trial_NNNNN folder holds "
    "complete deploy files; resuming the search, 'autoprune export --trial' and 'autoprune report' need the study. "
    "Start a new search with another --out."
)


def refuse_results_without_study(run: RunFolder) -> None:
    """Stop a search that would start a new study over an earlier one's results.

    A missing, empty (0-byte) or unfinished (:func:`_unfinished_study_file`) ``study.db`` means a
    new study, whose trial 0 would overwrite ``trials/00000/`` and whose export would replace
    ``pareto/`` and ``pareto.json``. That is
    right for a fresh folder, or one whose search died before its first trial (only
    ``base_model.pt`` / ``dense.json``: those are reused), and wrong when trials or a front are
    there: their study was deleted or truncated. Checked before anything is written.
    """
    db = run.study_db
    if db.is_file() and db.stat().st_size > 0 and not _unfinished_study_file(db):
        return
    trials_dir = run.trial(0).root.parent
    found = [p.name + ("/" if p.is_dir() else "") for p in (trials_dir, run.pareto_dir, run.pareto_json, run.final_json)
             if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if found:
        state = ("holds no study (its creation was interrupted)" if _unfinished_study_file(db) else "is empty (0 bytes)") \
            if db.is_file() else "is missing"
        raise ConfigError(
            f"{db}: {state} but the folder holds an earlier search's results ({', '.join(found)}), which a new study "
            f"would overwrite; restore study.db from a backup, or use another --out"
        )


#: The tables of an Optuna RDB storage (and Alembic's version table).
OPTUNA_TABLES = frozenset({
    "studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
    "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
    "trial_intermediate_values", "trial_heartbeats", "version_info", "alembic_version",
})


def _unfinished_schema(con: Any, tables: set[str]) -> bool:
    """Optuna creates its tables and their indexes one statement at a time (SQLite commits each)
    and writes its version row after the last: tables that are all Optuna's, all empty, without
    that row, are what a search killed during the creation leaves. Optuna would add the missing
    tables but not the missing indexes of the others (without the unique index on study names a
    resume creates a second study of the same name), so such a file is discarded, not resumed."""
    if not tables or not tables <= OPTUNA_TABLES:
        return False
    if "version_info" in tables and con.execute("SELECT COUNT(*) FROM version_info").fetchone()[0]:
        return False
    return not any(con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)


def _sqlite_state(path: Path) -> tuple[set[str], bool]:
    """(tables, unfinished Optuna schema) of an SQLite file; raises sqlite3.DatabaseError.

    Read-only, unless a process was killed in the middle of a transaction that had begun to
    change the file: then SQLite must roll its journal (``study.db-journal``) back before anyone
    reads, which a read-only connection cannot do ("attempt to write a readonly database"), and a
    read-write one does, as every SQLite client (Optuna's included) does when it opens the file."""
    import sqlite3

    for mode in ("ro", "rw"):
        try:
            con = sqlite3.connect(f"file:{path}?mode={mode}", uri=True)
            try:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                return tables, _unfinished_schema(con, tables)
            finally:
                con.close()
        except sqlite3.OperationalError:
            if mode == "rw" or not path.with_name(path.name + "-journal").is_file():
                raise
    raise AssertionError("unreachable")


def _unfinished_study_file(path: Path) -> bool:
    """Whether ``path`` is an SQLite file in which Optuna was killed while creating its tables
    (it holds no study: see :func:`_unfinished_schema`)."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        return _sqlite_state(path)[1]
    except sqlite3.DatabaseError:
        return False


def check_sqlite_file(path: Path, discard_unfinished: bool = False) -> None:
    """Refuse a corrupt file or another program's SQLite database before Optuna writes its tables
    into it (Optuna would silently add them to any SQLite database it is pointed at).

    An Optuna schema whose creation was interrupted is removed with ``discard_unfinished`` (the
    search, alone in its run folder under the run lock), so Optuna creates it whole; otherwise
    refused (another process may be creating it right now)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    import sqlite3

    try:
        tables, unfinished = _sqlite_state(path)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path}: not a readable SQLite database ({exc}); {WITHOUT_STUDY}") from None
    if unfinished:
        if discard_unfinished:
            for p in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
                p.unlink(missing_ok=True)
            return
        raise ConfigError(f"{path}: Optuna was stopped while creating this study file; it holds no study "
                          "(tables only, no rows). Delete it and start the search again.")
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise ConfigError(
            f"{path}: an SQLite database of another program (tables: {', '.join(sorted(tables)[:8])}), not an "
            "Optuna study; autoprune will not write into it. Use another --out or --storage."
        )


def make_storage(url: str, s: SearchSettings, stale_callback: Callable[..., None],
                 discard_unfinished: bool = False) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats, so the trials of killed workers are detected.
    ``discard_unfinished``: see :func:`check_sqlite_file` (only for the run folder's own study)."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        check_sqlite_file(Path(url[len("sqlite:///"):]), discard_unfinished)
        _create_schema_whole(Path(url[len("sqlite:///"):]))
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "postgres")):
        # Drop connections the server closed (restart, idle timeout) instead of failing a trial.
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            sqlalchemy_url(url),
            heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period,
            heartbeat_stale_trial_callback=stale_callback,
            engine_kwargs=engine_kwargs,
        )


def _create_schema_whole(path: Path) -> None:
    """Give a new SQLite study file Optuna's tables in one step: built in a file beside it, then
    linked into place (``os.link`` fails rather than replace a file another process made first).

    Optuna creates its tables one statement at a time (SQLAlchemy ``create_all``: look, then
    ``CREATE TABLE``). Any other process that opened the file meanwhile (``autoprune status``,
    optuna-dashboard, a test polling for the first trial) creates them too, and the search then
    stopped with "table studies already exists" or a UNIQUE failure on ``alembic_version``: 8
    of 10 creations raced by a polling reader failed. A file that exists already is left alone."""
    import os

    from sqlalchemy.pool import NullPool

    if path.exists() and path.stat().st_size > 0:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.unlink(missing_ok=True)
    try:
        rdb = optuna.storages.RDBStorage(sqlalchemy_url(f"sqlite:///{tmp}"), engine_kwargs={"poolclass": NullPool})
        rdb.remove_session()
        rdb.engine.dispose()
        try:
            os.link(tmp, path)
        except FileExistsError:
            if path.stat().st_size == 0:  # an empty file (a bare sqlite3.connect): nothing to keep
                os.replace(tmp, path)
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def redact_url(url: Optional[str]) -> Optional[str]:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db``: storage URLs end
    up in the study's stored config and in every exported model's metadata.json."""
    if not url or "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in cred else ''}@{host}"


def _redact_text(text: str, url: Optional[str]) -> str:
    """``text`` with ``url``'s password replaced by ``***``: database drivers quote the URL (or
    the password alone) in their error messages, which autoprune shows to the user."""
    if not url or "://" not in url or "@" not in url:
        return text
    cred = url.split("://", 1)[1].rsplit("@", 1)[0]
    password = cred.split(":", 1)[1] if ":" in cred else ""
    text = text.replace(url, redact_url(url) or "")
    return text.replace(password, "***") if password else text


def storage_error(exc: BaseException, url: str) -> str:
    """``Type: message`` of a driver's exception for a one-line ConfigError: whitespace collapsed
    (drivers add hint lines), cut to 300 characters, password redacted."""
    return f"{type(exc).__name__}: {_redact_text(' '.join(str(exc).split()), url)[:300]}"


def public_config(cfg: Any) -> dict[str, Any]:
    """``cfg.model_dump`` with the storage password removed."""
    d = cfg.model_dump(mode="json")
    d.get("search", {})["storage"] = redact_url(d.get("search", {}).get("storage"))
    return d


# --------------------------------------------------------------------------- Optuna internals
# The only two functions in autoprune that touch Optuna private names. Optuna has no public API
# for what they do; pyproject.toml pins optuna to the range they are tested with, and
# tests/study/test_optuna_internals.py fails loudly if a name they use disappears.
def trial_store(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage behind ``study`` (RDBStorage for ours), without Optuna's per-process cache.

    A worker must write ``fail_reason`` on a RUNNING trial that another, dead, process owns,
    before marking it FAIL (a finished trial is read-only), and read the heartbeat table. The
    public ``Study`` has no storage accessor and no way to set another trial's attributes
    (``study.tell`` fails a trial but records no reason; ``optuna.trial.Trial(study, id)`` runs
    the sampler's ``before_trial``). Private: ``Study._storage``, ``_CachedStorage._backend``.
    Everything done with the result uses public ``BaseStorage`` methods.
    """
    st = study._storage
    return getattr(st, "_backend", st)


def heartbeat_dead_trial_ids(rdb: optuna.storages.RDBStorage, study_id: int, started_long_ago: list[int]) -> list[int]:
    """Ids of the study's RUNNING trials whose worker is gone.

    Two kinds: heartbeat older than the grace period (Optuna's own check, which
    ``optuna.storages.fail_stale_trials`` runs but then fails the trials before anyone can
    record why), and those of ``started_long_ago`` that never recorded a heartbeat (their worker
    died between creating the trial and its first beat; Optuna's check skips them, and they
    would block the study forever, counted as running). Optuna exposes neither list. Private:
    ``RDBStorage._get_stale_trial_ids``, ``optuna.storages._rdb.models.TrialHeartbeatModel``
    (imported here, so that only this check, not ``import autoprune``, depends on it).
    """
    from optuna.storages._rdb import models

    stale = list(rdb._get_stale_trial_ids(study_id))
    if not started_long_ago:
        return stale
    session = rdb.scoped_session()
    try:
        silent = [tid for tid in started_long_ago if models.TrialHeartbeatModel.where_trial_id(tid, session) is None]
    finally:
        rdb.scoped_session.remove()
    return stale + [tid for tid in silent if tid not in stale]


def fail_running_trial(study: optuna.Study, number: int, reason: str) -> bool:
    """Record ``reason`` as trial ``number``'s ``fail_reason``, then mark it FAIL.

    For trials whose worker died: the reason goes first, while the trial is still writable;
    the state change goes through the public ``study.tell`` (the sampler sees the failure as
    for any failed trial). False when the trial finished meanwhile: another worker failed it,
    or its slow worker came back and completed it.
    """
    store = trial_store(study)
    tid = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study.study_name), number)
    try:
        store.set_trial_user_attr(tid, "fail_reason", reason)
        study.tell(number, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    except ValueError:  # "Cannot tell a COMPLETE trial": finished between the two calls
        if store.get_trial(tid).state.is_finished():
            return False
        raise
    return True


# --------------------------------------------------------------------------- base model
def check_base_model(study: optuna.Study, base: nn.Module, out: Path) -> str:
    """Store the dense model's hash in a new study; refuse a worker whose dense model differs."""
    h = weights_hash(base)  # the hash model files record too
    stored = study.user_attrs.get("base_model_sha256")
    if stored is None:
        study.set_user_attr("base_model_sha256", h)
    elif stored != h:
        raise ConfigError(
            f"{out / 'base_model.pt'}: this worker's dense model (weights hash {h}) is not the one the study was "
            f"started with ({stored}); trials would not be comparable. Share the run folder between workers, or copy "
            "base_model.pt from the first worker's run folder into this one (or pass the same checkpoint as --model)."
        )
    return h


def load_run_study(run_dir: Path, storage: Optional[str] = None, study_name: Optional[str] = None) -> optuna.Study:
    """Open the study of ``run_dir`` (its study.db, or ``storage`` for shared studies) read-mostly."""

    if storage is None:
        db = RunFolder(Path(run_dir)).study_db
        if not db.is_file():
            raise ConfigError(f"{run_dir}: no study.db; pass --storage (and --study-name) if the study lives in a database server")
        check_sqlite_file(db)
        storage = f"sqlite:///{db.resolve()}"
    shown = redact_url(storage)  # never print a password
    try:
        rdb = optuna.storages.RDBStorage(sqlalchemy_url(storage))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"storage {shown}: cannot open it ({storage_error(exc, storage)}). "
                          "Check the URL, that the server runs, and the user's rights.") from None
    name = study_name
    if name is None:  # the default name, else the only study there
        names = optuna.get_all_study_names(rdb)
        name = "autoprune" if "autoprune" in names or len(names) != 1 else names[0]
    try:
        return optuna.load_study(study_name=name, storage=rdb)
    except KeyError:
        names = optuna.get_all_study_names(rdb)
        raise ConfigError(f"storage {shown}: no study named {name!r} (studies there: {', '.join(names) or 'none'}); pass --study-name") from None


# --------------------------------------------------------------------------- run folder → study
def open_run_study(run_dir: Path, storage: Optional[str] = None, study_name: Optional[str] = None) -> Any:
    """Open the Optuna study of a run folder (its ``study.db``, or ``storage`` for shared
    PostgreSQL/MySQL studies). Read-only use: nothing here writes trials."""

    return load_run_study(Path(run_dir), storage, study_name)
