"""Pruning criteria as plug-ins: a small protocol and a registry, like Optuna's samplers.

A criterion scores every channel of a coupled group; the plan removes the lowest-scored ones.
Criteria that need gradients declare it, so the plan runs calibration backward passes once,
only when a chosen criterion needs them.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch_pruning as tp


@runtime_checkable
class Criterion(Protocol):
    """Scores channels of a torch-pruning group: higher = more important = kept."""

    name: str
    needs_grad: bool

    def __call__(self, group: tp.Group) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[[], Criterion]] = {}


def register(name: str) -> Callable[[Callable[[], Criterion]], Callable[[], Criterion]]:
    def deco(factory: Callable[[], Criterion]) -> Callable[[], Criterion]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Criterion:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown pruning method {name!r}; available: {', '.join(available())}") from None


class _TPCriterion:
    """Adapter over a torch-pruning importance object."""

    def __init__(self, name: str, imp: tp.importance.Importance, needs_grad: bool = False) -> None:
        self.name, self._imp, self.needs_grad = name, imp, needs_grad

    def __call__(self, group: tp.Group) -> torch.Tensor:
        return self._imp(group)


# Magnitude: the sum of |w|^p over every weight slice of the coupled channel (filters, BN, next
# layer's inputs), averaged across the group's layers. No normalizer: local pruning ranks within
# one group, so scale does not matter.
register("l1")(lambda: _TPCriterion("l1", tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)))
register("l2")(lambda: _TPCriterion("l2", tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)))
register("random")(lambda: _TPCriterion("random", tp.importance.RandomImportance()))
register("bn_scale")(lambda: _TPCriterion("bn_scale", tp.importance.BNScaleImportance(normalizer=None)))
# First-order Taylor |w · dL/dw| accumulated over calibration batches.
register("taylor")(lambda: _TPCriterion("taylor", tp.importance.GroupTaylorImportance(normalizer=None), needs_grad=True))
