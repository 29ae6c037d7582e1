"""Pick a Pareto model for a budget and write its deploy bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError


def load_front(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / "pareto.json"
    if not p.is_file():
        raise ConfigError(f"{run_dir}: no pareto.json; run 'autoprune search --out {run_dir}' first")
    return json.loads(p.read_text())


def choose(
    rows: list[dict[str, Any]],
    max_latency_ms: Optional[float] = None,
    max_params: Optional[int] = None,
    min_accuracy: Optional[float] = None,
    max_flops: Optional[float] = None,
    trial: Optional[int] = None,
) -> dict[str, Any]:
    """The most accurate Pareto model within every given budget (ties: the faster one)."""
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
    ]
    if not ok:
        lo = min(rows, key=lambda r: r["latency_ms"]) if rows else None
        hint = f" fastest Pareto model: {lo['latency_ms']:.3f} ms, acc {lo['accuracy']:.4f}, {lo['params']:,} params" if lo else ""
        raise ConfigError(f"no Pareto model meets the budget.{hint}")
    return max(ok, key=lambda r: (r["accuracy"], -r["latency_ms"]))


def pick(run_dir: str | Path, dest: Optional[str | Path] = None, **budget: Any) -> tuple[dict[str, Any], Path]:
    """Choose a model and copy its ONNX / OpenVINO IR / PyTorch files + metadata to ``dest``."""
    run_dir = Path(run_dir)
    rows = load_front(run_dir)["pareto"]
    row = choose(rows, **budget)
    if not row.get("artifacts"):
        raise ConfigError(f"trial {row['trial']} has no exported files in {run_dir} (run 'autoprune search' there to re-export)")
    src = run_dir / row["artifacts"]
    dest = Path(dest) if dest else run_dir / "picked"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    return row, dest
