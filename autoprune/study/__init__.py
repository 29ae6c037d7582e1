"""Stage 3, the search: an Optuna study over per-group pruning parameters.

One concept per module, as Optuna keeps them: ``space`` (trial parameters → pruning plan, seed
plans), ``trial`` (one trial's whole lifecycle, top to bottom), ``study`` (sampler, resume hash,
opening and driving the study), ``workers`` (several processes on one study: slots, dead workers,
retries), ``storage`` (Optuna RDB storages, run-folder study files), ``context`` (what is prepared
once per run: data, dense model, groups, dense measurement), ``priors`` (sensitivity scan and
sensitivity-shaped ranges), ``fidelity`` (multi-fidelity fine-tune) and ``final`` (the longer
fine-tune of the Pareto models). The folder is ``study`` because ``autoprune.search`` is the
public function.
"""

