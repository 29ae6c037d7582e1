"""Python API mirroring the CLI: ``autoprune.search(...)``, ``autoprune.pick(...)``, ``autoprune.bench(...)``."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from autoprune.config import RunConfig, load_device_profile, load_run_config, shipped_dir
from autoprune.errors import ConfigError
from autoprune.measure import backends
from autoprune.measure.onnx import external_data_files
from autoprune.results.artifacts import export_front
from autoprune.results.front import front
from autoprune.runlog import library_log
from autoprune.runfolder import RunFolder, file_lock, remove_dead_temp_files, writable_dir, writable_paths
from autoprune.study.context import SearchContext, prepare
from autoprune.study.final import final_stage, final_stage_needed
from autoprune.study.pool import WorkersFailed, plan_slots, run_workers
from autoprune.study.storage import public_config, redact_url, refuse_results_without_study
from autoprune.study.study import (
    _fail_stale_local_trials,
    completed,
    enqueue_seeds,
    open_study,
    optimize,
    run_lock,
    storage_url,
)


@dataclass
class SearchResult:
    """A finished (or resumed) search: its study, dense baseline and Pareto front."""

    out: Path
    study: optuna.Study
    ctx: SearchContext
    pareto: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def dense(self) -> dict[str, Any]:
        return self.ctx.dense

    def export(self) -> list[dict[str, Any]]:
        """(Re)write pareto.json/csv, plots and per-model ONNX/IR/PyTorch/metadata under ``out``."""
        meta = {
            "device_profile": self.ctx.profile.model_dump(mode="json"),
            "config": public_config(self.ctx.cfg),  # no storage password in deploy metadata
            "search_space": self.ctx.space.model_dump(mode="json"),
            "dense": self.ctx.dense,
        }
        self.pareto = export_front(self.study, self.ctx.run, self.ctx.example, meta, self.ctx.cfg.exporter, self.ctx.dense,
                                   recipe=self.ctx.recipe, trust_pickle=self.ctx.cfg.trust_pickle)
        return self.pareto


def _progress_callback(progress: Progress, task: Any, console: Console, target: int) -> Any:
    def cb(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = len(completed(study))
        best = front(study, {}) if done else []
        best_txt = ""
        if best:
            top = max(best, key=lambda r: r["accuracy"])
            fast = min(best, key=lambda r: r["latency_ms"])
            best_txt = f"best acc {top['accuracy']:.3f}@{top['latency_ms']:.2f}ms | fastest {fast['latency_ms']:.2f}ms@{fast['accuracy']:.3f}"
        progress.update(task, completed=min(done, target), best=best_txt)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            ua = trial.user_attrs
            console.log(
                f"trial {trial.number}: {ua.get('metric_name', 'acc')} {trial.values[0]:.3f} latency {trial.values[1]:.3f} ms "
                f"params {ua.get('params', 0):,} ({ua.get('trial_s', 0):.1f}s)"
                + (f" [{ua['skipped_finetune']}]" if ua.get("skipped_finetune") else "")
            )
        else:
            console.log(f"trial {trial.number}: {trial.state.name} {str(trial.user_attrs.get('fail_reason', ''))[:300]}")

    return cb


def run(cfg: RunConfig, console: Optional[Console] = None, export: bool = True, workers: int = 1) -> SearchResult:
    """Run (or resume) the search described by ``cfg`` and export its Pareto front.
    ``workers`` > 1: that many worker processes on this machine (``study/pool.py``), each with
    its own GPU or share of the CPU cores, after this process prepared the dense model once."""
    console = console or Console(stderr=True)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give a number of worker processes, 1 or more")
    t0 = time.perf_counter()

    writable_dir(cfg.out, "--out (run folder)")
    writable_paths(RunFolder(Path(cfg.out)).written_in_place(cfg.search.storage is None), "--out")
    if cfg.search.storage is None:
        refuse_results_without_study(RunFolder(Path(cfg.out)))  # before anything is written
    local = cfg.search.storage is None
    # One machine (SQLite): the run-folder lock comes first, so a second search in this folder
    # says at once that it is busy instead of waiting silently on the prepare lock while the
    # first trains. Workers sharing a folder through --storage take no run-folder lock.
    lock = run_lock(RunFolder(Path(cfg.out))) if local else contextlib.nullcontext()
    # Library chatter (exporter warnings, MLflow's INFO lines, deprecation warnings) goes to
    # <run>/autoprune.log; the console keeps autoprune's own lines.
    with lock, library_log(RunFolder(Path(cfg.out)).log):
        # Workers sharing the run folder: the first trains and measures the dense model, the others
        # wait here and load its base_model.pt / dense.json (the study checks the weights' hash).
        with file_lock(RunFolder(Path(cfg.out)).prepare_lock):
            ctx = prepare(cfg, console=lambda s: console.log(s))
        study = open_study(ctx)
        if local:
            n = _fail_stale_local_trials(study, cfg.search.max_retries)
            if n:
                console.log(f"{n} trial(s) left running by a killed search were marked failed and re-queued")
            remove_dead_temp_files(ctx.run.root)  # half-written files of a killed search (never read)
        # (with shared storage, optimize() enqueues the seeds under the study-wide lock)
        if local:
            enqueue_seeds(study, ctx)
        already = len(completed(study))
        console.log(
            f"{len(ctx.groups)} prunable groups; dense: {ctx.task.metric_name} {ctx.dense['accuracy']:.3f}, "
            f"latency {ctx.dense['latency']['median_ms']:.3f} ms on {ctx.profile.name}; "
            f"{already}/{cfg.search.trials} trials already done; study in {redact_url(cfg.search.storage) or ctx.run.study_db}"
        )
        with Progress(
            TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[best]}"), console=console, transient=False,
        ) as progress:
            task = progress.add_task("search", total=cfg.search.trials, completed=already, best="")
            try:
                if workers > 1:
                    _run_pool(ctx, study, workers, _progress_callback(progress, task, console, cfg.search.trials), console)
                else:
                    optimize(ctx, study, _progress_callback(progress, task, console, cfg.search.trials))
            except KeyboardInterrupt:
                console.log(f"[yellow]interrupted; finished trials are saved and the trial in flight is re-queued. Resume with: {resume_command(cfg)}")
                raise
        result = SearchResult(ctx.out, study, ctx)
        if export:
            # Workers sharing a run folder finish together: one writes pareto/ at a time.
            with file_lock(ctx.run.export_lock):
                if final_stage_needed(cfg, ctx.data):
                    final_stage(ctx, front(study, ctx.dense), say=lambda s: console.log(s))
                result.export()
    result.wall_s = time.perf_counter() - t0
    return result


def _run_pool(ctx: SearchContext, study: optuna.Study, n: int, progress: Any, console: Console) -> None:
    """``--workers N``: run the trials in N processes; this one shows their progress."""
    slots = plan_slots(n, ctx.cfg.train.device, ctx.cfg.train.threads)
    seen: set[int] = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}

    def tick() -> None:
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in seen:
                seen.add(t.number)
                progress(study, t)

    outcomes = run_workers(ctx.cfg, slots, storage_url(ctx), tick, report=console.log)
    failed = [o for o in outcomes if o.failed]
    if failed and len(failed) == len(outcomes):
        raise WorkersFailed(f"all {n} workers failed: " + "; ".join(o.describe() for o in failed))


def resume_command(cfg: RunConfig) -> str:
    """The command line that resumes ``cfg``'s study (printed on Ctrl-C)."""
    import shlex

    cmd = ["autoprune", "search", "--out", cfg.out]
    if cfg.search.storage:
        cmd += ["--storage", redact_url(cfg.search.storage) or ""]
    if cfg.search.study_name:
        cmd += ["--study-name", cfg.search.study_name]
    return " ".join(shlex.quote(c) for c in cmd) + "  (plus the same --config / options as before)"


