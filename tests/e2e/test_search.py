"""End-to-end search behaviour on tiny settings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import FAST_PROFILE, tiny_run_config, write_yaml
from optuna.trial import TrialState

import autoprune
from autoprune.config import load_run_config
from autoprune.errors import ConfigError
from autoprune.measure.stats import latency_ms
from autoprune.results.front import non_dominated
from autoprune.train.checkpoint import load_model


def test_front_is_nonempty_and_truly_non_dominated(tiny_run):
    study = tiny_run.study
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4
    front = tiny_run.pareto
    assert front, "a search must produce at least one Pareto model"
    pts = [(t.values[0], t.values[1]) for t in done]
    # The expected front by brute force over every pair of feasible trials (accuracy up, latency
    # down), written here: not through non_dominated or Optuna's best_trials, which the front uses.
    feasible = [t for t in done if all(c <= 0 for c in t.constraints.values())]
    assert feasible == done  # no budget and no accuracy floor: every finished trial counts

    def dominates(p: list[float], q: list[float]) -> bool:
        return p[0] >= q[0] and p[1] <= q[1] and (p[0] > q[0] or p[1] < q[1])

    expected = {t.number for t in feasible if not any(dominates(u.values, t.values) for u in feasible)}
    assert {r["trial"] for r in front} == expected
    assert {t.number for t, m in zip(done, non_dominated(pts)) if m} == expected
    # no front member is dominated by any finished trial
    for r in front:
        r = {**r, "accuracy": r.get("search_accuracy", r["accuracy"]), "latency_ms": r.get("search_latency_ms", r["latency_ms"])}
        assert not any(a >= r["accuracy"] and lat <= r["latency_ms"] and (a > r["accuracy"] or lat < r["latency_ms"]) for a, lat in pts)


def test_non_dominated_against_hand_worked_points():
    """(accuracy, latency ms): equal points do not dominate each other; a point beaten on one
    objective and tied on the other is dominated."""
    pts = [(0.9, 10.0), (0.9, 10.0), (0.8, 5.0), (0.8, 6.0), (0.95, 20.0), (0.9, 12.0), (0.7, 5.0)]
    assert non_dominated(pts) == [True, True, True, False, True, False, False]
    assert non_dominated([]) == [] and non_dominated([(0.5, 1.0)]) == [True]


def test_trials_record_objectives_and_attrs(tiny_run):
    dense = tiny_run.dense
    for t in tiny_run.study.get_trials(states=(TrialState.COMPLETE,)):
        ua = t.user_attrs
        assert t.values[0] == ua["accuracy"] and t.values[1] == latency_ms(ua["latency"])
        assert 0 < ua["params"] <= dense["params"] and 0 < ua["flops"] <= dense["flops"]
        assert set(t.constraints) == {"latency_ms", "params", "flops", "size_mb", "accuracy_drop"}
        assert t.constraints["accuracy_drop"] == -1.0  # no search.max_accuracy_drop: always feasible
        # multi-fidelity: 1 step (rung 0), then the other 2 unless already dominated at rung 0
        assert ua["finetune_steps"] == (1 if ua["stopped_at_rung0"] else 3)
        assert 0 <= ua["accuracy_rung0"] <= 1
        # the widths recorded are the kept channel counts, multiples of 8 (or untouched)
        for g, (before, after) in ua["widths"].items():
            assert after <= before and (after % 8 == 0 or after == before)
    # the enqueued uniform seeds ran first
    first = tiny_run.study.trials[0].params
    assert all(abs(v - 0.25) < 1e-9 for v in first.values())


def test_artifacts_written(tiny_run):
    out = tiny_run.out
    data = json.loads((out / "pareto.json").read_text())
    assert data["pareto"] and data["dense"]["accuracy"] > 0.5
    header = (out / "pareto.csv").read_text().splitlines()[0]
    assert header.startswith("trial,accuracy,latency_ms") and "ratio:" in header
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "plotly" in (out / "pareto.html").read_text()[:200_000].lower()
    finals = json.loads((out / "final.json").read_text())
    for r in data["pareto"]:
        # final stage: every Pareto model got the longer fine-tune and was re-measured
        f = finals[str(r["trial"])]
        assert r["final"] == f and f["steps"] == 2 and f["short_accuracy"] == r["search_accuracy"]
        assert r["accuracy"] == f["final_accuracy"] and r["latency_ms"] == f["final_latency_ms"]
        assert 0 <= f["final_accuracy"] <= 1 and f["final_latency_ms"] > 0
        d = out / r["artifacts"]
        meta = json.loads((d / "metadata.json").read_text())
        assert meta["device_profile"]["name"] == FAST_PROFILE["name"]
        assert meta["config"]["finetune"]["steps"] == 3
        assert meta["onnx_max_abs_diff"] < 1e-3
        for f in ("model.onnx", "model.xml", "model.bin", "model.pt", "state_dict.pt"):
            assert (d / f).stat().st_size > 0
        model = load_model(d / "model.pt")
        assert sum(p.numel() for p in model.parameters()) == r["params"]


def test_latency_budget_skips_finetune_and_marks_infeasible(tmp_path, fast_profile, monkeypatch):
    """Latency first: a candidate over budget costs seconds. No fine-tune, no full validation
    pass, no model.pt (it was saved, and fully evaluated, before the trial function was split)."""
    import autoprune.study.trial as trial_mod

    calls = []
    real = trial_mod.evaluate

    def evaluate(model, data, batch_size=256, max_batches=None, **kw):
        calls.append(max_batches)
        return real(model, data, batch_size=batch_size, max_batches=max_batches, **kw)

    monkeypatch.setattr(trial_mod, "evaluate", evaluate)
    prof = write_yaml(tmp_path / "p.yaml", {**FAST_PROFILE, "budget": {"max_latency_ms": 1e-4}})
    cfg = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", prof, trials=2))
    res = autoprune.run(load_run_config(str(cfg)))
    trials = res.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    for t in trials:
        assert t.constraints["latency_ms"] > 0
        assert t.user_attrs["finetune_steps"] == 0 and "budget" in t.user_attrs["skipped_finetune"]
        assert t.user_attrs["accuracy_estimated"] is True and 0.0 <= t.values[0] <= 1.0
        assert not (res.ctx.run.trial(t.number).model).exists()
    assert calls == [trial_mod.OVER_BUDGET_EVAL_BATCHES] * 2  # never a full pass
    assert res.pareto == []  # nothing feasible
    with pytest.raises(ConfigError, match="no Pareto model"):
        autoprune.pick(res.out, max_latency_ms=1.0)


def _count_complete(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        s = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{db}")
    except Exception:
        return 0
    return len(s.get_trials(states=(TrialState.COMPLETE,)))


def test_killed_search_resumes_without_redoing_trials(tmp_path, fast_profile):
    cfg_path = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", fast_profile, trials=5, finetune={"steps": 40}))
    db = tmp_path / "out" / "study.db"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "search.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "search", "--config", str(cfg_path)], env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while _count_complete(db) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    assert proc.poll() is None, f"the search ended on its own (exit code {proc.returncode}): {log.read_text()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{db}")
    done_before = {t.number: t.values for t in before.get_trials(states=(TrialState.COMPLETE,))}
    assert 1 <= len(done_before) < 5, "the worker should have been killed mid-search"

    res = autoprune.run(load_run_config(str(cfg_path)))
    after = res.study.get_trials()
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(complete) == 5
    for n, values in done_before.items():  # finished trials are kept, not redone
        assert after[n].state == TrialState.COMPLETE and after[n].values == values
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in after)
    # a trial killed mid-run is marked failed and its parameters re-queued
    for t in after:
        if t.state == TrialState.FAIL:
            assert any(u.user_attrs.get("retry_history", [None])[-1] == t.number for u in after)
    assert (res.out / "pareto.json").exists()


def test_changed_search_space_refuses_to_mix(tmp_path, fast_profile):
    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=1)
    autoprune.run(load_run_config(str(write_yaml(tmp_path / "a.yaml", cfg))))
    space = write_yaml(tmp_path / "space.yaml", {"low": 0.1, "high": 0.5})
    with pytest.raises(ConfigError, match="different model, data, search space"):
        autoprune.run(load_run_config(str(write_yaml(tmp_path / "b.yaml", {**cfg, "search_space": str(space)}))))


def test_seed_plans_pair_each_uniform_level_with_a_sensitivity_allocated_twin():
    from types import SimpleNamespace

    from autoprune.config import SearchSpace
    from autoprune.prune.structure import PrunableGroup
    from autoprune.study.space import RATIO_PREFIX, seed_plans

    groups = [PrunableGroup("a", 64, low=0.0, high=0.9), PrunableGroup("b", 64, low=0.0, high=0.9), PrunableGroup("stem", 16, low=0.0, high=0.0)]
    ctx = SimpleNamespace(space=SearchSpace(high=0.9, seed_uniform=[0.6, 0.3], seed_spread=0.2), groups=groups,
                          sensitivity={"a": 0.01, "b": 0.1}, savings={"a": 0.2, "b": 0.2})
    plans = seed_plans(ctx)
    assert plans == [
        {RATIO_PREFIX + "a": 0.3, RATIO_PREFIX + "b": 0.3},
        {RATIO_PREFIX + "a": 0.4, RATIO_PREFIX + "b": 0.2},  # b costs more accuracy per FLOP saved
        {RATIO_PREFIX + "a": 0.6, RATIO_PREFIX + "b": 0.6},
        {RATIO_PREFIX + "a": 0.7, RATIO_PREFIX + "b": 0.5},
    ]
    ctx.space = ctx.space.model_copy(update={"seed_spread": 0.0})
    assert len(seed_plans(ctx)) == 2
    ctx.space, ctx.sensitivity = ctx.space.model_copy(update={"seed_spread": 0.2}), {}  # no scan: uniform only
    assert len(seed_plans(ctx)) == 2


def test_export_trial_exports_the_final_stage_model_stored_or_rebuilt(tiny_run, run_copy, tmp_path, monkeypatch):
    """`autoprune export --trial N` of a Pareto trial that had the final fine-tune exports that
    model (what pareto/ deploys), from model_final.pt or re-created: short model + final fine-tune.
    A rebuild repeats the trial's build and fine-tune steps, not its latency measurement."""
    from autoprune.deploy.replay import rebuild_trial
    from autoprune.measure import backends

    def no_timing(*a, **k):
        raise AssertionError("export --trial must not time latency again; the study holds it")

    monkeypatch.setattr(backends, "measure", no_timing)

    finals = json.loads((tiny_run.out / "final.json").read_text())
    n = int(next(iter(finals)))
    stored = rebuild_trial(tiny_run.out, n, dest=tmp_path / "stored", tolerance=1e-9)
    assert stored["source"].endswith("model_final.pt")
    assert stored["accuracy"] == finals[str(n)]["final_accuracy"] == stored["check"]["final"]["accuracy"]
    assert stored["search_accuracy"] == finals[str(n)]["short_accuracy"]
    rebuilt = rebuild_trial(run_copy, n, dest=tmp_path / "rebuilt", tolerance=1e-9)  # the copy has no trials/ folder
    assert rebuilt["source"] == "rebuilt from stored parameters + final fine-tune"
    assert rebuilt["check"]["final"]["accuracy"] == pytest.approx(finals[str(n)]["final_accuracy"], abs=1e-9)
    ref = load_model(tiny_run.out / "trials" / f"{n:05d}" / "model_final.pt")
    got = load_model(tmp_path / "rebuilt" / "model.pt")
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), k


