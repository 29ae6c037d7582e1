"""The search space as Optuna parameters, and the plans they describe.

Parameter names are stable (they are stored in studies): ``ratio/<group>``, ``method`` or
``method/<group>``, ``granularity`` or ``granularity/<group>``, and ``wratio/<group>`` for groups
that drew ``hybrid`` (the fraction of the remaining weights zeroed after channel removal).
``seed_plans`` gives the first trials: uniform levels and their sensitivity-allocated twins.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, Optional, Sequence

import optuna

from autoprune.config import (
    SearchSpace,
)
from autoprune.prune.plan import PruningPlan
from autoprune.prune.structure import PrunableGroup
from autoprune.study.budget import allocate_for_target, measured_points, reachable, shift_to_target, shifted
from autoprune.study.context import SearchContext
from autoprune.study.priors import (
    allocate_ratios,
)

RATIO_PREFIX = "ratio/"
METHOD_PREFIX = "method/"


# --------------------------------------------------------------------------- trial
def _snap(v: float, low: float, high: float, step: Optional[float]) -> float:
    v = min(max(v, low), high)
    if step:
        v = low + round((v - low) / step) * step
        v = min(v, low + math.floor((high - low) / step + 1e-9) * step)
    return round(v, 10)


def _group_step(sp: SearchSpace, g: PrunableGroup) -> Optional[float]:
    """The ratio grid of one group: the space's ``step``, unless the group's range is narrower."""
    return sp.step if sp.step and sp.step <= (g.high - g.low) else None


def suggest_plan(trial: optuna.trial.BaseTrial, ctx: SearchContext) -> PruningPlan:
    """Trial parameters → pruning plan. Parameter names are ``ratio/<group>`` (and ``method``)."""
    sp = ctx.space
    ratios, meths = {}, {}
    for g in ctx.groups:
        if g.low == g.high:
            ratios[g.name] = g.low
        else:
            step = _group_step(sp, g)
            high = _snap(g.high, g.low, g.high, step) if step else g.high
            ratios[g.name] = trial.suggest_float(RATIO_PREFIX + g.name, g.low, high, step=step)
    if sp.global_method:
        meths_all = sorted(set(sp.methods))
        m = trial.suggest_categorical("method", meths_all) if len(meths_all) > 1 else meths_all[0]
        meths = {g.name: m for g in ctx.groups}
    else:
        for g in ctx.groups:
            options = sorted(set(g.methods))
            meths[g.name] = trial.suggest_categorical(METHOD_PREFIX + g.name, options) if len(options) > 1 else options[0]
    # ``granularity``/``granularity/<group>`` and, for hybrid groups, ``wratio/<group>`` (methods/space.py).
    grans, wratios = suggest_granularities(trial, sp, ctx.groups)
    return PruningPlan(ratios, meths, sp.round_unit, granularity=grans, weight_ratios=wratios, bn_l1=sp.bn_l1,
                       bn_l1_steps=sp.bn_l1_steps, widths=ctx.widths)


def aim_at_target(trial: optuna.trial.BaseTrial, ctx: SearchContext, plan: PruningPlan,
                  stored: Optional[dict[str, Any]] = None) -> PruningPlan:
    """Budget mode (``search.target``): the plan with every ratio shifted by one amount so the
    latency model predicts it meets the trial's target (study/budget.py); unchanged otherwise.

    The target is the seed trial's own, else the targets in turn by trial number. The shift is
    recorded (``budget_shift``) with the prediction; a trial that already has one (seed trials,
    and a replay passing the trial's ``stored`` attributes) uses it as it is, so ``export
    --trial N`` rebuilds the same plan without the study's other trials."""
    if not ctx.targets_ms or ctx.latency_model is None:
        return plan
    attrs = {**trial.user_attrs, **(stored or {})}
    model = ctx.latency_model
    line = model.line(measured_points(_finished(trial)))
    # Targets the space cannot reach by the prediction would all give the same fastest plan.
    aims = reachable(ctx.targets_ms, ctx.groups, model, line) or [max(ctx.targets_ms)]
    target = float(attrs.get("target_ms") or aims[trial.number % len(aims)])
    snap = _grid_snap(ctx.space)
    shift = float(attrs["budget_shift"]) if "budget_shift" in attrs else shift_to_target(plan.ratios, ctx.groups, model, target, snap, line)
    ratios = shifted(plan.ratios, ctx.groups, shift, snap)
    for k, v in {"target_ms": target, "budget_shift": shift, "macs_est": model.macs(ratios), "predicted_ms": model.ms(ratios, line)}.items():
        trial.set_user_attr(k, v)
    return dataclasses.replace(plan, ratios=ratios)


def _grid_snap(sp: SearchSpace) -> Callable[[float, PrunableGroup], float]:
    """A ratio clipped to a group's range and put on its grid, as the sampler's own values are."""
    return lambda v, g: _snap(v, g.low, g.high, _group_step(sp, g))


def _finished(trial: optuna.trial.BaseTrial) -> list[Any]:
    study = getattr(trial, "study", None)  # a FixedTrial (replay) has none
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if study is not None else []


def seed_trials(ctx: SearchContext) -> list[tuple[dict[str, float], dict[str, Any]]]:
    """The first trials as (parameters, user attributes). Budget mode: per target, the uniform
    ratio and the HALP-like allocation predicted to meet it, each pinned to its target (no
    shift); otherwise :func:`seed_plans`."""
    if not ctx.targets_ms or ctx.latency_model is None:
        return [(p, {}) for p in seed_plans(ctx)]
    free = [g for g in ctx.groups if g.low != g.high]
    model = ctx.latency_model
    line = model.line()
    snap = _grid_snap(ctx.space)
    out: list[tuple[dict[str, float], dict[str, Any]]] = []
    for target in sorted(ctx.targets_ms, reverse=True):  # the loosest (cheapest to fine-tune) first
        zero = {g.name: g.low for g in free}
        uniform = shifted(zero, free, shift_to_target(zero, free, model, target, snap, line), snap)
        plans = [("uniform", uniform)]
        if ctx.space.seed_spread > 0:
            plans.append(("allocated", allocate_for_target(free, ctx.sensitivity, model, target, ctx.cfg.efficiency.sensitivity_ratio,
                                                           snap, line)))
        for kind, ratios in plans:
            params = {RATIO_PREFIX + g.name: ratios[g.name] for g in free}
            if all(params != p for p, _ in out):
                out.append((params, {"target_ms": target, "budget_shift": 0.0, "seed": kind}))
    return out


def seed_plans(ctx: SearchContext) -> list[dict[str, float]]:
    """The first trials' ratios: each ``seed_uniform`` level as one ratio for every group, and,
    when a sensitivity scan ran and ``seed_spread`` > 0, its sensitivity-allocated twin.
    Ordered by level, so the sampler's first generation spans the whole latency range."""
    sp = ctx.space
    free = [g for g in ctx.groups if g.low != g.high]
    out: list[dict[str, float]] = []
    for r in sorted(sp.seed_uniform):
        plans = [{g.name: r for g in free}]
        if sp.seed_spread > 0 and ctx.sensitivity and ctx.savings:
            plans.append(allocate_ratios(free, ctx.sensitivity, ctx.savings, r, sp.seed_spread))
        for plan in plans:
            snapped = {
                RATIO_PREFIX + g.name: _snap(plan[g.name], g.low, g.high, _group_step(sp, g))
                for g in free
            }
            if snapped not in out:
                out.append(snapped)
    return out

GRAN_PARAM = "granularity"
GRAN_PREFIX = "granularity/"
WRATIO_PREFIX = "wratio/"


def _group_granularities(group: Any, space: Any) -> list[str]:
    """Allowed granularities of one group: the first layer rule matching the group's root or
    member names decides (as for ratio ranges); rules without ``granularities`` keep the default."""
    for rule in space.layers:
        names = [group.name, *getattr(group, "members", [])]
        if any(fnmatch.fnmatchcase(n, rule.pattern) for n in names):
            return sorted(set(rule.granularities)) if rule.granularities else sorted(set(space.granularities))
    return sorted(set(space.granularities))


def suggest_granularities(trial: Any, space: Any, groups: Sequence[Any]) -> tuple[dict[str, str], dict[str, float]]:
    """Sample granularity (global or per group) and, for hybrid groups, ``wratio/<group>``."""
    grans: dict[str, str] = {}
    if space.global_granularity:
        allowed = sorted(set(space.granularities))
        pick = trial.suggest_categorical(GRAN_PARAM, allowed) if len(allowed) > 1 else allowed[0]
        for g in groups:
            own = _group_granularities(g, space)
            grans[g.name] = pick if pick in own else own[0]
    else:
        for g in groups:
            own = _group_granularities(g, space)
            grans[g.name] = trial.suggest_categorical(GRAN_PREFIX + g.name, own) if len(own) > 1 else own[0]
    wratios: dict[str, float] = {}
    lo, hi, step = space.weight_low, space.weight_high, space.step
    for g in groups:
        if grans[g.name] != "hybrid":
            continue
        if lo == hi:
            wratios[g.name] = lo
            continue
        st = step if step and step <= hi - lo else None
        if st:
            hi = lo + int((hi - lo) / st + 1e-9) * st
        wratios[g.name] = trial.suggest_float(WRATIO_PREFIX + g.name, lo, hi, step=st)
    return grans, wratios
