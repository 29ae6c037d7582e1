"""The search's progress on the console: a trial bar with the ETA and the best models so far,
and one line per finished trial (its accuracy, latency and size, or why it failed)."""

from __future__ import annotations

from typing import Any, Callable

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

from autoprune.results.front import front
from autoprune.study.study import completed

__all__ = ["progress_bar", "progress_callback"]


def progress_bar(console: Console) -> Progress:
    """The bar of trials done out of ``search.trials``; its ``best`` field shows the front's extremes."""
    return Progress(
        TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), TextColumn("{task.fields[best]}"), console=console, transient=False,
    )


def progress_callback(progress: Progress, task: Any, console: Console,
                      target: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """The Optuna callback that moves ``progress``'s ``task`` (up to ``target``) and logs each
    finished trial: the bar alone would not say why a trial failed."""

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
