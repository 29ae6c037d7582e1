"""The Optuna private names autoprune still needs, in one place: they exist in the installed
Optuna (pyproject.toml pins the range), they do what the dead-worker handling relies on, and no
other module of the package uses a private name of Optuna or torch-pruning."""

from __future__ import annotations

import ast
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autoprune
from autoprune.config import SearchSettings
from autoprune.study import storage
from autoprune.study.storage import fail_running_trial, heartbeat_dead_trial_ids, trial_store

#: Private names of dependencies and the only functions allowed to use them.
PRIVATE = {"_storage", "_backend", "_get_stale_trial_ids", "_study_id", "_trial_id", "_module2name", "_reduce", "_rdb"}
ALLOWED = {("study/storage.py", "trial_store"), ("study/storage.py", "heartbeat_dead_trial_ids")}


def _study(tmp_path: Path) -> optuna.Study:
    """A study on the storage autoprune makes, with a 1 s grace period (SearchSettings allows
    2 s at least; the tests would wait longer for nothing)."""
    s = SearchSettings(heartbeat_interval=1, grace_period=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdb = storage.make_storage(f"sqlite:///{tmp_path / 'h.db'}", s, lambda *a: None)
        rdb.grace_period = 1
        return optuna.create_study(storage=rdb, directions=["maximize", "minimize"])


def _ask(study: optuna.Study) -> optuna.trial.Trial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat ... supposed to be used with Study.optimize"
        t = study.ask()
    t.suggest_float("ratio/x", 0.0, 0.5)
    return t


def test_the_optuna_private_names_we_use_still_exist(tmp_path: Path) -> None:
    """If this fails, Optuna moved one of the names that storage.trial_store /
    storage.heartbeat_dead_trial_ids use: update them and the optuna pin in pyproject.toml."""
    from optuna.storages import RDBStorage, _CachedStorage

    study = _study(tmp_path)
    assert hasattr(study, "_storage"), "optuna.Study._storage is gone"
    assert isinstance(study._storage, (_CachedStorage, RDBStorage))
    if isinstance(study._storage, _CachedStorage):
        assert isinstance(getattr(study._storage, "_backend", None), RDBStorage), "_CachedStorage._backend is gone"
    assert callable(getattr(RDBStorage, "_get_stale_trial_ids", None)), "RDBStorage._get_stale_trial_ids is gone"
    from optuna.storages._rdb import models

    assert callable(getattr(models.TrialHeartbeatModel, "where_trial_id", None)), "TrialHeartbeatModel.where_trial_id is gone"
    assert isinstance(trial_store(study), RDBStorage)


def test_dead_trials_are_found_and_live_ones_are_not(tmp_path: Path) -> None:
    study = _study(tmp_path)
    rdb = trial_store(study)
    sid = rdb.get_study_id_from_name(study.study_name)
    ids = [rdb.get_trial_id_from_study_id_trial_number(sid, _ask(study).number) for _ in range(3)]
    stale, live, silent = ids
    rdb.record_heartbeat(stale)
    time.sleep(2.2)  # > grace period (1 s): the database's clock decides
    rdb.record_heartbeat(live)
    assert heartbeat_dead_trial_ids(rdb, sid, []) == [stale]
    assert heartbeat_dead_trial_ids(rdb, sid, [live, silent]) == [stale, silent]


def test_fail_running_trial_records_the_reason_then_fails(tmp_path: Path) -> None:
    study = _study(tmp_path)
    a, b = _ask(study), _ask(study)
    study.tell(b, (0.5, 1.0))
    assert fail_running_trial(study, a.number, "worker died") is True
    assert fail_running_trial(study, a.number, "again") is False  # already failed: nothing changes
    assert fail_running_trial(study, b.number, "worker died") is False  # it finished meanwhile
    ts = study.get_trials()
    assert ts[0].state == TrialState.FAIL and ts[0].user_attrs["fail_reason"] == "worker died"
    assert ts[1].state == TrialState.COMPLETE and "fail_reason" not in ts[1].user_attrs


def _private_uses(tree: ast.AST) -> list[tuple[str, int]]:
    """(enclosing function, line) of every attribute access / import of a name in PRIVATE."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name if func == "<module>" else func
        hit = (isinstance(node, ast.Attribute) and node.attr in PRIVATE
               or isinstance(node, ast.Constant) and node.value in PRIVATE
               or isinstance(node, ast.ImportFrom) and any(part in PRIVATE for part in (node.module or "").split(".")))
        if hit:
            found.append((func, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "<module>")
    return found


def test_no_other_private_dependency_names_in_the_package() -> None:
    root = Path(autoprune.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for func, line in _private_uses(ast.parse(path.read_text(), str(path))):
            if (rel, func) not in ALLOWED:
                bad.append(f"{rel}:{line} in {func}")
    assert not bad, "private names of Optuna/torch-pruning outside storage.trial_store/heartbeat_dead_trial_ids: " + ", ".join(bad)
    # and the guard sees the allowed ones (it would pass vacuously otherwise)
    allowed = _private_uses(ast.parse((root / "study" / "storage.py").read_text()))
    assert {f for f, _ in allowed} == {"trial_store", "heartbeat_dead_trial_ids"}


@pytest.mark.parametrize("spec", ["optuna"])
def test_pyproject_pins_optuna_below_the_next_major(spec: str) -> None:
    """The private names above are only known to exist in the tested major version."""
    text = (Path(autoprune.__file__).parent.parent / "pyproject.toml").read_text()
    line = next(line for line in text.splitlines() if line.strip().startswith(f'"{spec}'))
    assert "<6" in line and ">=4.9" in line, line
