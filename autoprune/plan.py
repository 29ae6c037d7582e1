"""Pruning plan: per-group ratios (and criteria) → a physically smaller model.

Only physical channel removal speeds up dense CPU inference (measured: zeroed weights run
exactly as fast on onnxruntime and OpenVINO), so the plan always slices tensors. Kept widths
are rounded to a multiple of ``round_to`` because odd channel counts can be slower than the
dense model on vectorised kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import methods
from .structure import build_graph, channel_groups, iter_groups, output_layers


@dataclass
class PruningPlan:
    """What to remove: fraction of channels per group name, and which criterion ranks them."""

    ratios: dict[str, float]
    methods: dict[str, str] = field(default_factory=dict)
    round_to: int = 8
    default_method: str = "l1"

    def method_for(self, group: str) -> str:
        return self.methods.get(group, self.default_method)


def kept_channels(n: int, ratio: float, round_to: int = 8, ch_groups: int = 1) -> int:
    """Channels kept when removing ``ratio`` of ``n``: nearest multiple of the rounding unit,
    at least one unit, never more than ``n`` (a group smaller than the unit is left whole)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio} outside [0, 1)")
    unit = math.lcm(max(1, round_to), max(1, ch_groups))
    if ratio == 0.0 or n <= unit:
        return n
    keep = int(round(n * (1.0 - ratio) / unit)) * unit
    return min(n, max(unit, keep))


def _accumulate_grads(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    model.zero_grad(set_to_none=True)
    model.eval()  # BN statistics stay fixed; we only want dL/dw
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()


def apply_plan(
    model: nn.Module,
    example: torch.Tensor,
    plan: PruningPlan,
    num_classes: Optional[int] = None,
    calib: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
) -> dict[str, tuple[int, int]]:
    """Prune ``model`` in place. Returns {group: (channels before, channels after)}."""
    needed = {plan.method_for(g) for g, r in plan.ratios.items() if r > 0}
    criteria = {m: methods.get(m) for m in needed}
    if any(c.needs_grad for c in criteria.values()):
        if not calib:
            raise ValueError(f"methods {sorted(needed)} need calibration batches (gradients); none were given")
        _accumulate_grads(model, calib)
    DG = build_graph(model, example)
    widths: dict[str, tuple[int, int]] = {}
    for name, group in iter_groups(DG, output_layers(model, num_classes)):
        root = group[0].dep.target.module
        n = int(DG.get_out_channels(root))
        ratio = float(plan.ratios.get(name, 0.0))
        g = channel_groups(DG, group)
        keep = kept_channels(n, ratio, plan.round_to, g)
        widths[name] = (n, keep)
        if keep >= n:
            continue
        imp = criteria[plan.method_for(name)](group)
        if imp is None:  # torch-pruning returns None for groups it cannot score
            widths[name] = (n, n)
            continue
        imp = imp.detach().float().cpu()
        if g > 1:
            per = n // g
            local = imp.view(g, per).mean(0)
            drop_local = torch.argsort(local)[: per - keep // g]
            idxs = [int(i) + j * per for j in range(g) for i in drop_local]
        else:
            idxs = torch.argsort(imp)[: n - keep].tolist()
        group.prune(idxs=sorted(idxs))
    model.zero_grad(set_to_none=True)
    return widths