def test_duplicate_architectures_are_not_rerun_and_accuracy_floor_is_a_constraint(tmp_path, fast_profile):
    """Every ratio in [0, 0.01] keeps the same (rounded) widths: proposals are pruned as duplicates and
    does not count; once every proposal is a duplicate the space is exhausted and one runs anyway.
    search.max_accuracy_drop becomes the 'accuracy_drop' constraint."""
    from autoprune.study.trial import MAX_DUPLICATES_IN_ROW

    space = write_yaml(tmp_path / "space.yaml", {"name": "tiny", "low": 0.0, "high": 0.01, "step": None, "seed_uniform": [0.0]})
    cfg = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", fast_profile, trials=2, search_space=str(space),
                                                            search={"max_accuracy_drop": 0.5}))
    res = autoprune.run(load_run_config(str(cfg)))
    ts = res.study.trials
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    pruned = [t for t in ts if t.state == TrialState.PRUNED]
    assert len(complete) == 2 and len(pruned) == MAX_DUPLICATES_IN_ROW
    assert all(t.user_attrs["duplicate_of"] == 0 for t in pruned)
    assert ts[1].state == TrialState.PRUNED and complete[1].number == MAX_DUPLICATES_IN_ROW + 1
    assert complete[0].user_attrs["arch_key"] == complete[1].user_attrs["arch_key"]
    for t in complete:
        assert t.constraints["accuracy_drop"] == pytest.approx(res.dense["accuracy"] - t.values[0] - 0.5)


