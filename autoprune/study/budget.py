"""Budget mode (``search.target``): aim trials at latency targets instead of sweeping the front.

A user with a budget ("≤ 2 ms", "3× faster") wants the most accurate model under it; a search
whose trials land anywhere on the latency axis spends most of them far from it. Three pieces:

* :class:`LatencyModel`: the latency of a plan *before* pruning it: multiply-accumulates of every
  conv / linear computed from the kept widths (which group owns each layer's output and input
  channels comes from the dependency graph, :class:`~autoprune.prune.structure.PrunableGroup`),
  mapped to milliseconds by a line fitted to what was measured on the target: the dense model,
  two uniformly pruned calibration models, and every finished trial. Latency moves in steps, so
  the line only aims; the constraint is always the measured latency.
* :func:`allocate_for_target` (seed trials, like HALP): starting from the dense model, repeatedly
  prune a step more of the group that loses the least importance (sensitivity scan) per
  millisecond it saves (latency model), until the model is predicted to meet the target.
* :func:`shift_to_target`: every other trial's ratios, as the sampler proposed them, are a
  *shape*; one shift added to all of them sets the level so the prediction meets the trial's
  target. The sampler searches which groups to prune more, the budget decides how much in all.

The shift a trial used is stored (``budget_shift``), so ``export --trial N`` rebuilds exactly
the same plan without re-fitting anything.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from autoprune.config import parse_target
from autoprune.prune.plan import PruningPlan, apply_plan, kept_channels
from autoprune.prune.structure import PrunableGroup
from autoprune.files import atomic_write_text
from autoprune.runfolder import RunFolder

#: Uniform levels pruned and measured once per run folder to fit the MACs → ms line.
CALIBRATION_LEVELS = (0.3, 0.6)
#: Ratio increment of the greedy allocation.
ALLOCATION_STEP = 0.05


def targets_ms(spec: Optional[Sequence[Any]], dense_ms: float) -> list[float]:
    """``search.target`` in milliseconds, tightest first (speed-ups divide the dense latency)."""
    out = []
    for item in spec or []:
        kind, value = parse_target(item)
        out.append(dense_ms / value if kind == "speedup" else value)
    return sorted(set(out))


@dataclass
class Layer:
    """One conv / linear: dense MACs per (output channel × input channel per conv group), and
    which groups own its output and input channels (None: not pruned)."""

    name: str
    macs_per_pair: float
    cout: int
    cin_per_group: int
    depthwise: bool
    out_group: Optional[str]
    in_group: Optional[str]


@dataclass
class LatencyModel:
    """Analytic MACs of a plan, and a line ``ms = a + b·MACs`` fitted to measured models."""

    layers: list[Layer]
    groups: dict[str, PrunableGroup]
    round_to: int
    widths: dict[str, list[int]] = field(default_factory=dict)
    #: (MACs, measured ms) of the dense and calibration models; trials add theirs to ``line``.
    points: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, example: torch.Tensor, groups: Sequence[PrunableGroup], round_to: int,
           widths: Optional[dict[str, list[int]]] = None) -> "LatencyModel":
        out_of = {m: g.name for g in groups for m in g.members}
        in_of = {m: g.name for g in groups for m in g.consumers}
        spatial: dict[str, float] = {}

        def hook(mod: nn.Module, args: Any, out: torch.Tensor, name: str) -> None:
            last = out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1]
            spatial[name] = out[0].numel() / max(1, last)  # output positions per sample

        handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
                   for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                model.eval()(example[:1].to(next(model.parameters()).device))
        finally:
            for h in handles:
                h.remove()
        layers = []
        for name, m in model.named_modules():
            if name not in spatial:
                continue
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                layers.append(Layer(name, spatial[name] * k, m.out_channels, m.in_channels // m.groups, dw,
                                    out_of.get(name), None if dw else in_of.get(name)))
            else:
                layers.append(Layer(name, spatial[name], m.out_features, m.in_features, False, out_of.get(name), in_of.get(name)))
        return cls(layers, {g.name: g for g in groups}, round_to, dict(widths or {}))

    def kept(self, ratios: dict[str, float]) -> dict[str, float]:
        """Fraction of each group's channels a plan keeps (after rounding, as pruning does)."""
        out = {}
        for name, r in ratios.items():
            g = self.groups.get(name)
            if g is not None and r > 0:
                out[name] = kept_channels(g.channels, min(r, 0.99), self.round_to, g.ch_groups, self.widths.get(name)) / g.channels
        return out

    def macs(self, ratios: dict[str, float]) -> float:
        keep = self.kept(ratios)
        total = 0.0
        for ly in self.layers:
            cout = ly.cout * keep.get(ly.out_group or "", 1.0)
            cin = 1.0 if ly.depthwise else ly.cin_per_group * keep.get(ly.in_group or "", 1.0)
            total += ly.macs_per_pair * cout * cin
        return total

    def line(self, extra: Sequence[tuple[float, float]] = ()) -> tuple[float, float]:
        """(a, b) of ``ms = a + b·MACs``, least squares on the calibration points plus ``extra``
        (finished trials), b > 0, a ≥ 0."""
        pts = np.array([*self.points, *extra], dtype=float)
        if len(pts) == 0:
            return 0.0, 1.0
        if len(pts) == 1 or np.ptp(pts[:, 0]) <= 0:
            return 0.0, float(pts[:, 1].mean() / max(pts[:, 0].mean(), 1.0))
        b, a = np.polyfit(pts[:, 0], pts[:, 1], 1)
        if b <= 0 or a < 0:  # noise: fall back to proportional through the largest model
            top = pts[np.argmax(pts[:, 0])]
            return 0.0, float(top[1] / max(top[0], 1.0))
        return float(a), float(b)

    def ms(self, ratios: dict[str, float], line: Optional[tuple[float, float]] = None) -> float:
        a, b = line or self.line()
        return a + b * self.macs(ratios)


