"""Budget mode (study/budget.py, ``search.target``): the latency model's MACs, aiming, allocation, the search."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch
import torch.nn as nn

import autoprune
from autoprune.config import SearchSettings, load_run_config, parse_target
from autoprune.errors import ConfigError
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import PrunableGroup, find_groups
from autoprune.study.budget import LatencyModel, allocate_for_target, reachable, shift_to_target, shifted, targets_ms
from autoprune.train.models import build_model
from conftest import tiny_run_config, write_yaml


def real_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Conv / linear multiply-accumulates of one forward pass, read off the (pruned) modules."""
    total = 0.0

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        else:
            total += out[0].numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(example)
    for h in hs:
        h.remove()
    return total


@pytest.mark.parametrize("arch,size", [("demo", 16), ("mobilenet_v2", 32), ("resnet18", 32)])
def test_latency_model_macs_equal_those_of_the_pruned_model(arch, size):
    """The plan's MACs, computed before pruning from which group owns each layer's output and
    input channels, are exactly those of the model pruned by that plan (residual adds and
    depthwise convs included)."""
    torch.manual_seed(0)
    model = build_model(arch, 10, in_channels=1 if arch == "demo" else 3)
    example = torch.randn(1, 1 if arch == "demo" else 3, size, size)
    groups = find_groups(model, example, 10)
    lm = LatencyModel.of(model, example, groups, round_to=8)
    assert lm.macs({}) == pytest.approx(real_macs(model, example))
    gen = torch.Generator().manual_seed(1)
    ratios = {g.name: round(float(torch.rand(1, generator=gen)) * 0.8, 2) for g in groups}
    pruned = copy.deepcopy(model)
    apply_plan(pruned, example, PruningPlan(ratios, round_to=8), 10)
    assert real_macs(pruned, example) < 0.9 * real_macs(model, example)
    assert lm.macs(ratios) == pytest.approx(real_macs(pruned, example), rel=1e-9)


def test_targets_parse_to_ms_and_bad_ones_are_refused():
    assert parse_target("3x") == ("speedup", 3.0) and parse_target(2.5) == ("ms", 2.5) and parse_target("1.5ms") == ("ms", 1.5)
    assert targets_ms(["2x", "4x", 3.0], 12.0) == [3.0, 6.0]  # tightest first, duplicates merged
    for bad in ("0.5x", "fast", -1, "1x"):
        with pytest.raises(ValueError, match="speed-up over the dense model"):
            parse_target(bad)
    assert SearchSettings(target="3x").target == ["3x"]
    with pytest.raises(ConfigError, match="search.target"):
        load_run_config(None, **{"search.target": ["3x", "slow"]})


def _toy(n: int = 3) -> tuple[LatencyModel, list[PrunableGroup]]:
    """n independent 64-channel groups; group i's layer costs (i+1) MACs per channel pair."""
    from autoprune.study.budget import Layer

    groups = [PrunableGroup(f"g{i}", 64, low=0.0, high=0.9) for i in range(n)]
    layers = [Layer(f"l{i}", float(i + 1), 64, 1, False, f"g{i}", None) for i in range(n)]
    lm = LatencyModel(layers, {g.name: g for g in groups}, round_to=1)
    lm.points = [(lm.macs({}), 10.0), (0.0, 0.0)]  # 10 ms dense, proportional to MACs
    return lm, groups


def _snap(v: float, g: PrunableGroup) -> float:
    from autoprune.study.space import _snap as snap_to_grid  # what the search uses: clipped, on the 0.05 grid

    return snap_to_grid(v, g.low, g.high, 0.05)


def test_shift_meets_the_target_with_the_least_pruning():
    lm, groups = _toy()
    line = lm.line()
    shape = {"g0": 0.3, "g1": 0.0, "g2": 0.1}
    s = shift_to_target(shape, groups, lm, 5.0, _snap, line)
    aimed = shifted(shape, groups, s, _snap)
    assert lm.ms(aimed, line) <= 5.0
    assert lm.ms(shifted(shape, groups, s - 0.05, _snap), line) > 5.0  # any less pruning misses it
    assert aimed["g0"] - aimed["g2"] == pytest.approx(0.2)  # the sampler's shape is kept
    # A target below what the space reaches: the largest shift, and the target is reported unreachable.
    assert shift_to_target(shape, groups, lm, 0.01, _snap, line) == 1.0
    assert reachable([0.01, 5.0], groups, lm, line) == [5.0]


def test_allocation_prunes_cheap_importance_per_ms_first():
    """HALP-like: with equal sensitivity the group saving the most per step goes first; a
    sensitive group is pruned less than an insensitive one of the same cost."""
    lm, groups = _toy()
    line = lm.line()
    r = allocate_for_target(groups, {}, lm, 6.0, 0.5, _snap, line)
    assert lm.ms(r, line) <= 6.0
    assert r["g2"] > r["g0"]  # g2's layer is the dearest: pruning it saves the most
    r = allocate_for_target(groups, {"g0": 0.001, "g1": 0.001, "g2": 0.5}, lm, 6.0, 0.5, _snap, line)
    assert lm.ms(r, line) <= 6.0 and r["g2"] < r["g1"]


def test_budget_search_aims_trials_and_replays_them(tmp_path, fast_profile):
    """A budget-mode search: per-target seed trials, every other trial aimed (shift and
    prediction recorded) at a target in turn, trials slower than the loosest target skip the
    fine-tune, and ``export --trial N`` rebuilds an aimed trial's exact widths."""
    from autoprune.deploy.replay import replay_model
    from autoprune.study.context import prepare

    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=6, search={"trials": 6, "seed": 0, "target": ["1.5x", "2x"]},
                          efficiency={"sensitivity_scan": True})
    res = autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))), export=False)
    ctx, study = res.ctx, res.study
    assert len(ctx.targets_ms) == 2 and (ctx.run.budget_calibration).is_file()
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    seeds = [t for t in trials if t.user_attrs.get("seed")]
    assert {t.user_attrs["seed"] for t in seeds} == {"uniform", "allocated"}
    assert {round(t.user_attrs["target_ms"], 6) for t in seeds} == {round(x, 6) for x in ctx.targets_ms}
    aimed = [t for t in trials if not t.user_attrs.get("seed")]
    assert aimed, "the sampler's trials ran"
    for t in aimed:
        assert "budget_shift" in t.user_attrs and t.user_attrs["predicted_ms"] > 0
        assert t.user_attrs["target_ms"] in ctx.targets_ms
    loosest = max(ctx.targets_ms)
    for t in trials:
        assert (t.values[1] > loosest) == bool(t.user_attrs.get("skipped_finetune"))
    t = aimed[0]
    ctx2 = prepare(res.ctx.cfg)
    rebuilt = replay_model(ctx2, study.trials[t.number])
    widths = t.user_attrs["widths"]
    convs = {n: m for n, m in rebuilt.named_modules() if isinstance(m, nn.Conv2d)}
    for group, (_dense, kept) in widths.items():
        if group in convs:
            assert convs[group].out_channels == kept, group


def test_allocation_stops_at_an_upper_bound_off_the_ratio_grid():
    """A sensitivity-shaped upper bound (0.7875) is not on the 0.05 grid: the snapped bound lies
    below it, and the allocation must stop there instead of stepping forever."""
    lm, groups = _toy(2)
    for g in groups:
        g.high = 0.7875
    line = lm.line()
    r = allocate_for_target(groups, {}, lm, 0.01, 0.5, _snap, line)  # out of reach: every group at its bound
    assert r == {"g0": 0.75, "g1": 0.75}
