"""Several worker processes on one study in a real PostgreSQL server.

CI (.ci/run) starts a server on loopback and exports AUTOPRUNE_TEST_POSTGRES_URL; locally run
``export AUTOPRUNE_TEST_POSTGRES_URL="$(bash .ci/postgres.sh)"`` first, else these tests skip.
Workers are separate ``python -m autoprune.cli search`` processes sharing one run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest
import yaml
from conftest import FAST_EXTRAS
from optuna.trial import TrialState

PG_ENV = "AUTOPRUNE_TEST_POSTGRES_URL"

PROFILE = {"name": "ort-fast", "backend": "onnxruntime", "device": "cpu", "threads": 1, "warmup": 1,
           "repeats": 5, "target_rel_ci": None, "batch_size": 1}


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        msg = f"{PG_ENV} is not set: start a server with `export {PG_ENV}=\"$(bash .ci/postgres.sh)\"`"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run these tests: .ci/run starts the server)")
        pytest.skip(msg)
    return url


def _config(tmp: Path, out: Path, trials: int, finetune_steps: int = 3, **search) -> Path:
    prof = tmp / "profile.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    cfg = {
        "model": "demo", "data": "digits", "pretrain_steps": 20, "device_profile": str(prof), "out": str(out),
        "exporter": "torchscript", "finetune": {"steps": finetune_steps, "batch_size": 32},
        "search": {"trials": trials, "seed": 0, "heartbeat_interval": 1, "grace_period": 3, **search}, **FAST_EXTRAS,
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _worker(cfg: Path, url: str, name: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "autoprune.cli", "search", "--config", str(cfg), "--storage", url, "--study-name", name]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=cfg.parent, env=env)


def _study(url: str, name: str) -> optuna.Study:
    from autoprune.study.storage import sqlalchemy_url

    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(sqlalchemy_url(url)))


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p, log in zip(procs, logs):
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker timed out; log:\n{log.read_text()[-3000:]}")
        assert p.returncode == 0, f"worker exited {p.returncode}:\n{log.read_text()[-3000:]}"


def test_three_workers_share_one_study_exactly(tmp_path: Path, pg_url: str) -> None:
    """3 workers start together on an empty run folder: one dense model, N complete trials, no dupes;
    then any trial is rebuilt from its stored parameters and seed."""
    trials, name = 4, f"dist-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    cfg = _config(tmp_path, out, trials)
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [_worker(cfg, pg_url, name, log) for log in logs]
    _wait(procs, logs, timeout=240)

    study = _study(pg_url, name)
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    assert len(complete) == trials, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in all_trials]
    assert not [t for t in all_trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = [t.number for t in all_trials]
    assert sorted(numbers) == list(range(len(all_trials)))  # every trial exactly once
    # Different workers drew different points (session seeds seed+k), and the uniform seeds
    # were enqueued once, not once per worker.
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params)
    uniform = [t for t in all_trials if t.params and set(t.params.values()) == {0.25}]
    assert len(uniform) == 1
    sessions = study.user_attrs["sessions"]
    assert len(sessions) == 3 and len({s["pid"] for s in sessions}) == 3
    assert len({t.user_attrs["worker"] for t in complete}) >= 2, "only one worker ran trials"
    # The storage password is not stored in the study (nor, below, in exported metadata).
    secret = f":{urlsplit(pg_url).password}@"
    assert secret not in json.dumps(study.user_attrs)
    # One dense model for all (the others waited for the first and loaded it); its hash is stored.
    assert study.user_attrs["base_model_sha256"]
    for t in complete:
        assert (out / "trials" / f"{t.number:05d}" / "model.pt").is_file()

    # autoprune export --trial N: rebuild a fine-tuned trial's model from params + seed only.
    from autoprune.cli import main

    t = next(t for t in complete if t.user_attrs.get("finetune_steps"))
    (out / "trials" / f"{t.number:05d}" / "model.pt").unlink()
    dest = tmp_path / "exported"
    rc = main(["export", str(out), "--trial", str(t.number), "--storage", pg_url, "--study-name", name,
               "--dest", str(dest), "--tolerance", "1e-9"])
    assert rc == 0
    meta = yaml.safe_load((dest / "metadata.json").read_text())
    assert meta["source"] == "rebuilt from stored parameters"
    assert meta["check"]["accuracy"] == pytest.approx(t.values[0], abs=1e-9)
    assert meta["params"] == t.user_attrs["params"]
    assert (dest / "model.onnx").stat().st_size > 0 and (dest / "model.xml").is_file()
    assert secret not in (dest / "metadata.json").read_text()
    assert secret not in (out / "pareto.json").read_text() + "".join(p.read_text() for p in out.glob("pareto/*/metadata.json"))


def test_sigkilled_worker_trial_is_detected_and_retried(tmp_path: Path, pg_url: str) -> None:
    """SIGKILL a worker mid-trial; a second worker detects the dead trial by its stale heartbeat,
    records why it failed, re-runs its parameters, and completes the study with nothing lost."""
    trials, name = 2, f"kill-{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path, tmp_path / "run", trials, finetune_steps=30)
    log_a = tmp_path / "a.log"
    a = _worker(cfg, pg_url, name, log_a)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and a.poll() is None:
        time.sleep(0.3)
        try:
            running = _study(pg_url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # study not created yet
            continue
        if running:
            time.sleep(0.5)  # let it get into pruning / fine-tuning
            a.send_signal(signal.SIGKILL)
            killed = running[0]
    a.wait(30)
    assert killed is not None, f"no trial was seen RUNNING; log:\n{log_a.read_text()[-3000:]}"
    assert a.returncode == -signal.SIGKILL
    assert _study(pg_url, name).trials[killed.number].state == TrialState.RUNNING  # left behind

    log_b = tmp_path / "b.log"
    _wait([_worker(cfg, pg_url, name, log_b)], [log_b], timeout=180)

    study = _study(pg_url, name)
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    assert len(complete) == trials, [(t.number, t.state.name) for t in all_trials]
    dead = all_trials[killed.number]
    assert dead.state == TrialState.FAIL
    assert "heartbeat" in dead.user_attrs["fail_reason"]
    retries = [t for t in all_trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead.params and retries[0].user_attrs["retry_history"] == [killed.number]
    assert not [t for t in all_trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
