"""Faults a long search must survive (single machine, SQLite): crashing trials, Ctrl-C, a full
disk, corrupt / foreign / mismatched study files, and same-seed reproducibility."""

from __future__ import annotations

import contextlib
import errno
import json
import fcntl
import io
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import FAST_EXTRAS, sigint_as_from_a_terminal, still_running
from optuna.trial import TrialState
from rich.console import Console

from autoprune.api import run
from autoprune.config import RunConfig, validate
from autoprune.errors import ConfigError

PROFILE = {"name": "ort-fast", "backend": "onnxruntime", "device": "cpu", "threads": 1, "warmup": 1,
           "repeats": 5, "target_rel_ci": None, "batch_size": 1}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding only a trained dense model and its measurements: copying it lets each
    test skip the pre-training (trials are what is under test)."""
    from autoprune.study.context import prepare

    root = tmp_path_factory.mktemp("faults")
    (root / "profile.yaml").write_text(yaml.safe_dump(PROFILE))
    (root / "space.yaml").write_text(yaml.safe_dump({"name": "noseeds", "seed_uniform": []}))
    prepare(_cfg(root, root / "template", trials=1))
    return root


def _cfg(root: Path, out: Path, trials: int, template: Path | None = None, **over: Any) -> RunConfig:
    if template is not None and not out.exists():
        # base_model.pt, dense.json and whatever else prepare() caches (e.g. sensitivity.json)
        shutil.copytree(template / "template", out, ignore=shutil.ignore_patterns("*.lock", "study.db*"))
    data: dict[str, Any] = {
        "model": "demo", "data": "digits", "pretrain_steps": 20, "device_profile": str(root / "profile.yaml"),
        "out": str(out), "exporter": "torchscript", "finetune": {"steps": 2, "batch_size": 32},
        "search": {"trials": trials, "seed": 0}, **FAST_EXTRAS,
    }
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    return validate(RunConfig, data, "test")


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="autoprune", storage=f"sqlite:///{out / 'study.db'}").trials


def _fail_on_calls(monkeypatch: pytest.MonkeyPatch, faults: dict[int, BaseException]) -> None:
    """Make the n-th fine-tune call (1-based) raise ``faults[n]``; the others run for real."""
    import importlib

    search = importlib.import_module("autoprune.study.fidelity")
    real, calls = search.finetune, [0]

    def finetune(*a: Any, **k: Any) -> int:
        calls[0] += 1
        if calls[0] in faults:
            raise faults[calls[0]]
        return real(*a, **k)

    monkeypatch.setattr(search, "finetune", finetune)


def test_crashing_trials_are_recorded_and_ctrl_c_resumes(template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.errors import NonFiniteLoss

    out = template / "crash"
    cfg = _cfg(template, out, trials=2, template=template)
    _fail_on_calls(monkeypatch, {1: NonFiniteLoss("non-finite loss nan at fine-tune step 0"),
                                 2: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 4: KeyboardInterrupt()})
    console = Console(file=io.StringIO(), width=300)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, console=console, export=False)
    log = console.file.getvalue()
    assert "Resume with: autoprune search --out" in log

    ts = _trials(out)
    assert [t.state for t in ts[:4]] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert ts[0].user_attrs["fail_reason"].startswith("NonFiniteLoss: non-finite loss")
    assert ts[1].user_attrs["fail_reason"].startswith("OutOfMemoryError: CUDA out of memory")
    assert ts[3].user_attrs["fail_reason"].startswith("interrupted")
    waiting = [t for t in ts if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == 3  # the interrupted trial, re-queued
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    with open(out / ".lock", "w") as fh:  # the run lock was released
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)

    monkeypatch.undo()
    run(cfg, console=_quiet(), export=False)  # the same command resumes
    ts = _trials(out)
    assert [t.number for t in ts if t.state == TrialState.COMPLETE] == [2, 4]
    assert ts[4].params == ts[3].params and ts[4].user_attrs["retry_of"] == 3


def test_non_finite_objective_fails_with_reason() -> None:
    from autoprune.study.workers import SlotLock, _Objective

    study = optuna.create_study(directions=["maximize", "minimize"])
    obj = _Objective(lambda t: (float("nan"), 1.0), SlotLock("", "x"), max_retries=2)
    study.optimize(obj, n_trials=1, catch=(Exception,))
    t = study.trials[0]
    assert t.state == TrialState.FAIL and "not finite" in t.user_attrs["fail_reason"]


def test_disk_full_stops_with_clear_error_and_study_intact(template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.errors import DiskFullError

    out = template / "full"
    cfg = _cfg(template, out, trials=1, template=template, search_space=str(template / "space.yaml"))
    real_save = torch.save

    def save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if "trials" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError, match=r"disk full while trial 0 .*free space under .*run the same command again"):
        run(cfg, console=_quiet(), export=False)
    ts = _trials(out)  # the study still opens: nothing half-written
    assert ts[0].state == TrialState.FAIL and ts[0].user_attrs["fail_reason"].startswith("disk full")
    assert [t.state for t in ts[1:]] == [TrialState.WAITING] and ts[1].system_attrs["fixed_params"] == ts[0].params

    monkeypatch.undo()
    run(cfg, console=_quiet(), export=False)
    ts = _trials(out)
    assert ts[1].state == TrialState.COMPLETE and ts[1].params == ts[0].params
    assert (out / "trials" / "00001" / "model.pt").is_file()


def test_corrupt_or_foreign_sqlite_is_refused_untouched(template: Path) -> None:
    corrupt = template / "corrupt"
    cfg = _cfg(template, corrupt, trials=1, template=template)
    junk = b"this is not a database" * 100
    (corrupt / "study.db").write_bytes(junk)
    with pytest.raises(ConfigError, match="not a readable SQLite database"):
        run(cfg, console=_quiet(), export=False)
    assert (corrupt / "study.db").read_bytes() == junk

    foreign = template / "foreign"
    cfg = _cfg(template, foreign, trials=1, template=template)
    con = sqlite3.connect(foreign / "study.db")
    con.execute("CREATE TABLE photos (id INTEGER, path TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="another program.*photos"):
        run(cfg, console=_quiet(), export=False)
    con = sqlite3.connect(foreign / "study.db")
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["photos"]
    con.close()


def test_other_search_space_or_dense_model_is_refused(template: Path) -> None:
    from autoprune.train.checkpoint import read_model_file, save_model
    from autoprune.train.models import DemoResNet

    out = template / "mixed"
    run(_cfg(template, out, trials=1, template=template), console=_quiet(), export=False)
    other_space = _cfg(template, out, trials=2, search_space=str(template / "space.yaml"))
    with pytest.raises(ConfigError, match="different model, data, search space"):
        run(other_space, console=_quiet(), export=False)
    # Same config, but a worker whose dense model differs (e.g. trained on its own machine).
    recipe = read_model_file(out / "base_model.pt")["recipe"]  # same recipe (built from demo), other weights
    save_model(DemoResNet(10, 1), out / "base_model.pt", recipe)
    with pytest.raises(ConfigError, match="dense model .* not the one the study was started with"):
        run(_cfg(template, out, trials=2), console=_quiet(), export=False)
    # nothing was mixed in: the first session's one complete trial only (its seeds beyond
    # trials=1 were never queued)
    assert [t.state for t in _trials(out)] == [TrialState.COMPLETE]


def test_same_config_and_seed_replay_the_same_trials(template: Path) -> None:
    runs = []
    for name in ("rep1", "rep2"):
        cfg = _cfg(template, template / name, trials=2, template=template, search_space=str(template / "space.yaml"),
                   search={"sampler": "random"})
        run(cfg, console=_quiet(), export=False)
        runs.append(_trials(template / name))
    a, b = runs
    assert [t.params for t in a] == [t.params for t in b]
    assert len({tuple(sorted(t.params.items())) for t in a}) == 2
    assert [t.values[0] for t in a] == [t.values[0] for t in b]  # same pruning + seeded fine-tune


def test_trial_of_worker_that_died_before_its_first_heartbeat_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's stale check skips RUNNING trials without any heartbeat; they would block the
    study forever (counted as running). workers.fail_dead_trials retries them after a while."""
    from datetime import datetime, timedelta

    import autoprune.study.storage as storage
    import autoprune.study.workers as workers
    from autoprune.config import SearchSettings

    s = SearchSettings(heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage.make_storage(f"sqlite:///{tmp_path / 'h.db'}", s, lambda *a: None),
                                directions=["maximize", "minimize"])
    t = study.ask()  # RUNNING, never beats: its worker "died" right after creating it
    t.suggest_float("ratio/x", 0.0, 0.5)
    assert workers.fail_dead_trials(study, max_retries=2) == []  # too recent to judge

    class Later(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=60)

    monkeypatch.setattr(workers, "datetime", Later)
    assert workers.fail_dead_trials(study, max_retries=2) == [0]
    ts = study.trials
    assert ts[0].state == TrialState.FAIL and "heartbeat" in ts[0].user_attrs["fail_reason"]
    assert ts[1].state == TrialState.WAITING and ts[1].system_attrs["fixed_params"] == {"ratio/x": ts[0].params["ratio/x"]}
    assert workers.fail_dead_trials(study, max_retries=2) == []  # handled once


