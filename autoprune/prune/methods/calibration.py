"""Calibration statistics that data-driven criteria read: gradients, squared gradients
(diagonal Fisher) and per-input-channel activation statistics.

They are collected in one pass over the calibration batches *before* anything is pruned, and
keyed by module (not by Parameter: torch-pruning replaces Parameter objects when it slices
them), so the plan scores every group on the same, unpruned network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoprune.outputs import main_output

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class CalibStats:
    """What the calibration pass measured, per conv/linear/norm module.

    * ``grad[m]``: dL/dW summed over batches (the gradient of the total calibration loss);
    * ``fisher[m]``: mean over batches of (dL/dW)^2, the empirical-Fisher diagonal that
      approximates the Hessian diagonal (OBD saliency ½·h·w² uses it);
    * ``act_mean[m]``: mean |x| per *input* channel of a conv/linear layer;
    * ``apoz[m]``: fraction of inputs ≤ 0 per input channel (Average Percentage of Zeros; for
      post-ReLU inputs exactly the zero rate, otherwise the rate a ReLU would zero).
    """

    grad: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    fisher: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    act_mean: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    apoz: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    batches: int = 0


def _channel_view(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(channels, everything else) view of a layer input: dim 1 for conv, last dim for linear."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def collect(
    model: nn.Module,
    batches: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]],
    grads: bool,
    activations: bool,
) -> CalibStats:
    """Run the calibration batches once; gradients in eval mode so BN statistics stay put."""
    stats = CalibStats()
    if not (grads or activations):
        return stats
    batches = list(batches or [])
    if not batches:
        what = "gradients" if grads else "activations"
        raise ValueError(f"the chosen pruning methods need calibration batches ({what}); none were given (pass calib=...)")
    sums: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = []
    if activations:

        def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = _channel_view(m, inputs[0].detach().float())
            s = torch.stack([x.abs().sum(1), (x <= 0).float().sum(1), torch.full((x.shape[0],), float(x.shape[1]), device=x.device)])
            if m in sums and sums[m][0].shape == s.shape:
                sums[m][0] += s
            else:
                sums[m] = [s]

        hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    was_training = model.training
    model.eval()
    params = {m: m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
    try:
        for x, y in batches:
            if grads:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(main_output(model(x)), y).backward()
                for m, p in params.items():
                    if p.grad is None:
                        continue
                    g = p.grad.detach().clone()
                    stats.grad[m] = stats.grad[m] + g if m in stats.grad else g
                    stats.fisher[m] = stats.fisher[m] + g * g if m in stats.fisher else g * g
            else:
                with torch.no_grad():
                    model(x)
            stats.batches += 1
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for m in stats.fisher:
        stats.fisher[m] /= stats.batches
    for m, (s,) in sums.items():
        stats.act_mean[m] = s[0] / s[2]
        stats.apoz[m] = s[1] / s[2]
    return stats


def bn_l1_finetune(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    lam: float = 1e-4,
    steps: int = 20,
    lr: float = 1e-3,
) -> int:
    """Network slimming's sparsity training (Liu et al. 2017): cross-entropy + λ·Σ|γ| over all
    BatchNorm scales, so that unimportant channels' γ are pushed toward zero before ``bn_scale``
    ranks them. Runs ``steps`` optimizer steps cycling over ``batches``; returns steps done."""
    batches = list(batches)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    if not batches or not bns or steps <= 0:
        return 0
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(main_output(model(x)), y) + lam * sum(m.weight.abs().sum() for m in bns)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return steps
