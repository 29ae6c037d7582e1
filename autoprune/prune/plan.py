"""Pruning plan: per-group ratios (and criteria) → a physically smaller model.

Only physical channel removal speeds up dense CPU inference (measured: zeroed weights run
exactly as fast on onnxruntime and OpenVINO), so ``structured`` (the default granularity) slices
tensors; ``unstructured`` / ``nm:N:M`` / ``hybrid`` also write zeros (smaller gzip size, see
``methods/granularity.py``). Kept widths
are rounded to a multiple of ``round_to`` because odd channel counts can be slower than the
dense model on vectorised kernels, or, where the plan carries learned ``widths`` for a group
(latency staircases, ``measure/staircase.py``), snapped to the nearest of those.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from autoprune.outputs import main_output
from autoprune.prune import methods
from autoprune.prune.attention import head_scores, prune_heads, sync_shape_attributes
from autoprune.prune.structure import LiveGroup, Structure, analyse


@dataclass
class PruningPlan:
    """What to remove, per group name: a ratio, the criterion that ranks, and the granularity.

    ``ratios[g]`` is the fraction removed *at the group's granularity*: channels for
    ``structured`` and ``hybrid``, weights (per layer) for ``unstructured``; ignored by
    ``nm:N:M``, whose sparsity is 1 - N/M. ``weight_ratios[g]`` is, for ``hybrid``, the fraction
    of the remaining weights zeroed after channel removal.
    """

    ratios: dict[str, float]
    methods: dict[str, str] = field(default_factory=dict)
    round_to: int = 8
    default_method: str = "l1"
    granularity: dict[str, str] = field(default_factory=dict)
    weight_ratios: dict[str, float] = field(default_factory=dict)
    default_granularity: str = "structured"
    #: Network slimming: L1 penalty on BN scales for ``bn_l1_steps`` steps on the calibration
    #: batches before ``bn_scale`` ranks channels (0 = off).
    bn_l1: float = 0.0
    bn_l1_steps: int = 20
    #: Learned channel granularity: per group, the only kept widths allowed (ascending, the full
    #: width included), from the group's latency staircase. Groups not listed use ``round_to``.
    widths: dict[str, list[int]] = field(default_factory=dict)

    def method_for(self, group: str) -> str:
        return self.methods.get(group, self.default_method)

    def granularity_for(self, group: str) -> "methods.Granularity":
        return methods.parse_granularity(self.granularity.get(group, self.default_granularity))

    def active(self, group: str) -> bool:
        """Whether the plan changes this group at all."""
        gr = self.granularity_for(group)
        return gr.kind == "nm" or self.ratios.get(group, 0.0) > 0 or (gr.kind == "hybrid" and self.weight_ratios.get(group, 0.0) > 0)


def kept_channels(n: int, ratio: float, round_to: int = 8, ch_groups: int = 1, allowed: Optional[Sequence[int]] = None) -> int:
    """Channels kept when removing ``ratio`` of ``n``: nearest multiple of the rounding unit,
    at least one unit, never more than ``n`` (a group smaller than the unit is left whole).

    With ``allowed`` (learned widths of this group), the nearest allowed width to ``n·(1-ratio)``
    instead, ties going to the narrower (faster) one. Nearest rather than always down keeps
    ``ratio`` meaning "fraction removed" on average, as rounding to ``round_to`` does: snapping
    down would prune every group harder than the sampler asked and shift the whole search."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio} outside [0, 1)")
    if allowed:
        fits = [int(w) for w in allowed if 0 < int(w) <= n]
        if ratio == 0.0 or not fits:
            return n
        target = n * (1.0 - ratio)
        return min(fits, key=lambda w: (abs(w - target), w))
    unit = math.lcm(max(1, round_to), max(1, ch_groups))
    if ratio == 0.0 or n <= unit:
        return n
    keep = int(round(n * (1.0 - ratio) / unit)) * unit
    return min(n, max(unit, keep))


