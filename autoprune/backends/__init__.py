"""Inference backends behind one small protocol, selected by a device profile's ``backend`` key.

A backend turns an exported model into a :class:`Runner` (one synchronous inference on a fixed
input) configured exactly as the profile says: threads, streams, device, precision. Latency is
then timed by :mod:`autoprune.latency` with the same code for every backend, so numbers are
comparable. Runners that can time themselves more precisely than the host clock (CUDA events)
expose ``timed(x) -> seconds``. A backend that measures elsewhere (``remote``) implements
``measure`` itself and the timing loop runs on the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch.nn as nn

from ..config import DeviceProfile
from ..latency import LatencyStats, time_callable, time_pair


class BackendUnavailable(RuntimeError):
    """The profile asks for a device or runtime this machine lacks; the message says what to install."""


@dataclass
class ModelArtifact:
    """What a backend may need: the ONNX file always, the torch module for the torch backend.

    ``onnx_path`` may also be an OpenVINO IR ``.xml`` (the openvino backend reads both).
    ``quantized`` marks a file that already went through post-training quantization, so an int8
    profile does not quantize it again.
    """

    onnx_path: Optional[Path] = None
    torch_model: Optional[nn.Module] = None
    quantized: bool = False


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


def load(artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
    """A runner for ``artifact`` on the profile's (local) backend."""
    return get(profile.backend).load(artifact, profile)


def one_inference_timer(runner: Runner, x: np.ndarray) -> Callable[[], float]:
    """A zero-argument callable that runs one inference and returns its duration in seconds."""
    t = getattr(runner, "timed", None)
    if t is not None:
        def one() -> float:
            return float(t(x))

        one.clock = getattr(runner, "clock", "custom")  # type: ignore[attr-defined]
        return one

    def host() -> float:
        t0 = time.perf_counter()
        runner(x)
        return time.perf_counter() - t0

    host.clock = "perf_counter"  # type: ignore[attr-defined]
    return host


def ensure_precision(artifact: ModelArtifact, profile: DeviceProfile, calib: Optional[list[np.ndarray]] = None) -> ModelArtifact:
    """For an int8 profile, quantize ``artifact`` unless it already is (see :mod:`autoprune.quantize`)."""
    if profile.precision != "int8" or artifact.quantized:
        return artifact
    from ..quantize import quantize_artifact

    return quantize_artifact(artifact, profile, calib)


def measure(artifact: ModelArtifact, profile: DeviceProfile, x: np.ndarray, reference: Optional[ModelArtifact] = None,
            calib: Optional[list[np.ndarray]] = None) -> LatencyStats:
    """Load ``artifact`` on the profile's backend and time one inference of ``x``.

    With ``reference`` (the dense model) both are timed interleaved in this session and the stats
    carry ``speedup`` = reference time / candidate time. With an int8 profile, unquantized
    artifacts are quantized first (on ``calib`` samples, else on random inputs: fine for latency,
    not for accuracy).
    """
    backend = get(profile.backend)
    artifact = ensure_precision(artifact, profile, calib)
    if reference is not None:
        reference = ensure_precision(reference, profile, calib)
    own = getattr(backend, "measure", None)
    if own is not None:
        return own(artifact, profile, x, reference)
    kw = dict(warmup=profile.warmup, repeats=profile.repeats, target_rel_ci=profile.target_rel_ci,
              max_time_s=profile.max_time_s, batch_size=int(x.shape[0]))
    one = one_inference_timer(backend.load(artifact, profile), x)
    if reference is None:
        return time_callable(lambda: None, timed=one, **kw)
    ref = one_inference_timer(backend.load(reference, profile), x)
    return time_pair(one, ref, **kw)


def with_overrides(profile: DeviceProfile, **kw: Any) -> DeviceProfile:
    """A validated copy of ``profile`` with some keys changed (e.g. another backend for a cross-check)."""
    return DeviceProfile.model_validate({**profile.model_dump(), **kw})


from . import onnxruntime_backend, openvino_backend, remote, torch_backend  # noqa: E402,F401  (registration)

__all__ = ["BackendUnavailable", "ModelArtifact", "Runner", "FnRunner", "measure", "load", "get", "available", "register",
           "ensure_precision", "with_overrides", "one_inference_timer"]
