"""One trial, top to bottom: suggest → build → measure → constraints → fine-tune → score → persist.

:func:`run_trial` is the whole lifecycle of a trial in one function, as Optuna's
``_run_trial`` is for Optuna; the steps it calls sit below it and never call back up. The same
steps serve ``autoprune export --trial N`` (deploy/replay.py): it builds the candidate from the
stored parameters with :func:`build_candidate` and fine-tunes it with :func:`finetune_candidate`,
without a study and without timing latency again.

Objectives are (maximize accuracy, minimize median latency on the target); FLOPs, params and
sizes are user attributes; budgets are Optuna constraints set with ``trial.set_constraint``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
import torch
import torch.nn as nn
from optuna.trial import TrialState

from autoprune.config import Budget, parse_target
from autoprune.measure.candidate import measure_model, quantized_accuracy
from autoprune.prune.methods import hold_zeros, weight_sparsity
from autoprune.prune.plan import PruningPlan, apply_plan_from, apply_schedule
from autoprune.study.context import SearchContext
from autoprune.study.fidelity import finetune_in_rungs, hopeless_at_rung0, rung0_history
from autoprune.study.space import aim_at_target, suggest_plan
from autoprune.train.bn import recalibrate_bn
from autoprune.train.checkpoint import pruned_recipe, save_model
from autoprune.train.device import batches_to, model_device
from autoprune.train.finetune import finetune
from autoprune.train.models import count_params, evaluate
from autoprune.measure.stats import latency_ms

OBJECTIVES = ("accuracy", "latency_ms")
DIRECTIONS = ("maximize", "minimize")

#: After this many duplicate architectures in a row the space is taken as exhausted and
#: duplicates are run anyway (each is then a fresh fine-tune sample), so a search never spins.
MAX_DUPLICATES_IN_ROW = 5

#: Validation batches that estimate the accuracy of a candidate over the latency budget: it is
#: infeasible whatever its accuracy, so a rough, cheap value is enough for the sampler and plots.
OVER_BUDGET_EVAL_BATCHES = 2


def run_trial(trial: optuna.trial.Trial, ctx: SearchContext) -> tuple[float, ...]:
    """Run one trial of the search and return its objective values."""
    t0 = time.perf_counter()

    # 1. Suggest: trial parameters → pruning plan (budget mode: aimed at the trial's target).
    plan = aim_at_target(trial, ctx, suggest_plan(trial, ctx))

    # 2. Build the candidate: prune the dense model (channels physically removed), recalibrate BN.
    cand = build_candidate(ctx, plan, trial.number)
    trial.set_user_attr("arch_key", cand.key)
    if "retry_history" not in trial.user_attrs and (dup := duplicate_of(trial, cand.key)) is not None:
        # Samplers (NSGA-II's crossover especially) re-propose models already evaluated; re-running
        # one only re-samples fine-tune noise. Pruned trials do not count: the sampler draws again.
        trial.set_user_attr("duplicate_of", dup)
        raise optuna.TrialPruned(f"same pruned architecture as trial {dup}")

    # 3. Measure on the target, before any training (latency first).
    files = ctx.run.trial(trial.number)
    measured = measure_model(cand.model, ctx.example, ctx.profile, files.onnx, ctx.cfg.exporter,
                             calib=ctx.calib, run=ctx.run, dense=ctx.base, slicer=ctx.onnx_slicer())
    lat = latency_ms(measured["latency"])  # ratio x the dense quiet estimate: load cancels

    # 4. Constraints: the device profile's budgets (≤ 0 is feasible); speed-up targets against
    # the speed-up measured interleaved with dense when there is one (a loaded machine moves both).
    cons = budget_constraints(_latency_budget(ctx), budget_latency_ms(ctx, measured), cand.params, cand.flops, measured["onnx_bytes"])
    for k, v in cons.items():
        trial.set_constraint(k, v)
    attrs: dict[str, Any] = {**cand.attrs(plan), "prune_s": cand.seconds, **measured}

    if cons["latency_ms"] > 0:
        # 5a. Over the latency budget: no fine-tune, no full evaluation, no int8, no files kept.
        # The trial is infeasible whatever its accuracy; a few batches give the sampler a value.
        acc = evaluate(cand.model, ctx.data, max_batches=OVER_BUDGET_EVAL_BATCHES, split="search", setup=ctx.train, task=ctx.task)
        attrs.update(finetune_steps=0, skipped_finetune="over latency budget", accuracy_estimated=True)
    else:
        # 5b. Fine-tune (distilled from the dense model; multi-fidelity rungs).
        t1 = time.perf_counter()
        attrs.update(finetune_candidate(ctx, cand.model, trial.number, lambda acc0: hopeless_at_rung0(
            acc0, lat, _dense_accuracy(ctx), *rung0_history(trial.study))))
        attrs["finetune_s"] = time.perf_counter() - t1

        # 6. Score: held-out accuracy of what would be deployed (the quantized file on int8 profiles).
        acc, scored = score_candidate(ctx, cand.model, files.onnx)
        attrs.update(scored)

        # 7. Persist the fine-tuned model for export, pick and the final stage.
        save_model(cand.model, files.model, pruned_recipe(ctx.recipe, cand.widths))

    drop = ctx.cfg.search.max_accuracy_drop
    trial.set_constraint("accuracy_drop", (_dense_accuracy(ctx) - acc) - drop if drop else -1.0)
    attrs.update(accuracy=acc, metric_name=ctx.task.metric_name, trial_s=time.perf_counter() - t0)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if ctx.cfg.search.size_objective:
        return acc, lat, measured["onnx_gzip_bytes"]
    return acc, lat


# --------------------------------------------------------------------------- the steps
@dataclass
class Candidate:
    """A pruned (not yet fine-tuned) model and what is known about it before measuring."""

    model: nn.Module
    widths: dict[str, Any]
    key: str
    params: int
    flops: float
    seconds: float

    def attrs(self, plan: PruningPlan) -> dict[str, Any]:
        """The trial attributes that describe this architecture."""
        return {
            "params": self.params,
            "flops": self.flops,
            "widths": {k: list(v) for k, v in self.widths.items()},
            "methods": plan.methods,
            "ratios": plan.ratios,
            "granularity": {g: str(plan.granularity_for(g)) for g in plan.ratios},
            "weight_ratios": plan.weight_ratios,
            "weight_sparsity": weight_sparsity(self.model),
        }


def build_candidate(ctx: SearchContext, plan: PruningPlan, number: int) -> Candidate:
    """A copy of the dense model pruned by ``plan`` (its schedule's rounds separated by short
    fine-tunes), with BatchNorm statistics re-estimated for the pruned net (EagleEye)."""
    t0 = time.perf_counter()
    model = copy.deepcopy(ctx.base)  # on the train device, like the dense model
    dev = model_device(model)
    sp, ft, eff = ctx.space, ctx.cfg.finetune, ctx.cfg.efficiency
    calib = batches_to(ctx.calib, dev)  # the criteria's calibration pass runs where the model is
    example = ctx.example1.to(dev)
    oneshot = sp.schedule == "oneshot" or sp.schedule_steps <= 1
    # One-shot plans slice the copy through the dense model's groups, analysed once per run.
    widths = apply_plan_from(model, ctx.base, ctx.dense_structure(), plan) if oneshot else None
    widths = widths if widths is not None else apply_schedule(
        model, example, plan, ctx.data.num_classes, calib,
        steps=sp.schedule_steps if sp.schedule != "oneshot" else 1, mode="layerwise" if sp.schedule == "layerwise" else "iterative",
        between=lambda m: finetune(m, ctx.data, ft, teacher=ctx.base, steps=ft.steps // sp.schedule_steps, seed=trial_seed(ctx, number),
                                   setup=ctx.train, task=ctx.task),
    )
    try:  # before FLOPs, BN and latency: a model that no longer runs fails here, with the reason
        with torch.no_grad():
            model.eval()(example)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"the pruned model does not run ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                           f"pruned groups: {sorted(k for k, (a, b) in widths.items() if b < a)}") from exc
    if eff.bn_recalibration:
        recalibrate_bn(model, calib[: eff.bn_batches], ctx.train)
    return Candidate(model, widths, architecture_key(widths, plan), count_params(model), ctx.count_flops(model, ctx.example1),
                     time.perf_counter() - t0)


def finetune_candidate(ctx: SearchContext, model: nn.Module, number: int, stop_after_rung0: Callable[[float], bool]) -> dict[str, Any]:
    """The trial's distilled fine-tune, in place; unstructured / N:M zeros stay zero."""
    with hold_zeros(model):
        return finetune_in_rungs(model, ctx.data, ctx.cfg.finetune, ctx.cfg.efficiency, ctx.base, trial_seed(ctx, number),
                                 stop_after_rung0, ctx.train, task=ctx.task)


