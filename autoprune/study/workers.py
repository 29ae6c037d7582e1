"""Searches that survive: several workers on one study, dead workers, crashing trials, Ctrl-C.

One study (Optuna RDB storage: SQLite for one machine, PostgreSQL for several) is shared by any
number of ``autoprune search`` processes. This module holds what makes that safe:

* **Exactly ``trials`` complete trials.** Optuna's ``MaxTrialsCallback`` stops a worker only
  *after* a trial, so two workers that each see ``N-1`` complete trials both start one and the
  study ends with ``N+1``. Here a worker starts a trial only while *complete + running < N*, and
  that check and the trial's creation happen under a study-wide lock (a PostgreSQL advisory
  lock, released by the server if the worker dies; a file lock for SQLite).
* **Dead workers.** Every running trial sends heartbeats (Optuna RDB heartbeat). A trial whose
  heartbeat is older than ``search.grace_period`` belongs to a killed worker: it is marked FAIL
  with a ``fail_reason`` and its parameters are re-queued, at most ``search.max_retries`` times.
* **Crashing trials** (export error, out-of-memory, NaN loss, backend failure) are recorded as
  FAIL with ``fail_reason`` and the search goes on. A full disk stops the search with a clear
  error instead: every following trial would fail the same way. Ctrl-C (or SIGTERM) marks the
  trial in flight FAIL, re-queues its parameters and leaves a study that the same command resumes.
* **Reproducibility.** The sampler of the *k*-th worker session of a study is seeded with
  ``search.seed + k``: one fresh worker with a given config and seed replays the same trial
  sequence, while concurrent workers (and resumed sessions) do not redraw each other's points.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna
from optuna.trial import TrialState

from autoprune.config import SearchSettings
from autoprune.errors import ConfigError, DiskFullError
from autoprune.study.storage import fail_running_trial, heartbeat_dead_trial_ids, sqlalchemy_url, trial_store

log = logging.getLogger("autoprune")

#: A worker gives up after this many failed trials in a row: the cause is then not the trial's
#: parameters but the setup (a broken backend, a bad config), and looping would only burn time.
MAX_CONSECUTIVE_FAILURES = 10
POLL_S = 1.0


# --------------------------------------------------------------------------- study-wide lock
class SlotLock:
    """Serialises "may I start a trial?" + trial creation across all workers of a study.

    PostgreSQL: a session advisory lock on a dedicated connection (the server releases it when a
    worker dies, even by SIGKILL). SQLite: ``fcntl`` lock next to the database file. Other
    storages: no lock (the study may then end with up to one extra trial per worker).

    The PostgreSQL connection comes from an engine of our own on the study's URL (plain
    SQLAlchemy), not from Optuna's storage, whose engine is reachable only through private
    attributes of the study.
    """

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        self._held = False
        self._engine: Any = None
        self._conn: Any = None
        self._fh: Any = None
        self._key = int.from_bytes(hashlib.sha256(f"autoprune:{name}".encode()).digest()[:8], "big", signed=True)
        if sqlalchemy_url(url).startswith("postgresql"):
            # One connection held for the worker's life; no pool keeping others open.
            self._engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        elif url.startswith("sqlite:///"):
            db = Path(url[len("sqlite:///"):])
            self._fh = open(db.with_name(db.name + f".{hashlib.sha256(name.encode()).hexdigest()[:8]}.lock"), "a")

    def acquire(self) -> None:
        import sqlalchemy

        if self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        elif self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        import sqlalchemy

        self._held = False
        if self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        elif self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._engine.dispose()
        if self._fh is not None:
            self._fh.close()


# --------------------------------------------------------------------------- retries
def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial, max_retries: int, reason: str,
            count: bool = True) -> bool:
    """Enqueue ``trial``'s parameters again (only parameters: no metrics of the dead attempt).

    ``retry_history`` lists the trial numbers that ran these parameters before; ``count=False``
    (Ctrl-C, disk full) re-queues without using up a retry, since the parameters are not at fault.
    ``trial`` may be the live trial of this process or a frozen one (both have public
    ``params``, ``user_attrs``, ``number``).

    Not Optuna's ``RetryHeartbeatStaleTrialCallback`` (formerly ``RetryFailedTrialCallback``):
    it copies every user attribute of the dead attempt (its partial metrics, its
    ``fail_reason``) into the retry, keeps its retry history in system attributes, and only
    counts heartbeat deaths, while these retries also come from restarts and Ctrl-C and share
    one cap (``search.max_retries``) through the ``retry_history`` user attribute.
    """
    history = list(trial.user_attrs.get("retry_history", []))
    if count:
        history.append(trial.number)
        if len(history) > max_retries:
            return False
    study.enqueue_trial(trial.params, user_attrs={"retry_history": history, "retry_of": trial.number, "retry_reason": reason})
    return True


def fail_dead_trials(study: optuna.Study, max_retries: int) -> list[int]:
    """Mark RUNNING trials whose worker is gone FAIL (reason recorded first, while the trial is
    still writable) and re-queue their parameters; the numbers of the trials failed here.
    Called with the slot lock held.

    Gone: heartbeat older than the grace period, or no heartbeat at all although started long
    ago (see :func:`autoprune.study.storage.heartbeat_dead_trial_ids`). Optuna's public
    ``fail_stale_trials`` (which ``study.optimize`` also runs before each trial) cannot be used
    here: it fails the trials before anyone can record why, and skips the silent ones.
    """
    rdb = trial_store(study)
    if not isinstance(rdb, optuna.storages.RDBStorage) or rdb.get_heartbeat_interval() is None:
        return []
    grace = rdb.grace_period or 2 * rdb.get_heartbeat_interval()
    limit = 2 * grace + 10  # a silent trial: margin for clock skew between workers
    study_id = rdb.get_study_id_from_name(study.study_name)
    old = [rdb.get_trial_id_from_study_id_trial_number(study_id, t.number)
           for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and (datetime.now() - t.datetime_start).total_seconds() > limit]
    reason = f"worker stopped sending heartbeats for over {grace}s (killed or lost its connection)"
    failed = []
    for tid in heartbeat_dead_trial_ids(rdb, study_id, old):
        number = rdb.get_trial(tid).number
        if not fail_running_trial(study, number, reason):
            continue  # finished meanwhile (a slow worker came back)
        requeue(study, rdb.get_trial(tid), max_retries, reason)
        failed.append(number)
    return failed


# --------------------------------------------------------------------------- one trial
def _is_disk_full(exc: BaseException) -> Optional[OSError]:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class _Objective:
    """Wraps ``run_trial``: releases the slot lock once the trial exists, records why a trial
    failed (user attr ``fail_reason``), rejects non-finite objectives, and on Ctrl-C / disk full
    re-queues the trial's parameters so that a resumed search redoes it."""

    def __init__(self, run_trial: Callable[[optuna.trial.Trial], tuple[float, float]], lock: SlotLock, max_retries: int) -> None:
        self.run_trial = run_trial
        self.lock = lock
        self.max_retries = max_retries
        self.disk_full: Optional[tuple[int, OSError]] = None
        self.last_trial: Optional[int] = None

    def __call__(self, trial: optuna.trial.Trial) -> tuple[float, float]:
        self.lock.release()
        self.last_trial = trial.number
        with contextlib.suppress(Exception):
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            values = self.run_trial(trial)
            if _interrupt_requested.is_set():  # the KeyboardInterrupt itself was swallowed
                raise KeyboardInterrupt("interrupted during the trial")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"objective values are not finite: accuracy, latency_ms = {values}")
            return values
        except optuna.TrialPruned:
            raise  # not a failure: e.g. a duplicate architecture (search.run_trial)
        except KeyboardInterrupt:
            self._record(trial, "interrupted (Ctrl-C / SIGTERM); parameters re-queued")
            with contextlib.suppress(Exception):
                requeue(trial.study, trial, self.max_retries, "interrupted", count=False)
            raise
        except Exception as exc:
            full = _is_disk_full(exc)
            if full is not None:
                self.disk_full = (trial.number, full)
                self._record(trial, f"disk full: {full}")
                with contextlib.suppress(Exception):
                    requeue(trial.study, trial, self.max_retries, "disk full", count=False)
            else:
                self._record(trial, f"{type(exc).__name__}: {exc}")
            raise

    @staticmethod
    def _record(trial: optuna.trial.Trial, reason: str) -> None:
        with contextlib.suppress(Exception):  # the storage itself may be what failed
            trial.set_user_attr("fail_reason", reason[:2000])


