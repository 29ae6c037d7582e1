"""[from autoprune.efficiency]
Making trials cheap and predictive: BN recalibration, sensitivity priors, multi-fidelity, final stage.

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

import json
from typing import Any

import torch
import torch.nn as nn

from autoprune.measure.candidate import measure_model
from autoprune.prune.methods import hold_zeros
from autoprune.runfolder import atomic_torch_save, atomic_write_text, trial_dir
from autoprune.train.data import DataBundle
from autoprune.train.finetune import finetune
from autoprune.train.models import evaluate


def final_seed(cfg: Any, trial: int) -> int:
    """The seed of a trial's final-stage fine-tune."""
    return cfg.search.seed + 100_003 + trial


def final_finetune(model: nn.Module, data: DataBundle, cfg: Any, teacher: nn.Module, trial: int, steps: int) -> int:
    """The final stage's longer fine-tune of one trial's model, in place; its seed depends only
    on the config and trial number, so ``export --trial N --rebuild`` repeats it exactly."""

    with hold_zeros(model):  # unstructured / N:M zeros stay zero
        return finetune(model, data, cfg.finetune, teacher=teacher, steps=steps, seed=final_seed(cfg, trial))


def final_stage(ctx: Any, rows: list[dict[str, Any]], say: Any = print) -> dict[str, dict[str, Any]]:
    """Longer fine-tune for each Pareto model, then re-measure it. Writes ``final.json`` and
    ``trials/N/model_final.pt``; export prefers the final model. Idempotent per trial, so a
    resumed search does not redo finished final fine-tunes."""

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
