"""Plots of a study: accuracy vs measured latency, Pareto front highlighted, dense model marked.

PNG (matplotlib) for papers and terminals that show images; self-contained HTML (plotly, via
Optuna's own Pareto-front plot) to hover over trials and read their parameters.

``write_report`` (``autoprune report``) writes one self-contained HTML page for a whole run:
interactive Pareto front, all trials coloured by pruning method, a per-layer ratio heat-map of
the Pareto models, the hypervolume history, the latency predictor's predicted vs measured
latency (when the profile has ``lut: true``) and a table of the Pareto models (with latencies
re-measured on other profiles when ``autoprune remeasure`` was run). plotly.js is embedded once,
so the page works offline and can be mailed or archived as a single file.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from autoprune.errors import ConfigError
from autoprune.results.front import front, load_front
from autoprune.files import atomic_write_text, temp_sibling
from autoprune.runfolder import RunFolder, writable_dir
from autoprune.study.storage import open_run_study


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
    tmp = temp_sibling(path)  # a killed search never leaves a half-written plot under its name
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def _write_html(study: optuna.Study, path: Path, dense: dict[str, Any]) -> Path:
    import plotly.graph_objects as go

    fig = optuna.visualization.plot_pareto_front(
        study, target_names=["latency (ms)", "accuracy"], targets=lambda t: (t.values[1], t.values[0])
    )
    fig.update_layout(xaxis_title="median latency (ms)", yaxis_title="accuracy")
    dlat = dense.get("latency", {}).get("median_ms")
    if dlat is not None:
        fig.add_trace(go.Scatter(x=[dlat], y=[dense["accuracy"]], mode="markers", name="dense", marker={"symbol": "star", "size": 16, "color": "#f0b429"}))
    tmp = temp_sibling(path)
    try:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_plots(study: optuna.Study, run: RunFolder, dense: dict[str, Any]) -> None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    write_png(study, run.pareto_png, dense)
    _write_html(study, run.pareto_html, dense)


# --------------------------------------------------------------------------- full run report
_DENSE_MARKER = {"symbol": "star", "size": 18, "color": "#f0b429", "line": {"width": 1, "color": "black"}}


def _method_label(t: optuna.trial.FrozenTrial) -> str:
    """One label per trial: its method, or the set of per-group methods joined by '+'."""
    if "method" in t.params:
        return str(t.params["method"])
    meths = sorted(set((t.user_attrs.get("methods") or {}).values()))
    return "+".join(meths) or "?"


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]


def _fig_pareto(study: optuna.Study, dense: dict[str, Any]) -> Any:
    """Optuna's interactive Pareto-front plot (latency on x), with the dense model as a star."""
    import plotly.graph_objects as go

    fig = optuna.visualization.plot_pareto_front(
        study, target_names=["median latency (ms)", "accuracy"], targets=lambda t: (t.values[1], t.values[0])
    )
    dlat = dense.get("latency", {}).get("median_ms")
    if dlat is not None:
        fig.add_trace(go.Scatter(x=[dlat], y=[dense["accuracy"]], mode="markers", name="dense baseline", marker=_DENSE_MARKER))
    fig.update_layout(title="Pareto front (hover for trial parameters)",
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "xanchor": "left", "x": 0})
    return fig


