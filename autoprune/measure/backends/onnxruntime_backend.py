"""onnxruntime: CPU always; CUDA/TensorRT when ``onnxruntime-gpu`` is installed (extra ``cuda``).

Threads are fixed (``intra_op_num_threads`` = profile threads, one inter-op thread, sequential
execution) so a number measured today is comparable with one measured tomorrow. int8 models come
from :mod:`autoprune.quantize` as QDQ ONNX files, which every execution provider runs as is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autoprune.config import DeviceProfile
from autoprune.errors import BackendUnavailable
from autoprune.measure.backends.base import Backend, FnRunner, Runner
from autoprune.measure.onnx import ModelArtifact
from autoprune.registry import BACKENDS

_DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

_INSTALL_GPU = (
    "For CUDA/TensorRT install the GPU build: pip install 'autoprune[cuda]' (onnxruntime-gpu, which replaces "
    "onnxruntime: uninstall onnxruntime first, never install both) on a machine with an NVIDIA GPU and driver."
)


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def check(self, profile: DeviceProfile) -> None:
        """The profile's device and first execution provider exist here and fit its precision."""
        self.providers(profile)

    def providers(self, profile: DeviceProfile) -> tuple[list[str], list[str]]:
        """(providers the profile asks for, providers this onnxruntime has), or BackendUnavailable
        when the device is unknown, its provider is not installed, or fp16 is asked of a non-TensorRT one."""
        import onnxruntime as ort

        dev = profile.device.lower()
        providers = profile.providers or _DEVICE_PROVIDERS.get(dev)
        if providers is None:
            raise BackendUnavailable(
                f"device profile {profile.name}: device {profile.device!r} is not one of {sorted(_DEVICE_PROVIDERS)} for "
                "onnxruntime (or list execution providers explicitly under `providers:`)"
            )
        have = ort.get_available_providers()
        if providers[0] not in have:
            raise BackendUnavailable(
                f"device profile {profile.name}: onnxruntime provider {providers[0]} is not available "
                f"(available: {have}). {_INSTALL_GPU}"
            )
        if profile.precision == "fp16" and providers[0] != "TensorrtExecutionProvider":
            raise BackendUnavailable(
                f"device profile {profile.name}: precision fp16 on onnxruntime needs device: tensorrt "
                "(TensorRT builds fp16 engines); for fp16 use backend openvino (inference-precision hint) or torch on cuda"
            )
        return providers, have

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        import onnxruntime as ort

        if artifact.onnx_path is None or str(artifact.onnx_path).endswith(".xml"):
            raise ValueError("onnxruntime backend needs an ONNX file")
        providers, have = self.providers(profile)
        provider_options: list[dict[str, Any]] = [{} for _ in providers]
        if profile.precision == "fp16":
            provider_options[0]["trt_fp16_enable"] = True
        if profile.precision == "int8" and providers[0] == "TensorrtExecutionProvider":
            provider_options[0]["trt_int8_enable"] = True  # QDQ nodes carry the scales
        pairs = [(p, o) for p, o in zip(providers, provider_options) if p in have]
        sess = ort.InferenceSession(
            str(artifact.onnx_path), sess_options=session_options(profile.threads),
            providers=[p for p, _ in pairs], provider_options=[o for _, o in pairs],
        )
        return FnRunner(_Bound(sess), info={"providers": sess.get_providers(), "threads": profile.threads,
                                            "precision": profile.precision})


class _Bound:
    """One session called through a reused IOBinding, the input bound once per array.

    ``sess.run(None, {name: x})`` builds the feed dict, validates and wraps ``x`` and allocates
    a new output list on every call. That costs little (about 8 us per call on a trivial model on
    a shared 2-core machine, of which this saves about 3 us: ``benchmarks/runner_overhead.py``),
    but it is paid by no C++ deployment and weighs most on sub-millisecond models. The binding shares
    the caller's array (re-bound only when a different array arrives; a float16 model's input is
    converted on every call), and the first output is copied out of ORT's buffer, so a timed
    call is one real inference on the caller's data plus reading its result.
    """

    def __init__(self, sess: Any) -> None:
        self.sess = sess
        inp = sess.get_inputs()[0]
        self.in_name = inp.name
        self.dtype = np.dtype(np.float16) if inp.type == "tensor(float16)" else np.dtype(np.float32)
        self.binding = sess.io_binding()
        self.binding.bind_output(sess.get_outputs()[0].name, "cpu")
        self._bound: Any = None  # the caller's array the binding points at (kept alive)

    def _bind(self, x: np.ndarray) -> None:
        import onnxruntime as ort

        arr = x
        if not (isinstance(x, np.ndarray) and x.dtype == self.dtype and x.flags.c_contiguous):
            arr = np.ascontiguousarray(x, dtype=self.dtype)
        # An OrtValue made from a CPU array shares its memory (bind_cpu_input would copy it once
        # and then miss in-place changes to the array).
        self.binding.bind_ortvalue_input(self.in_name, ort.OrtValue.ortvalue_from_numpy(arr))
        # Only a shared array stays bound across calls (a converted copy would miss in-place changes
        # to x); the runtime does not own the memory, so ``arr`` is kept alive while bound.
        self._bound = (x if arr is x else None, arr)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._bound is None or self._bound[0] is not x:  # [0] is None for a converted copy
            self._bind(x)
        self.sess.run_with_iobinding(self.binding)
        # A fresh host copy (OrtValue.numpy() may be a view of a buffer the next run overwrites).
        return np.asarray(self.binding.copy_outputs_to_cpu()[0]).astype(np.float32, copy=False)


BACKENDS.register("onnxruntime", OnnxRuntimeBackend)
