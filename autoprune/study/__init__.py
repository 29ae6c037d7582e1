"""Stage 3, the search: an Optuna study over per-group pruning parameters.

One concept per module, as Optuna keeps them: ``space`` (trial parameters → pruning plan, seed
plans), ``trial`` (one trial's whole lifecycle, top to bottom), ``study`` (sampler, resume hash,
opening and driving the study), ``workers`` (several processes on one study: slots, dead workers,
retries), ``storage`` (Optuna RDB storages, run-folder study files), ``context`` (what is prepared
once per run: data, dense model, groups, dense measurement), ``priors`` (sensitivity scan and
sensitivity-shaped ranges), ``screen`` (many candidates scored without a fine-tune, the best
enqueued as trials), ``budget`` (budget mode's targets and latency model), ``fidelity``
(multi-fidelity fine-tune), ``final`` (the longer fine-tune of the Pareto models), ``pool``
(``--workers N``), ``progress`` (the progress bar) and ``tracking`` (MLflow). The folder is ``study`` because ``autoprune.search`` is the
public function.
"""

#: The stage's modules (``from autoprune.study import *`` imports them); each sets its own ``__all__``.
__all__ = ["budget", "context", "fidelity", "final", "pool", "priors", "progress", "screen", "space", "storage", "study", "trial", "tracking", "workers"]
