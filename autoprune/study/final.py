"""Final stage: the Pareto models get a longer fine-tune and are re-measured, and are scored on
the whole held-out split and on the official test split.

``final.json`` records short vs final accuracy and latency; exports prefer ``model_final.pt``.
It also runs without a fine-tune (``final_finetune_steps: 0``) when trials scored on a subset
of the held-out split (``val_samples``) or the data has a test split: the front then reports
accuracy on all held-out images and ``test_accuracy``, which no trial ever looked at.
The fine-tune seed depends only on the config and the trial number, so ``export --trial N
--rebuild`` repeats it exactly.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch.nn as nn
from scipy.stats import kendalltau  # scipy comes with scikit-learn, a dependency

from autoprune.measure.candidate import measure_model
from autoprune.prune.methods import hold_zeros
from autoprune.files import atomic_write_text
from autoprune.train.checkpoint import load_checkpoint, pruned_recipe, save_model
from autoprune.train.data import DataBundle
from autoprune.train.device import TrainSetup, model_device
from autoprune.train.finetune import finetune
from autoprune.train.models import evaluate, held_out_accuracy
from autoprune.measure.stats import latency_ms


def final_seed(cfg: Any, trial: int) -> int:
    """The seed of a trial's final-stage fine-tune."""
    return cfg.search.seed + 100_003 + trial


def final_finetune(model: nn.Module, data: DataBundle, cfg: Any, teacher: nn.Module, trial: int, steps: int,
                   setup: Optional[TrainSetup] = None, task: Any = None) -> int:
    """The final stage's longer fine-tune of one trial's model, in place, on the teacher's device
    (the train device; ``model`` is moved there); its seed depends only on the config and trial
    number, so ``export --trial N --rebuild`` repeats it exactly."""

    model.to(model_device(teacher))
    with hold_zeros(model):  # unstructured / N:M zeros stay zero
        return finetune(model, data, cfg.finetune, teacher=teacher, steps=steps, seed=final_seed(cfg, trial), setup=setup, task=task)


def final_stage_needed(cfg: Any, data: DataBundle) -> bool:
    """A longer fine-tune was asked for, or the front's accuracy needs an honest re-score (trials
    saw a subset of the held-out split, or there is a test split no trial saw)."""
    return bool(cfg.efficiency.final_finetune_steps) or data.search_val is not None or data.test is not None


def final_stage(ctx: Any, rows: list[dict[str, Any]], say: Any = print) -> dict[str, dict[str, Any]]:
    """Longer fine-tune for each Pareto model, then re-measure it. Writes ``final.json`` and
    ``trials/N/model_final.pt``; export prefers the final model. With 0 steps the model is only
    scored (whole held-out split, test split): no fine-tune, no new latency, no new file.
    Idempotent per trial, so a resumed search does not redo finished final fine-tunes."""

    steps = ctx.cfg.efficiency.final_finetune_steps
    path = ctx.run.final_json
    done: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    for r in rows:
        key = str(r["trial"])
        files = ctx.run.trial(r["trial"])
        if (key in done and done[key].get("steps") == steps) or not files.model.is_file():
            continue
        model = load_checkpoint(files.model, trust_pickle=ctx.cfg.trust_pickle, code=ctx.code)[0]
        latency = r["latency_ms"]
        if steps:
            final_finetune(model, ctx.data, ctx.cfg, ctx.base, r["trial"], steps, ctx.train, task=ctx.task)
            measured = measure_model(model, ctx.example, ctx.profile, files.final_onnx, ctx.cfg.exporter,
                                     calib=ctx.calib, run=ctx.run, dense=ctx.base)
            latency = latency_ms(measured["latency"])
            save_model(model, files.final_model, pruned_recipe(ctx.recipe, r["widths"]))
        acc = evaluate(model, ctx.data, split="val", setup=ctx.train, task=ctx.task)
        scores = held_out_accuracy(model, ctx.data, setup=ctx.train, task=ctx.task)
        scores.pop("search_accuracy", None)  # the trial's own accuracy already is
        done[key] = {"steps": steps, "short_accuracy": r["accuracy"], "final_accuracy": acc,
                     "short_latency_ms": r["latency_ms"], "final_latency_ms": latency, **scores}
        test = f", test {scores['test_accuracy']:.4f}" if "test_accuracy" in scores else ""
        say(f"final stage of trial {r['trial']}: accuracy {r['accuracy']:.4f} -> {acc:.4f} on the whole held-out split"
            f"{test} ({steps} fine-tune steps)")
        atomic_write_text(path, json.dumps(done, indent=2))
    tau = proxy_fidelity([d for d in done.values() if d.get("steps")])
    if tau is not None:
        say(f"proxy fidelity: Kendall tau {tau['kendall_tau']:.2f} between the trials' short-fine-tune accuracy and the final "
            f"accuracy over {tau['models']} front models (1 = the search ranked them as the final stage does)")
        atomic_write_text(ctx.run.proxy_fidelity, json.dumps(tau, indent=2))
    return done


def proxy_fidelity(entries: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Kendall τ between short (trial) and final accuracy over the fine-tuned front models: how
    far a trial's cheap score can be trusted to rank what will be deployed. None under 3 models."""
    if len(entries) < 3:
        return None
    short = [e["short_accuracy"] for e in entries]
    final = [e["final_accuracy"] for e in entries]
    tau = float(kendalltau(short, final).statistic)
    return {"kendall_tau": tau, "models": len(entries), "short": short, "final": final}
