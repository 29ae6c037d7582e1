"""The search: an Optuna multi-objective study over per-group sparsity ratios (and methods).

Each trial: copy the dense model → prune → export ONNX → measure latency on the profile's
backend → (only if within the latency budget) short distilled fine-tune → held-out accuracy.
Objectives are (maximize accuracy, minimize median latency); FLOPs, params and sizes are user
attributes; budgets are Optuna constraints set with ``trial.set_constraint``.

The study lives in SQLite inside the run folder unless ``storage`` names another Optuna
storage (e.g. PostgreSQL for several workers). Re-running the same command resumes it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna
import torch
import torch.nn as nn
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from . import backends
from .config import (
    ConfigError,
    DeviceProfile,
    RunConfig,
    SearchSpace,
    config_hash,
    load_device_profile,
    load_search_space,
)
from .data import DataBundle, load_data
from .export import export_onnx, file_size, gzip_size
from .finetune import finetune
from .models import build_model, count_flops, count_params, evaluate, pretrain
from .plan import PruningPlan, apply_plan
from .structure import PrunableGroup, apply_rules, find_groups

log = logging.getLogger("autoprune")

RATIO_PREFIX = "ratio/"
METHOD_PREFIX = "method/"
OBJECTIVES = ("accuracy", "latency_ms")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class SearchContext:
    """Everything prepared once per run and shared by all trials."""

    cfg: RunConfig
    space: SearchSpace
    profile: DeviceProfile
    out: Path
    data: DataBundle
    base: nn.Module
    example: torch.Tensor  # at the profile's batch size: what latency is measured on
    groups: list[PrunableGroup]
    dense: dict[str, Any]
    calib: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def example1(self) -> torch.Tensor:
        return self.example[:1]


# --------------------------------------------------------------------------- preparation
def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def measure_model(model: nn.Module, example: torch.Tensor, profile: DeviceProfile, onnx_path: Path, exporter: str) -> dict[str, Any]:
    """Export ``model`` and time it on the profile's backend; returns latency stats and sizes."""
    export_onnx(model, example, onnx_path, exporter)
    stats = backends.measure(backends.ModelArtifact(onnx_path, model), profile, example.numpy())
    return {"latency": stats.to_dict(), "onnx_bytes": file_size(onnx_path), "onnx_gzip_bytes": gzip_size(onnx_path)}


def prepare(cfg: RunConfig, console: Optional[Callable[[str], None]] = None) -> SearchContext:
    """Load config files, data and the dense model; measure the dense baseline once per run folder."""
    say = console or (lambda s: log.info(s))
    space = load_search_space(cfg.search_space)
    profile = load_device_profile(cfg.device_profile)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.search.seed)

    data = load_data(cfg.data, cfg.image_size, cfg.val_fraction, cfg.search.seed)
    num_classes = cfg.num_classes or data.num_classes
    base_path = out / "base_model.pt"
    if base_path.is_file():
        base = torch.load(base_path, map_location="cpu", weights_only=False)
    else:
        base = build_model(cfg.model, num_classes, in_channels=data.input_shape[0])
        is_checkpoint = Path(cfg.model).is_file()
        if not is_checkpoint and cfg.pretrain_seconds > 0:
            say(f"training the dense {cfg.model} model for {cfg.pretrain_seconds:.0f}s (no trained weights were given)")
            pretrain(base, data, cfg.pretrain_seconds, seed=cfg.search.seed)
        _atomic_torch_save(base, base_path)
    base.eval()

    shape = tuple(profile.input_shape) if profile.input_shape else data.input_shape
    example = torch.randn(profile.batch_size, *shape, generator=torch.Generator().manual_seed(cfg.search.seed))
    try:
        with torch.no_grad():
            base(example[:1])
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model {cfg.model} does not accept input of shape {list(example[:1].shape)}: {exc}") from None

    groups = apply_rules(
        find_groups(base, example[:1], num_classes), space.low, space.high, space.methods, space.layers, f"search space {cfg.search_space}"
    )
    if not groups:
        raise ConfigError(f"search space {cfg.search_space}: every prunable group is skipped; nothing to search")

    calib_n = 4
    calib = [b for _, b in zip(range(calib_n), data.loader("train", cfg.finetune.batch_size, shuffle=True, seed=cfg.search.seed))]

    dense_path = out / "dense.json"
    if dense_path.is_file():
        dense = json.loads(dense_path.read_text())
    else:
        say("measuring the dense model")
        dense = {
            "accuracy": evaluate(base, data),
            "params": count_params(base),
            "flops": count_flops(base, example[:1]),
            "profile": profile.name,
            **measure_model(base, example, profile, out / "dense" / "model.onnx", cfg.exporter),
        }
        _atomic_write_text(dense_path, json.dumps(dense, indent=2))
    return SearchContext(cfg, space, profile, out, data, base, example, groups, dense, calib)


