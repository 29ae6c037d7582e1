"""``autoprune search --workers N``: N worker processes on one study, on this machine.

Nothing new coordinates them: each worker is an ordinary worker of the study (``workers.work``:
the study-wide slot lock, heartbeats, retries, seeds ``search.seed + k``), on the run folder's
SQLite study (or the ``--storage`` one). What this module adds is the part a user would
otherwise script by hand:

* the dense model is trained, scanned and measured **once**, by the parent, before any worker
  starts (the workers load ``base_model.pt``, ``dense.json`` and the scans from the run folder);
* each worker gets its own GPU (``CUDA_VISIBLE_DEVICES``) when training on CUDA, and its own
  share of the CPU cores (``os.sched_setaffinity`` to disjoint cores, ``train.threads`` = its
  share): torch processes left alone each use every core, and three of them on two cores made a
  40-step fine-tune 20x slower. Disjoint cores also keep one worker's training off the cores
  where another times latency;
* Ctrl-C (or SIGINT/SIGTERM to the parent alone) stops every worker the way it stops one: the
  parent passes the signal on, the trial in flight is re-queued and the same command resumes; a worker that crashes is reported with its exit
  code and last error while the others go on (its trial is taken over after the heartbeat
  grace period).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna

from autoprune.config import RunConfig
from autoprune.errors import AutopruneError
from autoprune.files import file_lock
from autoprune.runfolder import RunFolder
from autoprune.runlog import library_log
from autoprune.study.context import prepare
from autoprune.study.study import open_study, optimize
from autoprune.train.device import available_cores, cuda_count, resolve_device

#: Seconds the parent waits for workers to re-queue their trials after Ctrl-C before ending them.
STOP_GRACE_S = 60.0
POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSlot:
    """What one worker process may use: a GPU (its ``CUDA_VISIBLE_DEVICES``), CPU cores, threads."""

    index: int
    gpu: Optional[str] = None
    cores: Optional[tuple[int, ...]] = None
    threads: int = 1

    def describe(self) -> str:
        where = [f"GPU {self.gpu}"] if self.gpu is not None else []
        if self.cores:
            where.append(f"cores {_ranges(self.cores)}")
        where.append(f"{self.threads} thread(s)")
        return f"worker {self.index} ({', '.join(where)})"


def plan_slots(n: int, train_device: str, threads: Optional[int] = None, cores: Optional[list[int]] = None,
               gpus: Optional[list[str]] = None) -> list[WorkerSlot]:
    """Share this machine among ``n`` workers.

    GPUs (``train.device`` auto with a GPU, or ``cuda``): worker *i* gets visible GPU *i mod G*
    (several workers per GPU when ``n`` > G). ``cuda:K`` pins every worker to GPU K. CPU cores:
    ``n`` disjoint slices of this process's cores (none when there are fewer cores than
    workers), threads = the slice's size unless ``train.threads`` says otherwise."""
    cores = available_cores() if cores is None else cores
    if gpus is None:
        gpus = _visible_gpus() if train_device in ("auto", "cuda") and resolve_device(train_device).type == "cuda" else []
    per = len(cores) // n if n <= len(cores) else 0
    slots = []
    for i in range(n):
        mine = tuple(cores[i * per:(i + 1) * per]) if per else None
        slots.append(WorkerSlot(i, gpus[i % len(gpus)] if gpus else None, mine, threads or max(1, per)))
    return slots


def _visible_gpus() -> list[str]:
    """The GPU ids a child may be given in ``CUDA_VISIBLE_DEVICES``: the parent's own list when it
    has one (ids or UUIDs), else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(cuda_count())]


def _ranges(values: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) → '0-2,5'."""
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + (None,):  # type: ignore[operator]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def worker_config(cfg: RunConfig, slot: WorkerSlot, storage: str) -> RunConfig:
    """The run config one worker runs: the study's storage, its share of the machine. A worker
    given a GPU sees only that one, so it trains on ``cuda`` (its cuda:0)."""
    train = {"threads": slot.threads, **({"device": "cuda"} if slot.gpu is not None else {})}
    search = {"storage": storage, "study_name": cfg.search.study_name or "autoprune"}
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train),
                                  "search": cfg.search.model_copy(update=search)})


