"""Measure one candidate on the target: export it, time it on the profile's backend, and (int8
profiles) score the quantized file that would really be deployed.
"""

from __future__ import annotations

import json
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
    violations; ``measure_reference: true`` (the default) times the dense model (the run's
    ``dense/model.onnx``; ``dense`` is its PyTorch module for the torch backend) interleaved with
    the candidate in rounds and records ``latency.ratio`` with its interval, ``speedup`` and
    ``corrected_ms`` (ratio x the run's dense quiet estimate: the headline latency, steady under
    load; raw ``median_ms`` etc. kept beside it).
    ``precision: int8`` quantizes first, calibrated on ``calib`` batches. Right after export the
    file is checked against ``model`` on a few ``calib`` samples (:mod:`autoprune.measure.parity`):
    a mismatch raises ExportError before anything is timed; the results are returned as ``parity``.
    With the predictor on (it predicts the ratio to dense), the result carries
    ``predicted_latency_ms`` (None until calibrated) and ``measured_latency_ms`` (None when
    rejected on the prediction), both in ms as ratio x the dense quiet estimate.

    ``model`` may sit on the train device (a GPU): what is exported and timed is its CPU fp32
    copy (:func:`cpu_fp32`), so latency never depends on where or how the model trained.
    ``slicer``: the run's :class:`~autoprune.measure.onnx_slice.OnnxSlicer` (export without tracing).
    """
    model = cpu_fp32(model)
    dense = cpu_fp32(dense) if dense is not None and profile.measure_reference else None  # only timed as the reference
    example = example.cpu()
    is_dense = run is not None and Path(onnx_path).resolve() == run.dense_onnx.resolve()
    dense_quiet = None if is_dense else _dense_quiet_ms(run)
    predictor = LatencyPredictor.for_run(run, profile) if run is not None and profile.lut else None
    features = model_features(model, example) if predictor is not None else {}
    # The predictor models latency relative to dense; ms = ratio x the dense quiet estimate
    # (1 ms stands in while no dense model was measured in the run: then it learns ms).
    scale = dense_quiet or 1.0
    predicted_ratio = predictor.predict(features) if predictor is not None else None
    predicted = predicted_ratio * scale if predicted_ratio is not None else None
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
    _correct(stats, is_dense and profile.measure_reference, dense_quiet)
    if predictor is not None and not cached:
        if is_dense:
            predictor.add(features, 1.0, predicted_ratio)
        else:
            predictor.add(features, stats.ratio if stats.ratio is not None and dense_quiet else stats.median_ms / scale,
                          predicted_ratio)
    extra = {"predicted_latency_ms": predicted, "measured_latency_ms": stats.latency_ms} if predictor is not None else {}
    return {"latency": stats.to_dict(), "latency_cached": cached, "arch_hash": arch, **extra, "parity": parity,
            "onnx_bytes": file_size(onnx_path), "onnx_gzip_bytes": gzip_size(onnx_path)}


def _dense_quiet_ms(run: Optional[RunFolder]) -> Optional[float]:
    """The dense model's quiet estimate of the run (its ``corrected_ms``: the fast quantile of its
    samples, see :data:`~autoprune.measure.stats.QUIET_QUANTILE`), or None before it is measured.
    One figure per run, so every candidate's ms = its ratio x the same dense time, and budget-mode
    targets (dense ms / speed-up) stay put however loaded each trial's measurement was."""
    if run is None or not run.dense_json.is_file():
        return None
    lat = json.loads(run.dense_json.read_text()).get("latency") or {}
    v = lat.get("corrected_ms") or lat.get("quiet_ms") or lat.get("median_ms")
    return float(v) if v else None


def _correct(stats: LatencyStats, is_dense: bool, dense_quiet: Optional[float]) -> None:
    """Fill ``corrected_ms``: the dense model's is its own quiet estimate (only when candidates are
    timed against it: else every figure stays a raw median, like with like); a candidate's is its
    ratio to dense x the run's dense quiet estimate (this session's dense quiet time when the run
    has none yet). Raw figures are left as measured."""
    if is_dense:
        stats.corrected_ms = stats.quiet_ms if stats.quiet_ms is not None else stats.median_ms
    elif stats.ratio is not None:
        d = dense_quiet or stats.reference_quiet_ms
        stats.corrected_ms = stats.ratio * d if d else None


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
