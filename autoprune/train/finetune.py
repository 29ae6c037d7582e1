"""Short fine-tune of a pruned model, distilling from the dense model.

A few dozen steps recover most of what pruning lost, and distillation (Hinton et al.) makes
those steps count: the dense teacher's soft targets carry more signal per sample than labels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from autoprune.config import FinetuneConfig
from autoprune.errors import NonFiniteLoss
from autoprune.train.data import DataBundle
from autoprune.train.device import (
    TrainSetup,
    autocast,
    compiled,
    grad_scaler,
    model_device,
    optimizer_step,
    precision_of,
    to_device,
    training,
)
from autoprune.train.task import ClassificationTask, Task


def finetune(
    model: nn.Module,
    data: DataBundle,
    cfg: FinetuneConfig,
    teacher: Optional[nn.Module] = None,
    steps: Optional[int] = None,
    seed: int = 0,
    setup: Optional[TrainSetup] = None,
    task: Optional[Task] = None,
) -> int:
    """Train ``model`` in place for ``steps`` (default ``cfg.steps``) optimizer steps on the
    ``task``'s loss (default: classification), distilled from ``teacher`` when given, on the
    model's device; ``setup`` (the run's ``train:`` section) gives autocast precision, CPU
    threads (restored afterwards), channels-last and torch.compile. The teacher must be on the
    same device (the dense model is kept on the train device)."""
    task = task or ClassificationTask()
    steps = cfg.steps if steps is None else steps
    if steps <= 0:
        return 0
    with training(setup):
        return _finetune(model, data, cfg, teacher, steps, seed, setup, task)


def _finetune(model: nn.Module, data: DataBundle, cfg: FinetuneConfig, teacher: Optional[nn.Module], steps: int, seed: int,
              setup: Optional[TrainSetup], task: Task) -> int:
    torch.manual_seed(seed)
    dev, precision = model_device(model), precision_of(setup)
    cl = bool(setup and setup.channels_last)
    if cl:
        model.to(memory_format=torch.channels_last)  # pruning slices weights back to contiguous
    scaler = grad_scaler(dev, precision)
    fwd = compiled(model, setup)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    if teacher is not None:
        teacher.eval()
    done, epoch = 0, 0
    while done < steps:
        model.train()
        for x, y in data.loader("train", cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            x, y = to_device(x, dev, cl), to_device(y, dev)
            with autocast(dev, precision):
                loss = task.loss(fwd, (x, y), teacher, cfg.distill_alpha, cfg.temperature)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss {loss.item()} at fine-tune step {done}")
            opt.zero_grad(set_to_none=True)
            optimizer_step(loss, opt, scaler)
            sched.step()
            done += 1
            if done >= steps:
                break
        epoch += 1
    model.eval()
    return done