def score_candidate(ctx: SearchContext, model: nn.Module, onnx_path: Path) -> tuple[float, dict[str, Any]]:
    """Accuracy of the fine-tuned model on the search's held-out images (``val_samples``: a fixed
    subset, the final stage scores the whole split); on int8 profiles the deployed model is the
    quantized file, so that is what is scored (fp32 accuracy kept beside it)."""
    acc = evaluate(model, ctx.data, split="search", setup=ctx.train, task=ctx.task)
    if ctx.profile.precision != "int8":
        return acc, {}
    q_acc, qpath = quantized_accuracy(model, ctx.example, ctx.profile, onnx_path, ctx.cfg.exporter, ctx.calib, ctx.data,
                                      split="search", task=ctx.task, slicer=ctx.onnx_slicer())
    return q_acc, {"accuracy_fp32": acc, "quantized_model": str(qpath)}


def _dense_accuracy(ctx: SearchContext) -> float:
    """The dense model's accuracy on the images trials are scored on (like with like)."""
    return float(ctx.dense.get("search_accuracy", ctx.dense["accuracy"]))


def _latency_budget(ctx: SearchContext) -> Budget:
    """The profile's budget; in budget mode no looser than the loosest target: a slower trial
    serves no target, so it is infeasible and skips the fine-tune."""
    b = ctx.profile.budget
    if not ctx.targets_ms:
        return b
    loosest = max(ctx.targets_ms)
    return b.model_copy(update={"max_latency_ms": min(loosest, b.max_latency_ms) if b.max_latency_ms else loosest})


