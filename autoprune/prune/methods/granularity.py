"""Granularities: *what* is removed once a criterion has ranked it.

* ``structured`` — whole channels, physically sliced out via the dependency graph (plan.py).
  The only one that makes dense CPU/GPU kernels faster.
* ``unstructured`` — single weights set to exactly zero (a per-layer magnitude/score
  threshold), made permanent by writing zeros. Tensors keep their shape: dense runtimes run
  at the same speed; the gzip-compressed model shrinks.
* ``nm:N:M`` — in every block of M consecutive weights along the input (reduction) dimension
  keep the N highest-scored (NVIDIA 2:4 sparse tensor cores need 2:4 along input channels).
  Speeds up only on hardware/kernels that exploit it; on CPU it behaves like unstructured.
* ``hybrid`` — structured first, then unstructured on the weights that remain.

Zeros written here would be regrown by the fine-tune; :func:`hold_zeros` keeps them at zero
with ``torch.nn.utils.prune`` masks while training and makes them permanent afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from autoprune.config.search_space import GRANULARITY_HELP, GRANULARITY_RE, Granularity, parse_granularity

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
#: Granularity names are parsed by the config (torch-free, so a search space validates without torch).
parse = parse_granularity

__all__ = ["GRANULARITY_HELP", "GRANULARITY_RE", "Granularity", "LAYER_TYPES", "parse", "apply_mask", "hold_zeros", "nm_mask",
           "unstructured_mask", "weight_sparsity"]


def _reduction_layout(w: torch.Tensor) -> torch.Tensor:
    """(out, reduction) view with input channels innermost: conv (O,I,kh,kw) → (O, kh·kw·I)."""
    if w.dim() > 2:
        return w.movedim(1, -1).reshape(w.shape[0], -1)
    return w.reshape(w.shape[0], -1)


def _from_reduction_layout(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() > 2:
        shape = (like.shape[0], *like.shape[2:], like.shape[1])
        return flat.reshape(shape).movedim(-1, 1).contiguous()
    return flat.reshape(like.shape)


def unstructured_mask(weight: torch.Tensor, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask keeping all but the ``round(sparsity·numel)`` lowest-scored weights of one layer.
    Weights already exactly zero are ranked lowest, so repeated (iterative) calls only grow
    the pruned set."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"weight sparsity {sparsity} outside [0, 1)")
    k = int(round(sparsity * weight.numel()))
    mask = torch.ones_like(weight, dtype=torch.bool)
    if k == 0:
        return mask
    s = scores.detach().float().flatten().clone()
    s[weight.detach().flatten() == 0] = -float("inf")
    drop = torch.topk(s, k, largest=False).indices
    mask.view(-1)[drop] = False
    return mask


def nm_mask(weight: torch.Tensor, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in each block of ``m`` consecutive weights along the input dimension keep the
    ``n`` highest-scored. A ragged tail block (reduction size not a multiple of m) keeps at most
    n of its real weights."""
    s = _reduction_layout(scores.detach().float())
    rows, cols = s.shape
    pad = (-cols) % m
    if pad:
        s = torch.cat([s, torch.full((rows, pad), -float("inf"), device=s.device)], 1)
    blocks = s.view(rows, -1, m)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(2, torch.topk(blocks, n, dim=2).indices, True)
    keep = keep.view(rows, -1)[:, :cols]
    return _from_reduction_layout(keep, weight)


@torch.no_grad()
def apply_mask(layer: nn.Module, mask: torch.Tensor) -> None:
    """Make a mask permanent: write zeros into ``layer.weight`` (no hooks, no extra tensors)."""
    layer.weight.mul_(mask.to(layer.weight.dtype))


@contextlib.contextmanager
def hold_zeros(model: nn.Module) -> Iterator[int]:
    """Keep every exact zero of conv/linear weights at zero while the block runs (fine-tune),
    with ``torch.nn.utils.prune`` masks, then make them permanent (``prune.remove``).
    Yields the number of layers held. Dense layers (no zeros) get no mask."""
    held = []
    for mod in model.modules():
        if isinstance(mod, LAYER_TYPES) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            mask = mod.weight.detach() != 0
            if not bool(mask.all()):
                tprune.custom_from_mask(mod, "weight", mask)
                held.append(mod)
    try:
        yield len(held)
    finally:
        for mod in held:
            tprune.remove(mod, "weight")


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over all conv/linear weights (what unstructured pruning sets)."""
    zeros = total = 0
    for mod in model.modules():
        if isinstance(mod, LAYER_TYPES):
            w = mod.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0
