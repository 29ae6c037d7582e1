"""onnxruntime: CPU always; CUDA/TensorRT when ``onnxruntime-gpu`` is installed (extra ``cuda``)."""

from __future__ import annotations

import numpy as np

from ..config import DeviceProfile
from . import BackendUnavailable, ModelArtifact, Runner, register

_DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        import onnxruntime as ort

        if artifact.onnx_path is None:
            raise ValueError("onnxruntime backend needs an ONNX file")
        providers = profile.providers or _DEVICE_PROVIDERS.get(profile.device.lower())
        if providers is None:
            raise BackendUnavailable(
                f"device profile {profile.name}: device {profile.device!r} is not one of {sorted(_DEVICE_PROVIDERS)} for onnxruntime"
            )
        have = ort.get_available_providers()
        if providers[0] not in have:
            raise BackendUnavailable(
                f"device profile {profile.name}: onnxruntime provider {providers[0]} is not available "
                f"(available: {have}). For CUDA install the GPU build: pip install 'autoprune[cuda]' "
                "(onnxruntime-gpu, which replaces onnxruntime; never install both) on a machine with an NVIDIA GPU."
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = profile.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(artifact.onnx_path), sess_options=so, providers=[p for p in providers if p in have])
        in_name = sess.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {in_name: x})[0]

        return run


register("onnxruntime")(OnnxRuntimeBackend)
