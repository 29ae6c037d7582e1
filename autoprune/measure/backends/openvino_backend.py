"""OpenVINO: reads ONNX (or IR .xml) directly; configured like ``benchmark_app -hint none
-nstreams 1 -nthreads N -nireq 1 -api sync -infer_precision f32`` so our numbers can be checked
against it (``benchmarks/benchmark_app_agreement.py``), threads pinned to cores as benchmark_app
pins them (``ENABLE_CPU_PINNING``; the profile's ``cpu_pinning: false`` turns it off).

The device name is passed through: ``CPU``, ``GPU``, ``GPU.1``, ``NPU``, ``AUTO:GPU,CPU``, ...
Precision: fp32 pins ``INFERENCE_PRECISION_HINT=f32`` (on CPUs with AMX/AVX512-BF16 OpenVINO
otherwise silently runs bf16, which is neither what was asked nor comparable across machines);
fp16 sets the f16 hint; int8 models arrive already quantized by NNCF (:mod:`autoprune.quantize`).
Latency is read from OpenVINO's per-request clock, as benchmark_app reads it (:data:`CLOCK`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autoprune.config import DeviceProfile
from autoprune.errors import BackendUnavailable
from autoprune.measure.backends.base import Backend, FnRunner, Runner
from autoprune.measure.onnx import ModelArtifact
from autoprune.measure.ov_core import shared_core
from autoprune.registry import BACKENDS

_VIRTUAL = ("AUTO", "HETERO", "MULTI", "BATCH")
_DRIVER_HINT = {
    "GPU": "Intel GPU: install the Intel graphics compute runtime (intel-opencl-icd / level-zero) and add the user to the 'render' group",
    "NPU": "Intel NPU: install the Intel NPU driver (linux-npu-driver) and OpenVINO >= 2024.x",
}


def _physical(device: str) -> list[str]:
    """``AUTO:GPU,CPU`` → [GPU, CPU]; ``GPU.1`` → [GPU.1]."""
    head, _, rest = device.partition(":")
    if head in _VIRTUAL:
        return [d for d in rest.split(",") if d]
    return [device]


def _check_device(core: Any, device: str, profile_name: str) -> None:
    have = list(core.available_devices)
    have_base = {d.split(".")[0] for d in have}
    for d in _physical(device):
        if d not in have and (("." in d) or d not in have_base):
            hint = _DRIVER_HINT.get(d.split(".")[0], "check the device name")
            raise BackendUnavailable(
                f"device profile {profile_name}: OpenVINO device {d!r} not found (available: {have}). {hint}."
            )


def _compile_config(core: Any, device: str, profile: DeviceProfile) -> dict[str, str]:
    """Properties for ``compile_model``; only those the device supports (an NPU rejects CPU keys)."""
    cfg: dict[str, str] = {
        "PERFORMANCE_HINT": "THROUGHPUT" if profile.mode == "throughput" else "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(profile.threads),
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "fp16": "f16", "int8": "f32"}[profile.precision],
        # Set explicitly, never left to the plugin's default (which depends on the OS, the
        # OpenVINO version and the hint): benchmark_app pins, so we pin unless the profile says not.
        "ENABLE_CPU_PINNING": "YES" if profile.cpu_pinning else "NO",
    }
    head = device.partition(":")[0]
    if head in _VIRTUAL:
        return {k: v for k, v in cfg.items() if k == "PERFORMANCE_HINT"}
    try:
        supported = set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    except Exception:  # noqa: BLE001 - old plugins
        supported = set(cfg)
    if profile.precision == "fp16":
        caps = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        if "FP16" not in caps:
            raise BackendUnavailable(
                f"device profile {profile.name}: OpenVINO device {device} has no native fp16 (capabilities: {sorted(caps)}); "
                "use precision fp32 or int8 there, or a GPU/NPU device"
            )
    return {k: v for k, v in cfg.items() if k in supported}


class OpenVINOBackend(Backend):
    name = "openvino"

    def check(self, profile: DeviceProfile) -> None:
        """The profile's OpenVINO device(s) exist here (a driver missing is the usual cause)."""
        _check_device(shared_core(), profile.device.upper(), profile.name)

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        if artifact.onnx_path is None:
            raise ValueError("openvino backend needs an ONNX (or IR .xml) file")
        core = shared_core()
        device = profile.device.upper()
        _check_device(core, device, profile.name)
        config = _compile_config(core, device, profile)
        compiled = core.compile_model(str(artifact.onnx_path), device, config)
        req = _Request(compiled)
        return FnRunner(req, timed=req.timed, clock=CLOCK, info={"device": device, "config": config,
                                                                  "compiled": _compiled_properties(compiled)})


