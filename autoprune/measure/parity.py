"""Export parity: does the exported file compute what the PyTorch model computes?

A model whose forward takes a Python branch on a tensor value, reads a global, or uses an op
the exporter lowers differently can export without any error and still compute something else.
Its latency would then be measured on the wrong graph and its file deployed as if it were the
model that was fine-tuned and scored. So every exported candidate (and the dense model) is run
once on a few calibration samples by the runtimes that will use it, and compared with PyTorch:

* the ONNX file on onnxruntime (CPU, fp32): the file every backend reads and the bundle ships;
* the same file on OpenVINO when the profile's runtime is OpenVINO (``backend: openvino``, or
  ``backend: remote`` with ``remote_backend: openvino``): with the profile's own device and
  settings when that is local and fp32, else on the local CPU in f32.

Pass: ``max |onnx - torch| <= parity_atol + parity_rtol * max |torch|`` over the batch (the
relative part scales with the logits' magnitude, which varies by orders between models), and the
top-1 class agrees on every sample whose PyTorch top-1 margin is larger than that tolerance (a
near-tie may flip under rounding). Failure raises :class:`~autoprune.errors.ExportError` naming
the runtime, the measured difference and the tolerance, so the trial FAILs with that reason and
the search goes on.

fp16 and int8 profiles check the fp32 ONNX file only, with the same tolerance: what is checked
is the export (graph and weights), not the precision the profile asks for; the rounding of fp16
and the quantization error of int8 are a different question, answered by scoring the quantized
file's accuracy (``measure/candidate.py``), and a tolerance loose enough for them would let a
broken export through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.config import DeviceProfile
from autoprune.errors import ExportError
from autoprune.measure import backends
from autoprune.outputs import main_output


@dataclass
class ParityResult:
    """One runtime's outputs against PyTorch's on the parity batch."""

    runtime: str
    max_abs_diff: float
    tolerance: float  # parity_atol + parity_rtol * max |torch|
    top1_agree: float  # fraction of samples whose top-1 class agrees
    top1_checked: int  # samples whose top-1 margin is above the tolerance (a flip there is a failure)
    top1_flips: int  # of those, how many disagree
    samples: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_flips == 0


def parity_runtimes(profile: DeviceProfile) -> list[tuple[str, DeviceProfile]]:
    """(label, profile to load with) for every runtime the exported file is checked on."""
    own_fp32 = profile.precision == "fp32"
    ort = (profile if profile.backend == "onnxruntime" and own_fp32 and profile.device.lower() == "cpu"
           else DeviceProfile(name=f"{profile.name}-parity-ort", backend="onnxruntime", device="cpu", threads=profile.threads))
    out = [("onnxruntime", ort)]
    if profile.backend == "openvino" and own_fp32:
        out.append((f"openvino {profile.device}", profile))
    elif profile.backend == "openvino" or (profile.backend == "remote" and profile.remote_backend == "openvino"):
        out.append(("openvino CPU f32", DeviceProfile(name=f"{profile.name}-parity-ov", backend="openvino", device="CPU",
                                                      threads=profile.threads)))
    return out


def parity_batch(example: torch.Tensor, calib: list[Any] | None, samples: int) -> torch.Tensor:
    """Up to ``samples`` real inputs from the calibration batches (``(x, y)`` pairs or tensors);
    the example input when there are none or their shape differs from what was exported
    (``input_shape`` in the profile)."""
    xs: list[torch.Tensor] = []
    for b in calib or []:
        x = b[0] if isinstance(b, (tuple, list)) else b
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(example.shape[1:]):
            break
        xs.append(x[: samples - sum(len(t) for t in xs)])
        if sum(len(t) for t in xs) >= samples:
            break
    return torch.cat(xs).float() if xs else example.detach().float()


def compare(label: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> ParityResult:
    """Compare one runtime's logits with PyTorch's (see the module doc for the rule)."""
    got = np.asarray(got, dtype=np.float64).reshape(len(ref), -1)
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    tol = atol + rtol * (float(np.abs(ref).max()) if ref.size else 0.0)
    agree = got.argmax(1) == ref.argmax(1)
    if ref.shape[1] > 1:
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > tol
    else:
        clear = np.zeros(len(ref), dtype=bool)
    return ParityResult(label, diff, tol, float(agree.mean()) if len(agree) else 1.0, int(clear.sum()),
                        int((clear & ~agree).sum()), len(ref))


def run_batched(runner: Any, xs: np.ndarray, batch: int) -> np.ndarray:
    """The exported file's batch axis is static: run ``xs`` in chunks of ``batch``, padding the
    last chunk by repeating its last sample and dropping the padding's outputs."""
    outs = []
    for i in range(0, len(xs), batch):
        chunk = xs[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)], 0)
        outs.append(np.asarray(runner(np.ascontiguousarray(chunk)))[:n])
    return np.concatenate(outs, 0)


def check_export_parity(model: nn.Module, artifact: backends.ModelArtifact, batch: torch.Tensor, profile: DeviceProfile,
                        export_batch: int, what: str = "exported model") -> list[dict[str, Any]]:
    """Run ``artifact`` on ``batch`` with every runtime of :func:`parity_runtimes` and compare with
    ``model``; returns one result dict per runtime, or raises :class:`ExportError` on a mismatch.

    ``export_batch`` is the file's (static) batch size. ``profile.parity_samples: 0`` turns the
    check off (returns ``[]``).
    """
    if profile.parity_samples <= 0 or artifact.onnx_path is None:
        return []
    was_training = model.training
    model.eval()
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            out = model(batch.to(device))
        # The exported file's one output ("logits") is the model's main output (export_onnx).
        ref = main_output(out).detach().float().cpu().numpy()
    finally:
        model.train(was_training)
    xs = batch.detach().cpu().numpy().astype(np.float32)
    results = []
    for label, prof in parity_runtimes(profile):
        got = run_batched(backends.load(artifact, prof), xs, export_batch)
        r = compare(label, got, ref, profile.parity_atol, profile.parity_rtol)
        if not r.ok:
            raise ExportError(
                f"{what} ({artifact.onnx_path}) does not compute what the PyTorch model computes on {label}: "
                f"max abs diff {r.max_abs_diff:.3g} vs tolerance {r.tolerance:.3g} (parity_atol {profile.parity_atol:g} + "
                f"parity_rtol {profile.parity_rtol:g} x max |logit|), top-1 agreement {r.top1_agree:.0%} "
                f"({r.top1_flips} clear flips) on {r.samples} calibration samples; the forward probably depends on "
                "tensor values in Python (traced as a constant) or uses an op the exporter lowers differently; "
                "try exporter: torchscript/dynamo, or loosen parity_atol/parity_rtol in the device profile if the difference is expected"
            )
        results.append({**asdict(r), "ok": True})
    return results
