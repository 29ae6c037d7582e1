"""Pick a Pareto model for a budget and write its deploy bundle.

A bundle is everything a deployment needs without the search: ONNX, OpenVINO IR, the PyTorch
model (pickled module, state dict, and ``torch.export`` / TorchScript files where the model
allows), a ``model_card.json`` that records where the model came from and how it measured, and
``infer_example.py`` that runs it with onnxruntime and with OpenVINO (no autoprune import).
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError

REMEASURE_DIR = "remeasure"
CARD = "model_card.json"
EXAMPLE = "infer_example.py"
BUDGET_KEYS = ("max_latency_ms", "max_params", "min_accuracy", "max_flops", "max_size_mb", "trial")


def load_front(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / "pareto.json"
    if not p.is_file():
        raise ConfigError(f"{run_dir}: no pareto.json; run 'autoprune search --out {run_dir}' first")
    return json.loads(p.read_text())


def search_profile_name(run_dir: Path, front: Optional[dict[str, Any]] = None) -> str:
    """Name of the device profile the search measured latency on (recorded with the dense model)."""
    front = front or load_front(run_dir)
    return str(front.get("dense", {}).get("profile", "?"))


def load_remeasure(run_dir: Path, profile: str) -> dict[str, Any]:
    """Results of ``autoprune remeasure`` for ``profile`` (a profile name or YAML path)."""
    name = _profile_name(profile)
    p = Path(run_dir) / REMEASURE_DIR / f"{name}.json"
    if not p.is_file():
        have = sorted(q.stem for q in (Path(run_dir) / REMEASURE_DIR).glob("*.json"))
        raise ConfigError(
            f"{run_dir}: no latencies on profile {name!r} (re-measured profiles: {have or 'none'}); run "
            f"'autoprune remeasure {run_dir} --device-profile {profile}' first"
        )
    return json.loads(p.read_text())


def _profile_name(profile: str) -> str:
    """A profile reference (shipped name or YAML path) → the ``name`` inside it."""
    from .config import load_device_profile

    p = Path(profile)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_device_profile(profile).name
    return profile


def rows_on_profile(run_dir: Path, profile: Optional[str] = None) -> tuple[list[dict[str, Any]], str]:
    """Pareto rows with ``latency_ms`` on ``profile``: the search's own numbers for the search
    profile, re-measured numbers (``autoprune remeasure``) for any other."""
    front = load_front(run_dir)
    rows = front["pareto"]
    searched = search_profile_name(run_dir, front)
    if profile is None or _profile_name(profile) == searched:
        return rows, searched
    rem = load_remeasure(run_dir, profile)
    by_trial = {r["trial"]: r for r in rem["rows"]}
    out = []
    for r in rows:
        m = by_trial.get(r["trial"])
        if m is None:
            continue  # front changed after the re-measure (resumed search): not measured there
        out.append({**r, "latency_ms": m["latency"]["median_ms"], "latency_p90_ms": m["latency"]["p90_ms"],
                    "latency_cv": m["latency"]["cv"], "non_dominated_on_profile": m.get("non_dominated")})
    if not out:
        raise ConfigError(f"{run_dir}: the re-measure on {rem['profile_name']!r} covers none of the current Pareto "
                          f"trials; run 'autoprune remeasure {run_dir} --device-profile {profile}' again")
    return out, rem["profile_name"]


def choose(
    rows: list[dict[str, Any]],
    max_latency_ms: Optional[float] = None,
    max_params: Optional[int] = None,
    min_accuracy: Optional[float] = None,
    max_flops: Optional[float] = None,
    trial: Optional[int] = None,
    max_size_mb: Optional[float] = None,
) -> dict[str, Any]:
    """The most accurate Pareto model within every given budget (ties: the faster one).

    Size is the ONNX file in MB (10^6 bytes), the same quantity the search's ``max_size_mb``
    budget constrains.
    """
    if trial is not None:
        hit = [r for r in rows if r["trial"] == trial]
        if not hit:
            raise ConfigError(f"trial {trial} is not on the Pareto front (front trials: {[r['trial'] for r in rows]})")
        return hit[0]
    ok = [
        r for r in rows
        if (max_latency_ms is None or r["latency_ms"] <= max_latency_ms)
        and (max_params is None or r["params"] <= max_params)
        and (min_accuracy is None or r["accuracy"] >= min_accuracy)
        and (max_flops is None or r["flops"] <= max_flops)
        and (max_size_mb is None or (r.get("onnx_bytes") or 0) / 1e6 <= max_size_mb)
    ]
    if not ok:
        lo = min(rows, key=lambda r: r["latency_ms"]) if rows else None
        hint = ""
        if lo:
            hint = (f" fastest Pareto model: {lo['latency_ms']:.3f} ms, acc {lo['accuracy']:.4f}, {lo['params']:,} params, "
                    f"{(lo.get('onnx_bytes') or 0) / 1e6:.2f} MB; most accurate: "
                    f"{max(r['accuracy'] for r in rows):.4f}. Relax a budget or pick with --trial.")
        raise ConfigError(f"no Pareto model meets the budget.{hint}")
    return max(ok, key=lambda r: (r["accuracy"], -r["latency_ms"]))


# --------------------------------------------------------------------------- run folder → study
def open_run_study(run_dir: Path, storage: Optional[str] = None, study_name: Optional[str] = None) -> Any:
    """Open the Optuna study of a run folder (its ``study.db``, or ``storage`` for shared
    PostgreSQL/MySQL studies). Read-only use: nothing here writes trials."""
    from .rebuild import load_run_study

    return load_run_study(Path(run_dir), storage, study_name)


def _trial_latency(run_dir: Path, trial: int) -> Optional[dict[str, Any]]:
    """Full latency statistics of a trial from its study (pareto.json keeps only median/p90/CV)."""
    try:
        study = open_run_study(run_dir)
        return dict(study.trials[trial].user_attrs.get("latency") or {}) or None
    except Exception:  # noqa: BLE001 - no readable study: the card falls back to pareto.json
        return None


# --------------------------------------------------------------------------- rebuild
def rebuild_model(bundle: str | Path) -> Any:
    """Rebuild the pruned PyTorch model from code + ``state_dict.pt`` (no pickled module needed).

    Builds the dense architecture named in the card's config, slices every group to its recorded
    kept width (which channels does not matter: the state dict overwrites every weight, zeros of
    unstructured sparsity included; only the shapes must match) and loads the fine-tuned weights.
    """
    import torch

    from .models import build_model
    from .plan import PruningPlan, apply_plan

    bundle = Path(bundle)
    card = json.loads((bundle / CARD).read_text())
    rb = card["rebuild"]
    model = build_model(rb["model"], rb["num_classes"], rb["in_channels"])
    example = torch.zeros(1, *card["input"]["shape"][1:])
    # ratio = 1 - after/before with round_to=1 keeps exactly ``after`` channels (kept_channels).
    ratios = {g: 1.0 - v["channels_after"] / v["channels_before"] for g, v in card["layers"].items()
              if v.get("channels_before") and v.get("channels_after") and v["channels_after"] < v["channels_before"]}
    apply_plan(model, example, PruningPlan(ratios, {g: "l1" for g in ratios}, round_to=1), rb["num_classes"])
    state = torch.load(bundle / "state_dict.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{bundle}: the rebuilt {rb['class']} does not match state_dict.pt ({str(exc)[:300]}); "
                          "load model.pt instead (torch.load(..., weights_only=False))") from None
    return model.eval()


# --------------------------------------------------------------------------- bundle
def _export_torch_formats(model: Any, example: Any, dest: Path) -> tuple[dict[str, str], dict[str, str]]:
    """torch.export (.pt2) and TorchScript files where the model allows; errors are recorded, not
    raised, because ONNX/IR are the deploy formats and these are conveniences."""
    import torch

    files, errors = {}, {}
    try:
        ep = torch.export.export(model, (example,))
        torch.export.save(ep, str(dest / "model.pt2"))
        files["torch_export"] = "model.pt2"
    except Exception as exc:  # noqa: BLE001
        errors["torch_export"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.trace(model, example)
        torch.jit.save(ts, str(dest / "model.torchscript.pt"))
        files["torchscript"] = "model.torchscript.pt"
    except Exception as exc:  # noqa: BLE001
        errors["torchscript"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return files, errors


def _format_agreement(model: Any, example: Any, dest: Path, files: dict[str, str]) -> dict[str, float]:
    """Max |logit difference| of every written format against the PyTorch model on one input,
    so a user can see that each file computes the same function."""
    import numpy as np
    import onnxruntime as ort
    import openvino as ov
    import torch

    x = example.numpy()
    with torch.no_grad():
        ref = model(example).numpy()
    out: dict[str, float] = {}
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    out["onnxruntime"] = float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x})[0] - ref).max())
    core = ov.Core()
    # OpenVINO's CPU plugin computes in bf16 by default where the CPU supports it; record both the
    # fp32 result (what the card's accuracy means) and the default-precision one users get.
    compiled = core.compile_model(str(dest / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out["openvino_f32"] = float(np.abs(compiled(x)[compiled.output(0)] - ref).max())
    default = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    compiled = core.compile_model(str(dest / "model.xml"), "CPU")
    out[f"openvino_default_{default.lower()}"] = float(np.abs(compiled(x)[compiled.output(0)] - ref).max())
    with torch.no_grad():
        if "torch_export" in files:
            ep = torch.export.load(str(dest / files["torch_export"]))
            out["torch_export"] = float(np.abs(ep.module()(example).numpy() - ref).max())
        if "torchscript" in files:
            ts = torch.jit.load(str(dest / files["torchscript"]))
            out["torchscript"] = float(np.abs(ts(example).numpy() - ref).max())
    return out


def _model_card(run_dir: Path, row: dict[str, Any], meta: dict[str, Any], model: Any, dest: Path,
                budget: dict[str, Any], profile: str, extra_files: dict[str, str], export_errors: dict[str, str],
                agreement: dict[str, float]) -> dict[str, Any]:
    from .export import file_size
    from .pareto import versions

    cfg = meta.get("config", {})
    searched = search_profile_name(run_dir)
    prof = meta.get("device_profile", {})
    lat_search = _trial_latency(run_dir, row["trial"]) or {
        "median_ms": row["latency_ms"], "p90_ms": row.get("latency_p90_ms"), "cv": row.get("latency_cv")}
    latency = {searched: {"backend": prof.get("backend"), "device": prof.get("device"), "threads": prof.get("threads"),
                          "source": "search", **lat_search}}
    for p in sorted((run_dir / REMEASURE_DIR).glob("*.json")):
        rem = json.loads(p.read_text())
        hit = [r for r in rem["rows"] if r["trial"] == row["trial"]]
        if hit and rem["profile_name"] != searched:
            rp = rem.get("profile", {})
            latency[rem["profile_name"]] = {"backend": rp.get("backend"), "device": rp.get("device"),
                                            "threads": rp.get("threads"), "source": "remeasure",
                                            "non_dominated": hit[0].get("non_dominated"), **hit[0]["latency"]}
    dense = meta.get("dense", {})
    files = {**meta.get("files", {}), **extra_files, "model_card": CARD, "inference_example": EXAMPLE}
    sizes = {k: file_size(dest / v) for k, v in files.items() if (dest / v).is_file() and k != "model_card"}
    widths = row.get("widths", {})
    layers = {
        g: {"ratio": r, "method": row.get("methods", {}).get(g),
            "channels_before": (widths.get(g) or [None, None])[0], "channels_after": (widths.get(g) or [None, None])[1]}
        for g, r in row.get("ratios", {}).items()
    }
    shape = meta.get("input_shape") or [1]
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    return {
        "schema": "autoprune.model_card/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir.resolve()),
        "trial": row["trial"],
        "selection": {"budget": {k: v for k, v in budget.items() if v is not None}, "latency_profile": profile},
        "accuracy": row["accuracy"],
        "evaluation": {
            "metric": "top-1 accuracy on the held-out split, PyTorch eager, after the trial's fine-tune",
            "data": cfg.get("data"), "image_size": cfg.get("image_size"), "val_fraction": cfg.get("val_fraction"),
            "seed": (cfg.get("search") or {}).get("seed"),
            "how": "autoprune.data.load_data(data, image_size, val_fraction, seed).val",
        },
        "dense": {"accuracy": dense.get("accuracy"), "params": dense.get("params"), "flops": dense.get("flops"),
                  "latency_ms": (dense.get("latency") or {}).get("median_ms"), "onnx_bytes": dense.get("onnx_bytes"),
                  "profile": dense.get("profile")},
        "speedup_vs_dense": row.get("speedup"),
        "latency": latency,
        "flops": row.get("flops"),
        "params": row.get("params"),
        "sizes": {**sizes, "onnx_gzip": row.get("onnx_gzip_bytes")},
        "layers": layers,
        "input": {"name": "input", "shape": shape, "dtype": "float32",
                  "note": "the batch axis is static (the profile's batch size); pad or split batches"},
        "output": {"name": "logits", "shape": [shape[0], _num_classes(model)]},
        "files": files,
        "export_errors": export_errors,
        "max_abs_diff_vs_pytorch": agreement,
        "rebuild": {
            "class": cls,
            "model": cfg.get("model"),
            "num_classes": _num_classes(model),
            "in_channels": int(shape[1]) if len(shape) > 1 else None,
            "round_to": (meta.get("search_space") or {}).get("round_to", 8),
            "python": "import autoprune.deploy as d; model = d.rebuild_model('<bundle folder>')",
            "steps": "autoprune.models.build_model(model, num_classes, in_channels) -> autoprune.plan.apply_plan("
                     "slice each group in 'layers' to channels_after) -> load_state_dict(state_dict.pt)",
            "pickled_module": "torch.load('model.pt', weights_only=False) (needs autoprune importable)",
        },
        "config": cfg,
        "search_space": meta.get("search_space"),
        "device_profile": prof,
        "versions": {"search": meta.get("versions"), "bundle": versions()},
    }


def _num_classes(model: Any) -> Optional[int]:
    import torch.nn as nn

    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else None


def _copy_example(dest: Path) -> None:
    src = importlib.resources.files("autoprune") / "templates" / EXAMPLE
    (dest / EXAMPLE).write_text(src.read_text())


def write_bundle(run_dir: Path, row: dict[str, Any], dest: Path, budget: Optional[dict[str, Any]] = None,
                 profile: Optional[str] = None) -> dict[str, Any]:
    """Copy a Pareto trial's files into ``dest`` and add torch.export/TorchScript files, the
    model card and the inference example. Returns the card."""
    import torch

    run_dir = Path(run_dir)
    if not row.get("artifacts"):
        raise ConfigError(f"trial {row['trial']} has no exported files in {run_dir} (run 'autoprune search' there to re-export)")
    src = run_dir / row["artifacts"]
    if not (src / "metadata.json").is_file():
        raise ConfigError(f"{src}: incomplete export (no metadata.json); run 'autoprune search --out {run_dir}' to re-export")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    meta = json.loads((tmp / "metadata.json").read_text())
    model = torch.load(tmp / "model.pt", map_location="cpu", weights_only=False).eval()
    shape = meta.get("input_shape") or [1]
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    extra, errors = _export_torch_formats(model, example, tmp)
    agreement = _format_agreement(model, example, tmp, extra)
    _copy_example(tmp)
    card = _model_card(run_dir, row, meta, model, tmp, budget or {}, profile or search_profile_name(run_dir),
                       extra, errors, agreement)
    (tmp / CARD).write_text(json.dumps(card, indent=2, default=str))
    # Replace the previous bundle only once the new one is complete.
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return card


def pick(run_dir: str | Path, dest: Optional[str | Path] = None, profile: Optional[str] = None,
         **budget: Any) -> tuple[dict[str, Any], Path]:
    """Choose a model and write its deploy bundle (default ``<run>/picked``).

    ``max_latency_ms`` applies to the search's device profile, or to ``profile`` when given
    (another profile needs ``autoprune remeasure`` first). Other budgets: ``max_params``,
    ``max_flops``, ``max_size_mb`` (ONNX file), ``min_accuracy``; or ``trial`` to name one.
    """
    unknown = set(budget) - set(BUDGET_KEYS)
    if unknown:
        raise TypeError(f"pick(): unknown budget {sorted(unknown)}; allowed: {', '.join(BUDGET_KEYS)}")
    run_dir = Path(run_dir)
    rows, prof_name = rows_on_profile(run_dir, profile)
    row = choose(rows, **budget)
    dest = Path(dest) if dest else run_dir / "picked"
    write_bundle(run_dir, row, dest, budget, prof_name)
    return row, dest
