"""int8 post-training quantization, so a search can explore pruning + quantization together.

* OpenVINO profiles: NNCF's ``nncf.quantize`` on the OpenVINO model (what OpenVINO recommends),
  saved as IR ``<stem>.int8.xml``.
* onnxruntime (and remote) profiles: ``onnxruntime.quantization.quantize_static`` writing a QDQ
  ONNX ``<stem>.int8.onnx`` (per-channel int8 weights, int8 activations) — the format every
  onnxruntime execution provider and OpenVINO read, so it can be sent to a remote target as is.

Calibration uses real training batches when the search provides them. Quantized weights change
the predictions, so with ``precision: int8`` the trial accuracy is measured on the quantized
model (:func:`quantized_accuracy`), not on the fp32 PyTorch module.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from autoprune.config import DeviceProfile
from autoprune.errors import QuantizationError
from autoprune.measure.onnx import ModelArtifact
from autoprune.measure.ov_core import shared_core

log = logging.getLogger("autoprune")


def calibration_batches(samples: Sequence[Any], batch_size: int, limit: int) -> list[np.ndarray]:
    """Stack single samples (or batches, or (x, y) pairs) into at most ``limit`` samples grouped in
    batches of ``batch_size`` — the static batch the model was exported with."""
    xs: list[np.ndarray] = []
    for s in samples:
        x = s[0] if isinstance(s, (tuple, list)) else s
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        xs.append(x.astype(np.float32))
    if not xs:
        return []
    allx = np.concatenate(xs, 0)[:limit]
    n = (len(allx) // batch_size) * batch_size
    if n == 0:  # fewer samples than one batch: repeat them
        reps = -(-batch_size // len(allx))
        allx, n = np.concatenate([allx] * reps, 0), batch_size
    return [allx[i:i + batch_size] for i in range(0, n, batch_size)]


def _input_shape(onnx_path: Path) -> list[int]:
    """Static input shape of an ONNX or OpenVINO IR file (dynamic dimensions read as 1)."""
    if str(onnx_path).endswith(".xml"):
        ps = shared_core().read_model(str(onnx_path)).inputs[0].get_partial_shape()
        return [d.get_length() if d.is_static else 1 for d in ps]
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.dim_value > 0 else 1 for d in dims]


def _random_calibration(onnx_path: Path, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Random inputs: enough for a *latency* measurement of the int8 graph, useless for accuracy."""
    shape = _input_shape(onnx_path)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _quantize_onnxruntime(onnx_path: Path, out_path: Path, calib: Iterable[np.ndarray]) -> Path:
    """QDQ int8 ONNX via onnxruntime.quantization (pre-processed: shape inference + fusions)."""
    import onnxruntime.quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = list(calib)

    class Reader(q.CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.it = iter({name: b} for b in batches)

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self.it, None)

    import onnx

    name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
    out_path = Path(out_path)
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    try:
        try:
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
            log.debug("quant_pre_process failed (%s); quantizing the raw export", exc)
            src = Path(onnx_path)
        q.quantize_static(
            str(src), str(out_path), Reader(name), quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    except Exception as exc:  # noqa: BLE001
        raise QuantizationError(f"onnxruntime int8 quantization of {onnx_path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        pre.unlink(missing_ok=True)
    return out_path


def _quantize_openvino(onnx_path: Path, out_xml: Path, calib: Iterable[np.ndarray]) -> Path:
    """int8 OpenVINO IR via NNCF post-training quantization (``pip install nncf``)."""
    try:
        import nncf
    except ImportError:
        raise QuantizationError("precision int8 on backend openvino needs NNCF: pip install 'autoprune[int8]' (or pip install nncf)") from None
    import openvino as ov

    batches = list(calib)
    try:
        model = shared_core().read_model(str(onnx_path))
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars on stdout
            qmodel = nncf.quantize(model, nncf.Dataset(batches), subset_size=max(1, sum(len(b) for b in batches)),
                                   preset=nncf.QuantizationPreset.PERFORMANCE)
        out_xml = Path(out_xml)
        ov.save_model(qmodel, str(out_xml), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001
        raise QuantizationError(f"NNCF int8 quantization of {onnx_path} failed: {type(exc).__name__}: {exc}") from exc
    return out_xml


def quantized_path(onnx_path: Path, profile: DeviceProfile) -> Path:
    suffix = ".int8.xml" if profile.backend == "openvino" else ".int8.onnx"
    return Path(onnx_path).with_name(Path(onnx_path).stem + suffix)


def quantize_artifact(artifact: Any, profile: DeviceProfile, calib: Optional[list[np.ndarray]] = None) -> Any:
    """int8 copy of ``artifact`` for ``profile`` (NNCF IR for openvino, QDQ ONNX otherwise)."""

    if artifact.onnx_path is None:
        raise QuantizationError("int8 quantization needs the exported ONNX file")
    src = Path(artifact.onnx_path)
    if not calib:
        log.warning("int8: no calibration data given for %s; quantizing on random inputs (latency only)", src)
        calib = _random_calibration(src)
    out = quantized_path(src, profile)
    if profile.backend == "openvino":
        _quantize_openvino(src, out, calib)
    else:
        _quantize_onnxruntime(src, out, calib)
    return ModelArtifact(out, artifact.torch_model, quantized=True)