def test_retries_of_the_same_parameters_are_capped() -> None:
    from autoprune.study.workers import requeue

    study = optuna.create_study(directions=["maximize", "minimize"])
    for attempt in range(4):  # each attempt's worker dies; the cap is search.max_retries = 2
        t = study.ask()
        t.suggest_float("ratio/x", 0.0, 0.5)
        study.tell(t, state=TrialState.FAIL)
        if not requeue(study, study.trials[-1], max_retries=2, reason="killed"):
            break
    ts = study.trials
    assert attempt == 2 and len(ts) == 3  # first run + 2 retries, then given up
    assert len({t.params["ratio/x"] for t in ts}) == 1 and ts[-1].user_attrs["retry_history"] == [0, 1]


def test_ctrl_c_on_a_real_process_exits_cleanly_and_prints_resume(template: Path) -> None:
    """SIGINT (Ctrl-C) to ``autoprune search`` mid-trial: exit 130, the message says how to resume,
    the trial in flight is FAIL 'interrupted' with its parameters re-queued, nothing left RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = template / "sigint"
    cfg = _cfg(template, out, trials=3, template=template, finetune={"steps": 200})
    (template / "sigint.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", "--config", str(template / "sigint.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "300"},
                            preexec_fn=sigint_as_from_a_terminal)
    running = _wait_for_running_trial(proc, out, timeout_s=120, poll_s=0.3)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log[-3000:]
    assert "Resume with: autoprune search --out" in log
    ts = _trials(out)
    hit = ts[running[0]]
    assert hit.state == TrialState.FAIL and hit.user_attrs["fail_reason"].startswith("interrupted")
    assert any(t.state == TrialState.WAITING and t.user_attrs.get("retry_of") == hit.number for t in ts)
    assert not [t for t in ts if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_sigint_to_the_parent_of_two_workers_stops_them_all_and_a_rerun_completes(template: Path) -> None:
    """Issue 23: ``--workers 2``, then SIGINT to the parent alone (``kill -INT``, not the terminal's
    Ctrl-C, which reaches every process): every child exits promptly, no trial is left RUNNING,
    and the same command finishes the search."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = template / "workers-sigint"
    cfg = _cfg(template, out, trials=2, template=template, finetune={"steps": 150})
    (template / "workers-sigint.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    argv = [sys.executable, "-m", "autoprune.cli", "search", "--config", str(template / "workers-sigint.yaml"), "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "300"},
                            preexec_fn=sigint_as_from_a_terminal)
    running = _wait_for_running_trial(proc, out, timeout_s=240, poll_s=0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len([c for c in children if "autoprune" in " ".join(c.cmdline()) or "multiprocessing" in " ".join(c.cmdline())]) >= 2
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)  # the parent only
    log = proc.communicate(timeout=90)[0]
    assert proc.returncode == 130, log[-3000:]

    while still_running(children) and time.monotonic() - t0 < 40:
        time.sleep(0.2)
    assert not still_running(children), ([(c.pid, c.ppid(), c.status(), c.cmdline()[-3:]) for c in still_running(children)], log[-2000:])
    assert time.monotonic() - t0 < 40, f"the workers ran on for {time.monotonic() - t0:.0f} s after the parent was interrupted"
    ts = _trials(out)
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    # the same command resumes and finishes (the interrupted trial re-queued)
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "300"})
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    ts = _trials(out)
    assert len([t for t in ts if t.state == TrialState.COMPLETE]) >= 2 and not [t for t in ts if t.state == TrialState.RUNNING]


