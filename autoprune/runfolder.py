"""[from autoprune.search]
The search: an Optuna multi-objective study over per-group sparsity ratios (and methods).

Each trial: copy the dense model → prune → export ONNX → measure latency on the profile's
backend → (only if within the latency budget) short distilled fine-tune → held-out accuracy.
Objectives are (maximize accuracy, minimize median latency); FLOPs, params and sizes are user
attributes; budgets are Optuna constraints set with ``trial.set_constraint``.

The study lives in SQLite inside the run folder unless ``storage`` names another Optuna
storage (e.g. PostgreSQL for several workers). Re-running the same command resumes it.

[from autoprune.workers]
Searches that survive: several workers on one study, dead workers, crashing trials, Ctrl-C.

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
  The SQL transactions of Optuna's storage mean a SIGKILL leaves no half-written rows.
* **Crashing trials** (export error, out-of-memory, NaN loss, backend failure) are recorded as
  FAIL with ``fail_reason`` and the search goes on. A full disk stops the search with a clear
  error instead: every following trial would fail the same way. Ctrl-C (or SIGTERM) marks the
  trial in flight FAIL, re-queues its parameters and leaves a study that the same command resumes.
* **Same base model everywhere.** Workers that do not share the run folder train their own dense
  model; the study stores the dense weights' hash and refuses a worker whose model differs.
* **Reproducibility.** The sampler of the *k*-th worker session of a study is seeded with
  ``search.seed + k``: one fresh worker with a given config and seed replays the same trial
  sequence, while concurrent workers (and resumed sessions) do not redraw each other's points.

[from autoprune.export]
Export: PyTorch → ONNX (what every backend reads) → OpenVINO IR (what OpenVINO deploys).
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
