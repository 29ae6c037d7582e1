"""Measure one candidate on the target: export it, time it on the profile's backend, and (int8
profiles) score the quantized file that would really be deployed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from autoprune.config import DeviceProfile
from autoprune.errors import ExportError
from autoprune.measure import backends
from autoprune.measure.cache import LatencyCache, architecture_hash
from autoprune.measure.onnx import cpu_fp32, export_onnx, file_size, gzip_size
from autoprune.measure.onnx_slice import OnnxSlicer
from autoprune.measure.parity import check_export_parity, parity_batch, run_batched
from autoprune.measure.predictor import LatencyPredictor, model_features
from autoprune.measure.quantize import (
    _input_shape,
    calibration_batches,
    quantize_artifact,
    quantized_path,
)
from autoprune.measure.stats import LatencyStats
from autoprune.runfolder import RunFolder


def measure_model(model: nn.Module, example: torch.Tensor, profile: DeviceProfile, onnx_path: Path, exporter: str, *,
                  calib: Optional[list[Any]] = None, run: Optional[RunFolder] = None,
                  dense: Optional[nn.Module] = None, slicer: Optional[OnnxSlicer] = None) -> dict[str, Any]:
    """Export ``model`` and time it on the profile's backend; returns latency stats and sizes.

    With a ``run`` folder: an architecture already measured on this profile there is not measured
    again (``cache: true``); ``lut: true`` predicts latency first (measure/predictor.py, once
    calibrated on the run's measured models) and skips export and measurement of clear budget
    violations; ``measure_reference: true`` times the dense model (the run's
    ``dense/model.onnx``; ``dense`` is its PyTorch module for the torch backend) interleaved with
    the candidate and records ``latency.speedup``, steadier than absolute times.
    ``precision: int8`` quantizes first, calibrated on ``calib`` batches. Right after export the
    file is checked against ``model`` on a few ``calib`` samples (:mod:`autoprune.measure.parity`):
    a mismatch raises ExportError before anything is timed; the results are returned as ``parity``.
    With the predictor on, the result carries ``predicted_latency_ms`` (None until calibrated)
    and ``measured_latency_ms`` (None when rejected on the prediction).

    ``model`` may sit on the train device (a GPU): what is exported and timed is its CPU fp32
    copy (:func:`cpu_fp32`), so latency never depends on where or how the model trained.
    ``slicer``: the run's :class:`~autoprune.measure.onnx_slice.OnnxSlicer` (export without tracing).
    """
    model = cpu_fp32(model)
    dense = cpu_fp32(dense) if dense is not None and profile.measure_reference else None  # only timed as the reference
    example = example.cpu()
    predictor = LatencyPredictor.for_run(run, profile) if run is not None and profile.lut else None
    features = model_features(model, example) if predictor is not None else {}
    predicted = predictor.predict(features) if predictor is not None else None
    rejected = _predicted_rejection(predicted, predictor, example, model, profile)
    if rejected is not None:
        return rejected
    # A broken export fails here, before it is timed (ExportError: the trial FAILs with the difference).
    parity = export_checked(model, example, onnx_path, exporter, slicer, lambda: check_export_parity(
        model, backends.ModelArtifact(onnx_path), parity_batch(example, calib, profile.parity_samples), profile, int(example.shape[0])))
    arch = architecture_hash(onnx_path)
    cache = LatencyCache(run.latency_cache) if run is not None and profile.cache else None
    stats = cache.get(profile, arch) if cache else None
    cached = stats is not None
    if stats is None:
        batches = calibration_batches(calib, int(example.shape[0]), profile.calib_samples) if calib and profile.precision == "int8" else None
        stats = backends.measure(backends.ModelArtifact(onnx_path, model), profile, example.numpy(),
                                 reference=_reference_artifact(run, onnx_path, profile, dense), calib=batches)
        if cache:
            cache.put(profile, arch, stats)
        if predictor is not None:
            predictor.add(features, stats.median_ms, predicted)
    extra = {"predicted_latency_ms": predicted, "measured_latency_ms": stats.median_ms} if predictor is not None else {}
    return {"latency": stats.to_dict(), "latency_cached": cached, "arch_hash": arch, **extra, "parity": parity,
            "onnx_bytes": file_size(onnx_path), "onnx_gzip_bytes": gzip_size(onnx_path)}


def export_checked(model: nn.Module, example: torch.Tensor, onnx_path: Path, exporter: str, slicer: Optional[OnnxSlicer],
                   check: Any) -> Any:
    """Export ``model`` (through ``slicer`` when given) and return ``check()`` (the parity
    check of the written file). A sliced file that fails the check is never used: the model is
    exported fresh and checked again, and slicing is off for the run (a slicer fault must not
    fail a trial whose model exports correctly)."""
    if slicer is None:
        export_onnx(model, example, onnx_path, exporter)
        return check()
    if not slicer.export(model, onnx_path, example):  # exported fresh (the slicer said why in the run log)
        return check()
    try:
        return check()
    except ExportError as exc:
        slicer.disable(f"a sliced file failed the parity check ({exc})"[:400])
        export_onnx(model, example, onnx_path, exporter)
        return check()


def _predicted_rejection(predicted: Optional[float], predictor: Optional[LatencyPredictor], example: torch.Tensor,
                         model: nn.Module, profile: DeviceProfile) -> Optional[dict[str, Any]]:
    """A result without export or measurement when the calibrated predictor puts the candidate
    clearly over ``max_latency_ms``: above budget × (1 + margin), the margin set by the
    predictor's held-out error (at least ``lut_margin``); None otherwise."""
    b = profile.budget.max_latency_ms
    if predicted is None or predictor is None or not b:
        return None
    margin = predictor.margin()
    if predicted <= b * (1 + margin):
        return None
    est = sum(p.numel() * p.element_size() for p in model.parameters())
    st = LatencyStats(predicted, predicted, predicted, predicted, 0.0, 0, 0.0, int(example.shape[0]))
    return {"latency": st.to_dict(), "latency_predicted": True, "predicted_latency_ms": predicted,
            "measured_latency_ms": None, "predictor_margin": margin, "onnx_bytes": est, "onnx_gzip_bytes": est,
            "onnx_bytes_estimated": True}


def _reference_artifact(run: Optional[RunFolder], onnx_path: Path, profile: DeviceProfile,
                        dense: Optional[nn.Module]) -> Optional[backends.ModelArtifact]:
    """The dense model to time interleaved with a candidate (``measure_reference: true``): the
    run's dense ONNX file (int8 profiles: the quantized file made when the dense model was
    measured), with its PyTorch module for the torch backend."""
    if run is None or not profile.measure_reference:
        return None
    dense_onnx = run.dense_onnx
    if not dense_onnx.is_file() or dense_onnx.resolve() == Path(onnx_path).resolve():
        return None
    if profile.precision == "int8" and quantized_path(dense_onnx, profile).is_file():
        return backends.ModelArtifact(quantized_path(dense_onnx, profile), dense, quantized=True)
    return backends.ModelArtifact(dense_onnx, dense)


def _eval_profile(profile: DeviceProfile) -> DeviceProfile:
    """Accuracy of a remote profile's QDQ model is computed locally with onnxruntime CPU."""
    if profile.backend in ("onnxruntime", "openvino"):
        return profile
    return DeviceProfile(name=profile.name + "-local-eval", backend="onnxruntime", device="cpu", threads=profile.threads,
                         precision="int8")


def evaluate_model_file(path: Path, data: Any, profile: DeviceProfile, batch_size: Optional[int] = None,
                        split: str = "val", task: Any = None) -> float:
    """Top-1 accuracy (or ``task``'s metric) of an exported (e.g. quantized) model file on the
    held-out ``split`` (see ``DataBundle.loader``), run by the profile's runtime. The file's batch
    axis is static, so the last batch is padded and the padding ignored."""

    prof = _eval_profile(profile)
    runner = backends.load(backends.ModelArtifact(Path(path), quantized=True), prof)
    b = batch_size or _input_shape(Path(path))[0]
    run = _padded_runner(runner, b)
    if task is not None:
        return float(task.evaluate(run, data.loader(split, 256)))
    correct = total = 0
    for x, y in data.loader(split, 256):
        correct += int((run(x).argmax(1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def _padded_runner(runner: Any, b: int) -> Any:
    """``runner`` (static batch ``b``, numpy) as a torch callable on any batch size (the last
    chunk padded, its padding's outputs dropped: :func:`parity.run_batched`)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run_batched(runner, x.numpy().astype(np.float32), b))

    return run


def quantized_accuracy(model: Any, example: Any, profile: DeviceProfile, onnx_path: Path, exporter: str,
                       calib: Sequence[Any], data: Any, split: str = "val", task: Any = None,
                       slicer: Optional[OnnxSlicer] = None) -> tuple[float, Path]:
    """Export the (fine-tuned) ``model``, quantize it on ``calib`` and return (accuracy, int8 file)."""
    model = cpu_fp32(model)

    export_checked(model, example, Path(onnx_path), exporter, slicer, lambda: check_export_parity(
        model, backends.ModelArtifact(Path(onnx_path)), parity_batch(example, list(calib), profile.parity_samples),
        profile, int(example.shape[0]), what="exported fine-tuned model"))
    batches = calibration_batches(calib, int(example.shape[0]), profile.calib_samples)
    art = quantize_artifact(backends.ModelArtifact(Path(onnx_path), model), profile, batches)
    return evaluate_model_file(Path(art.onnx_path), data, profile, split=split, task=task), Path(art.onnx_path)