#: The clock our OpenVINO latency is read from: ``InferRequest.latency``, the time OpenVINO
#: measures around the synchronous ``infer()`` of that request, in C++ (the GIL released). It is
#: the number ``benchmark_app -api sync`` reports (its median over the requests' latencies), so
#: the two agree by definition of what is timed, not by tuning. Host ``perf_counter`` around the
#: Python call adds what no C++ deployment pays: the call through pybind11, re-taking the GIL,
#: and, after a 1 ms inference has evicted the interpreter from the caches, the first Python
#: lines after it: measured at 40-75 us per call on a shared 2-core machine (5-20% of a
#: sub-millisecond MobileNetV2), the one fixed gap left once the data dispatcher was bypassed.
CLOCK = "openvino_infer"


def _compiled_properties(compiled: Any) -> dict[str, str]:
    """What the plugin actually runs with (the hint may be refused or rewritten by the device)."""
    supported = set(compiled.get_property("SUPPORTED_PROPERTIES"))
    keys = ("INFERENCE_PRECISION_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "ENABLE_CPU_PINNING")
    return {k: _text(compiled.get_property(k)) for k in keys if k in supported}


def _text(value: Any) -> str:
    """``ov.Type`` → ``f32`` (its str() is ``<Type: 'float32'>``); other values as str()."""
    return str(value.to_string()) if hasattr(value, "to_string") else str(value)


class _Request:
    """One reused InferRequest, called the way ``benchmark_app -api sync`` calls it.

    ``request.infer({0: x})`` sends the array through OpenVINO's Python data dispatcher (type
    checks, a fresh copy into the input tensor) and returns every output copied into a new dict:
    about 0.2 ms per call on a shared 2-core machine (about 12% of a 64 px MobileNetV2 on one
    thread there), none of it inference. Here the input array is wrapped once in an ``ov.Tensor``
    that shares its memory (re-wrapped only when a different array arrives; in-place changes to
    the same array are seen because the memory is shared; an array of another dtype or layout is
    converted on every call), ``infer()`` runs without inputs and without copying outputs, and
    the one output we return is copied out of the request's tensor: every timed call is one
    real inference on the caller's data whose result is read; its duration is OpenVINO's own
    (:meth:`timed`, :data:`CLOCK`).
    """

    def __init__(self, compiled: Any) -> None:
        self.request = compiled.create_infer_request()
        self.dtype = np.dtype(compiled.input(0).element_type.to_dtype())
        self._bound: Any = None  # the caller's array currently shared with the request (kept alive)

    def _bind(self, x: np.ndarray) -> None:
        import openvino as ov

        arr = x
        if not (isinstance(x, np.ndarray) and x.dtype == self.dtype and x.flags.c_contiguous and x.flags.writeable):
            arr = np.ascontiguousarray(x, dtype=self.dtype)  # OpenVINO can only share these
        self.request.set_input_tensor(ov.Tensor(arr, shared_memory=True))
        # Only a shared array stays bound across calls (a converted copy would miss in-place changes
        # to x); the runtime does not own the memory, so ``arr`` is kept alive while bound.
        self._bound = (x if arr is x else None, arr)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._bound is None or self._bound[0] is not x:  # [0] is None for a converted copy
            self._bind(x)
        self.request.infer(share_outputs=True)
        return np.array(self.request.get_output_tensor(0).data, copy=True)

    def timed(self, x: np.ndarray) -> float:
        """Run one inference on ``x``, read its output, and return the runtime's own duration of
        that inference in seconds (see :data:`CLOCK`)."""
        self(x)
        return float(self.request.latency) / 1000.0  # InferRequest.latency is in ms


BACKENDS.register("openvino", OpenVINOBackend)
