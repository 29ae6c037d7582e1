"""Screening (``search.screen``, study/screen.py): many candidates without fine-tune, the best fine-tuned."""

from __future__ import annotations

import copy
import json
import shutil

import optuna
import pytest
import torch
import torch.nn as nn
from optuna.trial import TrialState

import autoprune
from autoprune.config import load_run_config
from autoprune.prune.plan import apply_plan_from
from autoprune.study import screen as scr
from autoprune.study.context import prepare
from autoprune.study.study import storage_url
from conftest import tiny_run_config, write_yaml

SCREEN = {"candidates": 24, "finetune_top_k": 2, "bn_batches": 1, "eval_batches": 1}


def _cfg(tmp_path, fast_profile, base=None, **search):
    """A 2-trial digits run with the scan on; ``base``: another run's base_model.pt to start from (no pre-training)."""
    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=2, finetune={"steps": 2, "batch_size": 32},
                          efficiency={"sensitivity_scan": True, "final_finetune_steps": 0})
    if base is not None:  # the same recipe: the copied base_model.pt (and dense.json) are reused, not retrained
        (tmp_path / "out").mkdir(parents=True)
        for name in ("base_model.pt", "dense.json"):
            shutil.copy(base.parent / name, tmp_path / "out" / name)
    cfg["search"].update(search)
    return load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg)))


@pytest.fixture(scope="module")
def screened_run(tmp_path_factory, fast_profile):
    """A finished budget-mode search (target 2x) with screening on, and its prepared context."""
    tmp = tmp_path_factory.mktemp("screen")
    cfg = _cfg(tmp, fast_profile, target=["2x"], screen=SCREEN)
    res = autoprune.run(cfg)
    ctx = prepare(cfg)
    return res, ctx, scr.open_screen_study(ctx, storage_url(ctx))


def test_screening_runs_many_candidates_and_probes_replace_the_scan(screened_run):
    res, ctx, study = screened_run
    done = scr.screened(study)
    assert len(done) >= SCREEN["candidates"]  # count, not time: every one pruned, BN re-estimated, scored
    probes = {t.user_attrs["probe"] for t in done if "probe" in t.user_attrs}
    free = {g.name for g in ctx.groups if g.low != g.high}
    assert probes == free  # the per-group probes are the first screened candidates
    first = sorted(done, key=lambda t: t.number)[: len(probes)]
    assert all("probe" in t.user_attrs for t in first)
    # The priors come from them (no separate scan ran): sensitivity.json holds each probe's drop.
    drops = json.loads(ctx.run.sensitivity.read_text())
    ref = study.user_attrs["dense_score"]
    assert drops == pytest.approx({t.user_attrs["probe"]: ref - t.values[0] for t in done if "probe" in t.user_attrs})


def test_screened_params_rebuild_exactly_the_evaluated_model(screened_run):
    _, ctx, study = screened_run
    s = scr.Screener(ctx, ctx.cfg.search.screen)
    repaired = [t for t in scr.screened(study) if "proposal" in t.user_attrs]
    assert repaired, "budget mode should have repaired some proposals onto their target"
    for t in scr.screened(study)[-5:] + repaired[:3]:
        _, widths = s.build(s.plan(t.params))
        assert {k: list(v) for k, v in widths.items()} == t.user_attrs["widths"]
        proposal = study.trials[t.user_attrs["proposal"]] if "proposal" in t.user_attrs else None
        if proposal is not None:  # the sampler's proposal is FAIL (ignored), the recorded trial is the evaluated one
            assert proposal.state == TrialState.FAIL and proposal.user_attrs.get("repaired")
            # repaired onto its target by construction (the analytic model the repair uses)
            assert s.macs_ratio(s.plan(t.params).ratios) * t.user_attrs["target_speedup"] <= 1.0 + 1e-6


def test_screening_does_not_finetune(screened_run):
    _, ctx, study = screened_run
    s = scr.Screener(ctx, ctx.cfg.search.screen)
    t = scr.screened(study)[-1]
    plan = s.plan(t.params)
    screened_model, _ = s.build(plan)
    sliced = copy.deepcopy(ctx.base)
    apply_plan_from(sliced, ctx.base, ctx.dense_structure(), plan)
    bn_changed = False
    for (name, a), b in zip(screened_model.named_modules(), sliced.modules()):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            bn_changed |= not torch.equal(a.running_mean, b.running_mean)
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)  # affine params untouched
        else:
            for (pn, p), q in zip(a.named_parameters(recurse=False), b.parameters(recurse=False)):
                assert torch.equal(p, q), f"{name}.{pn} changed: screening must not train"
    assert bn_changed  # only the BN statistics were re-estimated


