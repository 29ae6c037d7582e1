"""Data loading: the embedded digits default, Fashion-MNIST and CIFAR files, ImageFolder
directories and user factories.

Everything is reduced to a :class:`DataBundle` (train split, held-out split, optional official
test split, class count, input shape) so the rest of the pipeline never cares where images came
from. Augmentation (``augment:`` in the run config) applies to the training split only; the
held-out and test splits always read the same pixels.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import logging
import math
import pickle
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms
from torchvision.transforms import v2

from autoprune.errors import ConfigError

log = logging.getLogger("autoprune")

#: ImageFolders with at most this many images are decoded once up front (about 1-3 ms an image):
#: a broken file then stops the search before the dense model trains, not minutes into it.
#: Larger folders are checked as they are read (:func:`load_rgb` names the file).
CHECK_ALL_IMAGES_UP_TO = 2000


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


# --------------------------------------------------------------------------- Fashion-MNIST
#: Where Debian's ``dataset-fashion-mnist`` package puts the official files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Mean and standard deviation of the 60k training images' pixels in [0, 1].
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
#: IDX magic numbers: 0x08 = unsigned byte, then the number of dimensions.
IDX_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped or not) as a uint8 array; strict: the magic
    number, the dimension count and the payload size must all match, else one error naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(f"{path}: cannot read this IDX file ({' '.join(str(exc).split())[:160]}); "
                          "the file is truncated or corrupt: reinstall or re-copy it") from None
    if len(raw) < 4 + 4 * ndim:
        raise ConfigError(f"{path}: {len(raw)} bytes, too short for an IDX header; the file is truncated")
    zero, dtype, dims = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype != IDX_UBYTE or dims != ndim:
        raise ConfigError(f"{path}: magic number {raw[:4].hex()} is not that of a {ndim}-dimensional unsigned-byte IDX "
                          f"file (0000080{ndim}); is this the right file?")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    start = 4 + 4 * ndim
    want = int(np.prod(shape))
    if len(raw) - start != want:
        raise ConfigError(f"{path}: the header says {'x'.join(map(str, shape))} = {want} bytes of data but the file has "
                          f"{len(raw) - start}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def read_fashion_mnist(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 1, 28, 28), int64 labels) of one split of the official files."""
    img_name, lab_name = FASHION_MNIST_FILES[split]
    images, labels = read_idx(folder / img_name, 3), read_idx(folder / lab_name, 1)
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"{folder / lab_name}: {labels.shape[0]} labels for {images.shape[0]} images in {img_name}")
    if labels.size and labels.max() > 9:
        raise ConfigError(f"{folder / lab_name}: label {int(labels.max())} outside 0-9; not Fashion-MNIST labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(folder: Optional[Path] = None, val_fraction: float = 0.25, seed: int = 0,
                       augment: AugmentSpec = "default") -> DataBundle:
    """Zalando's Fashion-MNIST from the official IDX files (Debian: ``apt-get install
    dataset-fashion-mnist``; or any folder with the same four files). The search's train and
    validation splits both come from the 60k training file (``val_fraction``, ``data_seed``);
    the official 10k test file is :attr:`DataBundle.test`, which only the final stage reads."""
    where = folder or FASHION_MNIST_DIR
    missing = [n for pair in FASHION_MNIST_FILES.values() for n in pair if not (where / n).is_file()]
    if missing:
        how = ("install Debian's package: apt-get install dataset-fashion-mnist" if folder is None else
               "put the four official files there (or use data: fashion-mnist with Debian's dataset-fashion-mnist package)")
        raise ConfigError(f"data: fashion-mnist: {where} lacks {', '.join(missing)}; {how}; "
                          "or point at a folder that has them with data: fashion-mnist:DIR")
    x, y = read_fashion_mnist(where, "train")
    tx, ty = read_fashion_mnist(where, "test")
    mean, std = FASHION_MNIST_STATS
    return _tensor_bundle(ImageTensors(x, y, mean, std), ImageTensors(tx, ty, mean, std), 10, val_fraction, seed,
                          augment_steps(augment, DEFAULT_AUGMENT["fashion-mnist"]), "fashion-mnist")


