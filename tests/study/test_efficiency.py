import copy

import pytest
import torch
import torch.nn as nn

from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import PrunableGroup, find_groups
from autoprune.study.fidelity import hopeless_at_rung0
from autoprune.study.priors import sensitivity_scan, shape_ranges
from autoprune.train.bn import recalibrate_bn
from autoprune.train.data import load_digits
from autoprune.train.models import DemoResNet, evaluate, pretrain


def test_recalibrated_bn_stats_equal_activation_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    batches = [(torch.randn(16, 1, 8, 8) * 3 + 1, torch.zeros(16)) for _ in range(3)]
    assert recalibrate_bn(net, batches) == 1
    acts = torch.cat([net[0](x) for x, _ in batches])
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, acts.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # cumulative average of per-batch unbiased variances (what PyTorch's momentum=None computes)
    per_batch = torch.stack([net[0](x).var((0, 2, 3), unbiased=True) for x, _ in batches]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not net.training


@pytest.fixture(scope="module")
def trained():
    """Digits, a demo model trained for 80 steps, and an example input."""
    d = load_digits()
    torch.manual_seed(0)
    base = DemoResNet()
    pretrain(base, d, 0, steps=80)
    return d, base, d.example_input()


def test_recalibration_recovers_accuracy_after_pruning(trained):
    d, base, x = trained
    groups = find_groups(base, x, 10)
    pruned = copy.deepcopy(base)
    apply_plan(pruned, x, PruningPlan({g.name: 0.6 for g in groups}), 10)
    before = evaluate(pruned, d)
    calib = [b for _, b in zip(range(8), d.loader("train", 64, shuffle=True))]
    recalibrate_bn(pruned, calib)
    after = evaluate(pruned, d)
    assert after > before + 0.05, (before, after)


def test_sensitivity_scan_and_range_shaping(trained):
    d, base, x = trained
    groups = find_groups(base, x, 10)
    for g in groups:
        g.low, g.high = 0.0, 0.7
    calib = [b for _, b in zip(range(4), d.loader("train", 64, shuffle=True))]
    drops = sensitivity_scan(base, groups, d, x, calib, ratio=0.5, max_batches=2)
    assert set(drops) == {g.name for g in groups}
    assert all(-1.0 <= v <= 1.0 for v in drops.values())


def test_shape_ranges_narrows_sensitive_groups_only():
    gs = [PrunableGroup("a", 64, low=0.0, high=0.8), PrunableGroup("b", 64, low=0.0, high=0.8), PrunableGroup("c", 64, low=0.2, high=0.6)]
    shape_ranges(gs, {"a": 0.2, "b": -0.01, "c": 0.1}, strength=0.5)
    assert gs[0].high == pytest.approx(0.4)  # most sensitive: range halved
    assert gs[1].high == pytest.approx(0.8)  # insensitive: untouched
    assert gs[2].high == pytest.approx(0.2 + 0.4 * 0.75)


def test_hopeless_at_rung0_uses_an_optimistic_projection():
    # Three fully fine-tuned trials: recovery fractions 0.5, 0.25, 0.0 of the gap to dense (0.9).
    full = [(0.70, 0.80, 0.5), (0.50, 0.60, 0.3), (0.85, 0.85, 0.8)]
    done = [(0.80, 0.5), (0.60, 0.3), (0.85, 0.8)]
    # acc0 0.60 at latency 0.6: optimistic 0.60 + 0.5*0.30 = 0.75 < 0.80 of a faster trial -> stop
    assert hopeless_at_rung0(0.60, 0.6, 0.9, full, done)
    # acc0 0.72: optimistic 0.81 > 0.80 -> might reach the front, keep going
    assert not hopeless_at_rung0(0.72, 0.6, 0.9, full, done)
    # nothing at least as fast beats it
    assert not hopeless_at_rung0(0.40, 0.2, 0.9, full, done)
    # too few fully fine-tuned trials to know how much the rest of the fine-tune recovers
    assert not hopeless_at_rung0(0.10, 0.9, 0.9, full[:2], done)


def test_flops_savings_measure_what_each_group_buys(trained):
    from autoprune.study.priors import flops_savings

    d, base, x = trained
    groups = find_groups(base, x, 10)
    for g in groups:
        g.low, g.high = 0.0, 0.7
    savings = flops_savings(base, groups, x, 10, ratio=0.5)
    assert set(savings) == {g.name for g in groups}
    assert all(0.0 < v < 1.0 for v in savings.values()), savings
    # pruning every group together saves more than any single group alone
    from autoprune.train.models import count_flops

    both = copy.deepcopy(base)
    apply_plan(both, x, PruningPlan({g.name: 0.5 for g in groups}), 10)
    assert 1 - count_flops(both, x) / count_flops(base, x) > max(savings.values())


def test_allocate_ratios_prunes_cheap_groups_more_around_the_level():
    from autoprune.study.priors import allocate_ratios

    gs = [PrunableGroup(n, 64, low=0.0, high=0.9) for n in ("cheap", "mid", "dear")] + [PrunableGroup("fixed", 64, low=0.3, high=0.3)]
    drops = {"cheap": 0.01, "mid": 0.05, "dear": 0.05}
    savings = {"cheap": 0.2, "mid": 0.2, "dear": 0.05}  # dear: same drop, a quarter of the saving
    r = allocate_ratios(gs, drops, savings, level=0.5, spread=0.4)
    assert r == pytest.approx({"cheap": 0.7, "mid": 0.5, "dear": 0.3})  # fixed groups are left out
    clipped = allocate_ratios(gs[:3], drops, savings, level=0.8, spread=0.4)
    assert clipped["cheap"] == pytest.approx(0.9) and clipped["dear"] == pytest.approx(0.6)


def test_fine_tune_rungs_follow_the_stop_decision():
    """The rung-0 decision is the caller's: the search asks hopeless_at_rung0, a replay (export
    --trial N) answers what the trial recorded, so it takes the same branch as the original."""
    from autoprune.config import EfficiencyConfig, FinetuneConfig
    from autoprune.study.fidelity import finetune_in_rungs
    from autoprune.train.models import DemoResNet

    data = load_digits(image_size=8)
    ft, eff = FinetuneConfig(steps=6, batch_size=16), EfficiencyConfig(rung0_fraction=0.34)
    seen = []
    for stop in (True, False):
        m = DemoResNet(10, 1, widths=(8, 8, 8))
        out = finetune_in_rungs(m, data, ft, eff, m, 0, lambda acc0, stop=stop: seen.append(acc0) or stop)
        assert out["stopped_at_rung0"] is stop and out["accuracy_rung0"] == seen[-1]
        assert out["finetune_steps"] == (2 if stop else 6)


def test_sensitivity_scan_says_its_eta_before_the_first_group(trained):
    """The scan's ETA comes before any group is pruned (it used to come only after the first
    groups), and names the switch that turns the scan off."""
    import time

    import autoprune.study.priors as priors

    d, base, x = trained
    groups = find_groups(base, x, 10)[:3]
    for g in groups:
        g.low, g.high = 0.0, 0.7
    calib = [b for _, b in zip(range(2), d.loader("train", 64, shuffle=True))]
    events: list[tuple[str, str]] = []
    real = priors.pruned_alone

    def spy(*a, **k):
        events.append(("prune", a[1].name))
        return real(*a, **k)

    priors.pruned_alone = spy
    try:
        t0 = time.perf_counter()
        priors.sensitivity_scan(base, groups, d, x, calib, ratio=0.5, max_batches=2, progress=lambda s: events.append(("say", s)))
        took = time.perf_counter() - t0
    finally:
        priors.pruned_alone = real
    first_prune = events.index(next(e for e in events if e[0] == "prune"))
    said_before = [s for kind, s in events[:first_prune] if kind == "say"]
    assert any("efficiency.sensitivity_scan=false" in s for s in said_before), said_before
    eta = [s for s in said_before if "ETA about" in s]
    assert eta and f"{len(groups)} groups" in eta[0], said_before
    assert 0 <= float(eta[0].split("ETA about ")[1].split("s")[0]) <= 3 * took + 1


def test_search_help_documents_the_sensitivity_scan_and_its_switch():
    from autoprune.cli import build_parser

    search = build_parser()._subparsers._group_actions[0].choices["search"]
    text = " ".join(search.format_help().split())
    assert "efficiency.sensitivity_scan" in text and "--no-sensitivity-scan" in text
    assert "evaluation of the model per group" in text and "whatever --trials is" in text
    from autoprune.cli.flags import load_config

    assert load_config(search.parse_args(["--no-sensitivity-scan"])).efficiency.sensitivity_scan is False
    assert load_config(search.parse_args([])).efficiency.sensitivity_scan is True  # the config decides (default on)
