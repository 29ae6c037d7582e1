"""Screening (``search.screen``): many candidates scored cheaply, only the best fine-tuned.

A fine-tuned trial costs tens of training steps, so a session sees a few dozen of them, about
as many as random sampling does; no sampler is much smarter than random on 30 points. Screening
is EagleEye's adaptive-BN evaluation: a candidate is the dense model sliced through the run's
dependency groups (``prune/plan.py::apply_plan_from``), its BatchNorm statistics re-estimated
on a few training batches, and it is scored on the fixed held-out subset (``val_samples``)
with no fine-tune. That ranks pruned models by their accuracy after fine-tuning well enough to
choose which ones deserve it (EagleEye reports a strong correlation; ``screen_vs_final``
measures it on each run), at the cost of a few forward passes.

Screened candidates are trials of a second study in the same storage, named
``<study>:screen``, with the objectives (screen score ↑, latency as a ratio to dense ↓): a
resumed search and other workers see them, and a crash mid-screening loses at most the
candidate in flight. Latency comes from the latency predictor (measure/predictor.py) when it is
calibrated, else from the analytic MACs model of budget mode (study/budget.py), always as a
ratio of two predictions (candidate / dense), so a loaded machine moves neither.

What the screen study records is exactly the evaluated model. In budget mode a proposal is
repaired onto its target by one shift of all its ratios (keeping its shape); when that moved
anything, the proposal is told FAIL (samplers ignore failed trials) and the repaired parameters
are added as the COMPLETE trial, with the proposal's number as ``proposal``.

The first screened candidates are the per-group probes (each group pruned alone): their drops
are the sensitivity priors, so no separate scan runs. Then the seed plans, then the sampler.
The best ``finetune_top_k`` (per target, or along the screened front) are enqueued into the
main study with their exact parameters and become ordinary, fine-tuned and measured trials.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from typing import Any, Callable, Optional

import numpy as np
import optuna
import torch
import torch.nn as nn
from optuna.trial import TrialState

from autoprune.config import ScreenSettings
from autoprune.measure.onnx import cpu_fp32
from autoprune.measure.predictor import LatencyPredictor, model_features
from autoprune.measure.stats import latency_ms
from autoprune.prune.plan import PruningPlan, apply_plan, apply_plan_from
from autoprune.files import atomic_write_text
from autoprune.study.budget import LatencyModel, reachable, shift_to_target, shifted
from autoprune.study.context import SearchContext
from autoprune.study.space import RATIO_PREFIX, _grid_snap, _snap, _group_step, seed_plans, seed_trials, suggest_plan
from autoprune.study.trial import architecture_key
from autoprune.train.bn import recalibrate_bn
from autoprune.train.device import batches_to, model_device
from autoprune.train.models import evaluate

log = logging.getLogger("autoprune")

SCREEN_SUFFIX = ":screen"
SCREEN_DIRECTIONS = ("maximize", "minimize")
#: Study attribute set once the picks are in the main study: a resume does not pick again.
PICKED_ATTR = "picked"
#: With ``search.timeout_s``, screening stops after this share of it (the fine-tunes need the rest).
TIME_SHARE = 0.5
#: Proposals per wanted candidate before screening stops (samplers re-propose screened models).
MAX_ATTEMPTS_PER_CANDIDATE = 3


# --------------------------------------------------------------------------- evaluating one candidate
class Screener:
    """Builds, BN-recalibrates and scores candidates of one run; estimates their latency ratio."""

    def __init__(self, ctx: SearchContext, settings: ScreenSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        dev = model_device(ctx.base)
        self.calib = batches_to(self._train_batches(settings.bn_batches), dev)
        self.lm = ctx.latency_model or LatencyModel.of(ctx.base, ctx.example, ctx.groups, ctx.space.round_unit, ctx.widths)
        self.line = self.lm.line()
        self.dense_ms_model = self.lm.ms({}, self.line)
        self.predictor = LatencyPredictor.for_run(ctx.run, ctx.profile) if ctx.profile.lut else None
        self._dense_pred: Optional[float] = None

    def _train_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The run's calibration batches, topped up from the same seeded loader when more are asked."""
        have = list(self.ctx.calib[:n])
        if len(have) < n:
            loader = self.ctx.data.loader("train", self.ctx.cfg.finetune.batch_size, shuffle=True, seed=self.ctx.cfg.search.seed)
            have = [b for _, b in zip(range(n), loader)]
        return have

    def plan(self, params: dict[str, Any]) -> PruningPlan:
        """The plan the parameters describe, exactly as a trial of the main study builds it."""
        return suggest_plan(optuna.trial.FixedTrial(params), self.ctx)

    def build(self, plan: PruningPlan) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
        """The pruned copy (cheap path; the traced path for plans it does not cover), BN
        re-estimated on the screen's batches. Nothing else is trained."""
        ctx = self.ctx
        model = copy.deepcopy(ctx.base)
        widths = apply_plan_from(model, ctx.base, ctx.dense_structure(), plan)
        if widths is None:
            widths = apply_plan(model, ctx.example1.to(model_device(model)), plan, ctx.data.num_classes, self.calib)
        recalibrate_bn(model, self.calib, ctx.train)
        return model, widths

    def score(self, model: nn.Module) -> float:
        """The metric on the fixed held-out subset the main trials are scored on (``split=search``)."""
        return float(evaluate(model, self.ctx.data, max_batches=self.settings.eval_batches, split="search", setup=self.ctx.train,
                              task=self.ctx.task))

    def macs_ratio(self, ratios: dict[str, float]) -> float:
        """Predicted latency / predicted dense latency by the analytic MACs model (budget mode's
        line when fitted): a function of the ratios alone, so a proposal can be repaired with it."""
        return self.lm.ms(ratios, self.line) / max(self.dense_ms_model, 1e-12)

    def latency_ratio(self, model: nn.Module, ratios: dict[str, float]) -> tuple[float, str]:
        """(latency ÷ dense latency, source): the calibrated predictor's two predictions when it is
        ready, else :meth:`macs_ratio`."""
        if self.predictor is not None and self.predictor.ready:
            example = self.ctx.example
            if self._dense_pred is None:
                self._dense_pred = self.predictor.predict(model_features(cpu_fp32(self.ctx.base), example))
            pred = self.predictor.predict(model_features(cpu_fp32(model), example))
            if pred is not None and self._dense_pred:
                return pred / self._dense_pred, "predictor"
        return self.macs_ratio(ratios), "macs"

    def evaluate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Screen one parameter set: its score, latency ratio, widths and architecture key."""
        t0 = time.perf_counter()
        plan = self.plan(params)
        model, widths = self.build(plan)
        score = self.score(model)
        ratio, source = self.latency_ratio(model, plan.ratios)
        return {"score": score, "latency_ratio": ratio, "latency_source": source, "arch_key": architecture_key(widths, plan),
                "widths": {k: list(v) for k, v in widths.items()}, "screen_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- the screen study
def _screen_study_name(ctx: SearchContext) -> str:
    return (ctx.cfg.search.study_name or "autoprune") + SCREEN_SUFFIX


def _sampler(ctx: SearchContext, n: int) -> optuna.samplers.BaseSampler:
    """The run's sampler kind, seeded like the main study, sized for ``n`` screened candidates."""
    s = ctx.cfg.search
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=s.population_size or max(8, min(50, n // 8)), seed=s.seed)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, n_startup_trials=max(10, n // 10))
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed)
    return optuna.samplers.RandomSampler(seed=s.seed)


def open_screen_study(ctx: SearchContext, url: str) -> optuna.Study:
    """The screen study beside the main one (same storage: resume and workers see it)."""
    n = ctx.cfg.search.screen.candidates if ctx.cfg.search.screen else 1
    return optuna.create_study(storage=url, study_name=_screen_study_name(ctx), directions=list(SCREEN_DIRECTIONS),
                               sampler=_sampler(ctx, n), load_if_exists=True)


def screened(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _targets(ctx: SearchContext) -> list[float]:
    """Budget mode's targets as speed-ups over dense (loosest first); empty otherwise."""
    dense_ms = latency_ms(ctx.dense["latency"])
    return sorted({dense_ms / t for t in ctx.targets_ms})


def _constraints(ratio: float, speedup: Optional[float]) -> dict[str, float]:
    """≤ 0 feasible: the predicted latency ratio within the target's (front mode: always feasible)."""
    return {"latency_ratio": ratio * speedup - 1.0 if speedup else -1.0}


def _free_params(ctx: SearchContext, ratios: dict[str, float]) -> dict[str, float]:
    return {RATIO_PREFIX + g.name: ratios[g.name] for g in ctx.groups if g.low != g.high}


def _record(study: optuna.Study, params: dict[str, Any], dists: dict[str, Any], res: dict[str, Any], attrs: dict[str, Any],
            speedup: Optional[float]) -> None:
    """Add one evaluated candidate as a COMPLETE trial holding exactly its parameters."""
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=dists, values=[res["score"], res["latency_ratio"]],
        constraints=_constraints(res["latency_ratio"], speedup), user_attrs={**attrs, **res}))


