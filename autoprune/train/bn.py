"""Adaptive BN recalibration (EagleEye, Li et al. 2020).

After channels are removed the BN running statistics describe the *dense* network's
activations; re-estimating them on a few training batches (no gradients) makes a pruned
model's un-fine-tuned accuracy a far better predictor of its fine-tuned accuracy, at the cost
of a few forward passes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from autoprune.train.device import TrainSetup, autocast, model_device, precision_of, to_device, training


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], setup: Optional[TrainSetup] = None) -> int:
    """Re-estimate every BatchNorm's running mean/var from ``batches`` (cumulative average), on
    the model's device (batches are moved there). Returns how many BN layers were reset (0:
    nothing to do, model untouched)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    was_training = model.training
    model.train()
    dev = model_device(model)
    with training(setup), autocast(dev, precision_of(setup)):
        for x, _ in batches:
            model(to_device(x, dev, bool(setup and setup.channels_last)))
    for m, mom in saved:
        m.momentum = mom
    model.train(was_training)
    model.eval()
    return len(bns)