# --------------------------------------------------------------------------- aiming trials
def shifted(ratios: dict[str, float], groups: Sequence[PrunableGroup], shift: float, snap: Callable[[float, PrunableGroup], float]) -> dict[str, float]:
    """Every free group's ratio moved by ``shift``, clipped to its range and snapped to its grid."""
    out = dict(ratios)
    for g in groups:
        if g.low < g.high and g.name in out:
            out[g.name] = snap(min(max(out[g.name] + shift, g.low), g.high), g)
    return out


def shift_to_target(ratios: dict[str, float], groups: Sequence[PrunableGroup], model: LatencyModel, target_ms: float,
                    snap: Callable[[float, PrunableGroup], float], line: tuple[float, float]) -> float:
    """The smallest shift (in [-1, 1]) whose plan is predicted (``line``) to meet ``target_ms``:
    the least pruning of this shape that fits (the prediction falls as the shift grows)."""

    def fits(s: float) -> bool:
        return model.ms(shifted(ratios, groups, s, snap), line) <= target_ms

    lo, hi = -1.0, 1.0
    if fits(lo):
        return lo
    if not fits(hi):
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def allocate_for_target(groups: Sequence[PrunableGroup], drops: dict[str, float], model: LatencyModel, target_ms: float,
                        ref_ratio: float, snap: Callable[[float, PrunableGroup], float], line: tuple[float, float]) -> dict[str, float]:
    """HALP-like ratios for one target: greedily prune ``ALLOCATION_STEP`` more of the group
    with the least importance lost per millisecond saved until the prediction meets the target.

    Importance lost by pruning ``r`` of a group: its sensitivity-scan drop at ``ref_ratio``
    scaled by ``(r / ref_ratio)²`` (the first channels removed are the least important ones);
    without a scan every group counts alike and the fastest savings go first."""
    free = [g for g in groups if g.low < g.high]
    ratios = {g.name: g.low for g in free}
    floor = 1e-4

    def cost(g: PrunableGroup, r: float) -> float:
        return max(drops.get(g.name, 0.0), floor) * (r / ref_ratio) ** 2 if drops else (r / ref_ratio) ** 2

    now = model.ms(ratios, line)
    while now > target_ms:
        best, best_score, best_ms = None, math.inf, now
        for g in free:
            r_next = _next_width(model, g, ratios[g.name], snap)
            if r_next is None:
                continue
            trial = {**ratios, g.name: r_next}
            ms = model.ms(trial, line)
            saved = now - ms
            if saved <= 0:
                continue
            score = (cost(g, r_next) - cost(g, ratios[g.name])) / saved
            if score < best_score:
                best, best_score, best_ms = (g.name, r_next), score, ms
        if best is None:  # every group at its bound: the target is out of this space's reach
            break
        ratios[best[0]] = best[1]
        now = best_ms
    return ratios


