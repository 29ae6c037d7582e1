"""The Pareto front: which trials are non-dominated, as rows, tables and the files that hold them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import optuna

from autoprune.config import load_device_profile
from autoprune.errors import ConfigError
from autoprune.files import atomic_write_text, swap_interrupted
from autoprune.measure.stats import latency_ms
from autoprune.runfolder import RunFolder


def trial_row(t: optuna.trial.FrozenTrial, dense: dict[str, Any]) -> dict[str, Any]:
    """Flatten a finished trial into the metrics a user compares."""
    ua = t.user_attrs
    lat = ua.get("latency", {})
    dense_lat = latency_ms(dense["latency"]) if dense.get("latency") else None
    return {
        "trial": t.number,
        "accuracy": t.values[0] if t.values else ua.get("accuracy"),
        "metric_name": ua.get("metric_name", "accuracy"),
        "latency_ms": t.values[1] if t.values else lat.get("median_ms"),
        "latency_p90_ms": lat.get("p90_ms"),
        "latency_cv": lat.get("cv"),
        "speedup": lat.get("speedup") or ((dense_lat / latency_ms(lat)) if dense_lat and lat.get("median_ms") else None),
        "flops": ua.get("flops"),
        "params": ua.get("params"),
        "onnx_bytes": ua.get("onnx_bytes"),
        "onnx_gzip_bytes": ua.get("onnx_gzip_bytes"),
        "feasible": all(v <= 0 for v in t.constraints.values()) if t.constraints else True,
        "finetune_steps": ua.get("finetune_steps"),
        "ratios": ua.get("ratios", {}),
        "methods": ua.get("methods", {}),
        "granularity": ua.get("granularity", {}),
        "weight_sparsity": ua.get("weight_sparsity"),
        "widths": ua.get("widths", {}),
    }


def non_dominated(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Mask of points (accuracy ↑, latency ↓) that no other point dominates. Used to verify fronts."""
    pts = np.asarray(points, dtype=float)
    mask = []
    for i, (a, lat) in enumerate(pts):
        dominated = np.any((pts[:, 0] >= a) & (pts[:, 1] <= lat) & ((pts[:, 0] > a) | (pts[:, 1] < lat)))
        mask.append(not bool(dominated))
    return mask


def front(study: optuna.Study, dense: dict[str, Any]) -> list[dict[str, Any]]:
    """Feasible, non-dominated trials (Optuna's ``best_trials`` honours constraints), by latency."""
    rows = [trial_row(t, dense) for t in study.best_trials]
    return sorted(rows, key=lambda r: (r["latency_ms"], -r["accuracy"]))


def best_under(rows: list[dict[str, Any]], target_ms: float) -> Optional[dict[str, Any]]:
    """The most accurate front model at or under ``target_ms`` (budget mode's answer; the most
    accurate model under any latency limit is always on the front)."""
    ok = [r for r in rows if r["latency_ms"] <= target_ms]
    return max(ok, key=lambda r: (r["accuracy"], -r["latency_ms"]), default=None)


CSV_FIELDS = [
    "trial", "accuracy", "latency_ms", "latency_p90_ms", "latency_cv", "speedup", "flops", "params",
    "onnx_bytes", "onnx_gzip_bytes", "finetune_steps",
]


def front_json(rows: list[dict[str, Any]], dense: dict[str, Any]) -> str:
    """The text of ``pareto.json`` (and of the copy inside ``pareto/``, ``run.front_journal``)."""
    return json.dumps({"dense": dense, "pareto": rows}, indent=2)


def write_tables(rows: list[dict[str, Any]], run: RunFolder, dense: dict[str, Any]) -> None:
    """``pareto.json`` (everything, what pick reads) and ``pareto.csv`` (the numbers, one row each)."""
    atomic_write_text(run.pareto_json, front_json(rows, dense))
    groups = sorted({g for r in rows for g in r["ratios"]})
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS + [f"ratio:{g}" for g in groups] + [f"method:{g}" for g in groups])
    for r in rows:
        w.writerow([r[k] for k in CSV_FIELDS] + [r["ratios"].get(g, 0.0) for g in groups] + [r["methods"].get(g, "") for g in groups])
    atomic_write_text(run.pareto_csv, buf.getvalue())



def load_front(run_dir: Path) -> dict[str, Any]:
    """The exported front: ``pareto.json``, or the rows inside ``pareto/`` when a search was killed
    after swapping in a new ``pareto/`` and before rewriting ``pareto.json`` (they are the rows of
    the folders that are there). Nothing is written: the next search or export tidies up."""
    run = RunFolder(Path(run_dir))
    if swap_interrupted(run.pareto_dir):
        raise ConfigError(f"{run.pareto_dir}: missing, its export was interrupted; run 'autoprune search --out {run_dir}' "
                          "with the same settings to restore it")
    for p in (run.front_journal, run.pareto_json):
        if p.is_file():
            return json.loads(p.read_text())
    raise ConfigError(f"{run_dir}: no pareto.json; run 'autoprune search --out {run_dir}' first")


def search_profile_name(run_dir: Path, front: Optional[dict[str, Any]] = None) -> str:
    """Name of the device profile the search measured latency on (recorded with the dense model)."""
    front = front or load_front(run_dir)
    return str(front.get("dense", {}).get("profile", "?"))


def load_remeasure(run_dir: Path, profile: str) -> dict[str, Any]:
    """Results of ``autoprune remeasure`` for ``profile`` (a profile name or YAML path)."""
    name = _profile_name(profile)
    run = RunFolder(Path(run_dir))
    p = run.remeasure(name)
    if not p.is_file():
        have = sorted(q.stem for q in run.remeasure_dir.glob("*.json"))
        raise ConfigError(
            f"{run_dir}: no latencies on profile {name!r} (re-measured profiles: {have or 'none'}); run "
            f"'autoprune remeasure {run_dir} --device-profile {profile}' first"
        )
    return json.loads(p.read_text())


def _profile_name(profile: str) -> str:
    """A profile reference (shipped name or YAML path) → the ``name`` inside it."""

    p = Path(profile)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_device_profile(profile).name
    return profile