# --------------------------------------------------------------------------- trial
def _snap(v: float, low: float, high: float, step: Optional[float]) -> float:
    v = min(max(v, low), high)
    if step:
        v = low + round((v - low) / step) * step
        v = min(v, low + math.floor((high - low) / step + 1e-9) * step)
    return round(v, 10)


def suggest_plan(trial: optuna.trial.BaseTrial, ctx: SearchContext) -> PruningPlan:
    """Trial parameters → pruning plan. Parameter names are ``ratio/<group>`` (and ``method``)."""
    sp = ctx.space
    ratios, meths = {}, {}
    for g in ctx.groups:
        if g.low == g.high:
            ratios[g.name] = g.low
        else:
            step = sp.step if sp.step and sp.step <= (g.high - g.low) else None
            high = _snap(g.high, g.low, g.high, step) if step else g.high
            ratios[g.name] = trial.suggest_float(RATIO_PREFIX + g.name, g.low, high, step=step)
    if sp.global_method:
        meths_all = sorted(set(sp.methods))
        m = trial.suggest_categorical("method", meths_all) if len(meths_all) > 1 else meths_all[0]
        meths = {g.name: m for g in ctx.groups}
    else:
        for g in ctx.groups:
            options = sorted(set(g.methods))
            meths[g.name] = trial.suggest_categorical(METHOD_PREFIX + g.name, options) if len(options) > 1 else options[0]
    return PruningPlan(ratios, meths, sp.round_to)


def _constraints(ctx: SearchContext, lat_ms: float, params: int, flops: float, size_bytes: int) -> dict[str, float]:
    """Budget → constraint values (≤ 0 feasible), always the same keys so samplers see a consistent set."""
    b = ctx.profile.budget
    return {
        "latency_ms": lat_ms - b.max_latency_ms if b.max_latency_ms else -1.0,
        "params": float(params - b.max_params) if b.max_params else -1.0,
        "flops": flops - b.max_flops if b.max_flops else -1.0,
        "size_mb": size_bytes / 1e6 - b.max_size_mb if b.max_size_mb else -1.0,
    }


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:05d}"


def run_trial(trial: optuna.trial.Trial, ctx: SearchContext) -> tuple[float, float]:
    t0 = time.perf_counter()
    plan = suggest_plan(trial, ctx)
    model = copy.deepcopy(ctx.base)
    widths = apply_plan(model, ctx.example1, plan, ctx.data.num_classes, ctx.calib)
    t_prune = time.perf_counter() - t0
    params = count_params(model)
    flops = count_flops(model, ctx.example1)
    tdir = trial_dir(ctx.out, trial.number)
    measured = measure_model(model, ctx.example, ctx.profile, tdir / "model.onnx", ctx.cfg.exporter)
    lat = measured["latency"]["median_ms"]
    cons = _constraints(ctx, lat, params, flops, measured["onnx_bytes"])
    for k, v in cons.items():
        trial.set_constraint(k, v)
    attrs: dict[str, Any] = {
        "params": params,
        "flops": flops,
        "widths": {k: list(v) for k, v in widths.items()},
        "methods": plan.methods,
        "ratios": plan.ratios,
        "prune_s": t_prune,
        **measured,
    }
    over_latency = cons["latency_ms"] > 0
    t1 = time.perf_counter()
    if over_latency:
        # Latency-first: a candidate already over budget is not worth a fine-tune.
        attrs["finetune_steps"] = 0
        attrs["skipped_finetune"] = "over latency budget"
    else:
        attrs["finetune_steps"] = finetune(model, ctx.data, ctx.cfg.finetune, teacher=ctx.base, seed=ctx.cfg.search.seed + trial.number)
    attrs["finetune_s"] = time.perf_counter() - t1
    acc = evaluate(model, ctx.data)
    attrs["accuracy"] = acc
    attrs["trial_s"] = time.perf_counter() - t0
    _atomic_torch_save(model, tdir / "model.pt")
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    return acc, lat