# --------------------------------------------------------------------------- the worker process
def _worker_main(cfg_json: dict[str, Any], trust_pickle: bool, slot: WorkerSlot, conn: Any, optuna_verbosity: int) -> None:
    """A worker process (spawned): pin itself, then run trials until the study is full.
    Its last error goes to the parent through ``conn``; exit code 0 done, 2 an AutopruneError,
    130 interrupted, 1 anything else."""
    if slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu  # before anything touches CUDA in this process
    if slot.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, slot.cores)
    code = 0
    try:
        cfg = RunConfig.model_validate({**cfg_json, "trust_pickle": trust_pickle})
        optuna.logging.set_verbosity(optuna_verbosity)  # the parent's (the CLI keeps Optuna's INFO off)
        with library_log(RunFolder(Path(cfg.out)).log):
            with file_lock(RunFolder(Path(cfg.out)).prepare_lock):
                ctx = prepare(cfg)  # loads what the parent prepared: no training here
            optimize(ctx, open_study(ctx))
    except KeyboardInterrupt:
        code = 130
    except AutopruneError as exc:
        conn.send(str(exc))
        code = 2
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which shows it
        conn.send(f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
        code = 1
    finally:
        conn.close()
    # sys.exit, not os._exit: multiprocessing's bootstrap then runs its finalizers, which unlink
    # the POSIX semaphores this process made (tqdm creates a multiprocessing lock the first time
    # a progress bar appears, e.g. inside torch.onnx's dynamo export). os._exit skipped them and
    # the parent's resource tracker reported "leaked semaphore objects" at the end of every
    # --workers search. A spawned child inherits no atexit handlers of the parent, and autoprune
    # registers none, so a normal exit touches nothing in the run folder.
    sys.exit(code)


# --------------------------------------------------------------------------- the parent
@dataclass
class WorkerOutcome:
    slot: WorkerSlot
    exitcode: Optional[int]
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.exitcode not in (0, 130)

    def describe(self) -> str:
        code = self.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"{self.slot.describe()} {how}" + (f": {self.message.strip()}" if self.message else "")


class WorkersFailed(AutopruneError, RuntimeError):
    """Every worker process of ``--workers N`` stopped with an error; the message lists them."""


def run_workers(cfg: RunConfig, slots: list[WorkerSlot], storage: str, tick: Callable[[], None] = lambda: None,
                report: Callable[[str], None] = print) -> list[WorkerOutcome]:
    """Start one process per slot on the study at ``storage`` and wait for all of them, calling
    ``tick`` about once a second (progress). A crashed worker is reported through ``report`` at
    once; the others go on. Ctrl-C / SIGTERM: every worker stops cleanly (its trial re-queued),
    then KeyboardInterrupt is raised here."""
    spawn = mp.get_context("spawn")  # a fresh interpreter: CUDA and thread settings start clean
    procs: list[tuple[WorkerSlot, Any, Any]] = []
    outcomes: dict[int, WorkerOutcome] = {}
    with _sigterm_as_interrupt():
        try:
            for slot in slots:
                recv, send = spawn.Pipe(duplex=False)
                # trust_pickle is left out of config dumps (a run folder never grants it): passed alone.
                wcfg = worker_config(cfg, slot, storage).model_dump(mode="json")
                p = spawn.Process(target=_worker_main, args=(wcfg, cfg.trust_pickle, slot, send, optuna.logging.get_verbosity()),
                                  name=f"autoprune-worker-{slot.index}", daemon=False)
                p.start()
                send.close()
                procs.append((slot, p, recv))
                report(f"started {slot.describe()} as pid {p.pid}")
            while len(outcomes) < len(procs):
                for slot, p, recv in procs:
                    if slot.index in outcomes or p.is_alive():
                        continue
                    p.join()
                    out = WorkerOutcome(slot, p.exitcode, _last_message(recv))
                    outcomes[slot.index] = out
                    if out.failed:
                        report(f"[red]{out.describe()}")
                tick()
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            _stop(procs)
            raise
    tick()
    return [outcomes[s.index] for s in slots]


def _last_message(recv: Any) -> str:
    msg = ""
    with contextlib.suppress(EOFError, OSError):
        while recv.poll():
            msg = recv.recv()
    return msg


def _stop(procs: list[tuple[WorkerSlot, Any, Any]]) -> None:
    """Stop every worker the way one search stops: its trial re-queued, then exit.

    The signal is passed on at once: SIGTERM or SIGINT sent to the parent alone (``kill``, a
    scheduler) reached no worker. Ctrl-C in a terminal reached every worker already (one process
    group); the second signal arrives within a moment and a worker ignores it
    (``workers.REPEAT_IGNORE_S``), so its re-queue is not cut short. Workers still running after
    :data:`STOP_GRACE_S` get SIGTERM again, then SIGKILL."""
    for _, p, _ in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker's own handler re-queues its trial
    deadline = time.monotonic() + STOP_GRACE_S
    for _, p, _ in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for _, p, _ in procs:
        if p.is_alive():
            p.terminate()
            p.join(30)
        if p.is_alive():
            p.kill()
            p.join(5)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """``kill <parent>`` (SIGTERM, what schedulers send) stops the workers like Ctrl-C does; the
    list yielded holds the SIGTERM once received (then the workers did not get it themselves)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, old)
