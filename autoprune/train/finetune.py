"""Short fine-tune of a pruned model, distilling from the dense model.

A few dozen steps recover most of what pruning lost, and distillation (Hinton et al.) makes
those steps count: the dense teacher's soft targets carry more signal per sample than labels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoprune.config import FinetuneConfig
from autoprune.errors import NonFiniteLoss
from autoprune.train.data import DataBundle
from autoprune.train.task import ClassificationTask, Task


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float, T: float) -> torch.Tensor:
    ce = F.cross_entropy(student, y)
    if alpha <= 0:
        return ce
    kd = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean", log_target=True) * (T * T)
    return (1 - alpha) * ce + alpha * kd


def finetune(
    model: nn.Module,
    data: DataBundle,
    cfg: FinetuneConfig,
    teacher: Optional[nn.Module] = None,
    steps: Optional[int] = None,
    seed: int = 0,
    task: Optional[Task] = None,
) -> int:
    """Train ``model`` in place for ``steps`` (default ``cfg.steps``) optimizer steps on the
    ``task``'s loss (default: classification), distilled from ``teacher`` when given."""
    task = task or ClassificationTask()
    steps = cfg.steps if steps is None else steps
    if steps <= 0:
        return 0
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    if teacher is not None:
        teacher.eval()
    done, epoch = 0, 0
    while done < steps:
        model.train()
        for x, y in data.loader("train", cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            loss = task.loss(model, (x, y), teacher, cfg.distill_alpha, cfg.temperature)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss {loss.item()} at fine-tune step {done}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
        epoch += 1
    model.eval()
    return done