# --------------------------------------------------------------------------- study
def _sampler(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    s = ctx.cfg.search
    if s.sampler == "nsga2":
        pop = s.population_size or max(4, min(50, s.trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=pop, seed=s.seed)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed)
    return optuna.samplers.RandomSampler(seed=s.seed)


def search_hash(ctx: SearchContext) -> str:
    """What must not change between resumes: the space, the profile, and how trials are scored."""
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.search.trials, cfg.search.timeout_s, cfg.search.storage, cfg.out = 1, None, None, ""
    groups = json.dumps([(g.name, g.low, g.high, g.methods) for g in ctx.groups])
    return config_hash(cfg, ctx.space, ctx.profile) + ":" + hashlib.sha256(groups.encode()).hexdigest()[:8]


def storage_url(ctx: SearchContext) -> str:
    return ctx.cfg.search.storage or f"sqlite:///{(ctx.out / 'study.db').resolve()}"


def open_study(ctx: SearchContext) -> optuna.Study:
    """Create or resume the study; refuse to mix trials from a different search space."""
    url = storage_url(ctx)
    name = ctx.cfg.search.study_name or "autoprune"
    try:
        storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=10,
            grace_period=30,
            heartbeat_stale_trial_callback=requeue_trial,
            engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {},
        )
        study = optuna.create_study(
            storage=storage, study_name=name, directions=list(DIRECTIONS), sampler=_sampler(ctx), load_if_exists=True
        )
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many types for a bad file
        raise ConfigError(f"storage {url}: cannot open an Optuna study there ({type(exc).__name__}: {exc})") from None
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]:
        raise ConfigError(f"storage {url}: study {name!r} has other objectives; use another --out or --study-name")
    h = search_hash(ctx)
    stored = study.user_attrs.get("search_hash")
    if stored is None:
        study.set_user_attr("search_hash", h)
        study.set_user_attr("dense", ctx.dense)
        study.set_user_attr("groups", [g.name for g in ctx.groups])
        study.set_user_attr("config", ctx.cfg.model_dump(mode="json"))
        study.set_user_attr("search_space", ctx.space.model_dump(mode="json"))
        study.set_user_attr("device_profile", ctx.profile.model_dump(mode="json"))
    elif stored != h:
        raise ConfigError(
            f"{ctx.out}: the study there was made with a different model, data, search space, device profile or "
            "fine-tune settings; finished trials would not be comparable. Use a new --out (or --study-name), "
            "or the same config as before."
        )
    return study


def enqueue_seeds(study: optuna.Study, ctx: SearchContext) -> None:
    """On a fresh study, enqueue uniform-ratio candidates: strong, cheap starting points."""
    if study.trials:
        return
    for r in ctx.space.seed_uniform:
        params: dict[str, Any] = {}
        for g in ctx.groups:
            if g.low != g.high:
                params[RATIO_PREFIX + g.name] = _snap(r, g.low, g.high, ctx.space.step if ctx.space.step and ctx.space.step <= g.high - g.low else None)
        study.enqueue_trial(params, skip_if_exists=True)


MAX_RETRY = 2


def requeue_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Re-run a trial whose worker died, with the same parameters, at most ``MAX_RETRY`` times.

    Only parameters are copied: constraints and metrics of the dead attempt must not leak in.
    """
    history = list(trial.user_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRY:
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_history": history})


def _fail_stale_local_trials(study: optuna.Study) -> int:
    """With the run-folder lock held nobody else runs this study, so RUNNING trials are leftovers
    of a killed process: mark them failed (the retry callback re-queues their parameters)."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study._storage.set_trial_system_attr(t._trial_id, "fail_reason", "worker died (found RUNNING at restart)")
        requeue_trial(study, t)
    return len(stale)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[bool]:
    """An exclusive lock on the run folder for the single-machine (SQLite) default."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigError(f"{out}: another autoprune search is running in this folder (lock {out / '.lock'})") from None
    try:
        yield True
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def optimize(ctx: SearchContext, study: optuna.Study, progress: Optional[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = None) -> None:
    """Run trials until the study holds ``trials`` complete ones (across all workers)."""
    target = ctx.cfg.search.trials
    remaining = target - len(completed(study))
    if remaining <= 0:
        return
    callbacks: list[Any] = [MaxTrialsCallback(target, states=(TrialState.COMPLETE,))]
    if progress:
        callbacks.append(progress)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(
        lambda t: run_trial(t, ctx),
        n_trials=remaining + 2 * 10,  # MaxTrialsCallback stops at target; slack for failed trials
        timeout=ctx.cfg.search.timeout_s,
        callbacks=callbacks,
        catch=(Exception,),
        gc_after_trial=True,
    )
