"""CIFAR-10 / CIFAR-100 from the "python version" batches, unpickled as data only."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.errors import ConfigError
from autoprune.registry import DATASETS
from autoprune.train.data.bundle import (
    DEFAULT_AUGMENT,
    AugmentSpec,
    DataBundle,
    DataRequest,
    DataSource,
    ImageTensors,
    augment_steps,
    tensor_bundle,
)

__all__ = ["CIFAR_LAYOUT", "CIFAR_STATS", "load_cifar", "read_cifar_batch"]

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
    return tensor_bundle(ImageTensors(x, y, mean, std), ImageTensors(tx, ty, mean, std), classes, val_fraction, seed,
                          augment_steps(augment, DEFAULT_AUGMENT["cifar"]), f"cifar{classes}")


class _Cifar(DataSource):
    """``data: cifar10:DIR`` / ``cifar100:DIR``: the folder of the batches is required (nothing is downloaded)."""

    takes_argument = True

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def load(self, request: DataRequest) -> DataBundle:
        kind, arg = f"cifar{self.classes}", request.arg
        if not arg or not Path(arg).is_dir():
            raise ConfigError(f"data: {request.ref!r}: give the folder of the CIFAR python batches, e.g. {kind}:data/"
                              f"{CIFAR_LAYOUT[self.classes][0]} (nothing is downloaded)")
        return load_cifar(Path(arg), self.classes, request.val_fraction, request.seed, request.augment)


DATASETS.register("cifar10", lambda: _Cifar(10))
DATASETS.register("cifar100", lambda: _Cifar(100))
