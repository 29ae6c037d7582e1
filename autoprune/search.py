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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import optuna
import torch
import torch.nn as nn
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
from .efficiency import (
    allocate_ratios,
    flops_savings,
    hopeless_at_rung0,
    load_or_compute,
    load_or_scan,
    recalibrate_bn,
    shape_ranges,
)
from .export import atomic_torch_save, atomic_write_text, export_onnx, file_size, gzip_size
from .finetune import finetune
from .models import build_model, count_flops, count_params, evaluate, pretrain
from .methods import hold_zeros, weight_sparsity
from .methods.space import suggest_granularities
from .plan import PruningPlan, apply_schedule
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
    #: Per-group accuracy drop (sensitivity scan) and FLOPs fraction saved, when scanned.
    sensitivity: dict[str, float] = field(default_factory=dict)
    savings: dict[str, float] = field(default_factory=dict)

    @property
    def example1(self) -> torch.Tensor:
        return self.example[:1]


# --------------------------------------------------------------------------- preparation
def _lut_rejection(predicted: Optional[float], model: nn.Module, example: torch.Tensor, profile: DeviceProfile) -> Optional[dict[str, Any]]:
    """A result without export or measurement when the latency table predicts a clear budget
    violation (over ``max_latency_ms`` by more than ``lut_margin``); None otherwise."""
    from .latency import LatencyStats

    b = profile.budget.max_latency_ms
    if predicted is None or not b or predicted <= b * (1 + profile.lut_margin):
        return None
    est = sum(p.numel() * p.element_size() for p in model.parameters())
    st = LatencyStats(predicted, predicted, predicted, predicted, 0.0, 0, 0.0, int(example.shape[0]))
    return {"latency": st.to_dict(), "latency_predicted": True, "lut_predicted_ms": predicted,
            "onnx_bytes": est, "onnx_gzip_bytes": est, "onnx_bytes_estimated": True}


def _reference_artifact(run_dir: Path, onnx_path: Path, profile: DeviceProfile) -> Optional[backends.ModelArtifact]:
    """The dense model to time interleaved with a candidate (``measure_reference: true``): its
    ONNX file (int8 profiles: the quantized file made when the dense model was measured)."""
    dense_onnx = run_dir / "dense" / "model.onnx"
    if not profile.measure_reference or not dense_onnx.is_file() or dense_onnx.resolve() == Path(onnx_path).resolve():
        return None
    base_pt = run_dir / "base_model.pt"
    dense_torch = torch.load(base_pt, map_location="cpu", weights_only=False) if profile.backend == "torch" and base_pt.is_file() else None
    if profile.precision == "int8":
        from .quantize import quantized_path

        if quantized_path(dense_onnx, profile).is_file():
            return backends.ModelArtifact(quantized_path(dense_onnx, profile), dense_torch, quantized=True)
    return backends.ModelArtifact(dense_onnx, dense_torch)


def measure_model(model: nn.Module, example: torch.Tensor, profile: DeviceProfile, onnx_path: Path, exporter: str,
                  calib: Optional[list[Any]] = None) -> dict[str, Any]:
    """Export ``model`` and time it on the profile's backend; returns latency stats and sizes.

    An architecture already measured on this profile in this run folder is not measured again
    (``latency_cache.py``; profile key ``cache``). ``precision: int8`` quantizes first, calibrated on
    ``calib`` batches. ``measure_reference: true`` times the dense model (``<run>/dense/model.onnx``)
    interleaved with the candidate and records ``latency.speedup``, steadier than absolute times.
    ``lut: true`` predicts latency first and skips export and measurement of clear violations.
    """
    from .latency_cache import LatencyCache, architecture_hash, run_folder_of
    from .quantize import calibration_batches

    run_dir = run_folder_of(onnx_path)
    lut, predicted = None, None
    if profile.lut:
        from .lut import LatencyLUT

        lut = LatencyLUT.for_run(run_dir, profile)
        predicted = lut.predict(model, example)
        rejected = _lut_rejection(predicted, model, example, profile)
        if rejected is not None:
            return rejected
    export_onnx(model, example, onnx_path, exporter)
    arch = architecture_hash(onnx_path)
    cache = LatencyCache(run_dir / "latency_cache.sqlite") if profile.cache else None
    stats = cache.get(profile, arch) if cache else None
    cached = stats is not None
    if stats is None:
        batches = calibration_batches(calib, int(example.shape[0]), profile.calib_samples) if calib and profile.precision == "int8" else None
        stats = backends.measure(backends.ModelArtifact(onnx_path, model), profile, example.numpy(),
                                 reference=_reference_artifact(run_dir, onnx_path, profile), calib=batches)
        if cache:
            cache.put(profile, arch, stats)
        if lut is not None:
            lut.record(model, example, stats.median_ms, predicted)
    extra = {"lut_predicted_ms": predicted} if lut is not None else {}
    return {"latency": stats.to_dict(), "latency_cached": cached, "arch_hash": arch, **extra,
            "onnx_bytes": file_size(onnx_path), "onnx_gzip_bytes": gzip_size(onnx_path)}