def _next_width(model: LatencyModel, g: PrunableGroup, r: float, snap: Callable[[float, PrunableGroup], float]) -> Optional[float]:
    """The smallest ratio above ``r`` (in :data:`ALLOCATION_STEP` steps, within the group's
    range) that keeps fewer channels: with ``round_to`` several steps often keep the same width."""
    now = model.kept({g.name: r}).get(g.name, 1.0)
    prev = r
    for k in range(1, int(1.0 / ALLOCATION_STEP) + 2):
        nxt = snap(min(r + k * ALLOCATION_STEP, g.high), g)
        if nxt <= prev:  # at the group's upper bound (snapped: it may lie below ``high``)
            return None
        if model.kept({g.name: nxt}).get(g.name, 1.0) < now:
            return nxt
        prev = nxt
    return None


def reachable(targets: Sequence[float], groups: Sequence[PrunableGroup], model: LatencyModel, line: tuple[float, float]) -> list[float]:
    """The targets the space can meet by the prediction: the fastest plan (every group at its
    upper bound) is predicted at or under them. Trials aimed at the others would all be that
    same plan."""
    fastest = model.ms({g.name: g.high for g in groups}, line)
    return [t for t in targets if t >= fastest]


# --------------------------------------------------------------------------- calibration
def calibrate(model: LatencyModel, base: nn.Module, example: torch.Tensor, groups: Sequence[PrunableGroup], num_classes: int,
              measure: Callable[[nn.Module, str], float], dense_ms: float, run: RunFolder) -> LatencyModel:
    """Fit the MACs → ms line once per run folder (``budget_calibration.json``: resumed runs and
    other workers aim with the same line): the dense model plus :data:`CALIBRATION_LEVELS`
    uniformly pruned copies, each measured on the target by ``measure(model, label)``."""
    path = run.budget_calibration
    if path.is_file():
        model.points = [tuple(p) for p in json.loads(path.read_text())["points"]]
        return model
    points = [(model.macs({}), dense_ms)]
    example1 = example[:1]
    for level in CALIBRATION_LEVELS:
        ratios = {g.name: min(max(level, g.low), g.high) for g in groups if g.high > 0}
        pruned = copy.deepcopy(base)
        apply_plan(pruned, example1.to(next(pruned.parameters()).device), PruningPlan(ratios, round_to=model.round_to,
                   widths=model.widths), num_classes)
        points.append((model.macs(ratios), measure(pruned, f"level{level:g}")))
    model.points = points
    atomic_write_text(path, json.dumps({"points": points, "levels": list(CALIBRATION_LEVELS)}, indent=1))
    return model


def measured_points(trials: Sequence[Any]) -> list[tuple[float, float]]:
    """(predicted MACs, measured ms) of finished trials that recorded them: the line's data. A
    trial the latency predictor rejected (``measured_latency_ms`` None) holds a prediction, not
    a measurement, and is left out."""
    return [(float(t.user_attrs["macs_est"]), float(t.values[1])) for t in trials
            if t.values and "macs_est" in t.user_attrs
            and not ("measured_latency_ms" in t.user_attrs and t.user_attrs["measured_latency_ms"] is None)]
