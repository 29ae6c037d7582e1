"""PyTorch: CPU eager as a reference, CUDA timed with CUDA events, optional ``torch.compile``.

On CUDA the host clock would time kernel *launches* (asynchronous); CUDA events recorded on the
stream around the forward pass give the device time, then we synchronise once per inference.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, ContextManager

import numpy as np
import torch

from autoprune.config import DeviceProfile
from autoprune.errors import BackendUnavailable, ConfigError
from autoprune.measure.backends.base import Backend, FnRunner, Runner
from autoprune.measure.onnx import ModelArtifact
from autoprune.outputs import main_output
from autoprune.registry import BACKENDS
from autoprune.train.device import torch_threads


class TorchBackend(Backend):
    name = "torch"

    def session(self, profile: DeviceProfile) -> ContextManager[Any]:
        """The profile's thread count for CPU profiles, restored on exit: ``torch.set_num_threads`` is
        process-wide, and every later fine-tune would otherwise run on the profile's count."""
        if profile.device.lower().startswith("cpu"):
            return torch_threads(profile.threads)
        return contextlib.nullcontext()

    def check(self, profile: DeviceProfile) -> None:
        """A CUDA profile needs a CUDA device and a CUDA build of torch."""
        if profile.device.lower().startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device profile {profile.name}: no CUDA device (torch.cuda.is_available() is False; "
                f"torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run on a machine with an NVIDIA GPU "
                "and a CUDA build of torch (see https://pytorch.org/get-started/locally/)."
            )

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        if artifact.torch_model is None:
            raise ConfigError(f"device profile {profile.name}: backend torch needs the PyTorch module and cannot time the ONNX file "
                              f"{artifact.onnx_path}; use a profile with backend onnxruntime or openvino for ONNX files")
        self.check(profile)
        dev = profile.device.lower()
        device = torch.device(dev)
        # A copy: moving/halving/compiling must not change the caller's (CPU, fp32) model.
        model = copy.deepcopy(artifact.torch_model).to(device).eval()
        dtype = torch.float16 if profile.precision == "fp16" else torch.float32
        model = model.to(dtype)
        if profile.compile:
            model = torch.compile(model, mode="max-autotune-no-cudagraphs" if device.type == "cuda" else "default")

        @torch.inference_mode()
        def forward(x: np.ndarray) -> torch.Tensor:
            return main_output(model(torch.from_numpy(x).to(device, dtype, non_blocking=True)))

        def run(x: np.ndarray) -> np.ndarray:
            # The thread count holds only while this inference runs (a no-op check inside
            # ``session``), so a runner kept and called later neither runs on the process's
            # current count nor changes it.
            with self.session(profile):
                out = forward(x)
            return out.float().cpu().numpy()

        if device.type != "cuda":
            return FnRunner(run, info={"device": dev, "threads": profile.threads, "compile": profile.compile})

        def timed(x: np.ndarray) -> float:
            xt = torch.from_numpy(x).to(device, dtype)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.inference_mode():
                start.record()
                model(xt)
                end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

        return FnRunner(run, timed=timed, clock="cuda_events",
                        info={"device": dev, "precision": profile.precision, "compile": profile.compile})


BACKENDS.register("torch", TorchBackend)