def prepare(cfg: RunConfig, console: Optional[Callable[[str], None]] = None) -> SearchContext:
    """Load config files, data and the dense model; measure the dense baseline once per run folder."""
    say = console or (lambda s: log.info(s))
    space = load_search_space(cfg.search_space)
    profile = load_device_profile(cfg.device_profile)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.search.seed)

    data = load_data(cfg.data, cfg.image_size, cfg.val_fraction, cfg.data_seed)
    num_classes = cfg.num_classes or data.num_classes
    base_path = out / "base_model.pt"
    if base_path.is_file():
        base = torch.load(base_path, map_location="cpu", weights_only=False)
    else:
        base = build_model(cfg.model, num_classes, in_channels=data.input_shape[0])
        is_checkpoint = Path(cfg.model).is_file()
        if not is_checkpoint and (cfg.pretrain_steps or (cfg.pretrain_steps is None and cfg.pretrain_seconds > 0)):
            budget = f"{cfg.pretrain_steps} steps" if cfg.pretrain_steps else f"{cfg.pretrain_seconds:.0f}s"
            say(f"training the dense {cfg.model} model for {budget} (no trained weights were given)")
            pretrain(base, data, cfg.pretrain_seconds, seed=cfg.search.seed, steps=cfg.pretrain_steps)
        atomic_torch_save(base, base_path)
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

    eff = cfg.efficiency
    calib_n = max(4, eff.bn_batches)
    calib = [b for _, b in zip(range(calib_n), data.loader("train", cfg.finetune.batch_size, shuffle=True, seed=cfg.search.seed))]
    drops: dict[str, float] = {}
    savings: dict[str, float] = {}
    if eff.sensitivity_scan:
        drops = load_or_scan(
            out / "sensitivity.json", base=base, groups=groups, data=data, example=example[:1],
            calib=calib[: eff.bn_batches] if eff.bn_recalibration else [], ratio=eff.sensitivity_ratio, round_to=space.round_to,
        )
        if space.seed_spread > 0 and space.seed_uniform:
            savings = load_or_compute(
                out / "flops_savings.json", flops_savings, base=base, groups=groups, example=example[:1],
                num_classes=num_classes, ratio=eff.sensitivity_ratio, round_to=space.round_to,
            )
        groups = shape_ranges(groups, drops, eff.sensitivity_strength)

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
            **measure_model(base, example, profile, out / "dense" / "model.onnx", cfg.exporter, calib=calib),
        }
        atomic_write_text(dense_path, json.dumps(dense, indent=2))
    return SearchContext(cfg, space, profile, out, data, base, example, groups, dense, calib, drops, savings)


# --------------------------------------------------------------------------- trial
def _snap(v: float, low: float, high: float, step: Optional[float]) -> float:
    v = min(max(v, low), high)
    if step:
        v = low + round((v - low) / step) * step
        v = min(v, low + math.floor((high - low) / step + 1e-9) * step)
    return round(v, 10)


def _group_step(sp: SearchSpace, g: PrunableGroup) -> Optional[float]:
    """The ratio grid of one group: the space's ``step``, unless the group's range is narrower."""
    return sp.step if sp.step and sp.step <= (g.high - g.low) else None


def suggest_plan(trial: optuna.trial.BaseTrial, ctx: SearchContext) -> PruningPlan:
    """Trial parameters → pruning plan. Parameter names are ``ratio/<group>`` (and ``method``)."""
    sp = ctx.space
    ratios, meths = {}, {}
    for g in ctx.groups:
        if g.low == g.high:
            ratios[g.name] = g.low
        else:
            step = _group_step(sp, g)
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
    # ``granularity``/``granularity/<group>`` and, for hybrid groups, ``wratio/<group>`` (methods/space.py).
    grans, wratios = suggest_granularities(trial, sp, ctx.groups)
    return PruningPlan(ratios, meths, sp.round_to, granularity=grans, weight_ratios=wratios, bn_l1=sp.bn_l1, bn_l1_steps=sp.bn_l1_steps)


