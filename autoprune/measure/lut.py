"""Per-layer latency lookup table: predict a candidate's latency before exporting it.

Measuring a candidate costs an export plus tens of inferences; for large models that dominates a
trial that is going to be rejected anyway. The table maps each Conv2d / Linear *configuration*
(channels, kernel, stride, groups, input size, batch) to its measured latency as a stand-alone
one-layer ONNX model on the profile's backend. Pruned widths snap to multiples of ``round_to``, so
configurations repeat across trials and the table fills quickly; it is stored per device profile
(JSON, ``<run>/lut/<profile key>.json``) and reused by later trials and resumed runs.

A prediction is ``scale × Σ layer latencies``: the layers are measured in isolation, so the sum
misses the rest of the graph (activations, pooling, adds) and fusion effects; ``scale`` is the
median ratio measured/sum over the models measured so far (the dense model first), which absorbs
both. Every measured candidate adds a (prediction, measurement) pair, and :meth:`LatencyLUT.error`
reports the prediction error against measurement.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from autoprune.config import DeviceProfile
from autoprune.measure import backends
from autoprune.measure.cache import profile_key
from autoprune.measure.onnx import export_onnx
from autoprune.runfolder import RunFolder, atomic_write_text, file_lock

LayerKey = str


def layer_configs(model: nn.Module, example: torch.Tensor) -> list[tuple[LayerKey, nn.Module, tuple[int, ...]]]:
    """(key, a fresh stand-alone copy of the layer, input shape) for every Conv2d/Linear run by ``model(example)``."""
    found: list[tuple[LayerKey, nn.Module, tuple[int, ...]]] = []
    hooks = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
        shape = tuple(inp[0].shape)
        if isinstance(mod, nn.Conv2d):
            key = (f"conv:{mod.in_channels}:{mod.out_channels}:{mod.kernel_size}:{mod.stride}:{mod.padding}:"
                   f"{mod.dilation}:{mod.groups}:{mod.bias is not None}:{shape}")
            fresh: nn.Module = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                         mod.dilation, mod.groups, mod.bias is not None)
        else:
            key = f"linear:{mod.in_features}:{mod.out_features}:{mod.bias is not None}:{shape}"
            fresh = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None)
        found.append((key.replace(" ", ""), fresh, shape))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return found


class LatencyLUT:
    """Per-layer latency table for one device profile, persisted as JSON."""

    def __init__(self, path: Path, profile: DeviceProfile) -> None:
        self.path = Path(path)
        self.profile = profile
        self.table: dict[str, float] = {}
        self.pairs: list[tuple[float, float]] = []  # (sum of layer ms, measured ms)
        self.predictions: list[tuple[float, float]] = []  # (predicted ms, measured ms) made before measuring
        # How many leading entries of ``pairs`` / ``predictions`` are already in the file: the
        # rest were added here since and are what :meth:`save` appends to the file's lists.
        self._saved_pairs = 0
        self._saved_predictions = 0
        d = self._read()
        if d is not None:
            self.table = dict(d.get("table", {}))
            self.pairs = [tuple(p) for p in d.get("pairs", [])]
            self.predictions = [tuple(p) for p in d.get("predictions", [])]
            self._saved_pairs, self._saved_predictions = len(self.pairs), len(self.predictions)

    def _read(self) -> Optional[dict[str, Any]]:
        """The stored table, or None if there is none yet (files are replaced atomically, so a
        reader never sees a half-written one)."""
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    @classmethod
    def for_run(cls, run: RunFolder, profile: DeviceProfile) -> "LatencyLUT":
        """The run folder's table for this profile (one file per profile and measurement settings)."""
        return cls(run.lut(f"{profile.name}-{profile_key(profile)}"), profile)

    def save(self) -> None:
        """Merge this table into the stored one and write it back, under a file lock.

        Workers sharing a run folder each hold a table and save after measuring; writing only
        the in-memory copy would drop the layers and calibration pairs another worker saved
        since this one loaded. So, holding ``<table>.lock``: read the file, keep its entries
        (a layer measured by both keeps the stored value: first writer wins, all workers then
        agree), append the pairs/predictions added here since the last save, write atomically,
        and adopt the merged result.
        """
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            d = self._read() or {}
            table = {**self.table, **d.get("table", {})}
            pairs = [tuple(p) for p in d.get("pairs", [])] + self.pairs[self._saved_pairs:]
            predictions = [tuple(p) for p in d.get("predictions", [])] + self.predictions[self._saved_predictions:]
            atomic_write_text(self.path, json.dumps({"profile": self.profile.name, "table": table, "pairs": pairs,
                                                     "predictions": predictions}, indent=1))
        self.table, self.pairs, self.predictions = table, pairs, predictions
        self._saved_pairs, self._saved_predictions = len(pairs), len(predictions)

    def _measure_layer(self, layer: nn.Module, shape: tuple[int, ...]) -> float:

        prof = self.profile.model_copy(update={"warmup": 3, "repeats": 15, "target_rel_ci": None, "measure_reference": False})
        x = torch.randn(*shape)
        with tempfile.TemporaryDirectory(prefix="autoprune-lut-") as d:
            p = export_onnx(layer.eval(), x, Path(d) / "layer.onnx", "torchscript")
            return backends.measure(backends.ModelArtifact(p, layer), prof, x.numpy()).median_ms

    def layer_sum(self, model: nn.Module, example: torch.Tensor) -> float:
        """Σ of the table entries for ``model``'s layers, measuring (and storing) missing ones."""
        total, added = 0.0, False
        for key, layer, shape in layer_configs(model, example):
            if key not in self.table:
                self.table[key] = self._measure_layer(layer, shape)
                added = True
            total += self.table[key]
        if added:
            self.save()
        return total

    @property
    def scale(self) -> Optional[float]:
        """Median of measured / Σ-layers over calibration models; None before the first one."""
        return float(np.median([m / s for s, m in self.pairs if s > 0])) if self.pairs else None

    def predict(self, model: nn.Module, example: torch.Tensor) -> Optional[float]:
        """Predicted median latency (ms) of ``model`` at ``example``'s shape; None until calibrated."""
        s = self.layer_sum(model, example)
        return None if self.scale is None else self.scale * s

    def record(self, model: nn.Module, example: torch.Tensor, measured_ms: float, predicted_ms: Optional[float] = None) -> None:
        """Add a measured model: refines ``scale``; with ``predicted_ms`` also scores the prediction."""
        self.pairs.append((self.layer_sum(model, example), float(measured_ms)))
        if predicted_ms is not None:
            self.predictions.append((float(predicted_ms), float(measured_ms)))
        self.save()

    def error(self) -> dict[str, Any]:
        """Prediction error against measurement (predictions made *before* each measurement)."""
        if not self.predictions:
            return {"n": 0}
        rel = np.array([(p - m) / m for p, m in self.predictions])
        return {"n": int(rel.size), "median_abs_pct": float(np.median(np.abs(rel)) * 100),
                "p90_abs_pct": float(np.percentile(np.abs(rel), 90) * 100), "mean_pct": float(rel.mean() * 100)}
