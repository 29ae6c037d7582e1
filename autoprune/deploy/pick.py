"""Pick the best Pareto model for a budget (on the searched target or a re-measured one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from autoprune.deploy.bundle import CARD, bundle_files, write_bundle
from autoprune.errors import ConfigError
from autoprune.measure.stats import latency_ms
from autoprune.runfolder import replaceable_dir, writable_dir
from autoprune.results.front import (
    _profile_name,
    load_front,
    load_remeasure,
    search_profile_name,
)
from autoprune.runfolder import RunFolder
from autoprune.trust import CodePolicy

BUDGET_KEYS = ("max_latency_ms", "max_params", "min_accuracy", "max_flops", "max_size_mb", "trial")


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
        out.append({**r, "latency_ms": latency_ms(m["latency"]), "latency_p90_ms": m["latency"]["p90_ms"],
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
            metric = lo.get("metric_name", "accuracy")  # the task's metric (miou ...), held as "accuracy"
            hint = (f" fastest Pareto model: {lo['latency_ms']:.3f} ms, {metric} {lo['accuracy']:.4f}, {lo['params']:,} params, "
                    f"{(lo.get('onnx_bytes') or 0) / 1e6:.2f} MB; best {metric}: "
                    f"{max(r['accuracy'] for r in rows):.4f}. Relax a budget or pick with --trial.")
        raise ConfigError(f"no Pareto model meets the budget.{hint}")
    return max(ok, key=lambda r: (r["accuracy"], -r["latency_ms"]))


def pick(run_dir: str | Path, dest: Optional[str | Path] = None, profile: Optional[str] = None,
         trust_pickle: bool = False, model: Optional[str] = None, trust_code: bool = False,
         say: Optional[Callable[[str], None]] = None, **budget: Any) -> tuple[dict[str, Any], Path]:
    """Choose a model and write its deploy bundle (default ``<run>/picked``).

    ``max_latency_ms`` applies to the search's device profile, or to ``profile`` when given
    (another profile needs ``autoprune remeasure`` first). Other budgets: ``max_params``,
    ``max_flops``, ``max_size_mb`` (ONNX file), ``min_accuracy``; or ``trial`` to name one.
    ``trust_pickle``: also load a full-pickle ``model.pt`` (unpickling runs the code it names).
    ``model``: the ``module:function`` of your model's code, when it is not demo or torchvision
    (must equal the one the model file records); ``trust_code``: build whatever the file names.
    ``say``: progress lines while the bundle is written (the CLI shows them on stderr).
    """
    unknown = set(budget) - set(BUDGET_KEYS)
    if unknown:
        raise TypeError(f"pick(): unknown budget {sorted(unknown)}; allowed: {', '.join(BUDGET_KEYS)}")
    run_dir = Path(run_dir)
    rows, prof_name = rows_on_profile(run_dir, profile)
    row = choose(rows, **budget)
    # The bundle replaces ``dest`` as a whole: refuse the run itself, its own files, a user's folder
    # and a bundle the user added files to; checked again right before the swap.
    given = Path(dest) if dest else RunFolder(run_dir).picked

    def check() -> Path:
        return replaceable_dir(given, RunFolder(run_dir), CARD, "bundle", "--dest", bundle_files)

    dest = check()
    writable_dir(dest.parent, "--dest's parent folder")
    if say is not None:
        say(f"picked trial {row['trial']} ({row['accuracy']:.4f}, {row['latency_ms']:.3f} ms on {prof_name}); writing its bundle to {dest}")
    write_bundle(run_dir, row, dest, budget, prof_name, trust_pickle=trust_pickle, guard=check,
                 code=CodePolicy.of(model, trust=trust_code), say=say)
    return row, dest
