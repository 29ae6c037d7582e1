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
from typing import Any, Callable, Optional

import numpy as np

from autoprune.config import DeviceProfile
from autoprune.errors import BackendUnavailable
from autoprune.measure.backends import (  # noqa: F401  (they register themselves)
    onnxruntime_backend,
    openvino_backend,
    remote,
    torch_backend,
)
from autoprune.measure.backends.base import Backend, FnRunner, Runner
from autoprune.measure.onnx import ModelArtifact
from autoprune.measure.quantize import quantize_artifact
from autoprune.measure.stats import LatencyStats, time_callable, time_pair
from autoprune.registry import BACKENDS


def register(name: str, factory: Optional[Callable[[], Backend]] = None, *, override: bool = False) -> Any:
    """Register a backend factory (see :class:`autoprune.registry.Registry`)."""
    return BACKENDS.register(name, factory, override=override)


def available() -> list[str]:
    return BACKENDS.available()


def get(name: str) -> Backend:
    """A fresh backend instance; an unknown name is a ConfigError listing the registered ones."""
    return BACKENDS.get(name)


def check(profile: DeviceProfile) -> None:
    """BackendUnavailable now, before anything is trained, when this machine cannot run ``profile``."""
    get(profile.backend).check(profile)


def load(artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
    """A runner for ``artifact`` on the profile's (local) backend."""
    return get(profile.backend).load(artifact, profile)


def one_inference_timer(runner: Runner, x: np.ndarray, clock: str = "wall") -> Callable[[], float]:
    """A zero-argument callable that runs one inference and returns its duration in seconds:
    the runner's own timer if it has one, else the host wall clock; ``clock="cpu"`` (a profile's
    ``clock: cpu``): the process's CPU time, which time slices taken by other jobs do not inflate."""
    if clock == "cpu":
        def cpu() -> float:
            t0 = time.process_time()
            runner(x)
            return time.process_time() - t0

        cpu.clock = "process_cpu"  # type: ignore[attr-defined]
        return cpu
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

    return quantize_artifact(artifact, profile, calib)


def measure(artifact: ModelArtifact, profile: DeviceProfile, x: np.ndarray, reference: Optional[ModelArtifact] = None,
            calib: Optional[list[np.ndarray]] = None, deadline: Optional[float] = None) -> LatencyStats:
    """Load ``artifact`` on the profile's backend and time one inference of ``x``.

    With ``reference`` (the dense model) both are timed interleaved in rounds in this session and
    the stats carry ``ratio`` = candidate time / reference time with its 95% interval, ``noisy``
    and ``speedup`` = 1 / ratio (:func:`autoprune.measure.stats.time_pair`). With an int8 profile, unquantized
    artifacts are quantized first (on ``calib`` samples, else on random inputs: fine for latency,
    not for accuracy). ``deadline`` (a ``time.perf_counter()`` value) cuts warm-up and repeats
    short there (local backends only; see :func:`autoprune.measure.stats.time_callable`).
    """
    backend = get(profile.backend)
    artifact = ensure_precision(artifact, profile, calib)
    if reference is not None:
        reference = ensure_precision(reference, profile, calib)
    own = getattr(backend, "measure", None)
    if own is not None:
        return own(artifact, profile, x, reference)
    kw = dict(warmup=profile.warmup, repeats=profile.repeats, target_rel_ci=profile.target_rel_ci,
              max_time_s=profile.max_time_s, batch_size=int(x.shape[0]), deadline=deadline)
    # Process-wide settings (torch's thread count) hold for loading and timing only.
    with backend.session(profile):
        one = one_inference_timer(backend.load(artifact, profile), x, profile.clock)
        if reference is None:
            return time_callable(lambda: None, timed=one, **kw)
        ref = one_inference_timer(backend.load(reference, profile), x, profile.clock)
        return time_pair(one, ref, **kw)


def with_overrides(profile: DeviceProfile, **kw: Any) -> DeviceProfile:
    """A validated copy of ``profile`` with some keys changed (e.g. another backend for a cross-check)."""
    return DeviceProfile.model_validate({**profile.model_dump(), **kw})



__all__ = ["Backend", "BackendUnavailable", "ModelArtifact", "Runner", "FnRunner", "measure", "load", "get", "available", "register",
           "ensure_precision", "with_overrides", "one_inference_timer", "check"]
