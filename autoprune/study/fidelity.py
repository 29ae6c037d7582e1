"""Multi-fidelity fine-tuning: stop hopeless trials after a first rung.

Optuna's pruners do not support multi-objective studies, so the rule lives here: a trial first
fine-tunes for ``rung0_fraction`` of the steps; it stops only if even an optimistic projection of
its final accuracy is already beaten by a finished trial that is at least as fast.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch.nn as nn
from optuna.trial import TrialState

from autoprune.config import EfficiencyConfig, FinetuneConfig
from autoprune.train.data import DataBundle
from autoprune.train.device import TrainSetup
from autoprune.train.finetune import finetune
from autoprune.train.models import (
    evaluate,
)


def rung0_history(study: Any) -> tuple[list[tuple[float, float, float]], list[tuple[float, float]]]:
    """(rung-0 accuracy, final accuracy, latency) of finished fully fine-tuned trials, and
    (accuracy, latency) of every finished trial: what hopeless_at_rung0 judges by."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    full = [(t.user_attrs["accuracy_rung0"], t.values[0], t.values[1]) for t in finished
            if "accuracy_rung0" in t.user_attrs and not t.user_attrs.get("stopped_at_rung0")]
    return full, [(t.values[0], t.values[1]) for t in finished]


def finetune_in_rungs(model: nn.Module, data: DataBundle, ft: FinetuneConfig, eff: EfficiencyConfig, teacher: nn.Module,
                      seed: int, stop_after_rung0: Callable[[float], bool], setup: Optional[TrainSetup] = None,
                      task: Any = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place, in two rungs when ``multi_fidelity`` is on.

    After the first ``rung0_fraction`` of the steps the model is evaluated and
    ``stop_after_rung0(accuracy)`` decides whether the rest is worth it: in a search that is
    :func:`hopeless_at_rung0` against the finished trials; in a replay (``export --trial N``) it
    is the decision the trial recorded, so the replay takes the same branch. Hopeless candidates
    cost a third of the steps; anything that might reach the front gets them all.
    Returns the trial attributes: steps done, rung-0 accuracy, whether it stopped there.
    """
    if not eff.multi_fidelity or ft.steps < 3:
        return {"finetune_steps": finetune(model, data, ft, teacher=teacher, seed=seed, setup=setup, task=task)}
    rung0 = max(1, int(round(ft.steps * eff.rung0_fraction)))
    done = finetune(model, data, ft, teacher=teacher, steps=rung0, seed=seed, setup=setup, task=task)
    acc0 = evaluate(model, data, setup=setup, split="search", task=task)
    if stop_after_rung0(acc0):
        return {"finetune_steps": done, "accuracy_rung0": acc0, "stopped_at_rung0": True}
    done += finetune(model, data, ft, teacher=teacher, steps=ft.steps - rung0, seed=seed + 7919, setup=setup, task=task)
    return {"finetune_steps": done, "accuracy_rung0": acc0, "stopped_at_rung0": False}


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
