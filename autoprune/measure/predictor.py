"""Latency predictor: the latency of a candidate on the target relative to the dense model,
before exporting it.

Measuring a candidate costs an export plus tens of inferences; for a candidate that is clearly
over the latency budget that is wasted. Pruned candidates of one base model differ only in
widths, so their latency is close to a *linear* function of what their layers compute and move:

    latency / dense latency ≈ Σ_f w_f · feature_f + c,      w_f ≥ 0

with features computed from one PyTorch forward pass (no export, no timing): multiply-accumulates
per layer kind and output resolution (a 3×3 conv at 56×56 and at 7×7, a depthwise and a 1×1
conv run at very different efficiencies), activation and weight bytes (memory traffic: the
BatchNorm, ReLU and residual adds the runtime fuses into the convs cost bandwidth, not MACs).
The target is the *ratio* to the dense model that every measurement carries (candidates are
timed interleaved with dense, measure/stats.py: ``time_pair``), so load on a busy machine
cancels in what the predictor learns; milliseconds are ratio × the dense model's quiet estimate
(:meth:`LatencyPredictor.predict_ms`). The weights are fitted by non-negative least squares on
*relative* error to the candidates measured so far in the run (the dense model first, ratio 1),
so they are the target's own costs, fusion
included — which is what a per-layer table timed on stand-alone one-layer models (the former
``lut.py``) missed (median 15.7 % off).

Honesty: every fit is scored held-out (leave-one-out; k-fold in long searches) — each
calibration point is predicted by a fit that did not see it — and the predictor refuses to predict (``predict`` returns None) until it
has :data:`MIN_POINTS` points and that held-out error. Of a few candidate feature sets the one
with the lowest held-out error is used; :meth:`LatencyPredictor.margin` turns the worst held-out
over-prediction into the safety margin of budget rejections.

Calibration points live in the run folder (``<run>/predictor/<profile key>.json``), merged under
a file lock so that workers sharing the folder all calibrate on every measured candidate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import nnls

from autoprune.config import DeviceProfile
from autoprune.measure.cache import profile_key
from autoprune.files import atomic_write_text, file_lock
from autoprune.runfolder import RunFolder

#: Fewest calibration points before the predictor predicts anything: fewer cannot both fit and
#: score a fit held-out.
MIN_POINTS = 6

#: The rejection margin is this multiple of the worst held-out over-prediction (and at least the
#: profile's ``lut_margin``): the held-out errors are a sample, the next candidate may be worse.
MARGIN_SAFETY = 1.5

#: Beyond this many calibration points, held-out error is k-fold with this many folds.
MAX_FOLDS = 20

Features = dict[str, float]


def model_features(model: nn.Module, example: torch.Tensor) -> Features:
    """What ``model(example)`` computes and moves, per layer kind and output resolution.

    ``macs:<kind>:<H>`` sums multiply-accumulates of conv layers of one kind (``conv`` k×k,
    ``pw`` 1×1, ``dw`` grouped/depthwise) at output height H, ``macs:linear`` of Linear layers;
    ``act_bytes`` the fp32 inputs + outputs of those layers, ``weight_bytes`` their weights,
    ``layers`` how many ran. ``macs16:*`` are the same MACs with channels padded to multiples of
    16, as blocked-layout kernels (oneDNN's nChw16c on AVX-512) compute them. Zeroed (unstructured) weights count in full: dense kernels run them.
    """
    feats: Features = {}
    hooks = []

    def add(key: str, v: float) -> None:
        feats[key] = feats.get(key, 0.0) + float(v)

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = inp[0]
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            kind = "dw" if mod.groups > 1 else ("pw" if kh * kw == 1 else "conv")
            cin = mod.in_channels // mod.groups
            add(f"macs:{kind}:{out.shape[-2]}", out.numel() * cin * kh * kw)
            pixels = out.numel() // mod.out_channels
            add(f"macs16:{kind}:{out.shape[-2]}", pixels * _pad16(mod.out_channels) * (cin if kind == "dw" else _pad16(cin)) * kh * kw)
        else:
            add("macs:linear", out.numel() * mod.in_features)
            add("macs16:linear", out.numel() // mod.out_features * _pad16(mod.out_features) * _pad16(mod.in_features))
        add("act_bytes", 4 * (x.numel() + out.numel()))
        add("weight_bytes", 4 * mod.weight.numel())
        add("layers", 1)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return feats


def _pad16(c: int) -> int:
    return -(-c // 16) * 16


#: Candidate feature sets, simplest first: total MACs; MACs per layer kind (k×k, 1×1, depthwise,
#: linear); MACs per kind and output resolution; the last two also with channels padded to 16
#: (``16``). Each but ``macs`` adds activation and weight bytes; all have a constant.
FEATURE_SETS = ("macs", "kinds", "kinds16", "resolution", "resolution16")


def _design_row(f: Features, feature_set: str, columns: list[str]) -> list[float]:
    """One row of the design matrix of ``feature_set``; ``columns`` names the ``resolution`` MAC
    columns (fixed by the calibration points, so every row has the same length)."""
    prefix = "macs16:" if feature_set.endswith("16") else "macs:"
    if feature_set == "macs":
        return [sum(v for k, v in f.items() if k.startswith(prefix)), 1.0]
    if feature_set.startswith("kinds"):
        macs = [sum(v for k, v in f.items() if k.startswith(prefix + kd)) for kd in ("conv", "pw", "dw", "linear")]
    else:
        macs = [f.get(prefix + c, 0.0) for c in columns]
    return macs + [f.get("act_bytes", 0.0), f.get("weight_bytes", 0.0), 1.0]


def design(feature_set: str, features: list[Features], columns: list[str]) -> np.ndarray:
    """The design matrix of ``feature_set``: one row per model, one column per weight."""
    return np.array([_design_row(f, feature_set, columns) for f in features], dtype=np.float64).reshape(len(features), -1)


def _columns_of(points: list[tuple[Features, float]]) -> list[str]:
    """The ``resolution`` sets' MAC columns: every ``<kind>:<H>`` a point has a ``macs:`` entry for."""
    return sorted({k.split(":", 1)[1] for f, _ in points for k in f if k.startswith("macs:")})


def _solve(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column scale, weights) of the non-negative fit of ``X`` to ``y`` on relative error."""
    scale = np.abs(X).max(0)
    scale = np.where(scale > 0, scale, 1.0)
    w, _ = nnls(X / scale / y[:, None], np.ones_like(y))
    return scale, w


class Fit:
    """Non-negative least squares on relative error: min Σ ((x·w − y) / y)², w ≥ 0.

    Non-negative because every feature is a cost (more MACs or bytes never make a model faster),
    which keeps extrapolation to wider or narrower candidates monotone; relative because budgets
    and errors are relative, and small candidates must not be fitted worse than the dense one.
    Columns are scaled to unit maximum first, so the solver sees comparable magnitudes.
    """

    def __init__(self, feature_set: str, points: list[tuple[Features, float]]) -> None:
        self.feature_set = feature_set
        self.columns = _columns_of(points)
        X = design(feature_set, [f for f, _ in points], self.columns)
        self.scale, self.w = _solve(X, np.array([m for _, m in points], dtype=np.float64))

    def __call__(self, f: Features) -> float:
        return float(np.asarray(_design_row(f, self.feature_set, self.columns)) / self.scale @ self.w)


def held_out_errors(feature_set: str, points: list[tuple[Features, float]]) -> np.ndarray:
    """Held-out relative errors (predicted − measured) / measured of every point: leave-one-out
    up to :data:`MAX_FOLDS` points, k-fold beyond (a long search stays cheap). Each point is
    predicted by a fit that did not see it, so no point scores a fit it was used to make."""
    X = design(feature_set, [f for f, _ in points], _columns_of(points))
    y = np.array([m for _, m in points], dtype=np.float64)
    fold = np.arange(len(y)) % min(len(y), MAX_FOLDS)
    out = np.empty(len(y))
    for k in np.unique(fold):
        test = fold == k
        scale, w = _solve(X[~test], y[~test])
        out[test] = (X[test] / scale @ w - y[test]) / y[test]
    return out


def _min_points(feature_set: str, points: list[tuple[Features, float]]) -> int:
    """Points a feature set needs: two more than its weights, so every leave-one-out fit has at
    least as many points as weights."""
    n_weights = len(_design_row(points[0][0], feature_set, _columns_of(points))) if points else 2
    return max(MIN_POINTS, n_weights + 2)


def _points(d: dict[str, Any]) -> list[tuple[Features, float]]:
    """Stored points as (features, ratio); files written before ratios hold ``ms`` with the dense
    model first, so those become ms / the first point's ms."""
    pts = d.get("points", [])
    base = next((float(p["ms"]) for p in pts[:1] if "ms" in p), 1.0) or 1.0
    return [(dict(p["features"]), float(p["ratio"]) if "ratio" in p else float(p["ms"]) / base) for p in pts]


class LatencyPredictor:
    """Calibration points (features, measured ratio to dense) of one device profile, persisted as
    JSON, and the fit chosen on them by held-out error. Ratios, not ms: a point measured under
    load and one measured on a quiet machine agree (both models slow down together)."""

    def __init__(self, path: Path, profile: DeviceProfile) -> None:
        self.path = Path(path)
        self.profile = profile
        self.points: list[tuple[Features, float]] = []  # (features, ratio to dense)
        self.predictions: list[tuple[float, float]] = []  # (predicted, measured ratio) made before measuring
        # How many leading entries are already in the file: :meth:`save` appends only the rest.
        self._saved_points = 0
        self._saved_predictions = 0
        self._chosen: Optional[tuple[Fit, np.ndarray]] = None
        d = self._read()
        if d is not None:
            self.points = _points(d)
            self.predictions = [(float(a), float(b)) for a, b in d.get("predictions", [])]
            self._saved_points, self._saved_predictions = len(self.points), len(self.predictions)

    @classmethod
    def for_run(cls, run: RunFolder, profile: DeviceProfile) -> "LatencyPredictor":
        """The run folder's predictor for this profile (one file per profile and measurement settings)."""
        return cls(run.predictor(f"{profile.name}-{profile_key(profile)}"), profile)

    def _read(self) -> Optional[dict[str, Any]]:
        """The stored points, or None if there are none yet (written atomically: never half a file)."""
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    def save(self) -> None:
        """Merge into the stored file under a lock: read it, append the points and predictions
        added here since the last save, write atomically and adopt the merged lists (workers
        sharing a run folder each save after measuring; none may drop another's points)."""
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            d = self._read() or {}
            points = _points(d) + self.points[self._saved_points:]
            predictions = [(float(a), float(b)) for a, b in d.get("predictions", [])] + self.predictions[self._saved_predictions:]
            atomic_write_text(self.path, json.dumps({
                "profile": self.profile.name,
                "points": [{"features": f, "ratio": m} for f, m in points],
                "predictions": predictions}, indent=1))
        self.points, self.predictions = points, predictions
        self._saved_points, self._saved_predictions = len(points), len(predictions)
        self._chosen = None

    # -- calibration
    def add(self, features: Features, measured: float, predicted: Optional[float] = None) -> None:
        """A measured model: one more calibration point (``measured``: its latency / the dense
        model's, 1 for the dense model itself); with ``predicted`` (the ratio predicted before the
        measurement) also one more scored prediction. Saved at once."""
        self.points.append((dict(features), float(measured)))
        if predicted is not None:
            self.predictions.append((float(predicted), float(measured)))
        self._chosen = None
        self.save()

    def _choose(self) -> Optional[tuple[Fit, np.ndarray]]:
        """The fit (on all points) of the feature set with the lowest held-out error, and that
        set's held-out errors; None while no set has enough points."""
        if self._chosen is None:
            best: Optional[tuple[float, str, np.ndarray]] = None
            for fs in FEATURE_SETS:
                if len(self.points) < _min_points(fs, self.points):
                    continue
                err = held_out_errors(fs, self.points)
                score = float(np.percentile(np.abs(err), 90))
                if best is None or score < best[0]:
                    best = (score, fs, err)
            if best is not None:
                self._chosen = (Fit(best[1], self.points), best[2])
        return self._chosen

    @property
    def ready(self) -> bool:
        """Enough points to fit and to know the held-out error."""
        return self._choose() is not None

    def held_out(self) -> dict[str, Any]:
        """Held-out error of the chosen fit ({"n": points} alone while not ready)."""
        ch = self._choose()
        if ch is None:
            return {"n": len(self.points)}
        fit, err = ch
        a = np.abs(err)
        return {"n": int(err.size), "feature_set": fit.feature_set, "within10_pct": float((a <= 0.10).mean() * 100),
                "median_abs_pct": float(np.median(a) * 100), "p90_abs_pct": float(np.percentile(a, 90) * 100),
                "max_over_pct": float(max(err.max(), 0.0) * 100)}

    def margin(self) -> float:
        """Relative margin of a budget rejection: :data:`MARGIN_SAFETY` × the worst held-out
        over-prediction, at least the profile's ``lut_margin``. A candidate predicted above
        budget × (1 + margin) is over budget unless it beats every held-out point by a wide margin."""
        ch = self._choose()
        worst = float(max(ch[1].max(), 0.0)) if ch is not None else 0.0
        return max(self.profile.lut_margin, MARGIN_SAFETY * worst)

    # -- prediction
    def predict(self, features: Features) -> Optional[float]:
        """Predicted latency of a model with these :func:`model_features` relative to the dense
        model's; None until :attr:`ready`."""
        ch = self._choose()
        return None if ch is None else max(ch[0](features), 0.0)

    def predict_ms(self, features: Features, dense_ms: float) -> Optional[float]:
        """Predicted milliseconds: the predicted ratio × ``dense_ms`` (the dense model's quiet
        estimate); None until :attr:`ready`."""
        r = self.predict(features)
        return None if r is None else r * float(dense_ms)

    def error(self) -> dict[str, Any]:
        """Error of the predictions made *before* each measurement (the search's own record)."""
        if not self.predictions:
            return {"n": 0}
        rel = np.array([(p - m) / m for p, m in self.predictions])
        return {"n": int(rel.size), "within10_pct": float((np.abs(rel) <= 0.10).mean() * 100),
                "median_abs_pct": float(np.median(np.abs(rel)) * 100),
                "p90_abs_pct": float(np.percentile(np.abs(rel), 90) * 100), "mean_pct": float(rel.mean() * 100)}