def test_top_k_become_complete_trials_with_the_same_params(screened_run):
    res, ctx, study = screened_run
    main = res.study.get_trials()
    from_screen = [t for t in main if "screen_trial" in t.user_attrs]
    assert len(from_screen) == ctx.cfg.search.trials == 2
    for t in from_screen:
        assert t.state == TrialState.COMPLETE
        src = study.trials[t.user_attrs["screen_trial"]]
        assert t.params == src.params
        assert t.user_attrs["widths"] == src.user_attrs["widths"]  # the fine-tuned model is the screened one
        assert t.user_attrs["budget_shift"] == 0.0
    # the best screened candidates that meet the target were picked
    ok = [u for u in scr.screened(study) if u.values[1] * 2.0 <= 1 + 1e-9]
    best = max(u.values[0] for u in ok)
    assert max(t.user_attrs["screen_score"] for t in from_screen) == best
    assert study.user_attrs.get(scr.PICKED_ATTR)


def test_resume_after_a_crash_mid_screening_does_not_screen_again(screened_run, tmp_path, fast_profile, monkeypatch):
    cfg = _cfg(tmp_path, fast_profile, base=screened_run[1].run.base_model, screen={**SCREEN, "candidates": 14})
    ctx = prepare(cfg)
    url = storage_url(ctx)
    calls = []
    real = scr.Screener.evaluate

    def crashing(self, params):
        calls.append(params)
        if len(calls) == 9:
            raise KeyboardInterrupt  # killed mid-screening
        return real(self, params)

    monkeypatch.setattr(scr.Screener, "evaluate", crashing)
    with pytest.raises(KeyboardInterrupt):
        scr.screen(ctx, url)
    study = scr.open_screen_study(ctx, url)
    before = {t.number: t.values for t in scr.screened(study)}
    assert len(before) == 8
    assert len(study.get_trials(states=(TrialState.RUNNING,))) == 1  # the one in flight

    calls.clear()
    ctx2 = prepare(cfg)
    study = scr.screen(ctx2, url)
    after = scr.screened(study)
    assert len(after) == 14
    assert {t.number: t.values for t in after if t.number in before} == before  # kept, not redone
    assert len(calls) <= 14 - 8 + 3  # only what was missing (+ duplicates the sampler re-proposed)
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    assert set(ctx2.sensitivity) == {t.user_attrs["probe"] for t in after if "probe" in t.user_attrs}


def test_front_mode_picks_spread_along_the_screened_front(screened_run, tmp_path, fast_profile):
    cfg = _cfg(tmp_path, fast_profile, base=screened_run[1].run.base_model, screen={**SCREEN, "candidates": 16, "finetune_top_k": 3})
    ctx = prepare(cfg)
    study = scr.screen(ctx, storage_url(ctx))
    chosen = scr.picks(ctx, study)
    assert len(chosen) == 2  # capped by search.trials
    pts = [(t.values[0], t.values[1]) for t in scr.screened(study)]
    for t, target in chosen:
        assert target is None
        a, lat = t.values
        assert not any(b >= a and m <= lat and (b > a or m < lat) for b, m in pts)  # on the screened front


def test_screen_vs_final_is_kendall_tau():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for s, acc in [(0.1, 0.5), (0.2, 0.6), (0.3, 0.7), (0.4, 0.65)]:
        study.add_trial(optuna.trial.create_trial(values=[acc, 1.0], user_attrs={"screen_score": s}))
    out = scr.screen_vs_final(study)
    assert out["n"] == 4 and out["tau"] == pytest.approx(4 / 6)


def test_speedup_targets_use_the_ratio_measured_interleaved_with_dense():
    from types import SimpleNamespace

    from autoprune.study.trial import budget_latency_ms

    def ctx(target):
        return SimpleNamespace(targets_ms=[0.5], dense={"latency": {"median_ms": 1.0}}, cfg=SimpleNamespace(search=SimpleNamespace(target=target)))

    loaded = {"latency": {"median_ms": 0.6, "speedup": 2.1}}  # a loaded machine: slower, but 2.1x faster than dense beside it
    assert budget_latency_ms(ctx(["2x"]), loaded) == pytest.approx(1.0 / 2.1)  # meets 2x: the ratio decides
    assert budget_latency_ms(ctx([0.5]), loaded) == 0.6  # a millisecond target is milliseconds
    assert budget_latency_ms(ctx(["2x"]), {"latency": {"median_ms": 0.6}}) == 0.6  # no reference timed: the median


def test_search_stores_screen_vs_final(screened_run):
    res, _, _ = screened_run
    stored = res.study.user_attrs["screen_vs_final"]
    assert stored["n"] == 2 and stored["tau"] is None  # two fine-tuned picks: too few for a tau
