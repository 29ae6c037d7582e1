"""One registry class for every plug-in kind: pruning methods, latency backends, tasks and data sources.

Modelled on timm's ``register_model``: a plug-in registers a zero-argument factory under a name;
YAML files name plug-ins, so names are the public interface. Registering a name twice is almost
always a mistake (two plug-ins fighting over ``l1``), so it warns and names both; pass
``override=True`` to replace a shipped plug-in on purpose. An unknown name is a
:class:`~autoprune.errors.ConfigError` that lists what is registered.

The shipped plug-ins need torch and the runtimes, but the config must validate a YAML file's
names without importing them (``import autoprune.config`` stays light). So a registry knows its
shipped names and the module that registers them: :meth:`Registry.names` answers from those
and from whatever is registered so far, without importing anything, and :meth:`Registry.get`
imports that module the first time a shipped name is asked for.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Generic, Optional, Sequence, TypeVar

from autoprune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → zero-argument factory of a plug-in of one kind (``kind`` is used in messages)."""

    def __init__(self, kind: str, shipped: Sequence[str] = (), plugins: Optional[str] = None) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[[], T]] = {}
        #: Names the ``plugins`` module registers when imported (tests/test_registry.py checks they agree).
        self.shipped = tuple(shipped)
        self._plugins = plugins

    def _load_plugins(self) -> None:
        """Import the module that registers the shipped plug-ins (once; Python caches modules)."""
        if self._plugins is not None:
            importlib.import_module(self._plugins)

    def register(self, name: str, factory: Optional[Callable[[], T]] = None, *, override: bool = False) -> Callable[..., T]:
        """Register ``factory`` under ``name``; without ``factory`` this is a decorator."""

        def deco(f: Callable[[], T]) -> Callable[[], T]:
            old = self._factories.get(name)
            if old is not None and old is not f and not override:
                warnings.warn(
                    f"{self.kind} {name!r} is registered twice ({_where(old)} and {_where(f)}); the later one wins. "
                    "Pass override=True if that is intended, or choose another name.",
                    UserWarning,
                    stacklevel=3,
                )
            self._factories[name] = f
            return f

        return deco(factory) if factory is not None else deco  # type: ignore[return-value]

    def available(self) -> list[str]:
        """Every registered name (the shipped ones are imported first)."""
        self._load_plugins()
        return sorted(self._factories)

    def names(self) -> list[str]:
        """The shipped names and those registered so far, without importing any plug-in code:
        what a config file may name (the config validates with it and must not import torch)."""
        return sorted(set(self._factories) | set(self.shipped))

    def __contains__(self, name: object) -> bool:
        return name in self._factories or name in self.shipped

    def get(self, name: str) -> T:
        """A fresh plug-in instance."""
        if name not in self._factories:
            self._load_plugins()
        try:
            factory = self._factories[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.available())}") from None
        return factory()


def _where(f: Callable[..., object]) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


#: Channel/weight importance criteria (autoprune.prune.methods registers the shipped ones).
METHODS: Registry = Registry("pruning method", ("act_mean", "apoz", "bn_scale", "grad_norm", "hessian", "l1", "l2", "random", "taylor"),
                             "autoprune.prune.methods")
#: Latency backends (autoprune.measure.backends registers the shipped ones).
BACKENDS: Registry = Registry("backend", ("onnxruntime", "openvino", "remote", "torch"), "autoprune.measure.backends")
#: Tasks by name (``task: classification`` in a run config; autoprune.train.task registers the shipped ones).
TASKS: Registry = Registry("task")
#: Data sources by the name a ``data:`` reference starts with (autoprune.train.data registers the shipped ones).
DATASETS: Registry = Registry("data source")