def _probes(ctx: SearchContext) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The per-group probes: each group alone at ``efficiency.sensitivity_ratio`` (snapped to its
    range and grid), every other at its lower bound. What the sensitivity scan measured, now the
    first screened candidates."""
    sp = ctx.space
    free = [g for g in ctx.groups if g.low != g.high]
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if ctx.cfg.efficiency.sensitivity_scan:
        low = {RATIO_PREFIX + h.name: _snap(h.low, h.low, h.high, _group_step(sp, h)) for h in free}
        for g in free:
            r = _snap(ctx.cfg.efficiency.sensitivity_ratio, g.low, g.high, _group_step(sp, g))
            if r > g.low:
                out.append(({**low, RATIO_PREFIX + g.name: r}, {"probe": g.name}))
    return out


def _seeds(ctx: SearchContext) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The seed plans (uniform levels and sensitivity-allocated twins; per target in budget mode)."""
    if ctx.targets_ms and ctx.latency_model is not None:
        return [(p, {"seed": a.get("seed", "seed"), "target_ms": a["target_ms"]}) for p, a in seed_trials(ctx)]
    return [(p, {"seed": "uniform"}) for p in seed_plans(ctx)]


def _enqueue_once(study: optuna.Study, attr: str, items: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Enqueue fixed candidates once per screen study (a resume finds them queued or done)."""
    if study.user_attrs.get(attr):
        return
    for params, attrs in items:
        study.enqueue_trial(params, user_attrs={**attrs, "fixed": True}, skip_if_exists=True)
    study.set_user_attr(attr, True)


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def screen(ctx: SearchContext, url: str, say: Optional[Callable[[str], None]] = None) -> optuna.Study:
    """Screen until the screen study holds ``candidates`` COMPLETE trials, resuming where a
    previous session stopped; fills ``ctx.sensitivity`` from the probes. Returns the study."""
    say = say or log.info
    settings = ctx.cfg.search.screen
    assert settings is not None
    study = open_screen_study(ctx, url)
    if ctx.cfg.search.storage is None:
        # The run folder's own storage, opened under its lock: RUNNING trials are a killed
        # session's. Fail them; fixed ones (probes, seeds) are queued again.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            if t.user_attrs.get("fixed"):
                study.enqueue_trial(dict(t.params), user_attrs=dict(t.user_attrs))
    scr = Screener(ctx, settings)
    speedups = _targets(ctx)
    keys = {t.user_attrs.get("arch_key"): t.number for t in screened(study)}
    t0 = time.perf_counter()
    n0 = len(keys)
    if n0 < settings.candidates:
        say(f"screening: {n0}/{settings.candidates} candidates screened so far; each is pruned, its BatchNorm re-estimated "
            f"on {settings.bn_batches} batches and scored on the held-out subset, without fine-tune")
    ref = study.user_attrs.get("dense_score")
    if ref is None:  # the dense model with the same BN re-estimation: what the probes' drops compare with
        model = copy.deepcopy(ctx.base)
        recalibrate_bn(model, scr.calib, ctx.train)
        ref = scr.score(model)
        study.set_user_attr("dense_score", ref)

    # 1. The per-group probes; their drops are the sensitivity priors (no separate scan).
    _enqueue_once(study, "probes_enqueued", _probes(ctx))
    while _waiting(study):
        _screen_one(ctx, study, scr, keys, speedups)
    probes = {t.user_attrs["probe"]: t for t in screened(study) if "probe" in t.user_attrs}
    if probes:
        ctx.sensitivity = {g: float(ref) - float(t.values[0]) for g, t in probes.items()}
        ctx.savings = {g: max(0.0, 1.0 - scr.macs_ratio({g: float(t.params[RATIO_PREFIX + g])})) for g, t in probes.items()}
        atomic_write_text(ctx.run.sensitivity, json.dumps(ctx.sensitivity, indent=2))
    # 2. The seed plans, then 3. the sampler's proposals, repaired onto their targets.
    _enqueue_once(study, "seeds_enqueued", _seeds(ctx))
    attempts = 0
    timeout = ctx.cfg.search.timeout_s
    deadline = time.perf_counter() + TIME_SHARE * timeout if timeout else math.inf
    while ((_waiting(study) or len(keys) < settings.candidates) and attempts < MAX_ATTEMPTS_PER_CANDIDATE * settings.candidates
           and time.perf_counter() < deadline):
        attempts += 1
        _screen_one(ctx, study, scr, keys, speedups)
        if len(keys) % 50 == 0 and len(keys) > n0:
            say(f"screening: {len(keys)}/{settings.candidates} screened, {time.perf_counter() - t0:.0f}s")
    say(f"screening: {len(keys)} candidates screened ({len(keys) - n0} in {time.perf_counter() - t0:.0f}s)")
    return study


def _screen_one(ctx: SearchContext, study: optuna.Study, scr: Screener, keys: dict[Any, int], speedups: list[float]) -> None:
    """One candidate: the next queued one (probe, seed: exact) or the sampler's proposal
    (budget mode: repaired onto its target keeping its shape), screened and recorded exactly."""
    trial = study.ask()
    fixed = bool(trial.user_attrs.get("fixed"))
    try:
        plan = suggest_plan(trial, ctx)
        params, dists = dict(trial.params), dict(trial.distributions)
        speedup: Optional[float] = None
        if speedups:
            target_ms = trial.user_attrs.get("target_ms")
            if target_ms:
                speedup = latency_ms(ctx.dense["latency"]) / float(target_ms)
            elif fixed:
                speedup = max(speedups)  # probes: scored against the tightest target
            else:
                fastest = scr.macs_ratio({g.name: g.high for g in ctx.groups})
                aims = [s for s in speedups if 1.0 / s >= fastest] or [min(speedups)]
                speedup = aims[trial.number % len(aims)]
            if not fixed:
                free = [g for g in ctx.groups if g.low != g.high]
                snap = _grid_snap(ctx.space)
                shift = shift_to_target(plan.ratios, free, scr.lm, scr.dense_ms_model / speedup, snap, scr.line)
                params.update(_free_params(ctx, shifted(plan.ratios, free, shift, snap)))
        res = scr.evaluate(params)
    except Exception as exc:  # noqa: BLE001 - one broken candidate never stops screening
        trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        study.tell(trial, state=TrialState.FAIL)
        return
    attrs = {"target_speedup": speedup}
    if res["arch_key"] in keys:
        trial.set_user_attr("duplicate_of", keys[res["arch_key"]])
        study.tell(trial, state=TrialState.FAIL)  # nothing new: samplers ignore failed trials
        return
    if params != trial.params:
        # Moved onto its target: the sampler learns from the model evaluated, not the proposal.
        trial.set_user_attr("repaired", True)
        study.tell(trial, state=TrialState.FAIL)
        _record(study, params, dists, res, {**attrs, "proposal": trial.number}, speedup)
        keys[res["arch_key"]] = study.get_trials(deepcopy=False)[-1].number
        return
    for k, v in {**attrs, **res}.items():
        trial.set_user_attr(k, v)
    for k, v in _constraints(res["latency_ratio"], speedup).items():
        trial.set_constraint(k, v)
    study.tell(trial, [res["score"], res["latency_ratio"]])
    keys[res["arch_key"]] = trial.number


# --------------------------------------------------------------------------- choosing what to fine-tune
def _feasible(t: optuna.trial.FrozenTrial, speedup: float) -> bool:
    return float(t.values[1]) * speedup <= 1.0 + 1e-9


def _front_ranks(points: np.ndarray) -> np.ndarray:
    """Non-dominated sorting rank (0 = front) of (score ↑, latency ↓) points."""
    n = len(points)
    rank = np.full(n, -1)
    left = set(range(n))
    r = 0
    while left:
        front = [i for i in left if not any(
            points[j, 0] >= points[i, 0] and points[j, 1] <= points[i, 1] and (points[j, 0] > points[i, 0] or points[j, 1] < points[i, 1])
            for j in left)]
        for i in front:
            rank[i] = r
        left -= set(front)
        r += 1
    return rank


def picks(ctx: SearchContext, study: optuna.Study) -> list[tuple[optuna.trial.FrozenTrial, Optional[float]]]:
    """The screened candidates to fine-tune, with the speed-up target each is for (None: front mode).

    Budget mode: the ``finetune_top_k`` best screen scores among those predicted to meet each
    target (tightest target first). Front mode: ``finetune_top_k`` spread evenly over latency
    along the screened front (then the next fronts when the first is shorter)."""
    settings = ctx.cfg.search.screen
    assert settings is not None
    done = [t for t in screened(study) if t.values and all(math.isfinite(v) for v in t.values)]
    speedups = _targets(ctx)
    budget = ctx.cfg.search.trials
    out: list[tuple[optuna.trial.FrozenTrial, Optional[float]]] = []
    seen: set[str] = set()
    if speedups:
        k = settings.finetune_top_k or max(1, budget // len(speedups))
        per: dict[float, list[optuna.trial.FrozenTrial]] = {}
        for s in sorted(speedups, reverse=True):
            ok = sorted((t for t in done if _feasible(t, s)), key=lambda t: -float(t.values[0]))
            per[s] = []
            for t in ok:
                if len(per[s]) >= k:
                    break
                if t.user_attrs.get("arch_key") not in seen:
                    seen.add(t.user_attrs.get("arch_key"))
                    per[s].append(t)
        # Round-robin over the targets by rank: cut to ``search.trials``, every target keeps its best.
        for i in range(k):
            out += [(per[s][i], s) for s in per if i < len(per[s])]
        return out[:budget]
    k = min(settings.finetune_top_k or budget, budget)
    if not done:
        return []
    pts = np.array([[float(t.values[0]), float(t.values[1])] for t in done])
    rank = _front_ranks(pts)
    chosen: list[optuna.trial.FrozenTrial] = []
    for r in range(int(rank.max()) + 1):
        layer = sorted((done[i] for i in np.flatnonzero(rank == r)), key=lambda t: float(t.values[1]))
        need = k - len(chosen)
        if need <= 0:
            break
        chosen += _spread(layer, need)
    return [(t, None) for t in chosen]


def _spread(items: list[Any], n: int) -> list[Any]:
    """``n`` of ``items`` evenly spaced, ends included (all when there are no more than ``n``)."""
    if n >= len(items):
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def enqueue_picks(ctx: SearchContext, main: optuna.Study, study: optuna.Study) -> int:
    """Enqueue the picks into the main study with their exact parameters (no shift: ``budget_shift``
    0); they are fine-tuned and measured on the target as ordinary trials. Once per study."""
    if study.user_attrs.get(PICKED_ATTR):
        return 0
    dense_ms = latency_ms(ctx.dense["latency"])
    chosen = picks(ctx, study)
    for t, s in chosen:
        attrs: dict[str, Any] = {"screen_trial": t.number, "screen_score": float(t.values[0]),
                                 "screen_latency_ratio": float(t.values[1])}
        if s is not None:
            attrs.update(target_ms=dense_ms / s, budget_shift=0.0)
        main.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=True)
    study.set_user_attr(PICKED_ATTR, True)
    return len(chosen)


def screen_vs_final(main: optuna.Study) -> dict[str, Any]:
    """Kendall's τ of screen score against the fine-tuned accuracy over the main study's COMPLETE
    trials that came from screening: how well screening ranked what it chose."""
    from scipy.stats import kendalltau

    pairs = [(float(t.user_attrs["screen_score"]), float(t.values[0])) for t in main.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if "screen_score" in t.user_attrs and t.values]
    if len(pairs) < 3:
        return {"n": len(pairs), "tau": None}
    tau = kendalltau([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return {"n": len(pairs), "tau": None if not math.isfinite(tau) else float(tau)}