def search(
    config: Optional[str] = None,
    *,
    model: Optional[str] = None,
    data: Optional[str] = None,
    search_space: Optional[str] = None,
    device_profile: Optional[str] = None,
    trials: Optional[int] = None,
    out: Optional[str] = None,
    console: Optional[Console] = None,
    **overrides: Any,
) -> SearchResult:
    """Python twin of ``autoprune search``. Extra keyword arguments override config keys, with
    dots for nesting (``**{"finetune.steps": 10}``)."""
    cfg = load_run_config(
        config, model=model, data=data, search_space=search_space, device_profile=device_profile,
        out=out, **{"search.trials": trials}, **overrides,
    )
    return run(cfg, console=console)


def onnx_profiles() -> list[str]:
    """Names of the shipped device profiles that can time an ONNX file (backend other than torch)."""
    names = []
    for path in sorted(shipped_dir("device_profiles").glob("*.yaml")):
        with contextlib.suppress(ConfigError):
            if load_device_profile(str(path)).backend != "torch":
                names.append(path.stem)
    return names


def bench(onnx_path: str, device_profile: str = "onnxruntime-cpu", batch_size: Optional[int] = None) -> dict[str, Any]:
    """Latency of any ONNX file on a device profile, with the code the search uses."""
    import numpy as np
    import onnx


    p = Path(onnx_path)
    if not p.is_file():
        raise ConfigError(f"{onnx_path}: file not found" if not p.exists() else f"{onnx_path}: not a file; pass an .onnx file")
    profile = load_device_profile(device_profile)
    if profile.backend == "torch":
        raise ConfigError(
            f"{onnx_path}: device profile {profile.name!r} (backend torch) times PyTorch modules, not ONNX files; "
            f"bench it with a profile whose backend is onnxruntime, openvino or remote (shipped: {', '.join(onnx_profiles())})"
        )
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{onnx_path}: not a readable ONNX model ({' '.join(str(exc).split())[:300]})") from None
    external = external_data_files(m, p.parent)
    missing = [f for f in external if not f.is_file()]
    if missing:
        saved = ", ".join(os.path.relpath(f, p.parent) for f in external)
        raise ConfigError(f"{onnx_path}: its weights are stored in {missing[0]}, which is missing; copy the file(s) saved with "
                          f"the model ({saved}, relative to the .onnx file) there, or re-save the model as one file")
    if external and profile.backend == "remote":
        raise ConfigError(f"{onnx_path}: backend remote sends the .onnx file alone, and its weights are in "
                          f"{', '.join(os.path.relpath(f, p.parent) for f in external)}; bench a single-file ONNX (onnx.save_model without "
                          "save_as_external_data, models under 2 GB) or time it with `autoprune bench` on the target")
    dims = m.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else None for d in dims]
    if batch_size and shape[0] is not None and batch_size != shape[0]:
        raise ConfigError(f"{onnx_path}: the model's batch size is fixed at {shape[0]} (static input shape {shape}); "
                          f"drop --batch-size {batch_size}, or export the model with that batch size")
    shape[0] = batch_size or shape[0] or profile.batch_size
    if any(s is None for s in shape):
        if not profile.input_shape:
            raise ConfigError(f"{onnx_path}: input has dynamic dimensions {shape}; set input_shape in the device profile")
        shape = [shape[0], *profile.input_shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stats = backends.measure(backends.ModelArtifact(p), profile, x)
    return {"onnx": str(p), "profile": profile.name, "backend": profile.backend, "threads": profile.threads, "input_shape": shape, **stats.to_dict()}


