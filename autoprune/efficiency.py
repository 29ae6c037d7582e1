"""Making trials cheap and predictive: BN recalibration, sensitivity priors, multi-fidelity, final stage.

* Adaptive BN recalibration (EagleEye, Li et al. 2020): after channels are removed the BN
  running statistics describe the *dense* network's activations; re-estimating them on a few
  training batches (no gradients) makes a pruned model's un-fine-tuned accuracy a far better
  predictor of its fine-tuned accuracy, at the cost of a few forward passes.
* Sensitivity scan: prune each group alone and record the accuracy drop; sensitive groups get a
  narrower ratio range, so the sampler does not waste trials on hopeless candidates.
* Multi-fidelity: a trial first fine-tunes for a fraction of the steps; if even an optimistic
  projection of its final accuracy is beaten by a finished, faster trial, it stops there.
* Final stage: Pareto models get a longer fine-tune and are re-measured.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .data import DataBundle
from .export import atomic_torch_save, atomic_write_text
from .models import evaluate
from .plan import PruningPlan, apply_plan
from .structure import PrunableGroup


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Re-estimate every BatchNorm's running mean/var from ``batches`` (cumulative average).
    Returns how many BN layers were reset (0: nothing to do, model untouched)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    was_training = model.training
    model.train()
    for x, _ in batches:
        model(x)
    for m, mom in saved:
        m.momentum = mom
    model.train(was_training)
    model.eval()
    return len(bns)


def pruned_alone(
    base: nn.Module, group: PrunableGroup, example: torch.Tensor, num_classes: int, ratio: float, round_to: int
) -> Optional[nn.Module]:
    """A copy of ``base`` with only ``group`` pruned (L1) by ``ratio`` clipped to the group's
    range; None when that leaves nothing to prune. What the per-group scans measure."""
    r = min(max(ratio, group.low), group.high) if group.high > 0 else 0.0
    if r <= 0:
        return None
    m = copy.deepcopy(base)
    apply_plan(m, example, PruningPlan({group.name: r}, round_to=round_to), num_classes)
    return m


def sensitivity_scan(
    base: nn.Module,
    groups: list[PrunableGroup],
    data: DataBundle,
    example: torch.Tensor,
    calib: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ratio: float = 0.5,
    round_to: int = 8,
    max_batches: Optional[int] = 4,
) -> dict[str, float]:
    """Accuracy drop (dense − pruned) when only one group is pruned by ``ratio`` (L1, BN
    recalibrated, no fine-tune). Evaluated on at most ``max_batches`` validation batches."""
    # Compare like with like: the reference is the dense model with the same BN recalibration.
    ref = copy.deepcopy(base)
    recalibrate_bn(ref, calib)
    dense_acc = evaluate(ref, data, max_batches=max_batches)
    out: dict[str, float] = {}
    for g in groups:
        m = pruned_alone(base, g, example, data.num_classes, ratio, round_to)
        if m is None:
            out[g.name] = 0.0
            continue
        recalibrate_bn(m, calib)
        out[g.name] = dense_acc - evaluate(m, data, max_batches=max_batches)
    return out


def shape_ranges(groups: list[PrunableGroup], drops: dict[str, float], strength: float = 0.5) -> list[PrunableGroup]:
    """Narrow each group's upper ratio bound by its relative sensitivity (most sensitive group:
    ``high`` shrinks by ``strength``×range; insensitive groups keep their range)."""
    worst = max([d for d in drops.values() if d > 0], default=0.0)
    if worst <= 0:
        return groups
    for g in groups:
        s = max(0.0, drops.get(g.name, 0.0)) / worst
        g.high = round(g.low + (g.high - g.low) * (1.0 - strength * s), 4)
    return groups


def flops_savings(
    base: nn.Module, groups: list[PrunableGroup], example: torch.Tensor, num_classes: int, ratio: float = 0.5, round_to: int = 8
) -> dict[str, float]:
    """Fraction of the dense FLOPs removed when only one group is pruned by ``ratio``: what a
    group *buys*, to weigh against what it costs in accuracy (:func:`sensitivity_scan`)."""
    from .models import count_flops

    dense = count_flops(base, example)
    out: dict[str, float] = {}
    for g in groups:
        m = pruned_alone(base, g, example, num_classes, ratio, round_to) if dense > 0 else None
        out[g.name] = 0.0 if m is None else max(0.0, 1.0 - count_flops(m, example) / dense)
    return out


def allocate_ratios(
    groups: list[PrunableGroup], drops: dict[str, float], savings: dict[str, float], level: float, spread: float
) -> dict[str, float]:
    """Non-uniform ratios around a uniform ``level``: groups ranked by accuracy lost per FLOP
    saved (drop / saving); the cheapest group gets ``level + spread/2``, the dearest
    ``level − spread/2``, linearly by rank, each clipped to its own range. Rank, not raw value:
    the scan's drops are noisy, their order is what carries over to the fine-tuned model."""
    free = [g for g in groups if g.low < g.high]
    score = {g.name: max(drops.get(g.name, 0.0), 0.0) / max(savings.get(g.name, 0.0), 1e-6) for g in free}
    order = sorted(free, key=lambda g: (score[g.name], g.name))
    n = len(order)
    out: dict[str, float] = {}
    for i, g in enumerate(order):
        rank = i / (n - 1) if n > 1 else 0.5
        out[g.name] = min(max(level + spread * (0.5 - rank), g.low), g.high)
    return out


