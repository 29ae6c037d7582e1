"""The study: sampler, resume check, seed trials, and the loop that runs trials.

The study lives in SQLite inside the run folder unless ``search.storage`` names another Optuna
storage (PostgreSQL for several workers). Re-running the same command resumes it; a config that
would score trials differently is refused (``search_hash``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from autoprune.config import (
    DEFAULT_ROUND_TO,
    DeviceProfile,
    RunConfig,
    SearchSpace,
    added_defaults,
    config_hash,
    resume_keys,
)
from autoprune.errors import ConfigError
from autoprune.files import file_lock
from autoprune.runfolder import RunFolder
from autoprune.study import screen
from autoprune.study.context import SearchContext
from autoprune.study.space import seed_trials
from autoprune.study.storage import (
    check_base_model,
    fail_running_trial,
    make_storage,
    public_config,
    redact_url,
    storage_error,
)
from autoprune.study.tracking import MlflowLogger
from autoprune.study.trial import DIRECTIONS, OBJECTIVES, run_trial
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


#: Which keys do not refuse a resume is marked on the config fields themselves
#: (:mod:`autoprune.config.base`); these lists are derived from the schema.
#:
#: Run-config keys that do not change how a trial is scored (``resume("free")``), so a study
#: resumes across changes to them: where the run folder and storage are and how long to search;
#: worker runtime settings; which trials the sampler proposes next (every finished trial is
#: scored the same either way); and the final stage, which runs after the trials on the Pareto
#: models. Everything else (model, data, pretrain budget, fine-tune, seeds, efficiency settings
#: that change a trial's accuracy, exporter) stays in the hash.
NOT_SCORING_KEYS = resume_keys(RunConfig, "free")
#: Run-config keys left out of the hash altogether (``resume("runtime")``, not even as null):
#: machine and logging settings added after studies existed, so studies made before them keep
#: their hash. The ``train`` section says where and in which precision this worker trains
#: (workers of one study may train on a GPU and on a CPU); ``search.mlflow`` where trials are logged.
RUNTIME_KEYS = resume_keys(RunConfig, "runtime")
#: Device-profile keys that only say how to reach a remote latency server, not what it measures.
NOT_SCORING_PROFILE_KEYS = resume_keys(DeviceProfile, "free")
#: Version of :func:`search_hash` stored next to it; studies without it hold the hash of
#: :func:`_legacy_search_hash` and are upgraded when that one matches.
SEARCH_HASH_VERSION = 2
#: Keys added after studies were first stored (``added(default)``), with the value that scores
#: trials as before they existed: left out of the hash at that value, so older studies still resume.
ADDED_KEY_DEFAULTS = added_defaults(RunConfig)
#: The same for search-space and device-profile keys.
ADDED_SPACE_DEFAULTS = added_defaults(SearchSpace)
ADDED_PROFILE_DEFAULTS = added_defaults(DeviceProfile)


def _without_added_defaults(cfg: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``cfg`` (a dump, changed in place) without the keys added later that hold their default."""
    for key, default in (ADDED_KEY_DEFAULTS if defaults is None else defaults).items():
        *heads, last = key.split(".")
        d: Any = cfg
        for part in heads:
            d = d.get(part, {}) if isinstance(d, dict) else {}
        if isinstance(d, dict) and last in d and d[last] == default:
            del d[last]
    return cfg


def _space_dump(ctx: SearchContext) -> dict[str, Any]:
    """The search space as hashed and compared (:func:`_comparable_space`)."""
    return _comparable_space(ctx.space.model_dump(mode="json"), ctx.cfg.efficiency.staircases)


def _comparable_space(space: dict[str, Any], staircases: bool) -> dict[str, Any]:
    """A search-space dump (changed in place) without keys added at their defaults, and with
    ``round_to: auto`` written as 8 when no staircases are measured: it rounds to the same
    multiples as the old default ``round_to: 8``."""
    space = _without_added_defaults(space, ADDED_SPACE_DEFAULTS)
    if space.get("round_to") is None and not staircases:
        space["round_to"] = DEFAULT_ROUND_TO
    return space