def _constraints(ctx: SearchContext, lat_ms: float, params: int, flops: float, size_bytes: int) -> dict[str, float]:
    """Budget → constraint values (≤ 0 feasible), always the same keys so samplers see a consistent set."""
    b = ctx.profile.budget
    return {
        "latency_ms": lat_ms - b.max_latency_ms if b.max_latency_ms else -1.0,
        "params": float(params - b.max_params) if b.max_params else -1.0,
        "flops": flops - b.max_flops if b.max_flops else -1.0,
        "size_mb": size_bytes / 1e6 - b.max_size_mb if b.max_size_mb else -1.0,
    }


#: After this many duplicate architectures in a row the space is taken as exhausted and
#: duplicates are run anyway (each is then a fresh fine-tune sample), so a search never spins.
MAX_DUPLICATES_IN_ROW = 5


def architecture_key(widths: dict[str, Any], plan: PruningPlan) -> str:
    """What makes two trials the same pruned model: kept widths per group plus how each group
    was pruned. Different ratios often round to the same widths (``round_to``)."""
    key = {"widths": {k: list(v) for k, v in sorted(widths.items())}, "methods": sorted(plan.methods.items()),
           "granularity": sorted((g, str(plan.granularity_for(g))) for g in plan.ratios), "wratios": sorted(plan.weight_ratios.items())}
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]


def duplicate_of(trial: optuna.trial.Trial, key: str) -> Optional[int]:
    """The number of a finished trial that already evaluated this architecture, unless the last
    trials were all such duplicates (the space is exhausted: then run it anyway)."""
    done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    recent = sorted(done, key=lambda t: t.number)[-MAX_DUPLICATES_IN_ROW:]
    if len(recent) == MAX_DUPLICATES_IN_ROW and all("duplicate_of" in t.user_attrs for t in recent):
        return None
    return next((t.number for t in done if t.state == TrialState.COMPLETE and t.user_attrs.get("arch_key") == key), None)


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:05d}"