def budget_latency_ms(ctx: SearchContext, measured: dict[str, Any]) -> float:
    """The latency a budget is checked against. Speed-up targets (``"3x"``) are ratios to dense:
    when the measurement timed dense interleaved in the same session (``latency.speedup``), the
    candidate's latency is the dense reading targets were set from divided by that ratio, so
    load that slows both sides alike does not move the candidate across a target. Otherwise,
    and for millisecond targets, the headline latency (:func:`~autoprune.measure.stats.latency_ms`)."""
    lat = latency_ms(measured["latency"])
    speedup = measured["latency"].get("speedup")
    if not ctx.targets_ms or not speedup or not all(parse_target(t)[0] == "speedup" for t in ctx.cfg.search.target or []):
        return lat
    return latency_ms(ctx.dense["latency"]) / float(speedup)


def budget_constraints(b: Budget, lat_ms: float, params: int, flops: float, size_bytes: int) -> dict[str, float]:
    """Budget → constraint values (≤ 0 feasible), always the same keys so samplers see a consistent set."""
    return {
        "latency_ms": lat_ms - b.max_latency_ms if b.max_latency_ms else -1.0,
        "params": float(params - b.max_params) if b.max_params else -1.0,
        "flops": flops - b.max_flops if b.max_flops else -1.0,
        "size_mb": size_bytes / 1e6 - b.max_size_mb if b.max_size_mb else -1.0,
    }


def trial_seed(ctx: SearchContext, number: int) -> int:
    """The fine-tune seed of trial ``number``: a replay with the same config repeats it exactly."""
    return ctx.cfg.search.seed + number


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