def test_leftover_running_trials_respect_search_max_retries(tmp_path: Path) -> None:
    """A killed local search's RUNNING trial is re-queued at restart only while search.max_retries allows."""
    from autoprune.study.study import fail_stale_local_trials

    for cap, requeued in ((0, False), (1, True)):
        study = optuna.create_study(storage=f"sqlite:///{tmp_path / f'r{cap}.db'}", directions=["maximize", "minimize"])
        t = study.ask()
        t.suggest_float("ratio/x", 0.0, 0.5)
        assert fail_stale_local_trials(study, max_retries=cap) == 1
        states = [x.state for x in study.trials]
        assert states[0] == TrialState.FAIL
        assert (states[1:] == [TrialState.WAITING]) is requeued


def test_settings_that_do_not_score_trials_resume_a_finished_run(template: Path) -> None:
    """Adding a final stage to a finished run, another sampler or population, another study-name
    spelling: the trials would be scored the same, so the study resumes. A change that scores
    trials differently is refused, and the message names it."""
    out = template / "final-later"
    run(_cfg(template, out, trials=1, template=template), console=_quiet(), export=False)
    run(_cfg(template, out, trials=1, search={"sampler": "random", "population_size": 4, "study_name": "autoprune"},
             efficiency={"final_finetune_steps": 2}), console=_quiet())
    final = json.loads((out / "final.json").read_text())
    assert final and all(v["steps"] == 2 for v in final.values())
    assert [t.state for t in _trials(out)].count(TrialState.COMPLETE) == 1  # nothing was redone
    with pytest.raises(ConfigError, match=r"different model, data.*changed: finetune\.steps: 2 -> 3\)"):
        run(_cfg(template, out, trials=1, finetune={"steps": 3}), console=_quiet(), export=False)
    with pytest.raises(ConfigError, match=r"changed: search\.seed: 0 -> 1\)"):
        run(_cfg(template, out, trials=1, search={"seed": 1}), console=_quiet(), export=False)


