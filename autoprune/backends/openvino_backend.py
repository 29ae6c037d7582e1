"""OpenVINO: reads ONNX directly; configured like ``benchmark_app -hint none -nstreams 1
-nthreads N -nireq 1 -api sync`` so our numbers can be checked against it."""

from __future__ import annotations

import numpy as np

from ..config import DeviceProfile
from . import BackendUnavailable, ModelArtifact, Runner, register


class OpenVINOBackend:
    name = "openvino"

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        import openvino as ov

        if artifact.onnx_path is None:
            raise ValueError("openvino backend needs an ONNX (or IR .xml) file")
        core = ov.Core()
        device = profile.device.upper()
        if device.split(".")[0] not in {d.split(".")[0] for d in core.available_devices} and device not in ("AUTO",):
            raise BackendUnavailable(
                f"device profile {profile.name}: OpenVINO device {device!r} not found (available: {core.available_devices})"
            )
        # benchmark_app -hint none -nstreams 1 -nthreads N: no hint, one stream, N threads.
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if device == "CPU":
            config["INFERENCE_NUM_THREADS"] = str(profile.threads)
        compiled = core.compile_model(str(artifact.onnx_path), device, config)
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return run


register("openvino")(OpenVINOBackend)
