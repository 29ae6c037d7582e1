"""Inference backends behind one small protocol, selected by a device profile's ``backend`` key.

A backend turns an exported model into a :class:`Runner` (one synchronous inference on a fixed
input) configured exactly as the profile says: threads, streams, device. Latency is then timed
by :mod:`autoprune.latency` with the same code for every backend, so numbers are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch.nn as nn

from ..config import DeviceProfile
from ..latency import LatencyStats, time_callable


class BackendUnavailable(RuntimeError):
    """The profile asks for a device or runtime this machine lacks; the message says what to install."""


@dataclass
class ModelArtifact:
    """What a backend may need: the ONNX file always, the torch module for the torch backend."""

    onnx_path: Optional[Path] = None
    torch_model: Optional[nn.Module] = None


class Runner(Protocol):
    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    name: str

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner: ...


_REGISTRY: dict[str, Callable[[], Backend]] = {}


def register(name: str) -> Callable[[Callable[[], Backend]], Callable[[], Backend]]:
    def deco(factory: Callable[[], Backend]) -> Callable[[], Backend]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backend {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]()


def measure(artifact: ModelArtifact, profile: DeviceProfile, x: np.ndarray) -> LatencyStats:
    """Load ``artifact`` on the profile's backend and time one inference of ``x``."""
    runner = get(profile.backend).load(artifact, profile)
    return time_callable(
        lambda: runner(x),
        warmup=profile.warmup,
        repeats=profile.repeats,
        target_rel_ci=profile.target_rel_ci,
        max_time_s=profile.max_time_s,
        batch_size=int(x.shape[0]),
    )


from . import onnxruntime_backend, openvino_backend, torch_backend  # noqa: E402,F401  (registration)
