"""Re-measure a run's Pareto models on another device profile.

The front is only Pareto-optimal *on the profile it was measured on*: a model that is fast on
onnxruntime may not be on OpenVINO or a GPU. This times every exported Pareto model (and the
dense baseline) on another profile, with the same timing code the search uses, and marks which
models are still non-dominated (accuracy ↑, median latency ↓) there. Results go to
``<run>/remeasure/<profile name>.json``; ``autoprune pick --profile`` and the card read them.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from autoprune.config import DeviceProfile, load_device_profile
from autoprune.errors import ConfigError
from autoprune.measure import backends
from autoprune.measure.onnx import export_onnx
from autoprune.measure.stats import latency_ms
from autoprune.results.artifacts import versions
from autoprune.results.front import (
    load_front,
    non_dominated,
    search_profile_name,
)
from autoprune.files import atomic_write_text
from autoprune.runfolder import RunFolder
from autoprune.train.checkpoint import load_checkpoint
from autoprune.trust import CodePolicy


def _input_for(profile: DeviceProfile, input_shape: list[int]) -> np.ndarray:
    """Input at the target profile's batch size (and its input shape when it names one)."""
    shape = [profile.batch_size, *(profile.input_shape or input_shape[1:])]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _onnx_for(folder: Path, x: np.ndarray, exporter: str, work: Path, trust_pickle: bool = False,
              code: CodePolicy = CodePolicy()) -> Path:
    """The trial's ONNX when its static input shape fits ``x``; otherwise re-export the PyTorch
    model at the new shape (the exported batch axis is static)."""
    import onnx
    import torch


    path = folder / "model.onnx"
    dims = [d.dim_value for d in onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim]
    if dims == list(x.shape):
        return path
    model = load_checkpoint(folder / "model.pt", trust_pickle=trust_pickle, code=code)[0]
    return export_onnx(model, torch.from_numpy(x), work / f"{folder.name}.onnx", exporter)


def _measure(folder: Path, profile: DeviceProfile, x: np.ndarray, exporter: str, work: Path,
             trust_pickle: bool = False, code: CodePolicy = CodePolicy()) -> dict[str, Any]:
    torch_model = None
    if profile.backend == "torch":
        torch_model = load_checkpoint(folder / "model.pt", trust_pickle=trust_pickle, code=code)[0]
    onnx_path = _onnx_for(folder, x, exporter, work, trust_pickle, code) if profile.backend != "torch" else folder / "model.onnx"
    return backends.measure(backends.ModelArtifact(onnx_path, torch_model), profile, x).to_dict()


def _require_files(run_dir: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    """Every Pareto row's ``names`` must be in its artifacts folder, checked before anything is
    measured: a deleted or moved folder is one line naming the file and how to get it back, not
    a FileNotFoundError traceback after the other models were timed."""
    missing: list[Path] = []
    for r in rows:
        folder = run_dir / r["artifacts"]
        missing += [folder] if not folder.is_dir() else [folder / n for n in names if not (folder / n).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more missing file(s))" if len(missing) > 1 else ""
        raise ConfigError(
            f"{missing[0]}: missing{more}, but {run_dir / 'pareto.json'} lists the model; restore it, or re-run the same "
            f"'autoprune search --out {run_dir}' command (a finished search re-exports pareto/ without new trials)"
        )


def remeasure(run_dir: str | Path, device_profile: str, include_dense: bool = True,
              say: Optional[Any] = None, trust_pickle: bool = False, model: Optional[str] = None,
              trust_code: bool = False) -> dict[str, Any]:
    """Time every exported Pareto model of ``run_dir`` on ``device_profile`` and mark which stay
    non-dominated there. Writes and returns ``<run>/remeasure/<profile>.json``. Model files load
    weights-only; full pickles only with ``trust_pickle``. A model whose
    code is a ``module:function`` is rebuilt only when ``model`` names it or ``trust_code``
    (:mod:`autoprune.trust`)."""

    say = say or (lambda s: None)
    code = CodePolicy.of(model, trust=trust_code)
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    front = load_front(run_dir)
    profile = load_device_profile(device_profile)
    rows = [r for r in front["pareto"] if r.get("artifacts")]
    if not rows:
        raise ConfigError(f"{run_dir}: no exported Pareto models to measure; run 'autoprune search --out {run_dir}' first")
    _require_files(run_dir, rows, ["metadata.json", "model.onnx"])
    meta = json.loads((run_dir / rows[0]["artifacts"] / "metadata.json").read_text())
    exporter = (meta.get("config") or {}).get("exporter", "dynamo")
    x = _input_for(profile, meta.get("input_shape") or [1])
    if profile.backend == "torch" or list(x.shape) != meta.get("input_shape"):
        _require_files(run_dir, rows, ["model.pt"])  # timed as a module, or re-exported at the new shape
    work = run.remeasure_dir / profile.name
    work.mkdir(parents=True, exist_ok=True)

    out_rows = []
    for r in rows:
        say(f"trial {r['trial']} on {profile.name}")
        lat = _measure(run_dir / r["artifacts"], profile, x, exporter, work, trust_pickle, code)
        out_rows.append({"trial": r["trial"], "accuracy": r["accuracy"], "search_latency_ms": r["latency_ms"],
                         "latency": lat, "latency_ms": latency_ms(lat)})
    mask = non_dominated([(r["accuracy"], r["latency_ms"]) for r in out_rows])
    for r, nd in zip(out_rows, mask):
        r["non_dominated"] = bool(nd)

    dense = None
    if include_dense and run.dense_onnx.is_file() and run.base_model.is_file():
        # The dense folder holds only the ONNX; the torch backend and re-exports need the module.
        import shutil

        tmp = work / "dense_src"
        tmp.mkdir(exist_ok=True)
        shutil.copy2(run.dense_onnx, tmp / "model.onnx")
        shutil.copy2(run.base_model, tmp / "model.pt")
        say(f"dense model on {profile.name}")
        dense = {"accuracy": front.get("dense", {}).get("accuracy"), "latency": _measure(tmp, profile, x, exporter, work, trust_pickle, code)}
        shutil.rmtree(tmp, ignore_errors=True)
        for r in out_rows:
            r["speedup"] = latency_ms(dense["latency"]) / r["latency_ms"]

    if not any(work.iterdir()):
        work.rmdir()  # nothing had to be re-exported
    result = {
        "profile_name": profile.name,
        "profile": profile.model_dump(mode="json"),
        "search_profile": search_profile_name(run_dir, front),
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input_shape": list(x.shape),
        "dense": dense,
        "rows": sorted(out_rows, key=lambda r: r["latency_ms"]),
        "still_non_dominated": [r["trial"] for r in sorted(out_rows, key=lambda r: r["latency_ms"]) if r["non_dominated"]],
        "versions": versions(),
    }
    dest = run.remeasure(profile.name)
    atomic_write_text(dest, json.dumps(result, indent=2))
    result["path"] = str(dest)
    return result