def _fig_trials_by_method(study: optuna.Study, dense: dict[str, Any]) -> Any:
    """Accuracy vs latency of every finished trial, one colour per method; over-budget trials as x."""
    import plotly.graph_objects as go

    best = {t.number for t in study.best_trials}
    groups: dict[tuple[str, bool], list[optuna.trial.FrozenTrial]] = {}
    for t in _complete(study):
        feasible = all(v <= 0 for v in (t.constraints or {}).values())
        groups.setdefault((_method_label(t), feasible), []).append(t)
    palette = ["#2680c2", "#d64545", "#3ebd93", "#9446ed", "#f7c948", "#e668a7", "#1f2933"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(sorted({m for m, _ in groups}))}
    fig = go.Figure()
    for (m, feasible), ts in sorted(groups.items()):
        fig.add_trace(go.Scatter(
            x=[t.values[1] for t in ts], y=[t.values[0] for t in ts], mode="markers",
            name=m if feasible else f"{m} (over budget)",
            marker={"color": colors[m], "size": [11 if t.number in best else 7 for t in ts],
                    "symbol": "circle" if feasible else "x", "line": {"width": [2 if t.number in best else 0 for t in ts], "color": "black"}},
            text=[f"trial {t.number}{' (Pareto)' if t.number in best else ''}<br>params {t.user_attrs.get('params', 0):,}"
                  f"<br>MFLOPs {(t.user_attrs.get('flops') or 0) / 1e6:.2f}" for t in ts],
            hovertemplate="%{text}<br>latency %{x:.3f} ms<br>accuracy %{y:.4f}<extra></extra>",
        ))
    dlat = dense.get("latency", {}).get("median_ms")
    if dlat is not None:
        fig.add_trace(go.Scatter(x=[dlat], y=[dense["accuracy"]], mode="markers", name="dense baseline", marker=_DENSE_MARKER))
    fig.update_layout(title="All trials by pruning method (Pareto trials outlined)",
                      xaxis_title=f"median latency (ms) on {dense.get('profile', '?')}", yaxis_title="held-out accuracy")
    return fig


def _fig_predicted_vs_measured(study: optuna.Study) -> Optional[Any]:
    """Latency the predictor gave each trial before it was measured against the measurement,
    with the y = x line: how far the budget rejections (made on predictions alone) can be
    trusted. None when no trial has both (predictor off, or not yet calibrated)."""
    import plotly.graph_objects as go

    trials = _complete(study)
    pts = [t for t in trials if t.user_attrs.get("predicted_latency_ms") is not None
           and t.user_attrs.get("measured_latency_ms") is not None]
    if not pts:
        return None
    rejected = sum(1 for t in trials if t.user_attrs.get("latency_predicted"))
    pred = [t.user_attrs["predicted_latency_ms"] for t in pts]
    meas = [t.user_attrs["measured_latency_ms"] for t in pts]
    within = sum(abs(p - m) <= 0.1 * m for p, m in zip(pred, meas))
    lo, hi = min(pred + meas), max(pred + meas)
    fig = go.Figure([
        go.Scatter(x=meas, y=pred, mode="markers", name="trial", text=[f"trial {t.number}" for t in pts],
                   hovertemplate="%{text}<br>measured %{x:.3f} ms<br>predicted %{y:.3f} ms<extra></extra>"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"color": "black", "dash": "dash"}),
    ])
    fig.update_layout(title=f"Predicted vs measured latency: {within}/{len(pts)} within ±10 %; "
                            f"{rejected} trial(s) rejected on the prediction alone (not measured)",
                      xaxis_title="measured median latency (ms)", yaxis_title="predicted before measuring (ms)")
    return fig


def _fig_ratio_heatmap(rows: list[dict[str, Any]], group_order: Optional[list[str]] = None) -> Any:
    """Fraction of channels removed per group (columns) for every Pareto model (rows)."""
    import plotly.graph_objects as go

    groups = list(group_order or [])
    groups += sorted({g for r in rows for g in r["ratios"]} - set(groups))
    labels = [f"#{r['trial']} ({r['accuracy']:.3f}, {r['latency_ms']:.3f} ms)" for r in rows]
    z = [[r["ratios"].get(g, 0.0) for g in groups] for r in rows]
    methods = [[r.get("methods", {}).get(g, "") for g in groups] for r in rows]
    fig = go.Figure(go.Heatmap(
        z=z, x=groups, y=labels, zmin=0.0, zmax=max([v for row in z for v in row] + [0.01]), colorscale="Blues",
        customdata=methods, colorbar={"title": "ratio removed"},
        hovertemplate="%{y}<br>group %{x}<br>ratio %{z:.2f}<br>method %{customdata}<extra></extra>",
    ))
    fig.update_layout(title="Per-group pruning ratio of the Pareto models", xaxis_title="group (root module)",
                      yaxis_title="Pareto model (accuracy, latency)", height=max(320, 60 + 34 * len(rows)))
    return fig