def test_data_split_follows_data_seed_not_the_sampler_seed(tmp_path, fast_profile, monkeypatch):
    """Repeating a search with another search.seed must score trials on the same held-out images."""
    import importlib

    search = importlib.import_module("autoprune.study.context")

    seen = []

    class Stop(Exception):
        pass

    def fake_load_data(ref, image_size, val_fraction, seed, *rest):
        seen.append(seed)
        raise Stop

    monkeypatch.setattr(search, "load_data", fake_load_data)
    for extra in ({"search": {"seed": 7}}, {"search": {"seed": 7}, "data_seed": 3}):
        cfg = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", fast_profile, **extra))
        with pytest.raises(Stop):
            search.prepare(load_run_config(str(cfg)))
    assert seen == [0, 3]


def test_proxy_fidelity_is_kendall_tau_of_short_vs_final_accuracy():
    from autoprune.study.final import proxy_fidelity

    rows = [{"short_accuracy": s, "final_accuracy": f} for s, f in [(0.80, 0.85), (0.70, 0.80), (0.90, 0.88), (0.60, 0.82)]]
    out = proxy_fidelity(rows)
    # pairs: 6; discordant: (0.70,0.80) vs (0.60,0.82) only -> tau = (5 - 1) / 6
    assert out["kendall_tau"] == pytest.approx(4 / 6) and out["models"] == 4
    assert proxy_fidelity(rows[:2]) is None  # too few to rank


def test_seeds_are_never_enqueued_beyond_the_trial_budget(monkeypatch):
    """Four seed plans and ``--trials 3``: three are queued, spread over the ordered list (the
    first and the last kept), so no seed is left WAITING in a finished study."""
    from types import SimpleNamespace

    import optuna

    import autoprune.study.study as st

    seeds = [({"ratio/a": r}, {}) for r in (0.1, 0.2, 0.3, 0.4)]
    monkeypatch.setattr(st, "seed_trials", lambda ctx: seeds)
    for trials, want in ((3, [0.1, 0.3, 0.4]), (1, [0.1]), (4, [0.1, 0.2, 0.3, 0.4]), (9, [0.1, 0.2, 0.3, 0.4])):
        study = optuna.create_study(directions=["maximize", "minimize"])
        st.enqueue_seeds(study, SimpleNamespace(cfg=SimpleNamespace(search=SimpleNamespace(trials=trials, screen=None))))
        waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
        assert [t.system_attrs["fixed_params"]["ratio/a"] for t in waiting] == want
