"""Latency staircases (measure/staircase.py) and the learned channel granularity they give."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import tiny_run_config, write_yaml

from autoprune.config import DeviceProfile, SearchSpace, load_search_space, validate
from autoprune.errors import ConfigError
from autoprune.measure import staircase
from autoprune.measure.staircase import (
    allowed_widths,
    fingerprint,
    fingerprint_key,
    learned_widths,
    load_or_measure,
    probe_widths,
)
from autoprune.prune.plan import PruningPlan, apply_plan, kept_channels, narrowing
from autoprune.prune.structure import find_groups

PROFILE = DeviceProfile(name="ort-test", backend="onnxruntime", threads=1, warmup=1, repeats=5, target_rel_ci=None)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4)).eval()


def _groups(net: nn.Module, x: torch.Tensor, high: float = 0.7):
    groups = find_groups(net, x, 4)
    for g in groups:
        g.high = high
    return groups


# --------------------------------------------------------------------------- the width chooser
def _steps(w: int) -> float:
    """A synthetic staircase of a 64-channel group: latency rises every 16 channels; odd widths
    pay 20% (the non-monotonic points real CPUs show)."""
    return math.ceil(w / 16) * 16 / 64 * (1.2 if w % 2 else 1.0)


def test_allowed_widths_are_the_lower_edge_of_each_step():
    points = {w: _steps(w) for w in range(8, 65)}
    assert allowed_widths(points, 64, tolerance=0.03) == [16, 32, 48, 64]


def test_widths_slower_than_a_wider_one_are_dropped_and_full_width_is_always_allowed():
    # 63 and 40 are slower than wider widths; 56 is on dense's step (within tolerance); nothing
    # at all is faster than dense in the second staircase, yet the full width stays allowed.
    points = {63: 1.10, 56: 0.99, 48: 0.80, 40: 0.85, 32: 0.60}
    assert allowed_widths(points, 64, tolerance=0.03) == [32, 48, 64]
    assert allowed_widths({63: 1.2, 48: 1.01, 32: 1.0}, 64) == [64]
    # a gradual slope is kept at the tolerance's resolution, not dropped as one long step
    slope = {64 - 8 * k: 1.0 - 0.02 * k for k in range(1, 6)}
    assert allowed_widths(slope, 64, tolerance=0.03) == [32, 48, 64]


def test_probe_widths_cover_the_search_range_on_the_channel_grid():
    for n, high, g in [(64, 0.7, 1), (512, 0.7, 1), (100, 0.5, 1), (96, 0.7, 4), (16, 0.7, 1)]:
        ws = probe_widths(n, high, g, max_widths=8)
        lo = math.ceil(n * (1 - high))
        assert ws[0] == n and len(ws) <= 8 and len(set(ws)) == len(ws)
        assert all(lo <= w <= n and w % g == 0 for w in ws)
        assert n - g in ws  # the width just below full: often slower than dense
        assert min(ws) <= lo + max(8, g) * 2  # the narrowest width the search can ask for is probed
    assert probe_widths(64, 0.0) == [64]  # an unprunable group costs nothing


def test_kept_channels_snap_to_the_nearest_allowed_width():
    allowed = [16, 32, 48, 64]
    assert kept_channels(64, 0.0, 8, 1, allowed) == 64
    assert kept_channels(64, 0.3, 8, 1, allowed) == 48  # 44.8 → 48
    assert kept_channels(64, 0.6, 8, 1, allowed) == 32  # 25.6 → 32
    assert kept_channels(64, 0.625, 8, 1, allowed) == 16  # 24: a tie goes to the faster, narrower width
    assert kept_channels(64, 0.95, 8, 1, allowed) == 16
    # without allowed widths round_to keeps today's behaviour exactly
    assert [kept_channels(64, r, 8) for r in (0.1, 0.3, 0.6)] == [56, 48, 24]
    assert [kept_channels(64, r, 1) for r in (0.1, 0.3, 0.6)] == [58, 45, 26]


def test_pruned_model_has_only_allowed_widths_and_round_to_stays_exact():
    net, x = _net(), torch.randn(1, 1, 8, 8)
    names = [g.name for g in find_groups(net, x, 4)]
    allowed = {names[0]: [4, 12, 16], names[1]: [8, 24]}
    for r in (0.1, 0.3, 0.5, 0.7):
        m = _net()
        widths = apply_plan(m, x, PruningPlan({n: r for n in names}, round_to=8, widths=allowed), 4)
        assert all(widths[n][1] in allowed[n] for n in names)
        assert m(x).shape == (1, 4)
        plain = apply_plan(_net(), x, PruningPlan({n: r for n in names}, round_to=8), 4)
        assert all(plain[n][1] == kept_channels(plain[n][0], r, 8) for n in names)


def test_round_to_auto_is_learned_and_an_integer_is_kept(tmp_path):
    assert load_search_space("default").round_to is None and load_search_space("default").round_unit == 8
    assert validate(SearchSpace, {"round_to": "auto"}, "x").round_to is None
    assert validate(SearchSpace, {"round_to": 4}, "x").round_unit == 4
    with pytest.raises(ConfigError, match="round_to"):
        validate(SearchSpace, {"round_to": "eight"}, "x")


# --------------------------------------------------------------------------- storage and reuse
def test_staircases_are_reused_for_the_same_fingerprint_and_measured_for_another(tmp_path, monkeypatch):
    net, x = _net(), torch.randn(1, 1, 8, 8)
    groups = _groups(net, x)
    path = tmp_path / "staircases" / f"{fingerprint_key(fingerprint(PROFILE, net, x))}.json"
    first = load_or_measure(path, net, groups, x, PROFILE, 4, max_widths=3)  # really measured, onnxruntime
    assert path.is_file()
    for g in groups:
        assert first[g.name] and all(w < g.channels for w in first[g.name])
        assert all(0 < r < 10 for r in first[g.name].values())

    def boom(*a, **k):
        raise AssertionError("the backend was called although the staircases were stored")

    monkeypatch.setattr(staircase, "time_ratios", boom)
    again = load_or_measure(path, net, groups, x, PROFILE, 4, max_widths=3)
    assert again == first  # same fingerprint: read back, nothing timed

    # Another fingerprint (2 threads, another model) is never reused: it is measured.
    other = PROFILE.model_copy(update={"threads": 2})
    assert fingerprint_key(fingerprint(other, net, x)) != fingerprint_key(fingerprint(PROFILE, net, x))
    calls = []

    def fake(files, profile, xx, models=None):
        calls.append(profile.threads)
        return {k: 0.5 for k in files if k != ("", 0)}

    monkeypatch.setattr(staircase, "time_ratios", fake)
    wider = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    assert fingerprint(PROFILE, wider, x)["model"] != fingerprint(PROFILE, net, x)["model"]
    for prof, model in ((other, net), (PROFILE, wider)):
        gs = _groups(model, x)
        key = fingerprint_key(fingerprint(prof, model, x))
        got = load_or_measure(tmp_path / "staircases" / f"{key}.json", model, gs, x, prof, 4, max_widths=3)
        assert all(set(v.values()) == {0.5} for v in got.values())
    assert 2 in calls and 1 in calls  # both were timed (2 threads; the other model on 1)
    # a stored file read back under another fingerprint gives nothing
    assert staircase.StaircaseStore.open(path, fingerprint(other, net, x)).groups == {}


def test_a_staircase_file_given_by_the_profile_is_used_only_when_it_matches(tmp_path, monkeypatch):
    net, x = _net(), torch.randn(1, 1, 8, 8)
    groups = _groups(net, x)
    fp = fingerprint(PROFILE, net, x)
    store = staircase.StaircaseStore(tmp_path / "remote.json", fp)
    for g in groups:
        store.add(g.name, g.channels, {g.channels // 2: 0.6, g.channels - 1: 1.2})
    store.save()
    monkeypatch.setattr(staircase, "time_ratios", lambda *a, **k: pytest.fail("measured although a file was given"))
    given = PROFILE.model_copy(update={"staircases": str(store.path)})
    got = load_or_measure(tmp_path / "unused.json", net, groups, x, given, 4)
    assert learned_widths(got, groups) == {g.name: [g.channels // 2, g.channels] for g in groups}
    assert not (tmp_path / "unused.json").exists()
    with pytest.raises(ConfigError, match="threads"):
        load_or_measure(tmp_path / "unused.json", net, groups, x, given.model_copy(update={"threads": 4}), 4)
    with pytest.raises(ConfigError, match="not found"):
        load_or_measure(tmp_path / "unused.json", net, groups, x, PROFILE.model_copy(update={"staircases": str(tmp_path / "no.json")}), 4)


def test_saving_merges_what_another_worker_stored(tmp_path):
    fp = {"cpu": "x"}
    a = staircase.StaircaseStore.open(tmp_path / "s.json", fp)
    b = staircase.StaircaseStore.open(tmp_path / "s.json", fp)
    a.add("g1", 64, {32: 0.5})
    a.save()
    b.add("g2", 32, {16: 0.7})
    b.save()
    stored = json.loads((tmp_path / "s.json").read_text())["groups"]
    assert set(stored) == {"g1", "g2"}


def test_narrowing_cuts_one_group_width_by_width_and_the_model_still_runs():
    net, x = _net(), torch.randn(1, 1, 8, 8)
    got = []
    for w in narrowing(net, x, "0", [12, 4, 8], 4):
        assert net[0].out_channels == w and net[1].num_features == w and net[3].in_channels == w
        assert net(x).shape == (1, 4)
        got.append(w)
    assert got == [12, 8, 4] and net[3].out_channels == 24  # the other group is untouched


def test_torch_profiles_time_the_cut_modules(tmp_path):
    net, x = _net(), torch.randn(1, 1, 8, 8)
    groups = _groups(net, x)
    prof = DeviceProfile(name="torch-test", backend="torch", threads=1, warmup=1, repeats=5, target_rel_ci=None)
    threads = torch.get_num_threads()
    got = staircase.measure_staircases(net, groups[:1], x, prof, 4, {groups[0].name: [8]})
    assert torch.get_num_threads() == threads
    assert set(got[groups[0].name]) == {8} and got[groups[0].name][8] > 0


# --------------------------------------------------------------------------- in a search
@pytest.mark.slow
def test_tiny_search_with_staircases_prunes_to_learned_widths_only(tmp_path, fast_profile):
    import autoprune
    from autoprune.config import load_run_config

    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=2, pretrain_steps=5,
                          efficiency={"staircases": True, "staircase_widths": 3, "sensitivity_scan": False,
                                      "multi_fidelity": False})
    res = autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))), export=False)
    pinned = json.loads((res.out / "staircases" / "allowed_widths.json").read_text())
    allowed = pinned["widths"]
    assert allowed and allowed == res.ctx.widths
    assert (res.out / "staircases" / f"{fingerprint_key(pinned['fingerprint'])}.json").is_file()
    done = [t for t in res.study.trials if t.user_attrs.get("widths")]
    assert done
    for t in done:
        for name, (before, after) in t.user_attrs["widths"].items():
            assert after in allowed[name], (name, after, allowed[name])
