"""Data loading: the embedded digits default, ImageFolder directories and user factories.

Everything is reduced to a :class:`DataBundle` (train split, held-out split, class count,
input shape) so the rest of the pipeline never cares where images came from.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

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

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        ds = {"train": self.train, "val": self.val, "test": self.test}[split]
        if ds is None:
            raise ValueError(f"{self.name} has no {split!r} split")
        gen = torch.Generator().manual_seed(seed)
        kw = dict(self.loader_kwargs)
        if not kw.get("num_workers"):
            kw.pop("persistent_workers", None)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False, **kw)

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
            train = datasets.ImageFolder(str(root / "train"), transform=tf, loader=load_rgb)
            val = datasets.ImageFolder(str(root / "val"), transform=tf, loader=load_rgb)
            if train.classes != val.classes:
                raise ConfigError(f"{root}: train/ and val/ have different class folders ({train.classes} vs {val.classes})")
            classes = train.classes
            train_targets, val_targets = list(train.targets), list(val.targets)
            paths = [p for p, _ in train.samples + val.samples]
        else:
            full = datasets.ImageFolder(str(root), transform=tf, loader=load_rgb)
            classes = full.classes
            train, val = _split(full, val_fraction, seed)
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
    """``digits`` | ``digits-cluttered`` | an ImageFolder directory | ``module:function``."""
    if ref == "digits":
        return load_digits(image_size or 16, val_fraction, seed)
    if ref == "digits-cluttered":
        return load_cluttered_digits(image_size or 32, val_fraction, seed)
    p = Path(ref)
    if p.is_dir():
        return load_image_folder(p, image_size or 224, val_fraction, seed)
    if ":" in ref and not p.exists():
        return _from_factory(ref)
    raise ConfigError(f"data: {ref!r} is not 'digits', 'digits-cluttered', an existing ImageFolder directory, or 'module:function'")
