"""The data that ships inside the package (no download): scikit-learn's 8×8 digits, plain or
cluttered into a harder task."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from autoprune.registry import DATASETS
from autoprune.train.data.bundle import DataBundle, DataRequest, DataSource, augment_train, split_dataset

__all__ = ["load_cluttered_digits", "load_digits"]


def load_digits(image_size: int = 16, val_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """scikit-learn's 8×8 handwritten digits (ships inside the package, no download),
    bilinearly upsampled so convolutions have something to chew on."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    train, val = split_dataset(TensorDataset(x, y), val_fraction, seed)
    return DataBundle(train, val, 10, tuple(x.shape[1:]), name="digits")


def _warp(src: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, size: int) -> torch.Tensor:
    """Place each ``src`` image (N,1,h,w) on a ``size``² canvas: rotated by ``angle`` (radians),
    covering ``scale`` of the canvas side, centred at ``shift`` (in [-1, 1] canvas coordinates)."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output (canvas) coordinates to input (source) coordinates: R(-a)·(p - t) / s.
    tx, ty = shift[:, 0], shift[:, 1]
    theta = torch.stack(
        [torch.stack([cos, sin, -(cos * tx + sin * ty)], 1), torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1)], 1
    )
    grid = torch.nn.functional.affine_grid(theta, [src.shape[0], 1, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def load_cluttered_digits(
    image_size: int = 32, val_fraction: float = 0.25, seed: int = 0, train_size: int = 12000, val_size: int = 3000
) -> DataBundle:
    """A harder, still learnable task built from the shipped digits (no download): each sample is a
    digit scaled to 50-80 % of a ``image_size``² canvas, rotated ±22°, placed off-centre, among
    three stroke fragments cut from *other* digits, with pixel noise and contrast jitter.

    Why: on the plain digits a pruned, fine-tuned net matches the dense one almost whatever is
    removed, so every pruning strategy looks alike. Here capacity matters and accuracy falls as
    channels go, which is what a pruning search must trade against latency. Train and held-out
    samples come from disjoint *source* digits (no near-duplicates leak into validation).
    """
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    src = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    lab = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(src), generator=g)
    n_val_src = max(1, int(round(len(src) * val_fraction)))
    pools = {"val": perm[:n_val_src], "train": perm[n_val_src:]}

    def make(pool: torch.Tensor, n: int, gen: torch.Generator) -> TensorDataset:
        pick = pool[torch.randint(len(pool), (n,), generator=gen)]
        u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
        x = _warp(src[pick], 0.5 + 0.3 * u(n), (u(n) - 0.5) * (math.pi / 4), (u(n, 2) - 0.5) * 0.5, image_size)
        for _ in range(3):  # clutter: 4x4 stroke fragments of other digits from the same pool
            other = src[pool[torch.randint(len(pool), (n,), generator=gen)]]
            oy, ox = torch.randint(0, 5, (2,), generator=gen).tolist()
            frag = other[:, :, oy : oy + 4, ox : ox + 4]
            x = torch.maximum(x, _warp(frag, 0.2 + 0.15 * u(n), u(n) * 2 * math.pi, (u(n, 2) - 0.5) * 1.6, image_size))
        x = x * (0.7 + 0.3 * u(n, 1, 1, 1)) + 0.15 * torch.randn(x.shape, generator=gen)
        return TensorDataset(x, lab[pick])

    train = make(pools["train"], train_size, g)
    val = make(pools["val"], val_size, g)
    mean, std = train.tensors[0].mean(), train.tensors[0].std()
    train = TensorDataset((train.tensors[0] - mean) / std, train.tensors[1])
    val = TensorDataset((val.tensors[0] - mean) / std, val.tensors[1])
    return DataBundle(train, val, 10, (1, image_size, image_size), name="digits-cluttered")


class _Digits(DataSource):
    """``data: digits`` (16×16 unless ``image_size``); already float tensors, so not augmented by default."""

    def load(self, request: DataRequest) -> DataBundle:
        return augment_train(load_digits(request.image_size or 16, request.val_fraction, request.seed), request.augment)


class _ClutteredDigits(DataSource):
    """``data: digits-cluttered`` (32×32 unless ``image_size``)."""

    def load(self, request: DataRequest) -> DataBundle:
        return augment_train(load_cluttered_digits(request.image_size or 32, request.val_fraction, request.seed),
                             request.augment)


DATASETS.register("digits", _Digits)
DATASETS.register("digits-cluttered", _ClutteredDigits)
