"""What a search prepares once per run folder and shares with every trial.

Config files, data, the dense model (trained first when no weights were given), the prunable
groups with their search-space ranges, the calibration batches, the sensitivity priors, and the
dense model's own measurement on the target (``dense.json``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from autoprune.config import (
    DeviceProfile,
    RunConfig,
    SearchSpace,
    load_device_profile,
    load_search_space,
)
from autoprune.errors import ConfigError
from autoprune.measure import backends
from autoprune.measure.candidate import measure_model
from autoprune.measure.onnx import cpu_fp32
from autoprune.measure.onnx_slice import OnnxSlicer, slicer_for
from autoprune.measure.staircase import (
    fingerprint,
    fingerprint_key,
    learned_widths,
    load_or_measure,
)
from autoprune.outputs import train_only_modules
from autoprune.prune.plan import PruningPlan, apply_plan, apply_plan_from, check_prunable
from autoprune.prune.structure import PrunableGroup, Structure, analyse, apply_rules, find_groups, probe_structure
from autoprune.files import atomic_write_text
from autoprune.runfolder import RunFolder
from autoprune.study.budget import LatencyModel, calibrate, reachable, targets_ms
from autoprune.study.priors import (
    flops_savings,
    load_or_compute,
    load_or_scan,
    shape_ranges,
)
from autoprune.study.tracking import check_available
from autoprune.train.checkpoint import (
    check_built_from,
    dense_recipe,
    model_from_file,
    read_model_file,
    save_model,
)
from autoprune.train.data import DataBundle, load_data
from autoprune.train.device import TrainSetup, prepare_model, setup_from_config
from autoprune.train.models import (
    build_model,
    count_flops,
    count_params,
    flop_counter,
    evaluate,
    held_out_accuracy,
    pretrain,
)
from autoprune.train.task import ClassificationTask, Task, load_task
from autoprune.trust import CodePolicy
from autoprune.measure.stats import latency_ms

log = logging.getLogger("autoprune")

#: Searches this long (``search.trials``) export their candidates through the ONNX slicer.
SLICE_FROM_TRIALS = 8


@dataclass
class SearchContext:
    """Everything prepared once per run and shared by all trials."""

    cfg: RunConfig
    space: SearchSpace
    profile: DeviceProfile
    run: RunFolder
    data: DataBundle
    base: nn.Module
    example: torch.Tensor  # at the profile's batch size: what latency is measured on
    groups: list[PrunableGroup]
    dense: dict[str, Any]
    calib: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: Per-group accuracy drop (sensitivity scan) and FLOPs fraction saved, when scanned.
    sensitivity: dict[str, float] = field(default_factory=dict)
    savings: dict[str, float] = field(default_factory=dict)
    #: What rebuilds the dense model (``train/checkpoint.py``); trial files add their widths to it.
    recipe: dict[str, Any] = field(default_factory=dict)
    #: The resolved ``train:`` section: ``base`` lives on ``train.device``; trials train there.
    train: Optional[TrainSetup] = None
    #: Learned channel granularity: allowed kept widths per group (``round_to: auto`` with
    #: ``efficiency.staircases``); empty = every group rounds to ``space.round_unit``.
    widths: dict[str, list[int]] = field(default_factory=dict)
    #: What the model is for (run config ``task:``): its loss, distillation and metric.
    task: Task = field(default_factory=ClassificationTask)
    #: Budget mode (``search.target``): the targets in ms, tightest first, and the latency model
    #: trials are aimed with (study/budget.py); empty / None otherwise.
    targets_ms: list[float] = field(default_factory=list)
    latency_model: Optional[LatencyModel] = None
    #: How trials count FLOPs: fvcore's count read off a plain forward where that agrees exactly
    #: with fvcore on the dense model (``train/models.py::flop_counter``), else fvcore's trace.
    count_flops: Callable[[nn.Module, torch.Tensor], float] = count_flops

    #: The dense model's groups with their dependency graphs (:meth:`dense_structure`).
    structure: Optional[Structure] = None
    #: Exports candidates through the dense model's translated graph (:meth:`onnx_slicer`).
    slicer: Optional[OnnxSlicer] = None

    def onnx_slicer(self) -> Optional[OnnxSlicer]:
        """The run's ONNX slicer (``efficiency.onnx_slicing``), made on first use: its probes
        are the dense model with every searched channel group cut as candidates are cut (heads
        are left whole: a head cut replaces the attention module, and is exported fresh). Off
        for searches of fewer than :data:`SLICE_FROM_TRIALS` trials: its set-up costs about three
        fresh exports, repaid after a few trials."""
        if not self.cfg.efficiency.onnx_slicing or self.cfg.search.trials < SLICE_FROM_TRIALS:
            return None
        if self.slicer is None:
            groups = [g for g in self.groups if g.kind != "heads" and g.high > 0]

            def cut(m: nn.Module, ratios: dict[str, float]) -> None:
                plan = PruningPlan(ratios, round_to=self.space.round_unit, widths=self.widths)
                if apply_plan_from(m, self.base, self.dense_structure(), plan) is None:
                    apply_plan(m, self.example1.to(next(m.parameters()).device), plan, self.data.num_classes)

            self.slicer = slicer_for(self.base, self.example, self.cfg.exporter, groups, cut)
        return self.slicer

    @property
    def code(self) -> CodePolicy:
        """The model code this run's own config names: all the run folder's model files may rebuild."""
        return _run_code(self.cfg, self.recipe)

    @property
    def example1(self) -> torch.Tensor:
        return self.example[:1]

    def dense_structure(self) -> Structure:
        """The dense model's structure, analysed on first use and kept for the run: every
        candidate is sliced through it (``prune/plan.py::apply_plan_from``) instead of tracing
        its own copy. Valid as long as ``base`` keeps its widths, which nothing changes."""
        if self.structure is None:
            dev = next(self.base.parameters()).device
            self.structure = analyse(self.base, self.example1.to(dev), self.data.num_classes)
        return self.structure

    @property
    def out(self) -> Path:
        return self.run.root


@dataclass
class ModelCheck:
    """What :func:`check_model` found on a model before it is trained."""

    #: Example input at the profile's batch size (what latency is measured on).
    example: torch.Tensor
    #: The groups the search searches: the search space's rules applied, broken ones left out.
    groups: list[PrunableGroup]
    #: Groups left out because pruning them breaks the model: name → why.
    broken: dict[str, str]
    #: The dependency analysis, shared by the groups, the check and every candidate.
    structure: Structure
    #: Groups not searched because the search space does not ask for them: name → why.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def not_searched(self) -> dict[str, str]:
        """Every part of the model the search leaves alone, and why."""
        return {**self.structure.unprunable, **self.skipped, **{n: f"pruning it breaks the model: {why}" for n, why in self.broken.items()}}


def check_model(
    cfg: RunConfig, space: SearchSpace, profile: DeviceProfile, base: nn.Module, data: DataBundle, num_classes: int,
    task: Optional[Task] = None,
) -> ModelCheck:
    """The example input (at the profile's batch size) and the prunable groups with the search
    space's rules applied, found on ``base`` before it is trained: a model that refuses the input
    shape or a layer pattern that matches nothing fails in seconds, not after pre-training.
    The groups depend only on the architecture, so they hold for the trained weights too.
    ``search`` and ``groups`` both call it, so ``groups`` lists exactly what a search searches."""
    shape = tuple(profile.input_shape) if profile.input_shape else data.input_shape
    example = torch.randn(profile.batch_size, *shape, generator=torch.Generator().manual_seed(cfg.search.seed))
    own = task.example_input(data, profile.batch_size) if task is not None else None
    example = own.detach().float() if own is not None else example
    base.eval()
    try:
        with torch.no_grad():
            base(example[:1])
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model {cfg.model} does not accept input of shape {list(example[:1].shape)}: {' '.join(str(exc).split())}") from None
    aux = train_only_modules(base, example)
    if aux:
        raise ConfigError(f"model {cfg.model}: {', '.join(aux)} run only in train mode (auxiliary heads); pruning follows the "
                          "eval-mode graph, so they would be left reading removed channels; build the model without them "
                          "(as torchvision's aux_logits=False) or return the main output alone in train mode too")

    # The analysis runs bounded first (a forked probe): some architectures make torch-pruning's
    # tracing take all memory. Then every group is pruned a little on a copy and run (train and
    # eval mode): a group that breaks the model is left out with its reason, not tried by trials.
    probe_structure(base, example[:1], num_classes)
    structure = analyse(base, example[:1], num_classes)  # once: the groups, the check and every candidate use it
    every = find_groups(base, example[:1], num_classes, embedding=True, structure=structure)
    skipped = {g.name: "transformer embedding width: searched only with 'embedding: true' in the search space"
               for g in every if g.kind == "embedding" and not space.embedding}
    groups = apply_rules([g for g in every if g.name not in skipped], space.low, space.high, space.methods, space.layers,
                         f"search space {cfg.search_space}")
    broken = check_prunable(base, example[:1], [g for g in groups if g.high > 0], num_classes, space.round_unit, structure=structure)
    return ModelCheck(example, [g for g in groups if g.name not in broken], broken, structure, skipped)


def search_groups(cfg: RunConfig) -> ModelCheck:
    """What a search with ``cfg`` would search, without training or measuring anything (the
    ``groups`` command): the same files, data, model and :func:`check_model` as :func:`prepare`,
    with the model freshly built from the same seed (the groups depend on the architecture only)."""
    space = load_search_space(cfg.search_space)
    profile = load_device_profile(cfg.device_profile)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(cfg.search.seed)
        task = load_task(cfg.task, cfg.output)
        data = load_data(cfg.data, cfg.image_size, cfg.val_fraction, cfg.data_seed, cfg.augment, cfg.val_samples)
        num_classes = cfg.num_classes or data.num_classes
        base = build_model(cfg.model, num_classes, in_channels=data.input_shape[0], trust_pickle=cfg.trust_pickle)
        return check_model(cfg, space, profile, base, data, num_classes, task)


def prepare(cfg: RunConfig, console: Optional[Callable[[str], None]] = None) -> SearchContext:
    """Load config files, data and the dense model; measure the dense baseline once per run folder."""
    say = console or (lambda s: log.info(s))
    # Everything that can be checked is checked before the dense model trains (minutes): config
    # files, the profile's backend on this machine, the data, the input shape and the search
    # space's layer patterns (groups depend on the architecture, not on the weights).
    space = load_search_space(cfg.search_space)
    profile = load_device_profile(cfg.device_profile)
    backends.check(profile)
    setup = setup_from_config(cfg.train)  # train.device: cuda without CUDA stops here, in seconds
    check_available(cfg.search.mlflow)  # search.mlflow without the mlflow package, likewise
    run = RunFolder(Path(cfg.out))
    run.root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.search.seed)
    task = load_task(cfg.task, cfg.output)

    data = load_data(cfg.data, cfg.image_size, cfg.val_fraction, cfg.data_seed, cfg.augment, cfg.val_samples)
    data.loader_kwargs = setup.loader_kwargs()
    num_classes = cfg.num_classes or data.num_classes
    shape = tuple(profile.input_shape) if profile.input_shape else data.input_shape
    base, recipe, fresh = _dense_model(cfg, data, num_classes, shape, run, say)
    say(f"checking that every prunable group of {cfg.model} can be pruned")
    check = check_model(cfg, space, profile, base, data, num_classes, task)
    example, groups, broken, structure = check.example, check.groups, check.broken, check.structure
    for name, why in broken.items():
        log.warning("group %s left unpruned: pruning it breaks the model (%s)", name, why)
    if not groups:
        raise ConfigError(f"search space {cfg.search_space}: every prunable group is skipped; nothing to search")
    if broken:  # kept for the report: why a group the user may expect is not searched
        atomic_write_text(run.unprunable, json.dumps(broken, indent=2))
    # The dense model (every trial's starting point and distillation teacher) stays on the train
    # device for the whole run; groups were found on the CPU above and name modules, not tensors.
    prepare_model(base, setup)
    say(f"training on {setup.device} ({setup.precision}, {setup.threads} CPU thread(s))")
    if fresh:
        if recipe["trained"] is not None:
            # The config holds exactly one budget: steps, or (steps null) wall-clock seconds.
            seconds = cfg.pretrain_seconds or 0.0
            budget = f"{cfg.pretrain_steps} steps" if cfg.pretrain_steps is not None else f"{seconds:g}s of wall time"
            say(f"training the dense {cfg.model} model for {budget} (no trained weights were given)")
            pretrain(base, data, seconds, seed=cfg.search.seed, steps=cfg.pretrain_steps, setup=setup, task=task)
        save_model(base, run.base_model, recipe)
    base.eval()

    eff = cfg.efficiency
    # Staircases are timed on CPU fp32 copies (the target backend), wherever the dense model trains.
    widths = _learned_widths(cfg, space, profile, run, cpu_fp32(base), example, groups, num_classes, say)
    calib_n = max(4, eff.bn_batches)
    calib = [b for _, b in zip(range(calib_n), data.loader("train", cfg.finetune.batch_size, shuffle=True, seed=cfg.search.seed))]
    drops: dict[str, float] = {}
    savings: dict[str, float] = {}
    counter, dense_flops = flop_counter(base, example[:1])  # one fvcore trace per run, not one per candidate
    # With screening (search.screen) the per-group probes are the first screened candidates
    # (study/screen.py): no separate scan, and the sampler learns the ranges from the screen.
    if eff.sensitivity_scan and cfg.search.screen is None:
        drops = load_or_scan(
            run.sensitivity, base=base, groups=groups, data=data, example=example[:1],
            calib=calib[: eff.bn_batches] if eff.bn_recalibration else [], ratio=eff.sensitivity_ratio, round_to=space.round_unit,
            setup=setup, progress=say, task=task, structure=structure,
        )
        if space.seed_spread > 0 and space.seed_uniform:
            savings = load_or_compute(
                run.flops_savings, flops_savings, base=base, groups=groups, example=example[:1],
                num_classes=num_classes, ratio=eff.sensitivity_ratio, round_to=space.round_unit, progress=say,
                counter=counter, structure=structure,
            )
        groups = shape_ranges(groups, drops, eff.sensitivity_strength)

    dense_path = run.dense_json
    if dense_path.is_file():
        dense = json.loads(dense_path.read_text())
    else:
        say("measuring the dense model")
        # "accuracy" is on the whole held-out split; "search_accuracy" on the images trials are
        # scored on, when a subset (what trials compare with); "test_accuracy" never searched on.
        dense = {
            "accuracy": evaluate(base, data, setup=setup, task=task),
            "metric_name": task.metric_name,
            **held_out_accuracy(base, data, setup=setup, task=task),
            "params": count_params(base),
            "flops": dense_flops,
            "profile": profile.name,
            **measure_model(base, example, profile, run.dense_onnx, cfg.exporter, calib=calib, run=run),
        }
        atomic_write_text(dense_path, json.dumps(dense, indent=2))
    ctx = SearchContext(cfg, space, profile, run, data, base, example, groups, dense, calib, drops, savings, recipe, setup, widths, task,
                        count_flops=counter, structure=structure)
    if cfg.search.target:
        _aim_at_targets(ctx, num_classes, say)
    return ctx


def _aim_at_targets(ctx: SearchContext, num_classes: int, say: Callable[[str], None]) -> None:
    """Budget mode: resolve the targets against the dense latency and fit the latency model
    (two calibration models measured on the target, once per run folder)."""
    dense_ms = latency_ms(ctx.dense["latency"])
    ctx.targets_ms = targets_ms(ctx.cfg.search.target, dense_ms)
    model = LatencyModel.of(ctx.base, ctx.example, ctx.groups, ctx.space.round_unit, ctx.widths)
    if not ctx.run.budget_calibration.is_file():
        say("budget mode: measuring two uniformly pruned models to aim trials at the targets")

    def measure(m: nn.Module, label: str) -> float:
        path = ctx.run.budget_model(label)
        path.parent.mkdir(parents=True, exist_ok=True)
        return latency_ms(measure_model(m, ctx.example, ctx.profile, path, ctx.cfg.exporter, calib=ctx.calib, run=ctx.run,
                                        dense=ctx.base)["latency"])

    ctx.latency_model = calibrate(model, ctx.base, ctx.example, ctx.groups, num_classes, measure, dense_ms, ctx.run)
    say("budget mode: targets " + ", ".join(f"{t:.3g} ms ({dense_ms / t:.2f}x)" for t in ctx.targets_ms))
    out_of_reach = sorted(set(ctx.targets_ms) - set(reachable(ctx.targets_ms, ctx.groups, model, model.line())))
    if out_of_reach:
        fastest = model.ms({g.name: g.high for g in ctx.groups})
        log.warning("budget mode: target(s) %s ms look out of reach: pruning every group to its upper bound is predicted at "
                    "%.3g ms; trials aim at the others (raise the search space's high: to reach them)",
                    ", ".join(f"{t:.3g}" for t in out_of_reach), fastest)


def _learned_widths(cfg: RunConfig, space: SearchSpace, profile: DeviceProfile, run: RunFolder, base: nn.Module,
                    example: torch.Tensor, groups: list[PrunableGroup], num_classes: int,
                    say: Callable[[str], None]) -> dict[str, list[int]]:
    """Allowed kept widths per group, fixed once per run folder (``allowed_widths.json``): a
    resumed run, a second worker on another machine and ``export --trial N`` must map the same
    ratios to the same widths, so the first measurement pins them. Staircases themselves are
    stored per device fingerprint (``staircases/<key>.json``) and reused where it matches.
    Called before the sensitivity scan narrows the ranges, so the probes cover the whole space."""
    eff = cfg.efficiency
    if not eff.staircases:
        return {}
    if space.round_to is not None:
        say(f"efficiency.staircases is on but search space {cfg.search_space} sets round_to: {space.round_to}, "
            "which wins; use round_to: auto to snap to learned widths")
        return {}
    pinned = run.allowed_widths
    if pinned.is_file():
        return {k: [int(w) for w in v] for k, v in json.loads(pinned.read_text())["widths"].items()}
    fp = fingerprint(profile, base, example)
    stairs = load_or_measure(run.staircases(fingerprint_key(fp)), base, groups, example, profile, num_classes,
                             max_widths=eff.staircase_widths, say=say)
    widths = learned_widths(stairs, groups, eff.staircase_tolerance)
    atomic_write_text(pinned, json.dumps({"fingerprint": fp, "tolerance": eff.staircase_tolerance, "widths": widths}, indent=1))
    return widths


def _run_code(cfg: RunConfig, recipe: dict[str, Any]) -> CodePolicy:
    """The code a run's config names (its ``model``, and the ``arch`` of a checkpoint given as
    ``model``): what the run folder's model files may rebuild (:mod:`autoprune.trust`)."""
    return CodePolicy.of(cfg.model, (recipe.get("build") or {}).get("model"))


