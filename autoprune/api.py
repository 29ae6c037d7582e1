"""Python API: ``autoprune.search(model, train, val)`` on objects a notebook holds (or the CLI's
string references), ``SearchResult.front`` / ``.pick()``, and ``export``, ``remeasure`` and
``bench`` in the same style. See autoprune/objects.py for how objects are named and resumed."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import optuna
import torch.nn as nn
from rich.console import Console

from autoprune import objects
from autoprune.config import RunConfig, load_run_config
from autoprune.errors import ConfigError
from autoprune.files import file_lock, remove_dead_temp_files
from autoprune.measure.bench import bench
from autoprune.results.artifacts import export_front
from autoprune.results.front import front
from autoprune.runlog import library_log
from autoprune.runfolder import RunFolder, writable_dir, writable_paths
from autoprune.study.context import SearchContext, prepare
from autoprune.study.final import final_stage, final_stage_needed
from autoprune.study.pool import WorkersFailed, plan_slots, run_workers
from autoprune.study.storage import public_config, redact_url, refuse_results_without_study
from autoprune.study.progress import progress_bar, progress_callback
from autoprune.study.study import (
    completed,
    enqueue_seeds,
    fail_stale_local_trials,
    open_study,
    optimize,
    run_lock,
    storage_url,
)
from autoprune.measure.stats import latency_ms
from autoprune.train.checkpoint import check_same_model

#: ``bench`` lives in autoprune.measure.bench; it is named here because the Python API is this module.
__all__ = ["Exported", "FrontRow", "Picked", "SearchResult", "bench", "export", "remeasure", "resume_command", "run",
           "search"]


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
                                   recipe=self.ctx.recipe, trust_pickle=self.ctx.cfg.trust_pickle,
                                   code=self.ctx.code)
        return self.pareto

    @property
    def front(self) -> list["FrontRow"]:
        """The Pareto front, fastest first: accuracy, latency, speed-up and trial of each model
        (the exported rows of ``pareto.json``; the study's front when nothing was exported)."""
        rows = self.pareto or front(self.study, self.ctx.dense)
        return [FrontRow.of(r) for r in rows]

    def pick(
        self,
        max_latency_ms: Optional[float] = None,
        min_accuracy: Optional[float] = None,
        target: Optional[Union[str, float]] = None,
        *,
        trial: Optional[int] = None,
        max_params: Optional[int] = None,
        max_flops: Optional[float] = None,
        max_size_mb: Optional[float] = None,
        profile: Optional[str] = None,
    ) -> "Picked":
        """The most accurate front model within every budget given (ties: the faster one), as
        ``autoprune pick`` chooses. ``target``: a latency target like ``search.target`` (``"3x"``
        over the dense model, or milliseconds), the same as ``max_latency_ms`` in its units.
        ``profile``: latencies on another device profile (``remeasure`` first)."""
        from autoprune.deploy.pick import choose, rows_on_profile
        from autoprune.study.budget import targets_ms

        if target is not None:
            ms = targets_ms([target], latency_ms(self.dense["latency"]))[0]
            max_latency_ms = ms if max_latency_ms is None else min(max_latency_ms, ms)
        budget = {k: v for k, v in dict(max_latency_ms=max_latency_ms, min_accuracy=min_accuracy, trial=trial, max_params=max_params,
                                        max_flops=max_flops, max_size_mb=max_size_mb).items() if v is not None}
        rows, _ = rows_on_profile(self.out, profile)
        return Picked(self.out, choose(rows, **budget), budget, profile, self.ctx.cfg.trust_pickle)


@dataclass(frozen=True)
class FrontRow:
    """One Pareto model: what a user compares before picking. ``accuracy`` is the task's metric
    (``metric_name``: accuracy, miou, ...); ``speedup`` is over the dense model on the profile."""

    trial: int
    accuracy: float
    latency_ms: float
    speedup: Optional[float]
    params: Optional[int]
    flops: Optional[float]
    metric_name: str = "accuracy"
    test_accuracy: Optional[float] = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> "FrontRow":
        return cls(int(row["trial"]), float(row["accuracy"]), float(row["latency_ms"]), row.get("speedup"), row.get("params"),
                   row.get("flops"), row.get("metric_name", "accuracy"), row.get("test_accuracy"))


@dataclass
class Picked:
    """A front model chosen by :meth:`SearchResult.pick`: its numbers, the fine-tuned module,
    and :meth:`save` to write the deploy bundle ``autoprune pick`` writes."""

    run: Path
    row: dict[str, Any]
    budget: dict[str, Any] = field(default_factory=dict)
    profile: Optional[str] = None
    trust_pickle: bool = False
    _model: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def trial(self) -> int:
        return int(self.row["trial"])

    @property
    def metrics(self) -> dict[str, Any]:
        """Accuracy (the task's metric), latency, speed-up, size and cost of the picked model."""
        keys = ("trial", "accuracy", "metric_name", "test_accuracy", "latency_ms", "latency_p90_ms", "speedup", "params", "flops",
                "onnx_bytes")
        return {k: self.row.get(k) for k in keys if k in self.row}

    @property
    def model(self) -> nn.Module:
        """The pruned, fine-tuned ``nn.Module`` (CPU, eval mode), loaded weights-only from the
        front's ``model.pt``; loaded once, then the same object."""
        if self._model is None:
            from autoprune.train.checkpoint import load_model

            if not self.row.get("artifacts"):
                raise ConfigError(f"trial {self.trial} has no exported files in {self.run} (it ran on another worker); "
                                  f"export it with autoprune.export({str(self.run)!r}, {self.trial})")
            self._model = load_model(Path(self.run) / self.row["artifacts"] / "model.pt", trust_pickle=self.trust_pickle)
        return self._model

    def save(self, dest: Optional[Union[str, Path]] = None) -> Path:
        """Write the deploy bundle (ONNX, OpenVINO IR, model.pt, model card) to ``dest`` (default
        ``<run>/picked``), as ``autoprune pick`` does; returns the folder."""
        from autoprune.deploy.pick import pick as write_pick

        _, folder = write_pick(self.run, dest, profile=self.profile, trust_pickle=self.trust_pickle,
                               **(self.budget or {"trial": self.trial}))
        return folder


@dataclass
class Exported:
    """A trial's deploy files written by :func:`export`."""

    dest: Path
    metadata: dict[str, Any]
    trust_pickle: bool = False

    @property
    def model(self) -> nn.Module:
        from autoprune.train.checkpoint import load_model

        return load_model(self.dest / "model.pt", trust_pickle=self.trust_pickle)


def run(cfg: RunConfig, console: Optional[Console] = None, export: bool = True, workers: int = 1) -> SearchResult:
    """Run (or resume) the search described by ``cfg`` and export its Pareto front.
    ``workers`` > 1: that many worker processes on this machine (``study/pool.py``), each with
    its own GPU or share of the CPU cores, after this process prepared the dense model once."""
    console = console or Console(stderr=True)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give a number of worker processes, 1 or more")
    if workers > 1 and (objects.is_object_ref(cfg.model) or objects.is_object_ref(cfg.data)):
        raise ConfigError(f"workers={workers}: the model or data is a Python object of this process, which worker processes "
                          "cannot rebuild; run with one worker, or start several Python processes that each call "
                          "autoprune.search with the same objects and one search.storage")
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
            n = fail_stale_local_trials(study, cfg.search.max_retries)
            if n:
                console.log(f"{n} trial(s) left running by a killed search were marked failed and re-queued")
            remove_dead_temp_files(ctx.run.root)  # half-written files of a killed search (never read)
        # (with shared storage, optimize() enqueues the seeds under the study-wide lock)
        if local:
            enqueue_seeds(study, ctx)
        already = len(completed(study))
        console.log(
            f"{len(ctx.groups)} prunable groups; dense: {ctx.task.metric_name} {ctx.dense['accuracy']:.3f}, "
            f"latency {latency_ms(ctx.dense['latency']):.3f} ms on {ctx.profile.name}; "
            f"{already}/{cfg.search.trials} trials already done; study in {redact_url(cfg.search.storage) or ctx.run.study_db}"
        )
        with progress_bar(console) as progress:
            task = progress.add_task("search", total=cfg.search.trials, completed=already, best="")
            try:
                if workers > 1:
                    _run_pool(ctx, study, workers, progress_callback(progress, task, console, cfg.search.trials), console)
                else:
                    optimize(ctx, study, progress_callback(progress, task, console, cfg.search.trials))
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


Data = Any  #: a torch Dataset or DataLoader of (input, target) pairs


def search(
    model: Union[nn.Module, str, None] = None,
    train: Optional[Data] = None,
    val: Optional[Data] = None,
    *,
    data: Optional[str] = None,
    target: Union[str, float, list[Union[str, float]], None] = None,
    device_profile: Optional[str] = None,
    search_space: Optional[str] = None,
    trials: Optional[int] = None,
    out: Optional[Union[str, Path]] = None,
    config: Union[None, str, Path, RunConfig] = None,
    test: Optional[Data] = None,
    console: Optional[Console] = None,
    **overrides: Any,
) -> SearchResult:
    """Search pruned versions of ``model`` for the best accuracy/latency trade-offs on a device.

    ``model``: an ``nn.Module`` (taken as trained: no pre-training unless ``pretrain_steps`` is
    given) or a CLI model reference (``resnet18``, ``pkg.nets:build``, a checkpoint path).
    ``train``/``val``: Datasets or DataLoaders of (input, target) pairs (a DataLoader gives its
    dataset and, unless ``finetune.batch_size`` is given, its batch size); or ``data=`` a CLI
    data reference. ``target``: budget mode, e.g. ``"3x"`` or ``2.5`` (ms). ``device_profile``:
    where latency is measured (default ``onnxruntime-cpu``, or the config's). ``config``: a run
    config (a YAML path, a shipped name, or a RunConfig) the other arguments override. Extra
    keyword arguments set run-config keys, with dots for nesting (``**{"finetune.steps": 10}``).

    A module or datasets given as objects are named by their fingerprints (autoprune/objects.py):
    calling again with the same objects and ``out`` resumes; another object there is refused.
    """
    sets: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        sets["model"] = objects.register_model(model)
        if "pretrain_steps" not in overrides and "pretrain_seconds" not in overrides:
            sets["pretrain_steps"] = 0  # the object's own weights are the dense model
    elif model is not None:
        if not isinstance(model, (str, Path)):
            raise ConfigError(f"model: expected an nn.Module or a model reference string, got {type(model).__name__}")
        sets["model"] = str(model)
    if (train is None) != (val is None):
        raise ConfigError("give both train= and val= (Datasets or DataLoaders), or neither and data= a data reference")
    if train is not None:
        if data is not None:
            raise ConfigError("give train=/val= datasets or data= a data reference, not both")
        train_ds, batch = objects.as_dataset(train, "train")
        val_ds, _ = objects.as_dataset(val, "val")
        test_ds = objects.as_dataset(test, "test")[0] if test is not None else None
        num_classes = overrides.get("num_classes")
        if num_classes is None:
            probe = model if isinstance(model, nn.Module) else None
            if probe is None:
                raise ConfigError("num_classes: give num_classes= with train=/val= datasets and a model reference string")
            num_classes = objects.infer_num_classes(probe, val_ds)
        sets["data"] = objects.register_data(train_ds, val_ds, num_classes, test_ds)
        if batch and "finetune.batch_size" not in overrides:
            sets["finetune.batch_size"] = int(batch)
    elif data is not None:
        sets["data"] = data
    if target is not None:
        sets["search.target"] = target if isinstance(target, list) else [target]
    if out is None and objects.is_object_ref(sets.get("model")):
        # One folder per object (its fingerprint): the same call again resumes, never into the demo's folder.
        out = Path("runs") / sets["model"][len(objects.PREFIX):].replace("@", "-")
    named = {"device_profile": device_profile, "search_space": search_space, "search.trials": trials,
             "out": None if out is None else str(out)}
    sets.update({k: v for k, v in named.items() if v is not None})
    both = sorted(set(sets) & set(overrides))
    if both:
        raise ConfigError(f"{both[0]} is given twice (as an argument and as a keyword override); keep one")
    if isinstance(config, RunConfig):
        base = _flatten(config.model_dump(mode="json"))
        given = {**sets, **overrides}
        if {"pretrain_steps", "pretrain_seconds"} & set(given):  # one budget replaces the config's other one
            base = {k: v for k, v in base.items() if k not in ("pretrain_steps", "pretrain_seconds")}
        if config.trust_pickle:  # excluded from dumps; given by whoever built this RunConfig
            base["trust_pickle"] = True
        cfg = load_run_config(None, {**base, **given})
    else:
        cfg = load_run_config(None if config is None else str(config), {**sets, **overrides})
    if objects.is_object_ref(cfg.model):
        check_same_model(Path(cfg.out) / "base_model.pt", cfg.model)
    return run(cfg, console=console)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"search": {"trials": 5}}`` -> ``{"search.trials": 5}`` (a RunConfig as overrides)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "augment":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _register(run_dir: Union[str, Path], model: Optional[nn.Module], train: Optional[Data], val: Optional[Data],
              test: Optional[Data] = None) -> None:
    """Make a run's Python objects resolvable in this process (export, remeasure, pick on a run
    folder a search of objects wrote), refusing objects other than the ones it searched."""
    if model is not None:
        ref = objects.register_model(model)
        check_same_model(Path(run_dir) / "base_model.pt", ref)
    if train is not None or val is not None:
        if train is None or val is None or model is None:
            raise ConfigError("give model=, train= and val= together: the data's classes are read from the model")
        val_ds = objects.as_dataset(val, "val")[0]
        objects.register_data(objects.as_dataset(train, "train")[0], val_ds, objects.infer_num_classes(model, val_ds),
                              objects.as_dataset(test, "test")[0] if test is not None else None)


