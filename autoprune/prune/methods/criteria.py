"""Importance criteria. Each one scores (a) every channel of a coupled torch-pruning group —
what structured removal ranks — and (b) every single weight of a conv/linear layer — what
unstructured and N:M sparsity rank. Higher score = more important = kept.

Where torch-pruning has the criterion (magnitude, random, BN scale, Taylor, Hessian/OBD) we
call its importance class, so the coupling logic (residual adds, grouped/depthwise convs, the
next layer's input slices) is torch-pruning's, not ours.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch_pruning as tp

from autoprune.prune.methods.calibration import CalibStats

def mean_by_root(imps: list[torch.Tensor], roots: list[list[int]]) -> Optional[torch.Tensor]:
    """Per root channel, the mean of the scores that several layers give it.

    Each entry of ``imps`` scores some of the group's channels, ``roots`` says which (indices
    into the root layer's channels). This is torch-pruning's ``group_reduction="mean"``, written
    here because torch-pruning only has it as a private method of its importances: scores are
    summed per root index, then divided by the number of layers that contributed. The result
    is as long as the first layer's scores. Layers whose root indices are not all known are
    skipped; None if none is left (torch-pruning would return NaNs there).
    """
    out = torch.zeros_like(imps[0], dtype=torch.float32)
    n = 0
    for imp, idx in zip(imps, roots):
        if any(r is None for r in idx):
            continue
        out.scatter_add_(0, torch.tensor(idx, device=out.device, dtype=torch.long), imp.to(out.device, torch.float32))
        n += 1
    return out / n if n else None


def _handler_name(dep: tp.Dependency) -> str:
    return getattr(dep.handler, "__name__", "")


def producers(group: tp.Group) -> list[tuple[nn.Module, list[int]]]:
    """Conv/linear layers whose *output* rows are the group's channels, with their root indices.
    These are the weights that unstructured / N:M sparsity of a group touches."""
    out = []
    for i, (dep, _) in enumerate(group):
        m = dep.target.module
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and _handler_name(dep) == "prune_out_channels":
            out.append((m, list(group[i].root_idxs)))
    return out


def _consumers(group: tp.Group) -> Iterator[tuple[nn.Module, list[int], list[int]]]:
    """Conv/linear layers that *read* the group's channels: (layer, input-channel idxs, root idxs).
    A depthwise conv reads and writes the same channels, so it counts as a consumer too."""
    for i, (dep, idxs) in enumerate(group):
        m = dep.target.module
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        name = _handler_name(dep)
        depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels
        if name == "prune_in_channels" or (depthwise and name == "prune_out_channels"):
            yield m, list(idxs), list(group[i].root_idxs)


def _input_index(layer: nn.Module) -> torch.Tensor:
    """For every element of ``layer.weight``, the index of the input channel it multiplies."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return torch.arange(w.shape[1], device=w.device).view(1, -1).expand_as(w)
    out_c, in_per_g = w.shape[0], w.shape[1]
    groups = getattr(layer, "groups", 1)
    base = (torch.arange(out_c, device=w.device) // max(1, out_c // groups)) * in_per_g
    idx = base.view(-1, 1) + torch.arange(in_per_g, device=w.device).view(1, -1)
    return idx.view(out_c, in_per_g, *([1] * (w.dim() - 2))).expand_as(w)


class Criterion:
    """Base class: subclasses set ``name``/``needs_grad``/``needs_activations`` and implement
    :meth:`channels` and :meth:`weights`."""

    name = "base"
    needs_grad = False
    needs_activations = False
    #: True when the per-weight form is a heuristic built from a per-channel score (documented).
    weight_is_derived = False

    def __call__(self, group: tp.Group, stats: Optional[CalibStats] = None) -> Optional[torch.Tensor]:
        return self.channels(group, stats)

    def channels(self, group: tp.Group, stats: Optional[CalibStats] = None) -> Optional[torch.Tensor]:
        """Per-channel score of ``group`` (None: this group cannot be scored this way)."""
        raise NotImplementedError

    def weights(self, layer: nn.Module, stats: Optional[CalibStats] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-weight score, same shape as ``layer.weight``. ``rows`` is the group's channel score
        for this layer's output rows (used by criteria defined per channel only)."""
        raise NotImplementedError


class TPCriterion(Criterion):
    """Adapter over a torch-pruning importance object for channel scores."""

    def __init__(self, name: str, imp: tp.importance.Importance, needs_grad: bool = False) -> None:
        self.name, self._imp, self.needs_grad = name, imp, needs_grad

    def channels(self, group: tp.Group, stats: Optional[CalibStats] = None) -> Optional[torch.Tensor]:
        return self._imp(group)


class Magnitude(TPCriterion):
    """Group L1/L2 norm: Σ|w|^p over every weight slice of the channel (filters, BN, next
    layer's inputs), averaged over the group's layers (torch-pruning, no normalizer: ranking
    is within one group). Per weight: |w|^p — L1 and L2 rank weights identically."""

    def __init__(self, p: int) -> None:
        super().__init__(f"l{p}", tp.importance.GroupMagnitudeImportance(p=p, normalizer=None))
        self.p = p

    def weights(self, layer, stats=None, rows=None):
        return layer.weight.detach().abs().pow(self.p)


class Random(TPCriterion):
    """Uniform random scores: the baseline every criterion must beat."""

    def __init__(self) -> None:
        super().__init__("random", tp.importance.RandomImportance())

    def weights(self, layer, stats=None, rows=None):
        return torch.rand_like(layer.weight, dtype=torch.float32)


class BNScale(TPCriterion):
    """Network slimming: |γ| of the BatchNorm(s) on the channel. Per weight (derived): |w|·|γ_row|.
    Groups with no BatchNorm (plain linear layers) fall back to L1 magnitude."""

    weight_is_derived = True

    def __init__(self) -> None:
        super().__init__("bn_scale", tp.importance.BNScaleImportance(normalizer=None))
        self._fallback = Magnitude(1)

    def channels(self, group, stats=None):
        s = self._imp(group)
        return s if s is not None else self._fallback.channels(group)

    def weights(self, layer, stats=None, rows=None):
        w = layer.weight.detach().abs()
        return w if rows is None else w * rows.view(-1, *([1] * (w.dim() - 1))).to(w)


@contextlib.contextmanager
def _grads_as(group: tp.Group, table: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Temporarily set ``weight.grad`` of the group's layers from ``table`` so torch-pruning's
    gradient criteria read our accumulated statistics."""
    saved = []
    for dep, _ in group:
        m = dep.target.module
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and m not in [s[0] for s in saved]:
            saved.append((m, w.grad))
            w.grad = table[m].clone() if m in table and table[m].shape == w.shape else torch.zeros_like(w)
    try:
        yield
    finally:
        for m, g in saved:
            m.weight.grad = g


@contextlib.contextmanager
def _weights_as(group: tp.Group, table: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace weight values by ``table`` (e.g. |grad|) to reuse torch-pruning's
    group reduction (coupled layers, grouped convs) on another per-weight quantity."""
    saved = []
    for dep, _ in group:
        m = dep.target.module
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and m not in [s[0] for s in saved]:
            saved.append((m, w.data))
            w.data = table[m].to(w.dtype) if m in table and table[m].shape == w.shape else torch.zeros_like(w)
    try:
        yield
    finally:
        for m, d in saved:
            m.weight.data = d


def _need(stats: Optional[CalibStats], attr: str, name: str) -> CalibStats:
    if stats is None or not getattr(stats, attr):
        raise ValueError(f"pruning method {name!r} needs calibration batches ({attr}); none were collected (pass calib=...)")
    return stats


class Taylor(Criterion):
    """First-order Taylor (Molchanov et al. 2019): |w · dL/dw| with dL/dw the gradient of the
    loss summed over the calibration batches. Per weight: |w·g|."""

    name, needs_grad = "taylor", True

    def __init__(self) -> None:
        self._imp = tp.importance.GroupTaylorImportance(normalizer=None)

    def channels(self, group, stats=None):
        with _grads_as(group, _need(stats, "grad", self.name).grad):
            return self._imp(group)

    def weights(self, layer, stats=None, rows=None):
        g = _need(stats, "grad", self.name).grad[layer]
        return (layer.weight.detach() * g).abs()


class GradNorm(Criterion):
    """Normalized gradient importance I_i = |∇J(W_i)| / Σ_j |∇J(W_j)|: per channel the summed
    |gradient| over the group's weight slices, divided by the group total (torch-pruning's
    ``normalizer='sum'``). Per weight: |g| / Σ|g| over the layer."""

    name, needs_grad = "grad_norm", True

    def __init__(self) -> None:
        self._imp = tp.importance.GroupMagnitudeImportance(p=1, normalizer="sum")

    def channels(self, group, stats=None):
        grads = _need(stats, "grad", self.name).grad
        with _weights_as(group, {m: g.abs() for m, g in grads.items()}):
            return self._imp(group)

    def weights(self, layer, stats=None, rows=None):
        g = _need(stats, "grad", self.name).grad[layer].abs()
        return g / g.sum().clamp_min(1e-30)


class Hessian(Criterion):
    """Second-order OBD saliency ½·h_ii·w² with the Hessian diagonal h approximated by the
    empirical Fisher (mean squared gradient over calibration batches) — a diagonal
    approximation, not the true Hessian. Channel scores by torch-pruning's
    ``GroupHessianImportance`` fed our Fisher (its own accumulator keys by name and by Parameter
    inconsistently, so it would keep only the last sample)."""

    name, needs_grad = "hessian", True

    def __init__(self) -> None:
        self._imp = tp.importance.GroupHessianImportance(normalizer=None)

    def channels(self, group, stats=None):
        with _grads_as(group, _need(stats, "fisher", self.name).fisher):
            return self._imp(group)

    def weights(self, layer, stats=None, rows=None):
        f = _need(stats, "fisher", self.name).fisher[layer]
        return 0.5 * f * layer.weight.detach() ** 2


class _Activation(Criterion):
    """Base for activation criteria: per channel, a statistic of the channel's activation as read
    by every consumer layer, averaged over consumers. Per weight (derived, Wanda-style):
    |w| × the statistic of the input channel the weight multiplies."""

    needs_activations = True
    weight_is_derived = True
    attr = "act_mean"

    def _stat(self, stats: Optional[CalibStats]) -> dict[nn.Module, torch.Tensor]:
        if stats is None or not getattr(stats, "act_mean"):
            raise ValueError(f"pruning method {self.name!r} needs calibration batches (activations); none were collected (pass calib=...)")
        return self._transform(getattr(stats, self.attr))

    def _transform(self, table: dict[nn.Module, torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
        return table

    def channels(self, group, stats=None):
        table = self._stat(stats)
        imps, roots = [], []
        for m, idxs, root in _consumers(group):
            if m in table and max(idxs, default=-1) < table[m].numel():
                imps.append(table[m][idxs])
                roots.append(root)
        reduced = mean_by_root(imps, roots) if imps else None
        if reduced is None:
            return Magnitude(1).channels(group)  # no measured consumer: magnitude fallback
        return reduced

    def weights(self, layer, stats=None, rows=None):
        table = self._stat(stats)
        w = layer.weight.detach().abs()
        if layer not in table:
            return w
        return w * table[layer][_input_index(layer)].to(w)


class MeanActivation(_Activation):
    """Mean |activation| of the channel over the calibration data (low = rarely used)."""

    name, attr = "act_mean", "act_mean"


class APoZ(_Activation):
    """Average Percentage of Zeros (Hu et al. 2016): score = 1 − APoZ, so channels that are
    zero (after ReLU) on most calibration inputs are removed first."""

    name, attr = "apoz", "apoz"

    def _transform(self, table):
        return {m: 1.0 - v for m, v in table.items()}