def rung0_history(study: Any) -> tuple[list[tuple[float, float, float]], list[tuple[float, float]]]:
    """(rung-0 accuracy, final accuracy, latency) of finished fully fine-tuned trials, and
    (accuracy, latency) of every finished trial: what hopeless_at_rung0 judges by."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    full = [(t.user_attrs["accuracy_rung0"], t.values[0], t.values[1]) for t in finished
            if "accuracy_rung0" in t.user_attrs and not t.user_attrs.get("stopped_at_rung0")]
    return full, [(t.values[0], t.values[1]) for t in finished]


def _finetune_multi_fidelity(trial: optuna.trial.Trial, ctx: SearchContext, model: nn.Module, lat: float) -> dict[str, Any]:
    """Fine-tune in two rungs. After the first ``rung0_fraction`` of the steps, a trial stops if
    even an optimistic projection of its final accuracy is beaten by a finished trial that is at
    least as fast (efficiency.hopeless_at_rung0): hopeless candidates cost a third of the steps,
    anything that might reach the front gets them all. (Optuna's pruners do not support
    multi-objective studies, hence this rule.)"""
    ft, eff, seed = ctx.cfg.finetune, ctx.cfg.efficiency, ctx.cfg.search.seed + trial.number
    if not eff.multi_fidelity or ft.steps < 3:
        return {"finetune_steps": finetune(model, ctx.data, ft, teacher=ctx.base, seed=seed)}
    rung0 = max(1, int(round(ft.steps * eff.rung0_fraction)))
    done = finetune(model, ctx.data, ft, teacher=ctx.base, steps=rung0, seed=seed)
    acc0 = evaluate(model, ctx.data)
    trial.set_user_attr("accuracy_rung0", acc0)
    if hopeless_at_rung0(acc0, lat, ctx.dense["accuracy"], *rung0_history(trial.study)):
        return {"finetune_steps": done, "stopped_at_rung0": True}
    done += finetune(model, ctx.data, ft, teacher=ctx.base, steps=ft.steps - rung0, seed=seed + 7919)
    return {"finetune_steps": done, "stopped_at_rung0": False}


def run_trial(trial: optuna.trial.Trial, ctx: SearchContext) -> tuple[float, float]:
    t0 = time.perf_counter()
    plan = suggest_plan(trial, ctx)
    model = copy.deepcopy(ctx.base)
    sp = ctx.space
    widths = apply_schedule(
        model, ctx.example1, plan, ctx.data.num_classes, ctx.calib,
        steps=sp.schedule_steps if sp.schedule != "oneshot" else 1, mode="layerwise" if sp.schedule == "layerwise" else "iterative",
        between=lambda m: finetune(m, ctx.data, ctx.cfg.finetune, teacher=ctx.base, steps=ctx.cfg.finetune.steps // sp.schedule_steps, seed=ctx.cfg.search.seed + trial.number),
    )
    eff = ctx.cfg.efficiency
    if eff.bn_recalibration:  # EagleEye: BN statistics of the pruned net, before any training
        recalibrate_bn(model, ctx.calib[: eff.bn_batches])
    t_prune = time.perf_counter() - t0
    key = architecture_key(widths, plan)
    trial.set_user_attr("arch_key", key)
    if "retry_history" not in trial.user_attrs and (dup := duplicate_of(trial, key)) is not None:
        # Samplers (NSGA-II's crossover especially) re-propose models already evaluated; re-running
        # one only re-samples fine-tune noise. Pruned trials do not count: the sampler draws again.
        trial.set_user_attr("duplicate_of", dup)
        raise optuna.TrialPruned(f"same pruned architecture as trial {dup}")
    params = count_params(model)
    flops = count_flops(model, ctx.example1)
    tdir = trial_dir(ctx.out, trial.number)
    measured = measure_model(model, ctx.example, ctx.profile, tdir / "model.onnx", ctx.cfg.exporter, calib=ctx.calib)
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
        "granularity": {g: str(plan.granularity_for(g)) for g in plan.ratios},
        "weight_ratios": plan.weight_ratios,
        "weight_sparsity": weight_sparsity(model),
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
        with hold_zeros(model):  # unstructured / N:M zeros stay zero while fine-tuning
            attrs.update(_finetune_multi_fidelity(trial, ctx, model, lat))
    attrs["finetune_s"] = time.perf_counter() - t1
    acc = evaluate(model, ctx.data)
    if ctx.profile.precision == "int8":  # the deployed model is the quantized one: score that (quantize.py)
        from .quantize import quantized_accuracy

        attrs["accuracy_fp32"] = acc
        acc, qpath = quantized_accuracy(model, ctx.example, ctx.profile, tdir / "model.onnx", ctx.cfg.exporter, ctx.calib, ctx.data)
        attrs["quantized_model"] = str(qpath)
    attrs["accuracy"] = acc
    drop = ctx.cfg.search.max_accuracy_drop
    trial.set_constraint("accuracy_drop", (ctx.dense["accuracy"] - acc) - drop if drop else -1.0)
    attrs["trial_s"] = time.perf_counter() - t0
    atomic_torch_save(model, tdir / "model.pt")
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if ctx.cfg.search.size_objective:
        return acc, lat, measured["onnx_gzip_bytes"]  # type: ignore[return-value]
    return acc, lat


# --------------------------------------------------------------------------- study
def _sampler(ctx: SearchContext, seed: Optional[int] = None) -> optuna.samplers.BaseSampler:
    # ``seed``: the worker session's seed (search.seed + k, see workers.py), not always search.seed.
    s = ctx.cfg.search if seed is None else ctx.cfg.search.model_copy(update={"seed": seed})
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
    # Worker runtime settings may differ between workers and sessions of one study.
    cfg.search.heartbeat_interval, cfg.search.grace_period, cfg.search.max_retries = 10, 30, 2
    groups = json.dumps([(g.name, g.low, g.high, g.methods) for g in ctx.groups])
    return config_hash(cfg, ctx.space, ctx.profile) + ":" + hashlib.sha256(groups.encode()).hexdigest()[:8]


def storage_url(ctx: SearchContext) -> str:
    return ctx.cfg.search.storage or f"sqlite:///{(ctx.out / 'study.db').resolve()}"


def study_directions(ctx: SearchContext) -> list[str]:
    """(accuracy ↑, latency ↓), plus gzip size ↓ when ``search.size_objective`` is on."""
    return list(DIRECTIONS) + (["minimize"] if ctx.cfg.search.size_objective else [])


def open_study(ctx: SearchContext) -> optuna.Study:
    """Create or resume the study; refuse to mix trials from a different search space."""
    url = storage_url(ctx)
    name = ctx.cfg.search.study_name or "autoprune"
    from .workers import check_base_model, make_storage, public_config

    shown = url.split("@")[-1]  # never print a password
    try:
        retries = ctx.cfg.search.max_retries
        storage = make_storage(url, ctx.cfg.search, lambda st, t: requeue_trial(st, t, retries))
        study = optuna.create_study(
            storage=storage, study_name=name, directions=study_directions(ctx), sampler=_sampler(ctx), load_if_exists=True
        )
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many types for a bad file
        hint = (" It is not an Optuna SQLite database (corrupt, or another program's file): move it away or use"
                " another --out.") if url.startswith("sqlite") else " Check the URL, that the server runs, and the user's rights."
        raise ConfigError(f"storage {shown}: cannot open an Optuna study there ({type(exc).__name__}: {str(exc)[:300]}).{hint}") from None
    if [d.name.lower() for d in study.directions] != study_directions(ctx):
        raise ConfigError(f"storage {url}: study {name!r} has other objectives; use another --out or --study-name")
    h = search_hash(ctx)
    stored = study.user_attrs.get("search_hash")
    if stored is None:
        study.set_user_attr("search_hash", h)
        study.set_user_attr("dense", ctx.dense)
        study.set_user_attr("groups", [g.name for g in ctx.groups])
        study.set_user_attr("config", public_config(ctx.cfg))  # no storage password
        study.set_user_attr("search_space", ctx.space.model_dump(mode="json"))
        study.set_user_attr("device_profile", ctx.profile.model_dump(mode="json"))
    elif stored != h:
        raise ConfigError(
            f"{ctx.out}: the study there was made with a different model, data, search space, device profile or "
            "fine-tune settings; finished trials would not be comparable. Use a new --out (or --study-name), "
            "or the same config as before."
        )
    check_base_model(study, ctx.base, ctx.out)
    return study


def seed_plans(ctx: SearchContext) -> list[dict[str, float]]:
    """The first trials' ratios: each ``seed_uniform`` level as one ratio for every group, and,
    when a sensitivity scan ran and ``seed_spread`` > 0, its sensitivity-allocated twin.
    Ordered by level, so the sampler's first generation spans the whole latency range."""
    sp = ctx.space
    free = [g for g in ctx.groups if g.low != g.high]
    out: list[dict[str, float]] = []
    for r in sorted(sp.seed_uniform):
        plans = [{g.name: r for g in free}]
        if sp.seed_spread > 0 and ctx.sensitivity and ctx.savings:
            plans.append(allocate_ratios(free, ctx.sensitivity, ctx.savings, r, sp.seed_spread))
        for plan in plans:
            snapped = {
                RATIO_PREFIX + g.name: _snap(plan[g.name], g.low, g.high, _group_step(sp, g))
                for g in free
            }
            if snapped not in out:
                out.append(snapped)
    return out


