"""ImageFolder directories (``class_x/img.png``), with ``train/``, ``val/`` and ``test/`` splits
when present: checked before the search trains, so a broken file or a missing class is one
line naming it."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import datasets, transforms
from torchvision.transforms import v2

from autoprune.errors import ConfigError
from autoprune.train.data.bundle import DEFAULT_AUGMENT, AugmentSpec, DataBundle, augment_steps, split_dataset

__all__ = ["CHECK_ALL_IMAGES_UP_TO", "IMAGENET_STATS", "image_folder_transforms", "load_image_folder", "load_rgb"]

log = logging.getLogger("autoprune")

#: ImageFolders with at most this many images are decoded once up front (about 1-3 ms an image):
#: a broken file then stops the search before the dense model trains, not minutes into it.
#: Larger folders are checked as they are read (:func:`load_rgb` names the file).
CHECK_ALL_IMAGES_UP_TO = 2000


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
            train_part, val = split_dataset(full, val_fraction, seed)
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
