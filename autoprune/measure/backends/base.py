"""What every latency backend implements: a small abstract class and the runner it returns."""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, ContextManager, Optional, Protocol

import numpy as np

from autoprune.config import DeviceProfile
from autoprune.measure.onnx import ModelArtifact
from autoprune.measure.stats import LatencyStats


class Runner(Protocol):
    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class FnRunner:
    """A runner from a function; ``timed`` (optional) returns the device-side seconds of one run."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], timed: Optional[Callable[[np.ndarray], float]] = None,
                 clock: str = "perf_counter", info: Optional[dict[str, Any]] = None) -> None:
        self.fn = fn
        self.timed = timed
        self.clock = clock
        #: What the runtime was actually configured with (threads, streams, precision, providers).
        self.info = info or {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


class Backend(abc.ABC):
    """A latency backend: turns an exported model into a :class:`Runner` set up as the profile
    says. Backends that time on another machine (``remote``) override :meth:`measure`."""

    name: str = ""

    @abc.abstractmethod
    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        """A runner for one synchronous inference of ``artifact`` on this backend."""

    def check(self, profile: DeviceProfile) -> None:
        """Raise :class:`~autoprune.errors.BackendUnavailable` when this machine cannot run
        ``profile`` (no such device, provider, driver or token). Cheap, and called before the dense
        model trains, so a CUDA profile on a CPU machine fails in seconds rather than after
        minutes of pre-training. The default checks nothing; :meth:`load` still checks too."""

    def session(self, profile: DeviceProfile) -> ContextManager[Any]:
        """Process-wide settings the profile asks for (e.g. torch's intra-op thread count), held
        only inside the ``with`` block and restored after it.

        Settings such as ``torch.set_num_threads`` belong to the whole process: applied in
        :meth:`load` and never undone they would leak into everything that runs afterwards (a
        fine-tune on one thread after a ``threads: 1`` measurement). The timing loop wraps
        loading and timing in this context; runners still apply the setting around each call of
        their own, so a runner called later, outside the session, behaves the same.
        """
        return contextlib.nullcontext()

    #: Optional: ``measure(artifact, profile, x, reference) -> LatencyStats`` timed elsewhere.
    measure: Optional[Callable[..., LatencyStats]] = None