def _get(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return None if d == {} else d


def _put(d: dict[str, Any], key: str, value: Any) -> None:
    *heads, last = key.split(".")
    for part in heads:
        d = d.setdefault(part, {})
    d[last] = value


def _without_runtime_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a config dump, changed in place) without :data:`RUNTIME_KEYS`."""
    for key in RUNTIME_KEYS:
        *heads, last = key.split(".")
        d: Any = cfg
        for part in heads:
            d = d.get(part, {}) if isinstance(d, dict) else {}
        if isinstance(d, dict):
            d.pop(last, None)
    return cfg


def _groups_hash(ctx: SearchContext) -> str:
    groups = json.dumps([(g.name, g.low, g.high, g.methods) for g in ctx.groups])
    return hashlib.sha256(groups.encode()).hexdigest()[:8]


def search_hash(ctx: SearchContext) -> str:
    """What must not change between resumes: the space, the profile, and how trials are scored
    (everything but :data:`NOT_SCORING_KEYS`)."""
    cfg = _without_added_defaults(_without_runtime_keys(ctx.cfg.model_dump(mode="json")))
    for key in NOT_SCORING_KEYS:
        _put(cfg, key, None)
    prof = _without_added_defaults(ctx.profile.model_dump(mode="json"), ADDED_PROFILE_DEFAULTS)
    for key in NOT_SCORING_PROFILE_KEYS:
        prof[key] = None
    return config_hash(cfg, _space_dump(ctx), prof) + ":" + _groups_hash(ctx)


def _legacy_search_hash(ctx: SearchContext, stored_cfg: dict[str, Any], stored_profile: dict[str, Any]) -> str:
    """The hash studies made before :data:`SEARCH_HASH_VERSION` 2 stored, with the keys that
    version hashed but this one ignores taken from the study's stored config: it matches when
    only those keys changed, so such a study resumes (and is upgraded) like a new one."""
    cfg = _without_added_defaults(_without_runtime_keys(ctx.cfg.model_dump(mode="json")))
    legacy_fixed = {"out": "", "search.trials": 1, "search.timeout_s": None, "search.storage": None,
                    "search.heartbeat_interval": 10, "search.grace_period": 30, "search.max_retries": 2}
    for key in NOT_SCORING_KEYS:
        _put(cfg, key, legacy_fixed[key] if key in legacy_fixed else _get(stored_cfg, key))
    if cfg.get("pretrain_steps") is not None:
        # Those studies stored a pretrain_seconds that the step budget made irrelevant.
        cfg["pretrain_seconds"] = stored_cfg.get("pretrain_seconds")
    prof = _without_added_defaults(ctx.profile.model_dump(mode="json"), ADDED_PROFILE_DEFAULTS)
    for key in NOT_SCORING_PROFILE_KEYS:
        prof[key] = stored_profile.get(key)
    return config_hash(cfg, _space_dump(ctx), prof) + ":" + _groups_hash(ctx)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def _scoring_changes(study: optuna.Study, ctx: SearchContext, limit: int = 6) -> list[str]:
    """``key: stored -> now`` for the scoring settings that differ from the study's stored ones,
    so a refused resume says what to change back."""
    # With a step budget pretrain_seconds is unused (older studies stored a number there anyway).
    unused = ("pretrain_seconds",) if ctx.cfg.pretrain_steps is not None else ()
    # Keys added since a study was made count as unchanged at their defaults, as in the hash.
    pairs = [
        ("", _without_added_defaults(copy.deepcopy(study.user_attrs.get("config") or {})), _without_added_defaults(public_config(ctx.cfg)),
         NOT_SCORING_KEYS + unused + RUNTIME_KEYS),
        ("search space ", _comparable_space(copy.deepcopy(study.user_attrs.get("search_space") or {}),
                                            bool(_get(study.user_attrs.get("config") or {}, "efficiency.staircases"))),
         _space_dump(ctx), ()),
        ("device profile ", _without_added_defaults(copy.deepcopy(study.user_attrs.get("device_profile") or {}), ADDED_PROFILE_DEFAULTS),
         _without_added_defaults(ctx.profile.model_dump(mode="json"), ADDED_PROFILE_DEFAULTS), NOT_SCORING_PROFILE_KEYS),
    ]
    changes = []
    for label, old, new, ignore in pairs:
        a, b = _flat(old), _flat(new)
        for key in sorted(set(a) | set(b)):
            ignored = any(key == i or key.startswith(i + ".") for i in ignore)  # "train" covers train.*
            if not ignored and a.get(key, "(absent)") != b.get(key, "(absent)"):
                changes.append(f"{label}{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}")
    if not changes and study.user_attrs.get("groups") != [g.name for g in ctx.groups]:
        changes.append("the model's prunable groups")
    return changes[:limit] + ([f"and {len(changes) - limit} more"] if len(changes) > limit else [])


def storage_url(ctx: SearchContext) -> str:
    return ctx.cfg.search.storage or f"sqlite:///{ctx.run.study_db.resolve()}"


def study_directions(ctx: SearchContext) -> list[str]:
    """(accuracy ↑, latency ↓), plus gzip size ↓ when ``search.size_objective`` is on."""
    return list(DIRECTIONS) + (["minimize"] if ctx.cfg.search.size_objective else [])


def open_study(ctx: SearchContext) -> optuna.Study:
    """Create or resume the study; refuse to mix trials from a different search space."""
    url = storage_url(ctx)
    name = ctx.cfg.search.study_name or "autoprune"

    shown = redact_url(url)  # never print a password
    try:
        retries = ctx.cfg.search.max_retries
        # The run folder's own study.db is opened under the run lock: an unfinished one can go.
        storage = make_storage(url, ctx.cfg.search, lambda st, t: _requeue_trial(st, t, retries),
                               discard_unfinished=ctx.cfg.search.storage is None)
        study = optuna.create_study(
            storage=storage, study_name=name, directions=study_directions(ctx), sampler=_sampler(ctx), load_if_exists=True
        )
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/optuna raise many types for a bad file
        hint = (" It is not an Optuna SQLite database (corrupt, or another program's file): restore it from a backup,"
                " or use another --out.") if url.startswith("sqlite") else " Check the URL, that the server runs, and the user's rights."
        raise ConfigError(f"storage {shown}: cannot open an Optuna study there ({storage_error(exc, url)}).{hint}") from None
    if [d.name.lower() for d in study.directions] != study_directions(ctx):
        raise ConfigError(f"storage {shown}: study {name!r} has other objectives; use another --out or --study-name")
    h = search_hash(ctx)
    stored = study.user_attrs.get("search_hash")
    if stored is not None and study.user_attrs.get("search_hash_version") != SEARCH_HASH_VERSION:
        legacy = _legacy_search_hash(ctx, study.user_attrs.get("config") or {}, study.user_attrs.get("device_profile") or {})
        if stored == legacy:  # an older autoprune's study, same scoring: continue under the new hash
            study.set_user_attr("search_hash", h)
            study.set_user_attr("search_hash_version", SEARCH_HASH_VERSION)
            stored = h
    if stored is None:
        study.set_user_attr("search_hash", h)
        study.set_user_attr("search_hash_version", SEARCH_HASH_VERSION)
        study.set_user_attr("dense", ctx.dense)
        study.set_user_attr("groups", [g.name for g in ctx.groups])
        study.set_user_attr("config", public_config(ctx.cfg))  # no storage password
        study.set_user_attr("search_space", ctx.space.model_dump(mode="json"))
        study.set_user_attr("device_profile", ctx.profile.model_dump(mode="json"))
    elif stored != h:
        changed = "; ".join(_scoring_changes(study, ctx))
        raise ConfigError(
            f"{ctx.out}: the study there was made with a different model, data, search space, device profile or "
            f"fine-tune settings{f' (changed: {changed})' if changed else ''}; finished trials would not be comparable. "
            "Use a new --out (or --study-name), or the same settings as before."
        )
    check_base_model(study, ctx.base, ctx.out)
    return study


def enqueue_seeds(study: optuna.Study, ctx: SearchContext) -> None:
    """On a fresh study, enqueue the seed plans: strong, cheap starting points.

    Never more than ``search.trials`` of them: a seed beyond the trial budget is never run and
    would stay in the study as a WAITING trial (shown by the dashboard and Optuna's tools) after
    the search finished. With fewer trials than seeds, seeds spread evenly over the ordered list
    are kept, so the first trials still span the latency range (or the budget targets).
    """
    if ctx.cfg.search.screen is not None:
        # Screening: the seeds are screened with the probes and the sampler's proposals; what the
        # main study runs are the best screened candidates, with their exact parameters.
        _screen_and_pick(study, ctx)
        return
    if study.trials:
        return
    for params, attrs in spread(seed_trials(ctx), ctx.cfg.search.trials):
        study.enqueue_trial(params, user_attrs=attrs or None, skip_if_exists=True)


def _screen_and_pick(study: optuna.Study, ctx: SearchContext) -> None:
    """``search.screen``: screen (resuming a screen study left unfinished), then enqueue the
    picks into ``study``, once per study (study/screen.py)."""
    url = storage_url(ctx)
    if screen.open_screen_study(ctx, url).user_attrs.get(screen.PICKED_ATTR):
        return
    n = screen.enqueue_picks(ctx, study, screen.screen(ctx, url))
    log.info("screening: %d screened candidates enqueued to be fine-tuned and measured", n)


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` (all of them when ``n`` >= their number), evenly spaced, ends included."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _requeue_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retries: int = 2) -> None:
    """Re-run a trial whose worker died, with the same parameters, at most ``max_retries``
    (``search.max_retries``) times; only parameters are copied (workers.requeue).

    The storage's ``heartbeat_stale_trial_callback``: Optuna's ``fail_stale_trials`` calls it
    for the stale trials it fails itself (inside ``study.optimize``; the workers' own check,
    which also records a ``fail_reason``, usually gets there first). Not Optuna's
    ``RetryHeartbeatStaleTrialCallback``: see workers.requeue for why.
    """

    requeue(study, trial, max_retries, "worker died (heartbeat stopped)")


def fail_stale_local_trials(study: optuna.Study, max_retries: int = 2) -> int:
    """With the run-folder lock held nobody else runs this study, so RUNNING trials are leftovers
    of a killed process: mark them failed and re-queue their parameters."""

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        # fail_running_trial records the reason first: a finished trial is read-only.
        if fail_running_trial(study, t.number, "worker died (found RUNNING at restart)"):
            requeue(study, t, max_retries, "worker died (found RUNNING at restart)")
    return len(stale)


def run_lock(run: RunFolder) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on the run folder for the single-machine (SQLite) default; it does not
    wait: a second search in the folder is refused at once. No ``.lock`` stays once it ends."""
    return file_lock(run.lock, busy=f"{run.root}: another autoprune search is running in this folder (lock {run.lock})")


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def optimize(ctx: SearchContext, study: optuna.Study, progress: Optional[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = None) -> None:
    """Run trials until the study holds ``trials`` complete ones (across all workers); see
    :mod:`autoprune.workers` for how workers share the study, retries and failures."""

    if len(completed(study)) >= ctx.cfg.search.trials:
        return
    callbacks = [progress] if progress else []
    if ctx.cfg.search.mlflow:
        callbacks.append(MlflowLogger(ctx.cfg.search.mlflow, f"autoprune/{study.study_name}", ctx.run,
                                      tuple(OBJECTIVES) + (("onnx_gzip_bytes",) if ctx.cfg.search.size_objective else ())))
    work(
        study, storage_url(ctx), ctx.cfg.search.study_name or "autoprune", ctx.cfg.search,
        lambda t: run_trial(t, ctx), lambda seed: _sampler(ctx, seed), ctx.out, callbacks,
        setup=lambda: enqueue_seeds(study, ctx),
    )
    if ctx.cfg.search.screen is not None:
        # How well the screen ranked what it chose: stored for reports, said once.
        fidelity = screen.screen_vs_final(study)
        study.set_user_attr("screen_vs_final", fidelity)
        if fidelity["tau"] is not None:
            log.info("screening: Kendall tau of screen score vs fine-tuned accuracy %.2f over %d trials", fidelity["tau"], fidelity["n"])