def _legacy_study(cfg: RunConfig, out: Path) -> optuna.Study:
    """A study as autoprune made it before search_hash version 2 (HEAD of 2026-11 and earlier):
    every config key but the worker runtime ones hashed, pretrain_seconds dumped as 10.0."""
    import hashlib

    from autoprune.config import config_hash
    from autoprune.study.context import prepare
    from autoprune.study.storage import public_config

    ctx = prepare(cfg)
    from autoprune.study.study import ADDED_PROFILE_DEFAULTS, ADDED_SPACE_DEFAULTS

    dump = cfg.model_dump(mode="json")
    dump.pop("train", None)  # sections and keys added since then were not in its dump
    dump["search"].pop("mlflow", None)
    dump["search"].pop("target", None)
    dump["search"].pop("screen", None)
    dump["efficiency"].pop("onnx_slicing", None)
    for key in ("task", "output", "augment", "val_samples"):
        dump.pop(key, None)
    for key in ("staircases", "staircase_widths", "staircase_tolerance"):
        dump["efficiency"].pop(key, None)
    space = {k: v for k, v in ctx.space.model_dump(mode="json").items() if k not in ADDED_SPACE_DEFAULTS}
    space["round_to"] = ctx.space.round_unit  # its default was 8, not auto
    profile = {k: v for k, v in ctx.profile.model_dump(mode="json").items() if k not in ADDED_PROFILE_DEFAULTS}
    dump["pretrain_seconds"] = 10.0
    dump["out"] = ""
    dump["search"].update(trials=1, timeout_s=None, storage=None, heartbeat_interval=10, grace_period=30, max_retries=2)
    groups = json.dumps([(g.name, g.low, g.high, g.methods) for g in ctx.groups])
    old = config_hash(dump, space, profile) + ":" + hashlib.sha256(groups.encode()).hexdigest()[:8]
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="autoprune", directions=["maximize", "minimize"])
    stored = {**public_config(cfg), "pretrain_seconds": 10.0}
    for key, value in (("search_hash", old), ("dense", ctx.dense), ("groups", [g.name for g in ctx.groups]), ("config", stored),
                       ("search_space", space), ("device_profile", profile)):
        study.set_user_attr(key, value)
    return study