def _drop_indices(imp: torch.Tensor, n: int, keep: int, g: int) -> list[int]:
    """Lowest-scored channels to remove; grouped convs drop the same pattern in every group."""
    imp = imp.detach().float().cpu()
    if g > 1:
        per = n // g
        local = imp.view(g, per).mean(0)
        drop_local = torch.argsort(local)[: per - keep // g]
        return sorted(int(i) + j * per for j in range(g) for i in drop_local)
    return sorted(torch.argsort(imp)[: n - keep].tolist())


def apply_plan(
    model: nn.Module,
    example: torch.Tensor,
    plan: PruningPlan,
    num_classes: Optional[int] = None,
    calib: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
) -> dict[str, tuple[int, int]]:
    """Prune ``model`` in place. Returns {group: (channels before, channels after)}.

    1. calibration statistics (gradients / Fisher / activations), once, if a criterion needs them;
    2. every structured/hybrid group is scored on the *unpruned* network, then sliced;
    3. unstructured / N:M / hybrid groups get per-weight masks on what remains, written as zeros.
    """
    groups = analyse(model, example, num_classes).groups
    active = [(g.name, g.group) for g in groups if plan.active(g.name) and g.kind != "heads"]
    criteria = {m: methods.get(m) for m in {plan.method_for(name) for name, _ in active}}
    if plan.bn_l1 > 0 and "bn_scale" in criteria:
        if not calib:
            raise ValueError("bn_l1 > 0 (network slimming) needs calibration batches; none were given")
        methods.bn_l1_finetune(model, calib, plan.bn_l1, plan.bn_l1_steps)
    def _stats() -> methods.CalibStats:
        need_grad = any(c.needs_grad for c in criteria.values())
        need_act = any(getattr(c, "needs_activations", False) for c in criteria.values())
        if (need_grad or need_act) and not calib:
            raise ValueError(f"methods {sorted(criteria)} need calibration batches (gradients/activations); none were given")
        return methods.collect(model, calib, need_grad, need_act)

    stats = _stats()
    widths: dict[str, tuple[int, int]] = {}
    cuts: list[tuple[LiveGroup, list[int]]] = []
    for g in groups:
        n = g.channels
        widths[g.name] = (n, n)
        gran = plan.granularity_for(g.name)
        ratio = float(plan.ratios.get(g.name, 0.0))
        if not gran.removes_channels or ratio <= 0:
            continue
        keep = kept_channels(n, ratio, _unit_of(g, plan.round_to), g.ch_groups, plan.widths.get(g.name))
        if keep >= n:
            continue
        # Heads: L1 magnitude of each head's weights, whatever the channel criterion.
        imp = head_scores(model.get_submodule(g.module)) if g.kind == "heads" else criteria[plan.method_for(g.name)](g.group, stats)
        if imp is None:  # torch-pruning returns None for groups it cannot score
            continue
        widths[g.name] = (n, keep)
        cuts.append((g, _drop_indices(imp, n, keep, g.ch_groups)))
    _cut(model, cuts)

    weighted = [name for name, _ in active if plan.granularity_for(name).zeros_weights]
    if weighted:
        if cuts:  # shapes changed: rebuild the graph and re-measure on the pruned network
            stats = _stats()
        live = {g.name: g.group for g in analyse(model, example, num_classes).groups}
        masks: list[tuple[nn.Module, torch.Tensor]] = []
        for name in weighted:
            group = live[name]
            gran = plan.granularity_for(name)
            crit = criteria[plan.method_for(name)]
            chan = crit(group, stats) if getattr(crit, "weight_is_derived", False) else None
            sparsity = float(plan.weight_ratios.get(name, 0.0) if gran.kind == "hybrid" else plan.ratios.get(name, 0.0))
            for layer, root_idxs in methods.producers(group):
                rows = chan[root_idxs] if chan is not None else None
                scores = crit.weights(layer, stats, rows)
                if gran.kind == "nm":
                    masks.append((layer, methods.nm_mask(layer.weight, scores, gran.n, gran.m)))
                elif sparsity > 0:
                    masks.append((layer, methods.unstructured_mask(layer.weight, scores, sparsity)))
        for layer, mask in masks:
            methods.apply_mask(layer, mask)
    model.zero_grad(set_to_none=True)
    return widths


def apply_plan_from(
    model: nn.Module,
    dense: nn.Module,
    structure: Structure,
    plan: PruningPlan,
) -> Optional[dict[str, tuple[int, int]]]:
    """Prune ``model``, an unpruned copy of ``dense``, in place by ``plan`` through ``structure``:
    the groups of ``dense``, analysed once per run, instead of tracing the copy again (a
    dependency graph per candidate costs about as much as the rest of building it).

    Channels are scored on ``dense`` (the copy has the same weights, so the same scores); each
    group's coupled cuts come from the dense graph in dense coordinates, and every layer of the
    copy is sliced once per dimension with the union of its groups' indices, so no cut shifts
    another's indices (concatenations included). Returns the widths as :func:`apply_plan` does,
    or None when the plan needs what only the copy's own graph gives: heads or embedding groups,
    weight zeros, calibration statistics, network slimming, or a graph node that is a bare
    parameter; the caller then uses :func:`apply_plan`.
    """
    active = [g for g in structure.groups if plan.active(g.name)]
    if any(g.kind != "channels" or not plan.granularity_for(g.name).removes_channels or plan.granularity_for(g.name).zeros_weights
           for g in active):
        return None
    criteria = {m: methods.get(m) for m in {plan.method_for(g.name) for g in active}}
    if plan.bn_l1 > 0 or any(c.needs_grad or getattr(c, "needs_activations", False) for c in criteria.values()):
        return None
    names = {id(m): n for n, m in dense.named_modules()}
    stats = methods.CalibStats()
    widths: dict[str, tuple[int, int]] = {g.name: (g.channels, g.channels) for g in structure.groups}
    # (module name, pruning function, dimension) -> dense indices to remove, and the handler.
    slices: dict[tuple[str, Any, int], tuple[Any, set[int]]] = {}
    for g in active:
        n = g.channels
        keep = kept_channels(n, float(plan.ratios.get(g.name, 0.0)), _unit_of(g, plan.round_to), g.ch_groups, plan.widths.get(g.name))
        if keep >= n:
            continue
        imp = criteria[plan.method_for(g.name)](g.group, stats)
        if imp is None:
            continue
        widths[g.name] = (n, keep)
        root = g.root
        group = g.DG.get_pruning_group(root, g.DG.get_pruner_of_module(root).prune_out_channels, _drop_indices(imp, n, keep, g.ch_groups))
        for dep, idxs in group:
            target = dep.target.module
            if isinstance(target, nn.Parameter):
                return None
            name = names.get(id(target))
            if name is None:  # torch-pruning's stand-ins for concat/split/reshape: no weights to slice
                continue
            key = (name, getattr(dep.handler, "__func__", dep.handler), int(dep.target.pruning_dim))
            slices.setdefault(key, (dep.handler, set()))[1].update(int(getattr(i, "idx", i)) for i in idxs)
    for (name, _, dim), (handler, idxs) in slices.items():
        handler.__self__.pruning_dim = dim
        handler(model.get_submodule(name), sorted(idxs))
    if slices:
        sync_shape_attributes(model)
    model.zero_grad(set_to_none=True)
    return widths


def _unit_of(g: LiveGroup, round_to: int) -> int:
    """Widths are rounded to ``round_to`` channels; heads are counted one by one."""
    return 1 if g.kind == "heads" else round_to


def _cut(model: nn.Module, cuts: list[tuple[LiveGroup, list[int]]]) -> None:
    """Slice every group (channel groups through torch-pruning first, then heads: a head cut
    replaces the attention module, which the channel groups' graph still refers to), then
    update the model's own shape attributes (``sync_shape_attributes``)."""
    for g, idxs in cuts:  # indices of one group never shift when another group is sliced
        if g.kind != "heads":
            root = g.root
            g.DG.get_pruning_group(root, g.DG.get_pruner_of_module(root).prune_out_channels, idxs).prune()
    for g, idxs in cuts:
        if g.kind == "heads":
            prune_heads(model, g.module, idxs)
    if cuts:
        sync_shape_attributes(model)


def apply_schedule(
    model: nn.Module,
    example: torch.Tensor,
    plan: PruningPlan,
    num_classes: Optional[int] = None,
    calib: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
    steps: int = 1,
    mode: str = "iterative",
    between: Optional[Callable[[nn.Module], Any]] = None,
) -> dict[str, tuple[int, int]]:
    """Reach ``plan`` in ``steps`` prune → ``between`` (fine-tune) rounds instead of one shot.

    * ``iterative``: every round prunes all groups a bit more; round k targets ratio·k/steps
      (channels rounded to ``round_to`` against the *original* width, so the last round lands
      exactly on the one-shot width; weight sparsity per layer likewise). N:M is applied in
      the last round (a pattern cannot be reached gradually).
    * ``layerwise`` (hierarchical): groups are split, in network order, into ``steps`` chunks;
      round k applies the full plan to chunk k only; the last round also tops zeroed weights of
      earlier chunks back up to their target (later slicing removed some of their zeros).

    Zeroed weights are held at zero during ``between`` (:func:`methods.hold_zeros`). Returns
    {group: (original channels, final channels)}.
    """
    if mode not in ("iterative", "layerwise"):
        raise ValueError(f"schedule mode {mode!r}; allowed: iterative, layerwise")
    if steps < 1:
        raise ValueError(f"schedule steps={steps}; must be >= 1")
    if steps == 1:
        return apply_plan(model, example, plan, num_classes, calib)
    info = {g.name: (g.channels, g.ch_groups, _unit_of(g, plan.round_to)) for g in analyse(model, example, num_classes).groups}
    order = list(info)
    chunks = [order[i * len(order) // steps:(i + 1) * len(order) // steps] for i in range(steps)]
    current = {name: n for name, (n, _, _) in info.items()}
    for k in range(1, steps + 1):
        sub = copy.deepcopy(plan)
        for name, (n0, g, unit) in info.items():
            gran = plan.granularity_for(name)
            r = float(plan.ratios.get(name, 0.0))
            w = float(plan.weight_ratios.get(name, 0.0))
            if mode == "layerwise":
                on = name in chunks[k - 1]
                frac = 1.0
            else:
                on, frac = True, k / steps
            if not on and k == steps and gran.zeros_weights:
                # Later chunks sliced inputs of this group's layers: top the zeros back up to target.
                sub.granularity[name] = "nm:%d:%d" % (gran.n, gran.m) if gran.kind == "nm" else "unstructured"
                sub.ratios[name] = w if gran.kind == "hybrid" else r
                continue
            if not on or (gran.kind == "nm" and k < steps and mode == "iterative"):
                sub.ratios[name], sub.weight_ratios[name] = 0.0, 0.0
                sub.granularity[name] = "structured"
                continue
            if gran.removes_channels:
                target = kept_channels(n0, r * frac, unit, g, plan.widths.get(name))
                cur = current[name]
                sub.ratios[name] = 1.0 - target / cur if target < cur else 0.0
            else:
                sub.ratios[name] = r * frac
            sub.weight_ratios[name] = w * frac
        widths = apply_plan(model, example, sub, num_classes, calib)
        for name, (_, after) in widths.items():
            current[name] = after
        if between is not None and k < steps:
            with methods.hold_zeros(model):
                between(model)
    return {name: (info[name][0], current[name]) for name in info}


def slice_to_widths(
    model: nn.Module,
    example: torch.Tensor,
    widths: dict[str, Any],
    num_classes: Optional[int] = None,
) -> None:
    """Cut each group of the dense ``model`` to a recorded kept width, in place.

    This rebuilds the *architecture* of a pruned model so that its state dict can be loaded
    (``train/checkpoint.py``): which channels are dropped does not matter because every weight is
    overwritten afterwards, so no criterion is scored (the last channels of each group go, the
    same ones in every channel group of a grouped conv). It goes through the same dependency
    graph as :func:`apply_plan`, so coupled layers and the attributes torch-pruning updates
    change exactly as they did when the model was pruned. ``widths`` is ``{group: (before,
    after)}`` as :func:`apply_plan` returns it; a group this model does not have, or whose width
    is not ``before``, raises ``ValueError`` (the dense model is not the one that was pruned).
    """
    live = analyse(model, example, num_classes).by_name()
    missing = sorted(set(widths) - set(live))
    if missing:
        raise ValueError(f"groups {missing[:5]} are not in the rebuilt dense model")
    cuts: list[tuple[LiveGroup, list[int]]] = []
    for name, (before, after) in widths.items():
        g = live[name]
        n = g.channels
        if n != int(before):
            raise ValueError(f"group {name} has {n} channels in the rebuilt dense model, {before} when it was pruned")
        if int(after) >= n:
            continue
        order = torch.arange(n, 0, -1, dtype=torch.float32)  # lowest score = last channel
        cuts.append((g, _drop_indices(order, n, int(after), g.ch_groups)))
    _cut(model, cuts)


def narrowing(
    model: nn.Module,
    example: torch.Tensor,
    group: str,
    widths: Sequence[int],
    num_classes: Optional[int] = None,
) -> Iterator[int]:
    """Cut one group of ``model`` to each of ``widths`` in turn (descending), in place, yielding
    each width once the model has it: one dependency graph for all the widths of a group rather
    than one per width (latency staircases time a group at several widths; only the
    architecture matters, so, as in :func:`slice_to_widths`, the last channels go)."""
    live = analyse(model, example, num_classes).by_name()
    if group not in live or live[group].kind == "heads":
        raise ValueError(f"channel group {group} is not in the model")
    g = live[group]
    root, DG = g.root, g.DG
    assert root is not None and DG is not None
    for w in sorted({int(w) for w in widths}, reverse=True):
        n = int(DG.get_out_channels(root))
        if w < n:
            order = torch.arange(n, 0, -1, dtype=torch.float32)
            DG.get_pruning_group(root, DG.get_pruner_of_module(root).prune_out_channels, _drop_indices(order, n, w, g.ch_groups)).prune()
            sync_shape_attributes(model)
        yield int(DG.get_out_channels(root))


def check_prunable(
    model: nn.Module,
    example: torch.Tensor,
    groups: list[Any],
    num_classes: Optional[int] = None,
    round_to: int = 8,
    ratio: float = 0.3,
    structure: Optional[Structure] = None,
) -> dict[str, str]:
    """Groups whose pruning breaks the model, with the reason: {group name: error}.

    Every group is pruned by ``ratio`` at once on a copy, which then runs in train and eval mode
    (batch of two: train-mode BatchNorm needs it) and must still give ``num_classes`` outputs;
    when that fails, the groups are bisected to the ones that fail alone. One copy and one
    forward for a model that is fine, so architecture problems (a shape attribute nothing
    updates, a reshape torch-pruning mistraced) surface in seconds, before the dense model
    is trained, instead of failing every trial. ``structure``: the model's analysed groups,
    when the caller has them (copies are then cut through them: :func:`apply_plan_from`).
    """
    x = example[:1].repeat(2, *([1] * (example.dim() - 1)))
    names = [g.name for g in groups]

    def fails(subset: list[str]) -> Optional[str]:
        m = copy.deepcopy(model)
        try:
            plan = PruningPlan({n: ratio for n in subset}, round_to=round_to)
            if structure is None or apply_plan_from(m, model, structure, plan) is None:
                apply_plan(m, x[:1], plan, num_classes)
            with torch.no_grad():
                for train in (True, False):
                    out = main_output(m.train(train)(x))
                    # (N, classes) logits or (N, classes, H, W) dense outputs: classes on axis 1.
                    if num_classes is not None and out.shape[1] != num_classes:
                        return f"output has {out.shape[1]} classes after pruning, not {num_classes}"
        except Exception as exc:  # noqa: BLE001 - any failure means: not prunable this way
            return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        return None

    bad: dict[str, str] = {}

    def bisect(subset: list[str], reason: Optional[str]) -> None:
        if reason is None:
            return
        if len(subset) == 1:
            bad[subset[0]] = reason
            return
        half = len(subset) // 2
        for part in (subset[:half], subset[half:]):
            bisect(part, fails(part))

    bisect(names, fails(names) if names else None)
    return bad
