"""Priors from the dense model, computed once per run folder: what each group costs and buys.

* Sensitivity scan: prune each group alone (L1, BN-recalibrated, no fine-tune) and record the
  accuracy drop; sensitive groups get a narrower ratio range, so the sampler does not waste
  trials on hopeless candidates.
* FLOPs savings: what pruning each group alone removes; with the drops it ranks groups by
  accuracy lost per FLOP saved, which shapes the sensitivity-allocated seed trials.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.nn as nn

from autoprune.prune.plan import PruningPlan, apply_plan, apply_plan_from
from autoprune.prune.structure import PrunableGroup, Structure, analyse
from autoprune.files import atomic_write_text
from autoprune.train.bn import recalibrate_bn
from autoprune.train.data import DataBundle
from autoprune.train.device import TrainSetup, batches_to, model_device
from autoprune.train.models import count_flops, evaluate


def pruned_alone(
    base: nn.Module, group: PrunableGroup, example: torch.Tensor, num_classes: int, ratio: float, round_to: int,
    structure: Optional[Structure] = None,
) -> Optional[nn.Module]:
    """A copy of ``base`` with only ``group`` pruned (L1) by ``ratio`` clipped to the group's
    range; None when that leaves nothing to prune. What the per-group scans measure."""
    r = min(max(ratio, group.low), group.high) if group.high > 0 else 0.0
    if r <= 0:
        return None
    m = copy.deepcopy(base)
    plan = PruningPlan({group.name: r}, round_to=round_to)
    # Through the base's groups (``structure``: analysed once per scan) where the plan allows.
    if structure is None or apply_plan_from(m, base, structure, plan) is None:
        apply_plan(m, example.to(model_device(m)), plan, num_classes)
    return m


def sensitivity_scan(
    base: nn.Module,
    groups: list[PrunableGroup],
    data: DataBundle,
    example: torch.Tensor,
    calib: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ratio: float = 0.5,
    round_to: int = 8,
    max_batches: Optional[int] = 4,
    setup: Optional[TrainSetup] = None,
    progress: Optional[Callable[[str], None]] = None,
    task: Optional[Any] = None,
    structure: Optional[Structure] = None,
) -> dict[str, float]:
    """Accuracy drop (dense − pruned) when only one group is pruned by ``ratio`` (L1, BN
    recalibrated, no fine-tune). Evaluated on at most ``max_batches`` validation batches, on
    the dense model's device (``setup``: precision and threads of the ``train:`` section);
    ``progress`` gets a line with the ETA every few seconds (a ResNet-50 scan takes minutes)."""
    calib = batches_to(calib, model_device(base))  # once, not once per group
    if progress is not None:
        progress(f"sensitivity scan: {len(groups)} groups, each pruned alone by {ratio:g} and evaluated once before the trials "
                 f"(turn off with --set efficiency.sensitivity_scan=false)")
    # Compare like with like: the reference is the dense model with the same BN recalibration.
    t0 = time.perf_counter()
    ref = copy.deepcopy(base)
    recalibrate_bn(ref, calib, setup)
    dense_acc = evaluate(ref, data, max_batches=max_batches, split="search", setup=setup, task=task)
    if progress is not None:
        # Every group costs what the reference did (copy, BN recalibration, evaluation on the same
        # batches) plus its pruning: the ETA is known before the first group starts.
        per = time.perf_counter() - t0
        progress(f"sensitivity scan: ETA about {per * len(groups):.0f}s ({len(groups)} groups x {per:.1f}s per evaluation)")
    out: dict[str, float] = {}
    if structure is None and groups:  # the run's analysis when given (study/context.py), else one for the scan
        structure = analyse(base, example.to(model_device(base)), data.num_classes)
    for g in _with_eta(groups, "sensitivity scan", progress):
        try:
            m = pruned_alone(base, g, example, data.num_classes, ratio, round_to, structure)
            if m is None:
                out[g.name] = 0.0
                continue
            recalibrate_bn(m, calib, setup)
            out[g.name] = dense_acc - evaluate(m, data, max_batches=max_batches, split="search", setup=setup, task=task)
        except Exception as exc:  # noqa: BLE001 - one group never stops the scan
            # Counted as losing everything: the group's range is narrowed the most.
            out[g.name] = dense_acc
            if progress is not None:
                progress(f"sensitivity scan: pruning {g.name} fails ({type(exc).__name__}: {exc}); counted as the largest drop")
    return out


T = TypeVar("T")


def _with_eta(items: Sequence[T], what: str, progress: Optional[Callable[[str], None]], every_s: float = 5.0) -> Iterator[T]:
    """Yield ``items``, telling ``progress`` how far along and the ETA at most every ``every_s``
    seconds (and at the end), so a long per-group pass is never silent."""
    t0 = last = time.perf_counter()
    n = len(items)
    for i, item in enumerate(items):
        yield item
        now = time.perf_counter()
        if progress is not None and (now - last >= every_s or i + 1 == n):
            last = now
            eta = (now - t0) / (i + 1) * (n - i - 1)
            progress(f"{what}: {i + 1}/{n} groups, {now - t0:.0f}s elapsed, ETA {eta:.0f}s")


def shape_ranges(groups: list[PrunableGroup], drops: dict[str, float], strength: float = 0.5) -> list[PrunableGroup]:
    """Narrow each group's upper ratio bound by its relative sensitivity (most sensitive group:
    ``high`` shrinks by ``strength``×range; insensitive groups keep their range)."""
    worst = max([d for d in drops.values() if d > 0], default=0.0)
    if worst <= 0:
        return groups
    for g in groups:
        s = max(0.0, drops.get(g.name, 0.0)) / worst
        g.high = round(g.low + (g.high - g.low) * (1.0 - strength * s), 4)
    return groups


def flops_savings(
    base: nn.Module, groups: list[PrunableGroup], example: torch.Tensor, num_classes: int, ratio: float = 0.5, round_to: int = 8,
    progress: Optional[Callable[[str], None]] = None, counter: Optional[Callable[[nn.Module, torch.Tensor], float]] = None,
    structure: Optional[Structure] = None,
) -> dict[str, float]:
    """Fraction of the dense FLOPs removed when only one group is pruned by ``ratio``: what a
    group *buys*, to weigh against what it costs in accuracy (:func:`sensitivity_scan`)."""

    count = counter or count_flops  # the run's counter (train/models.py::flop_counter): no trace per group
    dense = count(base, example)
    out: dict[str, float] = {}
    if structure is None and groups and dense > 0:
        structure = analyse(base, example.to(model_device(base)), num_classes)
    for g in _with_eta(groups, "FLOPs per group", progress):
        m = pruned_alone(base, g, example, num_classes, ratio, round_to, structure) if dense > 0 else None
        out[g.name] = 0.0 if m is None else max(0.0, 1.0 - count(m, example) / dense)
    return out


def allocate_ratios(
    groups: list[PrunableGroup], drops: dict[str, float], savings: dict[str, float], level: float, spread: float
) -> dict[str, float]:
    """Non-uniform ratios around a uniform ``level``: groups ranked by accuracy lost per FLOP
    saved (drop / saving); the cheapest group gets ``level + spread/2``, the dearest
    ``level − spread/2``, linearly by rank, each clipped to its own range. Rank, not raw value:
    the scan's drops are noisy, their order is what carries over to the fine-tuned model."""
    free = [g for g in groups if g.low < g.high]
    score = {g.name: max(drops.get(g.name, 0.0), 0.0) / max(savings.get(g.name, 0.0), 1e-6) for g in free}
    order = sorted(free, key=lambda g: (score[g.name], g.name))
    n = len(order)
    out: dict[str, float] = {}
    for i, g in enumerate(order):
        rank = i / (n - 1) if n > 1 else 0.5
        out[g.name] = min(max(level + spread * (0.5 - rank), g.low), g.high)
    return out


def load_or_compute(path: Path, fn: Any, **kwargs: Any) -> dict[str, float]:
    """Cache a per-group scan in the run folder: resumed searches and other workers reuse it."""
    if path.is_file():
        return json.loads(path.read_text())
    values = fn(**kwargs)
    atomic_write_text(path, json.dumps(values, indent=2))
    return values


def load_or_scan(path: Path, **kwargs: Any) -> dict[str, float]:
    """The sensitivity scan, cached in the run folder (see :func:`load_or_compute`)."""
    return load_or_compute(path, sensitivity_scan, **kwargs)
