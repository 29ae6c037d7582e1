"""Pruning methods as plug-ins: importance criterion × granularity.

* Criteria (``criteria.py``) score channels of a coupled group and single weights; they are
  registered by name, like Optuna's samplers, so a search space lists them in YAML.
* Granularities (``granularity.py``): ``structured`` (physical channel removal), ``unstructured``
  (zeroed weights), ``nm:N:M`` patterns, ``hybrid`` (structured then unstructured).
* Calibration (``calibration.py``): gradients, Fisher and activation statistics collected once
  over calibration batches, only when a chosen criterion needs them.

Register your own::

    from autoprune import methods
    @methods.register("mine")
    def _():
        return MyCriterion()   # subclass of methods.Criterion: channels() and weights()
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from autoprune.prune.methods.calibration import CalibStats, bn_l1_finetune, collect
from autoprune.prune.methods.criteria import (
    APoZ,
    BNScale,
    Criterion,
    GradNorm,
    Hessian,
    Magnitude,
    MeanActivation,
    Random,
    Taylor,
    TPCriterion,
    producers,
)
from autoprune.prune.methods.granularity import (
    GRANULARITY_HELP,
    Granularity,
    apply_mask,
    hold_zeros,
    nm_mask,
    unstructured_mask,
    weight_sparsity,
)
from autoprune.prune.methods.granularity import parse as parse_granularity
from autoprune.registry import METHODS

__all__ = [
    "APoZ", "BNScale", "apply_mask", "CalibStats", "Criterion", "GradNorm", "GRANULARITY_HELP", "Granularity", "Hessian",
    "Magnitude", "MeanActivation", "Random", "TPCriterion", "Taylor", "available", "bn_l1_finetune", "collect",
    "get", "hold_zeros", "nm_mask", "parse_granularity", "producers", "register", "unstructured_mask",
    "weight_sparsity",
]

def register(name: str, factory: Optional[Callable[[], Criterion]] = None, *, override: bool = False) -> Any:
    """Register a zero-argument factory returning a :class:`Criterion` under ``name`` (usable as a
    decorator); a name registered twice warns (:class:`autoprune.registry.Registry`)."""
    return METHODS.register(name, factory, override=override)


def available() -> list[str]:
    return METHODS.available()


def get(name: str) -> Criterion:
    """A fresh criterion instance; an unknown name is a ConfigError listing the registered ones."""
    return METHODS.get(name)


register("l1")(lambda: Magnitude(1))
register("l2")(lambda: Magnitude(2))
register("random")(Random)
register("bn_scale")(BNScale)
register("taylor")(Taylor)
register("grad_norm")(GradNorm)
register("hessian")(Hessian)
register("act_mean")(MeanActivation)
register("apoz")(APoZ)