#: Set by the signal handler below: Python drops a KeyboardInterrupt raised while a weakref
#: callback or ``__del__`` runs (it prints "Exception ignored in ..."), so the request is also
#: remembered here and honoured when the trial function returns.
_interrupt_requested = threading.Event()
#: A second signal this soon after the first is the same request arriving twice (Ctrl-C reaches a
#: ``--workers`` child from the terminal and again from its parent): ignored, so it cannot cut the
#: re-queue of the trial in flight short. A later one interrupts again (a user insisting).
REPEAT_IGNORE_S = 5.0


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """Ctrl-C (SIGINT) and ``kill <pid>`` (SIGTERM, what schedulers send) end a worker cleanly:
    the trial in flight is FAIL 'interrupted' and its parameters are re-queued."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first: list[float] = []

    def handler(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if first and now - first[0] < REPEAT_IGNORE_S:
            return
        first[:] = [now]
        _interrupt_requested.set()
        raise KeyboardInterrupt(f"signal {signum}")

    _interrupt_requested.clear()
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# --------------------------------------------------------------------------- the loop
def _register_session(study: optuna.Study, lock: SlotLock, setup: Optional[Callable[[], None]] = None) -> int:
    """Record this worker session in the study; returns its index *k* (0 for the first).
    ``setup`` (enqueueing the seed trials of a fresh study) runs under the same lock, so workers
    starting together do not enqueue the seeds once each."""
    lock.acquire()
    try:
        if setup is not None:
            setup()
        sessions = list(study.user_attrs.get("sessions", []))
        sessions.append({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        study.set_user_attr("sessions", sessions)
        return len(sessions) - 1
    finally:
        lock.release()


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _trial_numbered(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number`` of ``study`` as stored now (public API: one read of the study's trials)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def work(
    study: optuna.Study,
    url: str,
    name: str,
    s: SearchSettings,
    run_trial: Callable[[optuna.trial.Trial], tuple[float, float]],
    make_sampler: Callable[[int], optuna.samplers.BaseSampler],
    out: Path,
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]],
    setup: Optional[Callable[[], None]] = None,
) -> None:
    """Run trials until the study holds ``s.trials`` COMPLETE trials, counting every worker's."""
    lock = SlotLock(url, name)
    try:
        k = _register_session(study, lock, setup)
        study.sampler = make_sampler(s.seed + k)
        objective = _Objective(run_trial, lock, s.max_retries)
        t0 = time.monotonic()
        fails_in_row = 0
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with _signals_as_interrupt():
            while True:
                if _interrupt_requested.is_set():  # swallowed between trials
                    raise KeyboardInterrupt("interrupted")
                if s.timeout_s is not None and time.monotonic() - t0 > s.timeout_s:
                    return
                lock.acquire()
                try:
                    fail_dead_trials(study, s.max_retries)
                    done = count(study, TrialState.COMPLETE)
                    if done >= s.trials:
                        return
                    busy = count(study, TrialState.RUNNING)
                    if done + busy >= s.trials:
                        # Others' running trials may fill the study; wait in case one fails or dies.
                        lock.release()
                        time.sleep(POLL_S)
                        continue
                    before = objective.last_trial
                    try:
                        study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(Exception,), gc_after_trial=True)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        # Our trial was declared dead (heartbeats lost) and retried elsewhere.
                        log.warning("a trial of this worker was taken over by another worker after missed heartbeats")
                finally:
                    lock.release()
                if objective.disk_full is not None:
                    n, exc = objective.disk_full
                    raise DiskFullError(
                        f"disk full while trial {n} wrote its files ({exc}). The study is intact and trial {n}'s "
                        f"parameters are re-queued: free space under {out} and run the same command again to resume."
                    )
                if objective.last_trial == before:
                    continue
                t = _trial_numbered(study, objective.last_trial)
                fails_in_row = fails_in_row + 1 if t.state == TrialState.FAIL else 0
                if fails_in_row >= MAX_CONSECUTIVE_FAILURES:
                    raise ConfigError(
                        f"{fails_in_row} trials failed in a row; last reason: {t.user_attrs.get('fail_reason', '?')}. "
                        "Fix the cause (see each trial's fail_reason) and run the same command again to resume."
                    )
    finally:
        lock.close()
