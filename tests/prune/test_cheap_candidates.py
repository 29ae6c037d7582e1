"""Cheap candidates (issue 21): what a trial costs besides its fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch

from autoprune.prune.plan import PruningPlan, apply_plan, apply_plan_from
from autoprune.prune.structure import analyse, find_groups
from autoprune.study.priors import flops_savings
from autoprune.train import models
from autoprune.train.models import build_model, count_flops, count_flops_hooked, flop_counter


@pytest.mark.parametrize("arch,channels", [("demo", 1), ("resnet18", 3), ("mobilenet_v3_small", 3)])
def test_hooked_flops_equal_fvcore_on_dense_and_pruned_models(arch, channels):
    """The forward-hook count is fvcore's count, exactly, on the dense model and on a pruned copy
    (residual adds, depthwise convs, squeeze-excitation, BN and pooling included)."""
    torch.manual_seed(0)
    model = build_model(arch, 10, in_channels=channels)
    x = torch.randn(1, channels, 32, 32)
    counter, dense = flop_counter(model, x)
    assert counter is count_flops_hooked and dense == count_flops(model, x)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, x, PruningPlan({g.name: 0.4 for g in find_groups(model, x, 10)}, round_to=8), 10)
    assert count_flops_hooked(pruned, x) == count_flops(pruned, x) < 0.8 * dense


def test_flop_counter_falls_back_to_fvcore_where_hooks_miss_an_op():
    """MobileNetV2 pools functionally (F.adaptive_avg_pool2d): hooks do not see it, so the run
    keeps fvcore's trace rather than report a different count."""
    model = build_model("mobilenet_v2", 10)
    x = torch.randn(1, 3, 32, 32)
    counter, dense = flop_counter(model, x)
    assert counter is count_flops and dense == count_flops(model, x)
    assert count_flops_hooked(model, x) != dense


def test_flops_savings_counts_without_tracing_each_group(monkeypatch):
    """The per-group FLOPs-saved scan with the run's counter: no fvcore trace per group, and the
    same fractions as fvcore gives."""
    model = build_model("resnet18", 10)
    x = torch.randn(1, 3, 32, 32)
    groups = find_groups(model, x, 10)[:3]
    for g in groups:
        g.low, g.high = 0.0, 0.8
    ref = flops_savings(model, groups, x, 10, ratio=0.5)
    counter, _ = flop_counter(model, x)

    def no_trace(*a, **k):
        raise AssertionError("fvcore traced a candidate")

    monkeypatch.setattr(models, "count_flops", no_trace)
    monkeypatch.setattr("autoprune.study.priors.count_flops", no_trace)
    fast = flops_savings(model, groups, x, 10, ratio=0.5, counter=counter)
    assert fast == ref and all(v > 0 for v in fast.values())


@pytest.mark.parametrize("arch,channels", [("demo", 1), ("resnet18", 3), ("mobilenet_v3_small", 3), ("squeezenet1_0", 3)])
def test_candidate_sliced_through_the_dense_groups_equals_a_fresh_analysis(arch, channels):
    """A candidate cut through the dense model's groups (analysed once per run) has exactly the
    weights, widths and outputs of one pruned through its own freshly traced graph: residual
    adds, depthwise convs, squeeze-excitation and concatenations (SqueezeNet's Fire modules)."""
    torch.manual_seed(0)
    model = build_model(arch, 10, in_channels=channels).eval()
    x = torch.randn(2, channels, 64, 64)
    structure = analyse(model, x[:1], 10)
    gen = torch.Generator().manual_seed(1)
    plan = PruningPlan({g.name: round(float(torch.rand(1, generator=gen)) * 0.7, 2) for g in structure.groups}, round_to=8)
    fresh, cached = copy.deepcopy(model), copy.deepcopy(model)
    want = apply_plan(fresh, x[:1], plan, 10)
    got = apply_plan_from(cached, model, structure, plan)
    assert got == want and sum(a > b for a, b in want.values()) >= 5
    a, b = fresh.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(fresh(x), cached(x))
    assert all(p.shape == model.get_parameter(n).shape for n, p in model.named_parameters())  # the dense model is untouched


def test_plans_the_dense_groups_cannot_serve_fall_back_to_a_fresh_analysis():
    """Weight zeros (N:M) and calibration-statistics criteria need the copy's own graph:
    apply_plan_from declines (None) and leaves the copy as it was."""
    model = build_model("resnet18", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    structure = analyse(model, x, 10)
    name = structure.groups[0].name
    for plan in (PruningPlan({name: 0.5}, granularity={name: "nm:2:4"}), PruningPlan({name: 0.5}, default_method="taylor")):
        m = copy.deepcopy(model)
        assert apply_plan_from(m, model, structure, plan) is None
        assert all(torch.equal(p, model.get_parameter(n)) for n, p in m.named_parameters())
