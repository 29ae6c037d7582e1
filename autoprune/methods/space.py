"""Search-space side of methods: which granularities each group may use, and the Optuna
parameters that choose them.

Parameter names (stable, stored in studies):

* ``granularity`` — one value for the whole model when ``global_granularity: true`` (default);
* ``granularity/<group>`` — per group otherwise (choices from the first matching layer rule
  matching a group decides, the same first-match rule as ``apply_rules``);
* ``wratio/<group>`` — only for groups that drew ``hybrid``: fraction of the weights left after
  channel removal that are zeroed, in [weight_low, weight_high] with the space's ``step``.

``ratio/<group>``, ``method`` and ``method/<group>`` are sampled by ``search.suggest_plan``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

GRAN_PARAM = "granularity"
GRAN_PREFIX = "granularity/"
WRATIO_PREFIX = "wratio/"


def group_granularities(group: Any, space: Any) -> list[str]:
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
            own = group_granularities(g, space)
            grans[g.name] = pick if pick in own else own[0]
    else:
        for g in groups:
            own = group_granularities(g, space)
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