def _tensor_bundle(full: ImageTensors, test: ImageTensors, num_classes: int, val_fraction: float, seed: int,
                   steps: list[Any], name: str) -> DataBundle:
    """Train/validation split of ``full`` (by ``seed``); only the training view is augmented."""
    train, val = _split(full, val_fraction, seed)
    train = Subset(full.view(_compose(steps)), train.indices)
    return DataBundle(train, val, num_classes, tuple(full.images.shape[1:]), name=name, test=test)


# --------------------------------------------------------------------------- CIFAR
#: Per-channel mean and std of the training images in [0, 1] (the commonly used values).
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """What the real CIFAR pickles name: ndarray reconstruction (the module is numpy.core.multiarray
    in files written by numpy 1.x, numpy._core.multiarray by numpy 2.x) and numpy scalars; plus
    ``_codecs.encode``, with which Python 3 writes bytes in protocol-2 pickles. Each resolves to
    the running numpy's own object, whatever module name the file used."""
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    out: dict[tuple[str, str], Any] = {("_codecs", "encode"): __import__("codecs").encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = reconstruct
        out[(mod, "scalar")] = scalar
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "ndarray")] = np.ndarray
        out[(mod, "dtype")] = np.dtype
    return out


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles data only: any global but the few numpy names a CIFAR batch uses is refused, so
    a crafted file cannot run code (a plain ``pickle.load`` would call whatever it names)."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle CIFAR batch → (uint8 images (N, 3, 32, 32), int64 labels)."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as exc:
        raise ConfigError(f"{path}: not a CIFAR python batch this loader accepts ({' '.join(str(exc).split())[:160]}); "
                          "only the numpy arrays and lists of the official files are unpickled") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ConfigError(f"{path}: a CIFAR batch is a dict with b'data' and {label_key!r}; this one has {keys}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ConfigError(f"{path}: b'data' is {data.dtype} {data.shape} for {labels.shape[0]} labels; a CIFAR batch holds "
                          "uint8 rows of 3072 pixels (3x32x32), one per label")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(root: Path, classes: int, val_fraction: float = 0.25, seed: int = 0, augment: AugmentSpec = "default") -> DataBundle:
    """CIFAR-10 / CIFAR-100 "python version" batches in ``root`` (the extracted folder, or the
    folder that holds it). Train/validation come from the training batches; the official test
    batch is :attr:`DataBundle.test`."""
    sub, train_files, test_files, label_key = CIFAR_LAYOUT[classes]
    folder = root / sub if (root / sub).is_dir() else root
    missing = [n for n in train_files + test_files if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"data: cifar{classes}:{root}: {folder} lacks {', '.join(missing)}; give the extracted "
                          f"{sub} folder (from the python version of CIFAR-{classes}) or the folder holding it")

    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_cifar_batch(folder / n, label_key) for n in names]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise ConfigError(f"{folder}: labels outside 0-{classes - 1}; is this CIFAR-{classes}?")
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    (x, y), (tx, ty) = read(train_files), read(test_files)
    mean, std = CIFAR_STATS[classes]
    return _tensor_bundle(ImageTensors(x, y, mean, std), ImageTensors(tx, ty, mean, std), classes, val_fraction, seed,
                          augment_steps(augment, DEFAULT_AUGMENT["cifar"]), f"cifar{classes}")