def export(
    run_dir: Union[str, Path],
    trial: int,
    dest: Optional[Union[str, Path]] = None,
    *,
    model: Optional[nn.Module] = None,
    train: Optional[Data] = None,
    val: Optional[Data] = None,
    rebuild: bool = False,
    storage: Optional[str] = None,
    study_name: Optional[str] = None,
    trust_pickle: bool = False,
) -> Exported:
    """Python twin of ``autoprune export``: deploy files of any complete trial (default
    ``<run>/export/trial_N``). A run of a Python model object needs ``model=`` that object (and
    ``train=``/``val=`` to ``rebuild`` its trials from their parameters)."""
    from autoprune.deploy.replay import rebuild_trial

    _register(run_dir, model, train, val)
    meta = rebuild_trial(run_dir, trial, storage=storage, study_name=study_name, dest=dest, rebuild=rebuild,
                         trust_pickle=trust_pickle)
    return Exported(Path(meta["dest"]), meta, trust_pickle)


def remeasure(run_dir: Union[str, Path], device_profile: str, *, model: Optional[nn.Module] = None,
              trust_pickle: bool = False) -> dict[str, Any]:
    """Python twin of ``autoprune remeasure``: the front's latencies on another device profile
    (then ``SearchResult.pick(profile=...)`` or ``autoprune pick --profile``). A run of a Python
    model object needs ``model=`` that object."""
    from autoprune.results.remeasure import remeasure as _remeasure

    _register(run_dir, model, None, None)
    return _remeasure(run_dir, device_profile, trust_pickle=trust_pickle)
