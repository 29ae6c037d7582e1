"""What every data source gives the search: a :class:`DataBundle`, and the pieces sources share.

Everything is reduced to a DataBundle (train split, held-out split, optional official test
split, class count, input shape) so the rest of the pipeline never cares where images came
from. Augmentation (``augment:`` in the run config) applies to the training split only; the
held-out and test splits always read the same pixels. :class:`DataSource` is what a source
registered in :data:`autoprune.registry.DATASETS` provides.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from autoprune.errors import ConfigError

__all__ = ["DEFAULT_AUGMENT", "AugmentSpec", "Augmented", "DataBundle", "DataRequest", "DataSource", "ImageTensors",
           "augment_steps", "augment_train", "split_dataset", "tensor_bundle"]


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # without batch dimension
    name: str = "data"
    #: The official test split where the data has one (Fashion-MNIST, CIFAR): never seen by the
    #: search; the final stage, pareto.json and the model card report it as test accuracy.
    test: Optional[Dataset] = None
    #: Extra DataLoader options (num_workers, pin_memory, persistent_workers) from the run
    #: config's ``train:`` section; set once by the search context, used by every loader.
    loader_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The fixed part of ``val`` that trials are scored on (``val_samples``), the same images in
    #: every trial and every worker; None = the whole of ``val``. Split name ``"search"``.
    search_val: Optional[Dataset] = None
    _loaders: dict[tuple[Any, ...], DataLoader] = field(default_factory=dict, repr=False, compare=False)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """``split``: train | val (the whole held-out split) | search (what trials are scored on:
        ``search_val`` or all of ``val``) | test (the official test split, never used by trials)."""
        ds = {"train": self.train, "val": self.val, "search": self.val if self.search_val is None else self.search_val, "test": self.test}[split]
        if ds is None:
            raise ValueError(f"{self.name} has no {split!r} split")
        kw = dict(self.loader_kwargs)
        if not kw.get("num_workers"):
            kw.pop("persistent_workers", None)
        # Unshuffled loaders read the same images in the same order every time: every trial's
        # evaluation reuses one (its worker processes too, with persistent_workers).
        key = (split, batch_size, id(ds), repr(sorted(kw.items())))
        if not shuffle and key in self._loaders:
            return self._loaders[key]
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False, **kw)
        if not shuffle:
            self._loaders[key] = loader
        return loader

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its loaders (their worker processes belong to this process)."""
        return {**self.__dict__, "_loaders": {}}

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        x = self.val[0][0]
        return x.unsqueeze(0).repeat(batch_size, *([1] * x.dim())).contiguous()


def split_dataset(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A random split of ``ds`` by ``seed``: (the rest, ``val_fraction`` of it, at least one item)."""
    n = len(ds)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return Subset(ds, perm[n_val:]), Subset(ds, perm[:n_val])


# --------------------------------------------------------------------------- in-memory images
class ImageTensors(Dataset):
    """Images kept as uint8 ``(N, C, H, W)`` in memory, turned into normalized float one item at
    a time: ``augment`` (on the uint8 image) → [0, 1] → ``(x - mean) / std``.

    Why uint8: Fashion-MNIST's 70k images are 55 MB as uint8 and 220 MB as float32 (CIFAR's
    60k: 184 MB vs 737 MB), and every DataLoader worker would hold its own float copy. Decoding
    per item happens in the loader's workers; the class is module-level and its transforms
    are torchvision modules, so it pickles into ``num_workers > 0`` workers.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: Optional[Any] = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"ImageTensors wants uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.augment is not None:
            x = self.augment(x)
        return (x.float() / 255.0 - self.mean) / self.std, self.labels[i]

    def view(self, augment: Optional[Any]) -> ImageTensors:
        """The same images (shared memory, no copy) read with another augmentation."""
        out = copy.copy(self)
        out.augment = augment
        return out


class Augmented(Dataset):
    """``ds`` with ``augment`` applied to each image it returns: the training split of data that
    is already a float tensor (digits, a user's factory)."""

    def __init__(self, ds: Dataset, augment: Any) -> None:
        self.ds, self.augment = ds, augment

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.ds[i]
        return self.augment(x), y


