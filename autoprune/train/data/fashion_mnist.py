"""Zalando's Fashion-MNIST from the official IDX files (Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Optional

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

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_FILES", "FASHION_MNIST_STATS", "IDX_UBYTE", "load_fashion_mnist",
           "read_fashion_mnist", "read_idx"]

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
    return tensor_bundle(ImageTensors(x, y, mean, std), ImageTensors(tx, ty, mean, std), 10, val_fraction, seed,
                          augment_steps(augment, DEFAULT_AUGMENT["fashion-mnist"]), "fashion-mnist")


class _FashionMnist(DataSource):
    """``data: fashion-mnist`` (Debian's files) or ``fashion-mnist:DIR``."""

    takes_argument = True

    def load(self, request: DataRequest) -> DataBundle:
        return load_fashion_mnist(Path(request.arg) if request.arg else None, request.val_fraction, request.seed,
                                  request.augment)


DATASETS.register("fashion-mnist", _FashionMnist)
