"""Pareto front: which trials are non-dominated, and their deployable artifacts.

For every Pareto trial we write the fine-tuned model as ONNX, OpenVINO IR and PyTorch state,
plus a metadata JSON that records the device profile and the exact config that produced it,
so a model can be traced back to (and rebuilt from) its search.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import optuna
import torch

from .export import atomic_write_text, export_onnx, export_openvino, file_size, gzip_size

PARETO_DIR = "pareto"


def trial_row(t: optuna.trial.FrozenTrial, dense: dict[str, Any]) -> dict[str, Any]:
    """Flatten a finished trial into the metrics a user compares."""
    ua = t.user_attrs
    lat = ua.get("latency", {})
    dense_lat = dense.get("latency", {}).get("median_ms")
    return {
        "trial": t.number,
        "accuracy": t.values[0] if t.values else ua.get("accuracy"),
        "latency_ms": t.values[1] if t.values else lat.get("median_ms"),
        "latency_p90_ms": lat.get("p90_ms"),
        "latency_cv": lat.get("cv"),
        "speedup": (dense_lat / lat["median_ms"]) if dense_lat and lat.get("median_ms") else None,
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


CSV_FIELDS = [
    "trial", "accuracy", "latency_ms", "latency_p90_ms", "latency_cv", "speedup", "flops", "params",
    "onnx_bytes", "onnx_gzip_bytes", "finetune_steps",
]


def write_tables(rows: list[dict[str, Any]], out: Path, dense: dict[str, Any]) -> None:
    atomic_write_text(out / "pareto.json", json.dumps({"dense": dense, "pareto": rows}, indent=2))
    groups = sorted({g for r in rows for g in r["ratios"]})
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS + [f"ratio:{g}" for g in groups] + [f"method:{g}" for g in groups])
    for r in rows:
        w.writerow([r[k] for k in CSV_FIELDS] + [r["ratios"].get(g, 0.0) for g in groups] + [r["methods"].get(g, "") for g in groups])
    atomic_write_text(out / "pareto.csv", buf.getvalue())


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import openvino
    import torch_pruning

    from . import __version__

    return {
        "autoprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_pruning": torch_pruning.__version__,
        "optuna": optuna.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }


def export_trial_artifacts(
    model: torch.nn.Module,
    example: torch.Tensor,
    dest: Path,
    row: dict[str, Any],
    meta_extra: dict[str, Any],
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Write ONNX, OpenVINO IR, PyTorch state and metadata.json for one model into ``dest``."""
    import onnxruntime as ort

    dest.mkdir(parents=True, exist_ok=True)
    model.eval()
    onnx_path = export_onnx(model, example, dest / "model.onnx", exporter)
    export_openvino(onnx_path, dest / "model.xml")
    torch.save(model, dest / "model.pt")
    torch.save(model.state_dict(), dest / "state_dict.pt")
    # Check that the deployable file computes what the PyTorch model computes.
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(example).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    meta = {
        **row,
        **meta_extra,
        "input_shape": list(example.shape),
        "files": {
            "onnx": "model.onnx",
            "openvino_xml": "model.xml",
            "openvino_bin": "model.bin",
            "torch_module": "model.pt",
            "torch_state_dict": "state_dict.pt",
        },
        "sizes": {
            "onnx_bytes": file_size(onnx_path),
            "onnx_gzip_bytes": gzip_size(onnx_path),
            "openvino_bin_bytes": file_size(dest / "model.bin"),
        },
        "onnx_max_abs_diff": float(np.abs(got - ref).max()),
        "versions": versions(),
    }
    (dest / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    return meta


def export_front(
    study: optuna.Study,
    out: Path,
    example: torch.Tensor,
    meta_extra: dict[str, Any],
    exporter: str = "dynamo",
    dense: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """(Re)write ``out/pareto/``: one folder per Pareto trial, plus tables and plots."""
    from .report import write_plots

    dense = dense if dense is not None else study.user_attrs.get("dense", {})
    rows = front(study, dense)
    pdir = out / PARETO_DIR
    tmp = out / (PARETO_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    final_path = out / "final.json"
    finals = json.loads(final_path.read_text()) if final_path.is_file() else {}
    for r in rows:
        tdir = out / "trials" / f"{r['trial']:05d}"
        src = tdir / "model.pt"
        if str(r["trial"]) in finals and (tdir / "model_final.pt").is_file():
            # The final stage's longer fine-tune: deploy that model. Its numbers become the row's
            # accuracy/latency (what a user picks and deploys); the search-time ones stay as search_*.
            f = finals[str(r["trial"])]
            r.update(final=f, search_accuracy=r["accuracy"], search_latency_ms=r["latency_ms"],
                     accuracy=f["final_accuracy"], latency_ms=f["final_latency_ms"])
            src = tdir / "model_final.pt"
        if not src.is_file():
            r["artifacts"] = None  # trial ran on another worker without a shared run folder
            continue
        model = torch.load(src, map_location="cpu", weights_only=False)
        name = f"trial_{r['trial']:05d}"
        export_trial_artifacts(model, example, tmp / name, r, meta_extra, exporter)
        r["artifacts"] = f"{PARETO_DIR}/{name}"
    rows.sort(key=lambda r: (r["latency_ms"], -r["accuracy"]))  # final-stage numbers may reorder
    # Swap in the new front only once it is complete: a crash never leaves a half-written front.
    shutil.rmtree(pdir, ignore_errors=True)
    os.replace(tmp, pdir)
    write_tables(rows, out, dense)
    write_plots(study, out, dense)
    return rows
