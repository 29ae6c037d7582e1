"""A worked segmentation example: LR-ASPP MobileNetV3-Large on generated shapes, scored by mIoU.

Point a run at it (from the repository root, so ``examples`` is importable)::

    PYTHONPATH=. autoprune search --config examples/segmentation/shapes.yaml
    autoprune pick runs/shapes-seg --max-latency-ms 5
    python runs/shapes-seg/picked/infer_example.py          # onnxruntime: a class mask per image

* ``data: examples.segmentation.shapes:data`` — circles, rectangles and triangles in random
  colours on a noisy background; the target is a per-pixel class mask (0 background, 1 circle,
  2 rectangle, 3 triangle). Generated from a seed (nothing downloads), the same on every machine.
* ``model: examples.segmentation.shapes:lraspp`` — torchvision's LR-ASPP MobileNetV3-Large with
  random weights (``weights=None, weights_backbone=None``; trained by ``pretrain_steps``). It
  returns ``{"out": logits}``: autoprune's output adapter takes ``out``.
* ``task: segmentation`` — per-pixel cross-entropy, per-pixel KL distillation, mean IoU
  (``autoprune.train.task.SegmentationTask``); ``task: examples.segmentation.shapes:task`` names
  the same object the way you would name your own task.

Sizes come from environment variables so a test can run a tiny version of the same code:
``SHAPES_SIZE`` (image side, default 64), ``SHAPES_TRAIN`` / ``SHAPES_VAL`` (images, 1024 / 256).
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import TensorDataset
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

from autoprune.train.data import DataBundle
from autoprune.train.task import SegmentationTask

CLASSES = ("background", "circle", "rectangle", "triangle")


def make_shapes(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB images (n, 3, size, size) and their class masks (n, size, size), from ``seed``:
    1-3 shapes per image (1 circle, 2 rectangle, 3 triangle), each covering roughly 5-25 % of it,
    in a random colour over a random-tinted noisy background; later shapes cover earlier ones."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    S = 3  # shape slots per image
    count = torch.randint(1, S + 1, (n, 1), generator=g)
    kind = torch.randint(1, len(CLASSES), (n, S), generator=g)
    active = torch.arange(S).unsqueeze(0) < count
    cx, cy = ((0.2 + 0.6 * u(n, S)) * size for _ in range(2))
    r = (0.12 + 0.14 * u(n, S)) * size
    w, h = r * (0.6 + 0.8 * u(n, S)), r * (0.6 + 0.8 * u(n, S))
    angle = u(n, S) * 2 * math.pi
    colour = u(n, S, 3) * 1.5 - 0.25

    c = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = c.view(1, 1, size, 1), c.view(1, 1, 1, size)
    dx, dy = xx - cx[..., None, None], yy - cy[..., None, None]  # (n, S, size, size)
    rr = r[..., None, None]
    circle = dx * dx + dy * dy <= rr * rr
    rect = (dx.abs() <= w[..., None, None]) & (dy.abs() <= h[..., None, None])
    tri = torch.ones_like(circle)  # inside all three edges of a rotated equilateral triangle
    corners = [(rr * torch.cos(angle + k * 2 * math.pi / 3)[..., None, None], rr * torch.sin(angle + k * 2 * math.pi / 3)[..., None, None])
               for k in range(3)]
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        tri &= (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) >= 0
    k = kind[..., None, None]
    inside = torch.where(k == 1, circle, torch.where(k == 2, rect, tri)) & active[..., None, None]

    images = u(n, 3, 1, 1) * 0.5 + 0.2 * torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for s in range(S):
        m = inside[:, s]
        images = torch.where(m.unsqueeze(1), colour[:, s, :, None, None], images)
        masks = torch.where(m, kind[:, s, None, None], masks)
    images = images + 0.1 * torch.randn(n, 3, size, size, generator=g)
    return (images - 0.5) / 0.5, masks


def data() -> DataBundle:
    """The run config's ``data:`` factory: train and held-out shapes from different seeds."""
    size = int(os.environ.get("SHAPES_SIZE", 64))
    n_train, n_val = int(os.environ.get("SHAPES_TRAIN", 1024)), int(os.environ.get("SHAPES_VAL", 256))
    train = TensorDataset(*make_shapes(n_train, size, seed=1))
    val = TensorDataset(*make_shapes(n_val, size, seed=2))
    return DataBundle(train, val, len(CLASSES), (3, size, size), name="shapes")


def lraspp(num_classes: int = len(CLASSES)) -> torch.nn.Module:
    """The run config's ``model:`` factory: LR-ASPP MobileNetV3-Large, random weights (no download)."""
    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)


#: The run config's ``task:`` object (``examples.segmentation.shapes:task``); ``task: segmentation`` is the same.
task = SegmentationTask()
