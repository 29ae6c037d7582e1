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

from typing import Callable

from .calibration import CalibStats, bn_l1_finetune, collect
from .criteria import (
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
from .granularity import (
    GRANULARITY_HELP,
    Granularity,
    apply_mask,
    hold_zeros,
    nm_mask,
    parse as parse_granularity,
    unstructured_mask,
    weight_sparsity,
)

__all__ = [
    "APoZ", "BNScale", "apply_mask", "CalibStats", "Criterion", "GradNorm", "GRANULARITY_HELP", "Granularity", "Hessian",
    "Magnitude", "MeanActivation", "Random", "TPCriterion", "Taylor", "available", "bn_l1_finetune", "collect",
    "get", "hold_zeros", "nm_mask", "parse_granularity", "producers", "register", "unstructured_mask",
    "weight_sparsity",
]

_REGISTRY: dict[str, Callable[[], Criterion]] = {}


def register(name: str) -> Callable[[Callable[[], Criterion]], Callable[[], Criterion]]:
    """Decorator: register a zero-argument factory returning a :class:`Criterion` under ``name``."""

    def deco(factory: Callable[[], Criterion]) -> Callable[[], Criterion]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Criterion:
    """A fresh criterion instance; unknown names list what is registered."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown pruning method {name!r}; available: {', '.join(available())}") from None


register("l1")(lambda: Magnitude(1))
register("l2")(lambda: Magnitude(2))
register("random")(Random)
register("bn_scale")(BNScale)
register("taylor")(Taylor)
register("grad_norm")(GradNorm)
register("hessian")(Hessian)
register("act_mean")(MeanActivation)
register("apoz")(APoZ)
