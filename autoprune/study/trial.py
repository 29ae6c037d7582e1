"""One trial, top to bottom: suggest → build → measure → constraints → fine-tune → score → persist.

Objectives are (maximize accuracy, minimize median latency on the target); FLOPs, params and
sizes are user attributes; budgets are Optuna constraints set with ``trial.set_constraint``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from autoprune.measure.candidate import measure_model, quantized_accuracy
from autoprune.prune.methods import hold_zeros, weight_sparsity
from autoprune.prune.plan import PruningPlan, apply_schedule
from autoprune.runfolder import atomic_torch_save, trial_dir
from autoprune.study.context import SearchContext
from autoprune.study.fidelity import _finetune_multi_fidelity
from autoprune.study.space import suggest_plan
from autoprune.train.bn import recalibrate_bn
from autoprune.train.finetune import finetune
from autoprune.train.models import (
    count_flops,
    count_params,
    evaluate,
)

OBJECTIVES = ("accuracy", "latency_ms")
DIRECTIONS = ("maximize", "minimize")


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