def load_rgb(path: str, draft: Optional[int] = None) -> Image.Image:
    """torchvision's PIL loader, but a file PIL cannot decode (truncated, corrupt, not an image)
    is a one-line error naming it: otherwise it surfaces from deep inside a DataLoader as a bare
    ``OSError: image file is truncated`` with no file name. ``draft``: decode JPEGs at about
    that size (the up-front check needs the decode to succeed, not the full-size pixels)."""
    try:
        with Image.open(path) as img:
            if draft:
                img.draft("RGB", (draft, draft))
            return img.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error ...
        raise ConfigError(f"{path}: cannot read this image ({' '.join(str(exc).split())[:200]}); "
                          "replace or delete the file") from None


def _check_images(paths: list[str], image_size: int) -> None:
    """Decode every image of a small folder once, before any training (see CHECK_ALL_IMAGES_UP_TO);
    one error naming the first unreadable file and how many others there are."""
    if len(paths) > CHECK_ALL_IMAGES_UP_TO:
        return
    bad: list[ConfigError] = []
    for path in paths:
        try:
            load_rgb(path, draft=image_size)
        except ConfigError as exc:
            bad.append(exc)
    if bad:
        more = f" (and {len(bad) - 1} more unreadable image(s) in this folder)" if len(bad) > 1 else ""
        raise ConfigError(f"{bad[0]}{more}")


def _class_checks(root: Path, classes: list[str], train_targets: list[int], val_targets: list[int], fix: str) -> None:
    """Refuse fewer than two classes (every model scores 1.000 and the search means nothing) and
    warn when the held-out split lacks a class the model trains on (its accuracy ignores it)."""
    if len(classes) < 2:
        found = f"one class folder ({classes[0]!r})" if classes else "no class folder"
        raise ConfigError(f"{root}: an ImageFolder needs at least two class folders (class_x/img.png), found {found}; "
                          "add a folder of images for every other class")
    missing = sorted(set(train_targets) - set(val_targets))
    if missing:
        names = ", ".join(repr(classes[i]) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        counts = Counter(train_targets)
        log.warning(
            f"{root}: the validation split has no image of {len(missing)} class(es) the training split has ({names}; "
            f"{sum(counts[i] for i in missing)} training images): accuracy will not measure them; {fix}"
        )


IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def image_folder_transforms(image_size: int, augment: AugmentSpec = "default") -> tuple[Any, Any]:
    """(training, evaluation) transforms of an ImageFolder. Evaluation: Resize + CenterCrop.
    Training: ``augment`` on the decoded image (default RandomResizedCrop + flip), then Resize +
    CenterCrop so every batch has one shape whatever the list did; ``none``: the evaluation one."""
    evaluation = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize(*IMAGENET_STATS),
    ])
    steps = augment_steps(augment, DEFAULT_AUGMENT["imagefolder"], image_size)
    if not steps:
        return evaluation, evaluation
    training = v2.Compose([*steps, v2.Resize(image_size), v2.CenterCrop(image_size), v2.ToImage(),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(*IMAGENET_STATS)])
    return training, evaluation


def load_image_folder(root: Path, image_size: int = 224, val_fraction: float = 0.25, seed: int = 0,
                      augment: AugmentSpec = "default") -> DataBundle:
    """An ImageFolder tree (``class_x/img.png``); uses ``train/`` and ``val/`` subfolders when
    present, and a ``test/`` beside them as the official test split (never seen by the search).
    With one tree, the random split's training part reads through the augmenting transform and
    the held-out part through the plain one (two views of one file list)."""
    train_tf, eval_tf = image_folder_transforms(image_size, augment)
    test = None
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = datasets.ImageFolder(str(root / "train"), transform=train_tf, loader=load_rgb)
            val = datasets.ImageFolder(str(root / "val"), transform=eval_tf, loader=load_rgb)
            if train.classes != val.classes:
                raise ConfigError(f"{root}: train/ and val/ have different class folders ({train.classes} vs {val.classes})")
            if (root / "test").is_dir():
                test = datasets.ImageFolder(str(root / "test"), transform=eval_tf, loader=load_rgb)
                if test.classes != train.classes:
                    raise ConfigError(f"{root}: train/ and test/ have different class folders ({train.classes} vs {test.classes})")
            classes = train.classes
            train_targets, val_targets = list(train.targets), list(val.targets)
            paths = [p for p, _ in train.samples + val.samples + (test.samples if test is not None else [])]
        else:
            full = datasets.ImageFolder(str(root), transform=eval_tf, loader=load_rgb)
            classes = full.classes
            train_part, val = _split(full, val_fraction, seed)
            augmented = copy.copy(full)  # shares the file list; only the transform differs
            augmented.transform = train_tf
            train = Subset(augmented, train_part.indices)
            train_targets = [full.targets[i] for i in train.indices]
            val_targets = [full.targets[i] for i in val.indices]
            paths = [p for p, _ in full.samples]
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"{root}: not a usable ImageFolder directory (class subfolders with images): {exc}") from None
    fix = ("add images of those classes to val/" if (root / "train").is_dir() and (root / "val").is_dir()
           else "add images of those classes, or raise val_fraction")
    _class_checks(root, classes, train_targets, val_targets, fix)
    _check_images(paths, image_size)
    x0 = val[0][0]
    return DataBundle(train, val, len(classes), tuple(x0.shape), name=root.name, test=test)


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


