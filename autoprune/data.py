"""Data loading: the embedded digits default, ImageFolder directories and user factories.

Everything is reduced to a :class:`DataBundle` (train split, held-out split, class count,
input shape) so the rest of the pipeline never cares where images came from.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .config import ConfigError


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # without batch dimension
    name: str = "data"

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        ds = self.train if split == "train" else self.val
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        x = self.val[0][0]
        return x.unsqueeze(0).repeat(batch_size, *([1] * x.dim())).contiguous()


def _split(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    n = len(ds)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return Subset(ds, perm[n_val:]), Subset(ds, perm[:n_val])


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
    train, val = _split(TensorDataset(x, y), val_fraction, seed)
    return DataBundle(train, val, 10, tuple(x.shape[1:]), name="digits")


def load_image_folder(root: Path, image_size: int = 224, val_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """An ImageFolder tree (``class_x/img.png``); uses ``train/`` and ``val/`` subfolders when present."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = datasets.ImageFolder(str(root / "train"), transform=tf)
            val = datasets.ImageFolder(str(root / "val"), transform=tf)
            if train.classes != val.classes:
                raise ConfigError(f"{root}: train/ and val/ have different class folders ({train.classes} vs {val.classes})")
            classes = train.classes
        else:
            full = datasets.ImageFolder(str(root), transform=tf)
            classes = full.classes
            train, val = _split(full, val_fraction, seed)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"{root}: not a usable ImageFolder directory (class subfolders with images): {exc}") from None
    x0 = val[0][0]
    return DataBundle(train, val, len(classes), tuple(x0.shape), name=root.name)


def _from_factory(ref: str) -> DataBundle:
    mod_name, _, fn_name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"data: cannot import {ref!r} ({exc}); expected 'package.module:function'") from None
    out: Any = fn()
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, tuple) and len(out) in (2, 3):
        train, val = out[0], out[1]
        x0, _ = val[0]
        if len(out) == 3:
            num_classes = int(out[2])
        else:
            num_classes = int(max(int(y) for _, y in val)) + 1
        return DataBundle(train, val, num_classes, tuple(x0.shape), name=fn_name)
    raise ConfigError(f"data: {ref} returned {type(out).__name__}; return a DataBundle or (train, val[, num_classes])")


def load_data(ref: str, image_size: Optional[int] = None, val_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """``digits`` | an ImageFolder directory | ``module:function``."""
    if ref == "digits":
        return load_digits(image_size or 16, val_fraction, seed)
    p = Path(ref)
    if p.is_dir():
        return load_image_folder(p, image_size or 224, val_fraction, seed)
    if ":" in ref and not p.exists():
        return _from_factory(ref)
    raise ConfigError(f"data: {ref!r} is not 'digits', an existing ImageFolder directory, or 'module:function'")
