"""Data loading: the embedded digits default, Fashion-MNIST and CIFAR files, ImageFolder
directories and user factories, each a source in :data:`DATASETS`.

A ``data:`` reference ``NAME`` or ``NAME:ARG`` goes to the source registered under ``NAME``
(``digits``, ``digits-cluttered``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``object``);
anything else is an ImageFolder directory, or a ``module:function`` that returns the splits.
A source of one's own is a :class:`DataSource` registered with :func:`register`; registering a
name twice warns (``override=True`` replaces a shipped source on purpose).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset, Subset

from autoprune.config import DATA_HELP
from autoprune.errors import ConfigError
from autoprune.registry import DATASETS
from autoprune.train.data.bundle import (
    DEFAULT_AUGMENT,
    AugmentSpec,
    Augmented,
    DataBundle,
    DataRequest,
    DataSource,
    ImageTensors,
    augment_steps,
    augment_train,
)
from autoprune.train.data.cifar import CIFAR_LAYOUT, CIFAR_STATS, load_cifar, read_cifar_batch
from autoprune.train.data.digits import load_cluttered_digits, load_digits
from autoprune.train.data.factory import from_factory
from autoprune.train.data.fashion_mnist import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_STATS,
    load_fashion_mnist,
    read_fashion_mnist,
    read_idx,
)
from autoprune.train.data.image_folder import (
    CHECK_ALL_IMAGES_UP_TO,
    IMAGENET_STATS,
    image_folder_transforms,
    load_image_folder,
    load_rgb,
)

__all__ = [
    "CHECK_ALL_IMAGES_UP_TO", "CIFAR_LAYOUT", "CIFAR_STATS", "DATASETS", "DATA_HELP", "DEFAULT_AUGMENT", "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES", "FASHION_MNIST_STATS", "IMAGENET_STATS", "AugmentSpec", "Augmented", "DataBundle", "DataRequest",
    "DataSource", "ImageTensors", "augment_steps", "available", "image_folder_transforms", "load_cifar",
    "load_cluttered_digits", "load_data", "load_digits", "load_fashion_mnist", "load_image_folder", "load_rgb",
    "read_cifar_batch", "read_fashion_mnist", "read_idx", "register", "search_subset", "source_of",
]


def register(name: str, factory: Optional[Callable[[], DataSource]] = None, *, override: bool = False) -> Any:
    """Register a data source factory under ``name`` (see :class:`autoprune.registry.Registry`)."""
    return DATASETS.register(name, factory, override=override)


def available() -> list[str]:
    """The registered source names."""
    return DATASETS.available()


def load_data(ref: str, image_size: Optional[int] = None, val_fraction: float = 0.25, seed: int = 0,
              augment: AugmentSpec = "default", val_samples: Optional[int] = None) -> DataBundle:
    """``ref`` (see :data:`DATA_HELP`) → a DataBundle. ``augment`` applies to the training split
    only; ``val_samples`` fixes the part of the held-out split that trials are scored on."""
    bundle = _load(DataRequest(ref, ref.partition(":")[2], image_size, val_fraction, seed, augment))
    bundle.search_val = search_subset(bundle.val, val_samples, seed)
    return bundle


def search_subset(val: Dataset, n: Optional[int], seed: int) -> Optional[Dataset]:
    """``n`` images of ``val`` chosen by ``seed`` (``data_seed``) alone: every trial, every worker
    and every resume scores on the same images, whatever the sampler seed. None when ``n`` is
    None or covers the whole split (trials then score on all of it)."""
    size = len(val)  # type: ignore[arg-type]
    if n is None or n >= size:
        return None
    pick = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 1_000_003))[:n]
    return Subset(val, sorted(pick.tolist()))


def source_of(ref: str) -> Optional[DataSource]:
    """The registered source that reads ``ref`` (``NAME``, or ``NAME:ARG`` for a source that takes
    an argument), or None: then ``ref`` is a folder or a ``module:function``."""
    name, sep, _ = ref.partition(":")
    if name not in DATASETS:
        return None
    source = DATASETS.get(name)
    return source if not sep or source.takes_argument else None


def _load(request: DataRequest) -> DataBundle:
    """Registered names first (a folder called ``digits`` does not hide the digits), then a
    folder, then a factory."""
    ref = request.ref
    source = source_of(ref)
    if source is not None:
        return source.load(request)
    p = Path(ref)
    if p.is_dir():
        return load_image_folder(p, request.image_size or 224, request.val_fraction, request.seed, request.augment)
    if ":" in ref and not p.exists():
        return augment_train(from_factory(ref), request.augment)
    raise ConfigError(f"data: {ref!r} is not {DATA_HELP}")
