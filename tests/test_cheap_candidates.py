"""Cheap candidates (issue 21): what a trial costs besides its fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch

from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import find_groups
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
