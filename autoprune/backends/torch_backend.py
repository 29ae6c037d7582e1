"""PyTorch eager (CPU as a reference, CUDA with CUDA-event timing semantics via synchronize)."""

from __future__ import annotations

import numpy as np
import torch

from ..config import DeviceProfile
from . import BackendUnavailable, ModelArtifact, Runner, register


class TorchBackend:
    name = "torch"

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        if artifact.torch_model is None:
            raise ValueError("torch backend needs the PyTorch module (it does not read ONNX)")
        dev = profile.device.lower()
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device profile {profile.name}: no CUDA device (torch.cuda.is_available() is False; "
                f"torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run on a machine with an NVIDIA GPU."
            )
        device = torch.device(dev)
        model = artifact.torch_model.to(device).eval()
        if dev == "cpu":
            torch.set_num_threads(profile.threads)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        @torch.inference_mode()
        def run(x: np.ndarray) -> np.ndarray:
            out = model(torch.from_numpy(x).to(device, non_blocking=True))
            sync()
            return out.float().cpu().numpy()

        return run


register("torch")(TorchBackend)