# --------------------------------------------------------------------------- augmentation
#: ``augment: default`` per kind of data, in the run config's own list form (docs/guides/data.md shows them).
#: digits / digits-cluttered / factories: none, so the quick-start demo is unchanged (and
#: digits-cluttered already has random geometry baked into every sample). CIFAR: the standard
#: 4-pixel pad-and-crop plus horizontal flip. Fashion-MNIST: a 2-pixel pad-and-crop, no flip:
#: its footwear is photographed facing one way in train and test alike, so a flip teaches an
#: invariance the test never asks for. ImageFolder: RandomResizedCrop + flip (ImageNet practice).
DEFAULT_AUGMENT: dict[str, list[dict[str, dict[str, Any]]]] = {
    "none": [],
    "fashion-mnist": [{"RandomCrop": {"size": 28, "padding": 2}}],
    "cifar": [{"RandomCrop": {"size": 32, "padding": 4}}, {"RandomHorizontalFlip": {}}],
    "imagefolder": [{"RandomResizedCrop": {"size": "<image_size>"}}, {"RandomHorizontalFlip": {}}],
}

AugmentSpec = str | list[Any]


def augment_steps(spec: AugmentSpec, default: list[dict[str, dict[str, Any]]], image_size: Optional[int] = None) -> list[Any]:
    """The run config's ``augment`` → torchvision.transforms.v2 objects (empty: no augmentation).

    ``spec``: ``default`` (``default``, the data's own) | ``none`` | a list whose items are
    ``{ClassName: {kwargs}}`` (or a bare class name) of torchvision.transforms.v2."""
    if spec == "none":
        return []
    items = default if spec == "default" else spec
    if not isinstance(items, list):
        raise ConfigError(f"run config key 'augment': {spec!r} is not 'default', 'none' or a list of "
                          "torchvision.transforms.v2 classes (e.g. [{RandomCrop: {size: 32, padding: 4}}])")
    out = []
    for i, item in enumerate(items):
        name, kwargs = (item, {}) if isinstance(item, str) else (next(iter(item)), next(iter(item.values()))) \
            if isinstance(item, dict) and len(item) == 1 else (None, None)
        where = f"run config key 'augment[{i}]'"
        if name is None:
            raise ConfigError(f"{where}: {item!r} is not one mapping of a torchvision.transforms.v2 class to its "
                              "arguments, e.g. '- RandomHorizontalFlip: {}'")
        cls = getattr(v2, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
            raise ConfigError(f"{where}: unknown transform {name!r}; it must be a class of torchvision.transforms.v2 "
                              "(e.g. RandomCrop, RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomRotation)")
        kwargs = {k: (image_size if v == "<image_size>" else v) for k, v in (kwargs or {}).items()}
        try:
            out.append(cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                              f"{' '.join(str(exc).split())[:200]}; see torchvision.transforms.v2.{name}") from None
    return out


def _compose(steps: list[Any]) -> Optional[Any]:
    return v2.Compose(steps) if steps else None


def tensor_bundle(full: ImageTensors, test: ImageTensors, num_classes: int, val_fraction: float, seed: int,
                   steps: list[Any], name: str) -> DataBundle:
    """Train/validation split of ``full`` (by ``seed``); only the training view is augmented."""
    train, val = split_dataset(full, val_fraction, seed)
    train = Subset(full.view(_compose(steps)), train.indices)
    return DataBundle(train, val, num_classes, tuple(full.images.shape[1:]), name=name, test=test)


def augment_train(bundle: DataBundle, augment: AugmentSpec) -> DataBundle:
    """Data that is already a float tensor (digits, a factory's) has no augmentation by default;
    a list given in ``augment`` wraps its training split only."""
    steps = augment_steps(augment, DEFAULT_AUGMENT["none"])
    if steps:
        bundle.train = Augmented(bundle.train, v2.Compose(steps))
    return bundle


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class DataRequest:
    """A ``data:`` reference and the run config's data options, as a source receives them."""

    ref: str
    #: What follows ``NAME:`` in ``ref`` ("" when nothing does).
    arg: str
    image_size: Optional[int] = None
    val_fraction: float = 0.25
    seed: int = 0
    augment: AugmentSpec = "default"


class DataSource:
    """One kind of data, named ``NAME`` or ``NAME:ARG`` in a run config's ``data:`` (registered in
    :data:`autoprune.registry.DATASETS` under ``NAME``).

    ``takes_argument``: whether ``NAME:ARG`` is this source's. A source that takes none leaves
    ``NAME:x`` to be read as a ``module:function`` factory: a user's module may share its name."""

    takes_argument: bool = False

    def load(self, request: DataRequest) -> DataBundle:
        raise NotImplementedError