#: ``data:`` values other than a folder or ``module:function`` (docs/guides/data.md).
DATA_HELP = ("'digits', 'digits-cluttered', 'fashion-mnist', 'fashion-mnist:DIR', 'cifar10:DIR', 'cifar100:DIR', "
             "an existing ImageFolder directory, or 'module:function'")


def load_data(ref: str, image_size: Optional[int] = None, val_fraction: float = 0.25, seed: int = 0,
              augment: AugmentSpec = "default", val_samples: Optional[int] = None) -> DataBundle:
    """``ref`` (see :data:`DATA_HELP`) → a DataBundle. ``augment`` applies to the training split
    only; ``val_samples`` fixes the part of the held-out split that trials are scored on."""
    bundle = _load(ref, image_size, val_fraction, seed, augment)
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


def _load(ref: str, image_size: Optional[int], val_fraction: float, seed: int, augment: AugmentSpec) -> DataBundle:
    kind, _, arg = ref.partition(":")
    if kind == "object":  # Datasets given to the Python API (autoprune/objects.py)
        from autoprune import objects

        reg = objects.registered_data(ref)
        return _augment_train(DataBundle(reg.train, reg.val, reg.num_classes, reg.input_shape, name="python objects", test=reg.test), augment)
    if ref in ("digits", "digits-cluttered"):
        b = load_digits(image_size or 16, val_fraction, seed) if ref == "digits" else \
            load_cluttered_digits(image_size or 32, val_fraction, seed)
        return _augment_train(b, augment)
    if kind == "fashion-mnist":
        return load_fashion_mnist(Path(arg) if arg else None, val_fraction, seed, augment)
    if kind in ("cifar10", "cifar100"):
        if not arg or not Path(arg).is_dir():
            raise ConfigError(f"data: {ref!r}: give the folder of the CIFAR python batches, e.g. {kind}:data/"
                              f"{CIFAR_LAYOUT[int(kind[5:])][0]} (nothing is downloaded)")
        return load_cifar(Path(arg), int(kind[5:]), val_fraction, seed, augment)
    p = Path(ref)
    if p.is_dir():
        return load_image_folder(p, image_size or 224, val_fraction, seed, augment)
    if ":" in ref and not p.exists():
        return _augment_train(_from_factory(ref), augment)
    raise ConfigError(f"data: {ref!r} is not {DATA_HELP}")


def _augment_train(bundle: DataBundle, augment: AugmentSpec) -> DataBundle:
    """Data that is already a float tensor (digits, a factory's) has no augmentation by default;
    a list given in ``augment`` wraps its training split only."""
    steps = augment_steps(augment, DEFAULT_AUGMENT["none"])
    if steps:
        bundle.train = Augmented(bundle.train, v2.Compose(steps))
    return bundle