def load_or_compute(path: Path, fn: Any, **kwargs: Any) -> dict[str, float]:
    """Cache a per-group scan in the run folder: resumed searches and other workers reuse it."""
    if path.is_file():
        return json.loads(path.read_text())
    values = fn(**kwargs)
    atomic_write_text(path, json.dumps(values, indent=2))
    return values


def load_or_scan(path: Path, **kwargs: Any) -> dict[str, float]:
    """The sensitivity scan, cached in the run folder (see :func:`load_or_compute`)."""
    return load_or_compute(path, sensitivity_scan, **kwargs)


#: Fully fine-tuned trials needed before any trial may be stopped at the first rung.
MIN_FULL_TRIALS = 3


def hopeless_at_rung0(
    acc0: float, lat: float, dense_acc: float, full: Sequence[tuple[float, float, float]], done: Sequence[tuple[float, float]]
) -> bool:
    """Stop a trial after its first fine-tune rung only if it cannot reach the front.

    ``full``: (rung-0 accuracy, final accuracy, latency) of trials that got the whole fine-tune;
    ``done``: (accuracy, latency) of every finished trial. The rest of the fine-tune recovers a
    fraction of what the trial is still below the dense model; the *largest* fraction seen so far,
    ``k``, gives an optimistic final accuracy ``acc0 + k·(dense − acc0)``. The trial stops when a
    finished trial at least as fast is already more accurate than that optimistic value.

    Why not compare rung-0 results with each other: recovery differs a lot by how much was
    pruned (a heavily pruned net gains 10-20 points in the remaining steps, a lightly pruned one
    1-3), so rung-0 dominance stopped trials that would have ended on the front.
    """
    if len(full) < MIN_FULL_TRIALS:
        return False
    k = max(max(0.0, f - a) / max(dense_acc - a, 1e-3) for a, f, _ in full)
    optimistic = acc0 + min(k, 1.0) * max(dense_acc - acc0, 0.0)
    return any(a > optimistic and l <= lat for a, l in done)


def final_seed(cfg: Any, trial: int) -> int:
    """The seed of a trial's final-stage fine-tune."""
    return cfg.search.seed + 100_003 + trial


def final_finetune(model: nn.Module, data: DataBundle, cfg: Any, teacher: nn.Module, trial: int, steps: int) -> int:
    """The final stage's longer fine-tune of one trial's model, in place; its seed depends only
    on the config and trial number, so ``export --trial N --rebuild`` repeats it exactly."""
    from .finetune import finetune
    from .methods import hold_zeros

    with hold_zeros(model):  # unstructured / N:M zeros stay zero
        return finetune(model, data, cfg.finetune, teacher=teacher, steps=steps, seed=final_seed(cfg, trial))


def final_stage(ctx: Any, rows: list[dict[str, Any]], say: Any = print) -> dict[str, dict[str, Any]]:
    """Longer fine-tune for each Pareto model, then re-measure it. Writes ``final.json`` and
    ``trials/N/model_final.pt``; export prefers the final model. Idempotent per trial, so a
    resumed search does not redo finished final fine-tunes."""
    from .search import measure_model, trial_dir

    steps = ctx.cfg.efficiency.final_finetune_steps
    path = ctx.out / "final.json"
    done: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    for r in rows:
        key = str(r["trial"])
        tdir = trial_dir(ctx.out, r["trial"])
        if (key in done and done[key].get("steps") == steps) or not (tdir / "model.pt").is_file():
            continue
        model = torch.load(tdir / "model.pt", map_location="cpu", weights_only=False)
        final_finetune(model, ctx.data, ctx.cfg, ctx.base, r["trial"], steps)
        acc = evaluate(model, ctx.data)
        measured = measure_model(model, ctx.example, ctx.profile, tdir / "model_final.onnx", ctx.cfg.exporter, calib=ctx.calib)
        atomic_torch_save(model, tdir / "model_final.pt")
        done[key] = {"steps": steps, "short_accuracy": r["accuracy"], "final_accuracy": acc,
                     "short_latency_ms": r["latency_ms"], "final_latency_ms": measured["latency"]["median_ms"]}
        say(f"final fine-tune of trial {r['trial']}: accuracy {r['accuracy']:.4f} -> {acc:.4f} ({steps} steps)")
        atomic_write_text(path, json.dumps(done, indent=2))
    return done
