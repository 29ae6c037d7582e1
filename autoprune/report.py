"""Plots of a study: accuracy vs measured latency, Pareto front highlighted, dense model marked.

PNG (matplotlib) for papers and terminals that show images; self-contained HTML (plotly, via
Optuna's own Pareto-front plot) to hover over trials and read their parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState


def _points(study: optuna.Study) -> tuple[list, list, list]:
    best = {t.number for t in study.best_trials}
    feas, infeas, front = [], [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        p = (t.values[1], t.values[0], t.number)
        ok = all(v <= 0 for v in t.constraints.values())
        (front if t.number in best else feas if ok else infeas).append(p)
    return feas, infeas, sorted(front)


def write_png(study: optuna.Study, path: Path, dense: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feas, infeas, front = _points(study)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if feas:
        ax.scatter([p[0] for p in feas], [p[1] for p in feas], c="#9aa5b1", s=18, label="trial")
    if infeas:
        ax.scatter([p[0] for p in infeas], [p[1] for p in infeas], c="#d64545", marker="x", s=22, label="over budget")
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", c="#2680c2", ms=5, label="Pareto front")
        for x, y, n in front:
            ax.annotate(f"#{n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    dlat = dense.get("latency", {}).get("median_ms")
    if dlat is not None:
        ax.scatter([dlat], [dense["accuracy"]], marker="*", s=160, c="#f0b429", edgecolors="k", label="dense", zorder=5)
    ax.set_xlabel(f"median latency (ms) on {dense.get('profile', '?')}")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("autoprune: accuracy vs measured latency")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_html(study: optuna.Study, path: Path, dense: dict[str, Any]) -> Path:
    import plotly.graph_objects as go

    fig = optuna.visualization.plot_pareto_front(
        study, target_names=["latency (ms)", "accuracy"], targets=lambda t: (t.values[1], t.values[0])
    )
    fig.update_layout(xaxis_title="median latency (ms)", yaxis_title="accuracy")
    dlat = dense.get("latency", {}).get("median_ms")
    if dlat is not None:
        fig.add_trace(go.Scatter(x=[dlat], y=[dense["accuracy"]], mode="markers", name="dense", marker={"symbol": "star", "size": 16, "color": "#f0b429"}))
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def write_plots(study: optuna.Study, out: Path, dense: dict[str, Any]) -> None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    write_png(study, out / "pareto.png", dense)
    write_html(study, out / "pareto.html", dense)