def _fig_hypervolume(study: optuna.Study, dense: dict[str, Any]) -> Any:
    """Optuna's hypervolume history; reference point: accuracy 0 and 1.1× the slowest latency seen."""
    lats = [t.values[1] for t in _complete(study)]
    dlat = dense.get("latency", {}).get("median_ms")
    ref_lat = 1.1 * max(lats + ([dlat] if dlat else []))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_hypervolume_history(study, reference_point=[0.0, ref_lat])
    fig.update_layout(title=f"Hypervolume of the feasible front by trial (reference: accuracy 0, {ref_lat:.3f} ms)")
    return fig


def _remeasures(run_dir: Path) -> list[dict[str, Any]]:

    return [json.loads(p.read_text()) for p in sorted(RunFolder(run_dir).remeasure_dir.glob("*.json"))]


def _table(rows: list[dict[str, Any]], dense: dict[str, Any], remeasures: list[dict[str, Any]]) -> str:
    """HTML table of the Pareto models (dense first), with re-measured latencies when present."""
    e = html.escape
    head = ["trial", "accuracy", f"latency ms ({e(str(dense.get('profile', '?')))})", "p90 ms", "speed-up", "MFLOPs",
            "params", "ONNX KB", "files"]
    for rem in remeasures:
        head += [f"latency ms ({e(rem['profile_name'])})", f"non-dominated on {e(rem['profile_name'])}"]
    out = ["<table class='front'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    if dense:
        lat = dense.get("latency", {})
        cells = ["dense", f"{dense['accuracy']:.4f}", f"{lat.get('median_ms', 0):.3f}", f"{lat.get('p90_ms', 0):.3f}", "1.00x",
                 f"{(dense.get('flops') or 0) / 1e6:.2f}", f"{dense.get('params', 0):,}", f"{(dense.get('onnx_bytes') or 0) / 1024:.0f}", ""]
        for rem in remeasures:
            d = rem.get("dense") or {}
            cells += [f"{d['latency']['median_ms']:.3f}" if d else "", ""]
        out.append("<tr class='dense'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    for r in rows:
        cells = [str(r["trial"]), f"{r['accuracy']:.4f}", f"{r['latency_ms']:.3f}", f"{(r.get('latency_p90_ms') or 0):.3f}",
                 f"{(r.get('speedup') or 0):.2f}x", f"{(r.get('flops') or 0) / 1e6:.2f}", f"{r.get('params', 0):,}",
                 f"{(r.get('onnx_bytes') or 0) / 1024:.0f}", e(r.get("artifacts") or "")]
        for rem in remeasures:
            m = {x["trial"]: x for x in rem["rows"]}.get(r["trial"])
            cells += [f"{m['latency_ms']:.3f}" if m else "n/a", ("yes" if m["non_dominated"] else "no") if m else "n/a"]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _failed_table(study: optuna.Study) -> str:
    """Why each FAIL trial failed (its ``fail_reason``: e.g. an export that does not match PyTorch,
    with the measured difference), so a user sees what was excluded from the front and why."""
    e = html.escape
    rows = [f"<tr><td>{t.number}</td><td style='text-align:left'>{e(str(t.user_attrs.get('fail_reason', '?')))}</td></tr>"
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    if not rows:
        return ""
    return "<table class='front failed'><thead><tr><th>trial</th><th>fail_reason</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1f2933;padding:0 16px}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #cbd2d9}
.summary td{padding:2px 12px 2px 0}.front{border-collapse:collapse;font-size:.9em}
.front th,.front td{border:1px solid #cbd2d9;padding:4px 8px;text-align:right}.front tr.dense{background:#fff8e1}
.plot{min-height:420px}footer{margin-top:3em;color:#7b8794;font-size:.8em}
"""


def write_report(run_dir: str | Path, out: Optional[str | Path] = None, storage: Optional[str] = None,
                 study_name: Optional[str] = None) -> Path:
    """Write one self-contained HTML report for a run (default ``<run>/report.html``)."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs


    run_dir = Path(run_dir)
    study = open_run_study(run_dir, storage, study_name)
    done = _complete(study)
    if not done:
        raise ConfigError(f"{run_dir}: no finished trials yet; nothing to report (see 'autoprune dashboard {run_dir}' for a live view)")
    dest = Path(out) if out else RunFolder(run_dir).report_html
    if dest.is_dir():
        raise ConfigError(f"{dest}: --out names a folder; pass the HTML file to write, e.g. {dest / 'report.html'}")
    writable_dir(dest.parent, "--out's folder")
    dense = study.user_attrs.get("dense", {})
    rows = front(study, dense)
    run = RunFolder(run_dir)
    if run.pareto_json.is_file() or run.front_journal.is_file():
        # The exported front: the deployed models' numbers (after the final stage, if any) and files.
        exported = {r["trial"]: r for r in load_front(run_dir).get("pareto", [])}
        rows = [exported.get(r["trial"], {**r, "artifacts": None}) for r in rows]
    remeasures = _remeasures(run_dir)
    figs = [
        ("pareto", "Pareto front", _fig_pareto(study, dense)),
        ("trials", "All trials: accuracy vs latency, by method", _fig_trials_by_method(study, dense)),
        ("ratios", "Per-layer ratios of the Pareto models", _fig_ratio_heatmap(rows, study.user_attrs.get("groups"))),
        ("hypervolume", "Hypervolume over the search", _fig_hypervolume(study, dense)),
    ]
    if (fig := _fig_predicted_vs_measured(study)) is not None:
        figs.append(("predictor", "Latency predictor: predicted vs measured", fig))
    cfg = study.user_attrs.get("config", {})
    prof = study.user_attrs.get("device_profile", {})
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    e = html.escape
    summary = [
        ("run folder", str(run_dir.resolve())), ("model / data", f"{cfg.get('model')} / {cfg.get('data')}"),
        ("device profile", f"{prof.get('name')} ({prof.get('backend')}, {prof.get('device')}, {prof.get('threads')} thread(s))"),
        ("trials", ", ".join(f"{v} {k}" for k, v in sorted(states.items()))),
        ("dense baseline", f"accuracy {dense.get('accuracy', 0):.4f}, {dense.get('latency', {}).get('median_ms', 0):.3f} ms, {dense.get('params', 0):,} params"),
        ("Pareto models", str(len(rows))),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>autoprune report: {e(run_dir.name)}</title><style>{_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>autoprune report: {e(run_dir.name)}</h1>",
        "<table class='summary'>" + "".join(f"<tr><td><b>{e(k)}</b></td><td>{e(v)}</td></tr>" for k, v in summary) + "</table>",
    ]
    for div_id, title, fig in figs:
        fig.update_layout(template="plotly_white", margin={"t": 60})
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"plot-{div_id}",
                                 config={"responsive": True, "displaylogo": False}))
    parts.append("<h2>Pareto models</h2>")
    parts.append(_table(rows, dense, remeasures))
    failed = _failed_table(study)
    if failed:
        parts.append("<h2>Failed trials</h2>")
        parts.append(failed)
    parts.append(f"<footer>written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} by autoprune; "
                 "deploy one with <code>autoprune pick</code>.</footer></body></html>")
    # A unique temporary name: two reports written at once never share (and truncate) one file.
    return atomic_write_text(dest, "\n".join(parts))