def enqueue_seeds(study: optuna.Study, ctx: SearchContext) -> None:
    """On a fresh study, enqueue the seed plans: strong, cheap starting points."""
    if study.trials:
        return
    for params in seed_plans(ctx):
        study.enqueue_trial(params, skip_if_exists=True)


def requeue_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retries: int = 2) -> None:
    """Re-run a trial whose worker died, with the same parameters, at most ``max_retries``
    (``search.max_retries``) times; only parameters are copied (workers.requeue)."""
    from .workers import requeue

    requeue(study, trial, max_retries, "worker died (heartbeat stopped)")


def _fail_stale_local_trials(study: optuna.Study, max_retries: int = 2) -> int:
    """With the run-folder lock held nobody else runs this study, so RUNNING trials are leftovers
    of a killed process: mark them failed and re-queue their parameters."""
    from .workers import requeue

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        # The reason first: a finished trial's attributes can no longer be written.
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "worker died (found RUNNING at restart)")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        requeue(study, t, max_retries, "worker died (found RUNNING at restart)")
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
    """Run trials until the study holds ``trials`` complete ones (across all workers); see
    :mod:`autoprune.workers` for how workers share the study, retries and failures."""
    from .workers import work

    if len(completed(study)) >= ctx.cfg.search.trials:
        return
    work(
        study, storage_url(ctx), ctx.cfg.search.study_name or "autoprune", ctx.cfg.search,
        lambda t: run_trial(t, ctx), lambda seed: _sampler(ctx, seed), ctx.out, [progress] if progress else [],
        setup=lambda: enqueue_seeds(study, ctx),
    )