def test_study_of_an_older_autoprune_resumes_with_a_final_stage_added(template: Path) -> None:
    from autoprune.study.study import SEARCH_HASH_VERSION

    out = template / "legacy"
    _legacy_study(_cfg(template, out, trials=1, template=template), out)
    res = run(_cfg(template, out, trials=1, efficiency={"final_finetune_steps": 2}, search={"sampler": "tpe"}),
              console=_quiet(), export=False)
    assert res.study.user_attrs["search_hash_version"] == SEARCH_HASH_VERSION
    assert [t.state for t in _trials(out)].count(TrialState.COMPLETE) == 1

    out = template / "legacy-other-finetune"
    _legacy_study(_cfg(template, out, trials=1, template=template), out)
    with pytest.raises(ConfigError, match=r"changed: finetune\.steps: 2 -> 3\)"):
        run(_cfg(template, out, trials=1, finetune={"steps": 3}), console=_quiet(), export=False)


def test_storage_errors_never_show_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from autoprune.study import study as st
    from autoprune.study.storage import load_run_study

    url = "postgresql://autoprune:s3cr3t-pw@db.example:5432/studies"
    ctx = SimpleNamespace(cfg=validate(RunConfig, {"search": {"storage": url}}, "test"), out=tmp_path)
    messages = []

    def quoting_driver(u: str, *a: Any, **k: Any) -> None:  # drivers quote the URL, or the password alone
        raise RuntimeError(f"could not connect to {u}: password 's3cr3t-pw' rejected\nhint: check pg_hba.conf")

    monkeypatch.setattr(st, "make_storage", quoting_driver)
    with pytest.raises(ConfigError, match="cannot open an Optuna study") as e:
        st.open_study(ctx)  # type: ignore[arg-type]
    messages.append(str(e.value))

    single = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'single.db'}")
    optuna.create_study(storage=single, study_name="autoprune", direction="maximize")
    monkeypatch.setattr(st, "make_storage", lambda *a, **k: single)
    with pytest.raises(ConfigError, match="has other objectives") as e:
        st.open_study(ctx)  # type: ignore[arg-type]
    messages.append(str(e.value))

    with pytest.raises(ConfigError) as e:  # nothing listens there (or no PostgreSQL driver installed)
        load_run_study(tmp_path, "postgresql://autoprune:s3cr3t-pw@127.0.0.1:1/studies")
    messages.append(str(e.value))
    monkeypatch.setattr(optuna.storages, "RDBStorage", quoting_driver)
    with pytest.raises(ConfigError, match="cannot open it") as e:
        load_run_study(tmp_path, url)
    messages.append(str(e.value))
    for m in messages:
        assert "s3cr3t-pw" not in m and "autoprune:***@" in m and "\n" not in m, m


def _wait_for_running_trial(proc: "subprocess.Popen[str]", out: Path, timeout_s: float, poll_s: float) -> list[int]:
    """The numbers of the RUNNING trials of the search ``proc`` runs into ``out``, once there is one (the test
    fails with the command's output if none starts in ``timeout_s``)."""
    import time

    deadline = time.monotonic() + timeout_s
    running: list = []
    while not running and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(poll_s)
        db = out / "study.db"
        if db.is_file():
            # read-only, straight from SQLite: opening it through Optuna would create its tables
            # and race the search creating them ("table trial_values already exists")
            try:
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                    running = [n for (n,) in con.execute("SELECT number FROM trials WHERE state = 'RUNNING'")]
            except sqlite3.Error:  # study being created
                continue
    assert running, proc.communicate(timeout=30)[0][-3000:]
    return running
