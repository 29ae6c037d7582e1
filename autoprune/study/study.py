"""The study: sampler, resume check, seed trials, and the loop that runs trials.

The study lives in SQLite inside the run folder unless ``search.storage`` names another Optuna
storage (PostgreSQL for several workers). Re-running the same command resumes it; a config that
would score trials differently is refused (``search_hash``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from typing import Callable, Iterator, Optional

import optuna
from optuna.trial import TrialState

from autoprune.config import (
    config_hash,
)
from autoprune.errors import ConfigError
from autoprune.runfolder import RunFolder
from autoprune.study.context import SearchContext
from autoprune.study.space import seed_plans
from autoprune.study.storage import check_base_model, fail_running_trial, make_storage, public_config
from autoprune.study.trial import DIRECTIONS, run_trial
from autoprune.study.workers import requeue, work

log = logging.getLogger("autoprune")


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
    return ctx.cfg.search.storage or f"sqlite:///{ctx.run.study_db.resolve()}"


def study_directions(ctx: SearchContext) -> list[str]:
    """(accuracy ↑, latency ↓), plus gzip size ↓ when ``search.size_objective`` is on."""
    return list(DIRECTIONS) + (["minimize"] if ctx.cfg.search.size_objective else [])


def open_study(ctx: SearchContext) -> optuna.Study:
    """Create or resume the study; refuse to mix trials from a different search space."""
    url = storage_url(ctx)
    name = ctx.cfg.search.study_name or "autoprune"

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


def enqueue_seeds(study: optuna.Study, ctx: SearchContext) -> None:
    """On a fresh study, enqueue the seed plans: strong, cheap starting points."""
    if study.trials:
        return
    for params in seed_plans(ctx):
        study.enqueue_trial(params, skip_if_exists=True)


def requeue_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retries: int = 2) -> None:
    """Re-run a trial whose worker died, with the same parameters, at most ``max_retries``
    (``search.max_retries``) times; only parameters are copied (workers.requeue).

    The storage's ``heartbeat_stale_trial_callback``: Optuna's ``fail_stale_trials`` calls it
    for the stale trials it fails itself (inside ``study.optimize``; the workers' own check,
    which also records a ``fail_reason``, usually gets there first). Not Optuna's
    ``RetryHeartbeatStaleTrialCallback``: see workers.requeue for why.
    """

    requeue(study, trial, max_retries, "worker died (heartbeat stopped)")


def _fail_stale_local_trials(study: optuna.Study, max_retries: int = 2) -> int:
    """With the run-folder lock held nobody else runs this study, so RUNNING trials are leftovers
    of a killed process: mark them failed and re-queue their parameters."""

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        # fail_running_trial records the reason first: a finished trial is read-only.
        if fail_running_trial(study, t.number, "worker died (found RUNNING at restart)"):
            requeue(study, t, max_retries, "worker died (found RUNNING at restart)")
    return len(stale)


@contextlib.contextmanager
def run_lock(run: RunFolder) -> Iterator[bool]:
    """An exclusive lock on the run folder for the single-machine (SQLite) default."""
    run.root.mkdir(parents=True, exist_ok=True)
    fh = open(run.lock, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigError(f"{run.root}: another autoprune search is running in this folder (lock {run.lock})") from None
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

    if len(completed(study)) >= ctx.cfg.search.trials:
        return
    work(
        study, storage_url(ctx), ctx.cfg.search.study_name or "autoprune", ctx.cfg.search,
        lambda t: run_trial(t, ctx), lambda seed: _sampler(ctx, seed), ctx.out, [progress] if progress else [],
        setup=lambda: enqueue_seeds(study, ctx),
    )