def _dense_model(cfg: RunConfig, data: DataBundle, num_classes: int, shape: tuple[int, ...], run: RunFolder,
                 say: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any], bool]:
    """The run folder's dense model, its recipe, and whether it is new (to be pre-trained when
    ``recipe["trained"]`` says so, then saved): ``base_model.pt`` when it was built from what
    ``cfg`` asks for (refused otherwise, before any trial), else built now.

    ``base_model.pt`` is weights-only (``train/checkpoint.py``). One that is a full pickle loads
    only with ``trust_pickle`` (unpickling runs the code it names); its weights must then fit the
    model the config builds, and it is rewritten weights-only so the next reader needs no trust.
    """
    is_checkpoint = Path(cfg.model).is_file()
    seconds = cfg.pretrain_seconds or 0.0
    trains = not is_checkpoint and bool(cfg.pretrain_steps or (cfg.pretrain_steps is None and seconds > 0))
    trained = {"data": cfg.data, "image_size": cfg.image_size, "val_fraction": cfg.val_fraction, "data_seed": cfg.data_seed,
               "pretrain_steps": cfg.pretrain_steps, "pretrain_seconds": cfg.pretrain_seconds, "seed": cfg.search.seed}
    recipe = dense_recipe(cfg.model, num_classes, data.input_shape[0], data.input_shape[1:], shape,
                          trained if trains else None, trust_pickle=cfg.trust_pickle)
    base_path = run.base_model
    if not base_path.is_file():
        return build_model(cfg.model, num_classes, in_channels=data.input_shape[0], trust_pickle=cfg.trust_pickle), recipe, True
    stored = read_model_file(base_path, trust_pickle=cfg.trust_pickle)
    if isinstance(stored, dict):
        check_built_from(stored["recipe"], recipe, base_path)
        return model_from_file(stored, base_path, trust_pickle=cfg.trust_pickle, code=_run_code(cfg, recipe)), recipe, False
    base = build_model(cfg.model, num_classes, in_channels=data.input_shape[0], trust_pickle=cfg.trust_pickle)
    try:
        base.load_state_dict(stored.state_dict())
    except RuntimeError:
        raise ConfigError(f"{base_path}: a full pickle of an older autoprune whose weights do not fit the model the config "
                          f"asks for ({cfg.model}); use a new --out, or delete {base_path.name} if you mean to retrain it") from None
    save_model(base, base_path, recipe)
    say(f"rewrote {base_path} weights-only (it was a full pickle of an older autoprune)")
    return base.eval(), recipe, False
