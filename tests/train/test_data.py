"""Data readers (Fashion-MNIST IDX, CIFAR pickles), augmentation on the training split only, the
fixed validation subset trials are scored on, and the official test split: never read by a
trial, reported by the final stage."""

from __future__ import annotations

import gzip
import json
import pickle
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_config, write_yaml
from PIL import Image
from torch.utils.data import DataLoader, Subset

from autoprune.errors import ConfigError
from autoprune.train import data as data_pkg
from autoprune.train.data import bundle as bundle_mod
from autoprune.train.data import fashion_mnist as fashion_mnist_mod
from autoprune.train.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    load_data,
    read_fashion_mnist,
    read_idx,
)

HAVE_FMNIST = all((FASHION_MNIST_DIR / n).is_file() for pair in FASHION_MNIST_FILES.values() for n in pair)


# --------------------------------------------------------------------------- helpers
def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    """An IDX file as LeCun's format defines it: 0, 0, type 0x08 (ubyte), ndim, big-endian sizes."""
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_fashion(folder: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lab_name = FASHION_MNIST_FILES[split]
        arrays[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[split + "_labels"] = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / img_name, arrays[split])
        write_idx(folder / lab_name, arrays[split + "_labels"])
    return arrays


def pickle2(obj: object, numpy_module: bytes | None = None) -> bytes:
    """Protocol 2 (what CIFAR's files use); ``numpy_module`` rewrites the module the file names for
    ndarray reconstruction, to imitate files written by the other numpy major version."""
    raw = pickle.dumps(obj, protocol=2)
    if numpy_module is not None:
        for name in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
            raw = raw.replace(name + b"\n", numpy_module + b"\n")
    return raw


def fake_cifar(root: Path, classes: int, n: int = 12, numpy_module: bytes | None = None) -> dict[str, np.ndarray]:
    """Tiny batches in the real layout: cifar-10-batches-py/data_batch_1..5 + test_batch with
    b'data' / b'labels'; cifar-100-python/train + test with b'fine_labels' / b'coarse_labels'."""
    rng = np.random.default_rng(classes)
    if classes == 10:
        folder, names, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder, names, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True)
    out = {}
    for name in names:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, n)]
        batch = {b"batch_label": name.encode(), key: labels, b"data": x, b"filenames": [b"img%d.png" % i for i in range(n)]}
        if classes == 100:
            batch[b"coarse_labels"] = [v // 5 for v in labels]
        (folder / name).write_bytes(pickle2(batch, numpy_module))
        out[name] = x
    return out


def unnormalize(ds, x: torch.Tensor) -> np.ndarray:
    return np.rint(((x * ds.std + ds.mean) * 255).numpy()).astype(np.uint8)


# --------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.skipif(not HAVE_FMNIST, reason=f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (CI installs it)")
def test_real_fashion_mnist_files():
    x, y = read_fashion_mnist(FASHION_MNIST_DIR, "train")
    tx, ty = read_fashion_mnist(FASHION_MNIST_DIR, "test")
    assert tuple(x.shape) == (60000, 1, 28, 28) and tuple(tx.shape) == (10000, 1, 28, 28)
    assert x.dtype == torch.uint8 and int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(ty).tolist() == [1000] * 10
    b = load_data("fashion-mnist", val_fraction=0.25, seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (45000, 15000, 10000)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10 and b.name == "fashion-mnist"
    xb, _ = next(iter(b.loader("test", 512)))
    assert abs(float(xb.mean())) < 0.2 and 0.8 < float(xb.std()) < 1.2  # normalized with the training statistics


def test_fashion_mnist_dir_form_reads_the_same_pixels(tmp_path):
    arrays = fake_fashion(tmp_path / "fm")
    b = load_data(f"fashion-mnist:{tmp_path / 'fm'}", val_fraction=0.25, seed=0, augment="none")
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 20)
    x, y = b.test[3]
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 28, 28) and int(y) == 3
    np.testing.assert_array_equal(unnormalize(b.test, x)[0], arrays["test"][3])
    i = b.val.indices[0]  # the validation split comes from the TRAIN file
    np.testing.assert_array_equal(unnormalize(b.test, b.val[0][0])[0], arrays["train"][i])
    assert sorted(b.train.indices + b.val.indices) == list(range(40))


def test_fashion_mnist_missing_files_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist_mod, "FASHION_MNIST_DIR", tmp_path / "none")
    with pytest.raises(ConfigError, match=r"apt-get install dataset-fashion-mnist.*fashion-mnist:DIR"):
        load_data("fashion-mnist")
    with pytest.raises(ConfigError, match=r"empty lacks train-images-idx3-ubyte.gz.*fashion-mnist:DIR"):
        (tmp_path / "empty").mkdir()
        load_data(f"fashion-mnist:{tmp_path / 'empty'}")


def test_idx_reader_is_strict(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "ok.gz", arr), 3), arr)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "plain", arr, gz=False), 3), arr)
    good = (tmp_path / "ok.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])  # a truncated download
    with pytest.raises(ConfigError, match=r"cut.gz: cannot read this IDX file .*truncated"):
        read_idx(tmp_path / "cut.gz", 3)
    raw = gzip.decompress(good)
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-5]))  # a valid gzip of too little data
    with pytest.raises(ConfigError, match=r"short.gz: the header says 2x28x28 = 1568 bytes of data but the file has 1563"):
        read_idx(tmp_path / "short.gz", 3)
    with pytest.raises(ConfigError, match=r"ok.gz: magic number 00000803 is not that of a 1-dimensional"):
        read_idx(tmp_path / "ok.gz", 1)  # an image file where labels belong
    folder = tmp_path / "fm"
    fake_fashion(folder)
    write_idx(folder / FASHION_MNIST_FILES["train"][1], np.zeros(39, dtype=np.uint8))
    with pytest.raises(ConfigError, match="39 labels for 40 images"):
        load_data(f"fashion-mnist:{folder}")


# --------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("numpy_module", [None, b"numpy.core.multiarray", b"numpy._core.multiarray"])
def test_cifar10_batches(tmp_path, numpy_module):
    """The real layout, as written by this numpy and as named by numpy 1.x / 2.x files."""
    batches = fake_cifar(tmp_path, 10, numpy_module=numpy_module)
    b = load_data(f"cifar10:{tmp_path}", val_fraction=0.25, seed=0, augment="none")
    assert (len(b.train) + len(b.val), len(b.test)) == (60, 12)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10 and b.name == "cifar10"
    np.testing.assert_array_equal(unnormalize(b.test, b.test[5][0]), batches["test_batch"][5].reshape(3, 32, 32))
    # the extracted folder itself works too
    assert len(load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}").test) == 12


def test_cifar100_batches(tmp_path):
    batches = fake_cifar(tmp_path, 100)
    b = load_data(f"cifar100:{tmp_path}", val_fraction=0.25, seed=0, augment="none")
    assert (len(b.train), len(b.val), len(b.test), b.num_classes) == (9, 3, 12, 100)
    labels = pickle.loads((tmp_path / "cifar-100-python" / "test").read_bytes(), encoding="bytes")[b"fine_labels"]
    assert int(b.test[7][1]) == labels[7]
    np.testing.assert_array_equal(unnormalize(b.test, b.test[7][0]), batches["test"][7].reshape(3, 32, 32))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_is_refused(tmp_path):
    fake_cifar(tmp_path, 10)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(ConfigError, match=r"data_batch_3: not a CIFAR python batch .*refused global (posix|os)\.system"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"cifar10:.*give the folder"):
        load_data(f"cifar10:{tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"lacks train, test"):
        load_data(f"cifar100:{tmp_path}")


# --------------------------------------------------------------------------- augmentation
def _reads_differ(ds, i: int, n: int = 8) -> bool:
    first = ds[i][0]
    return any(not torch.equal(first, ds[i][0]) for _ in range(n))


def test_augmentation_on_the_training_split_only(tmp_path):
    fake_fashion(tmp_path / "fm")
    b = load_data(f"fashion-mnist:{tmp_path / 'fm'}")  # default: 2-pixel pad-and-crop
    assert _reads_differ(b.train, 0)
    assert not _reads_differ(b.val, 0) and not _reads_differ(b.test, 0)
    # the training and validation views share one uint8 tensor (no copy)
    assert b.train.dataset.images.data_ptr() == b.val.dataset.images.data_ptr()
    none = load_data(f"fashion-mnist:{tmp_path / 'fm'}", augment="none")
    assert not _reads_differ(none.train, 0)
    flip = load_data(f"fashion-mnist:{tmp_path / 'fm'}", augment=[{"RandomHorizontalFlip": {"p": 1.0}}])
    assert torch.equal(flip.train[0][0], none.train[0][0].flip(-1))
    # picklable for DataLoader workers (num_workers > 0), and the workers augment too
    assert _reads_differ(pickle.loads(pickle.dumps(b.train)), 0)
    xs = torch.cat([x for x, _ in DataLoader(b.train, batch_size=10, num_workers=2)])
    assert xs.shape == (30, 1, 28, 28)


def _image_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_split_augments_train_not_val(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    b = load_data(str(root), image_size=16, val_fraction=0.25, seed=0)
    assert isinstance(b.train, Subset) and b.train.dataset is not b.val.dataset  # two views, one file list
    assert b.train.dataset.samples is b.val.dataset.samples
    assert tuple(b.train[0][0].shape) == tuple(b.val[0][0].shape) == (3, 16, 16)
    assert _reads_differ(b.train, 0) and not _reads_differ(b.val, 0)
    assert not _reads_differ(load_data(str(root), image_size=16, augment="none").train, 0)
    pickle.loads(pickle.dumps(b.train))


def test_digits_unchanged_by_default_and_augment_errors():
    d = load_data("digits")
    assert isinstance(d.train, Subset) and isinstance(d.train.dataset, torch.utils.data.TensorDataset)
    assert not _reads_differ(d.train, 0)
    aug = load_data("digits", augment=[{"RandomHorizontalFlip": {"p": 1.0}}])
    assert torch.equal(aug.train[0][0], d.train[0][0].flip(-1)) and torch.equal(aug.val[0][0], d.val[0][0])
    with pytest.raises(ConfigError, match=r"augment\[1\]'.*'RandomFoo'.*torchvision.transforms.v2"):
        load_data("digits", augment=[{"RandomHorizontalFlip": {}}, {"RandomFoo": {}}])
    with pytest.raises(ConfigError, match=r"augment\[0\]'.*RandomCrop\(sizee=3\) failed"):
        load_data("digits", augment=[{"RandomCrop": {"sizee": 3}}])


# --------------------------------------------------------------------------- honest evaluation
def test_val_subset_is_fixed_by_data_seed():
    """What every worker builds in prepare(): the same images whatever else happened before."""
    a = load_data("digits", val_samples=50, seed=0)
    torch.manual_seed(123)  # another worker, another sampler seed: the global RNG does not matter
    b = load_data("digits", val_samples=50, seed=0)
    c = load_data("digits", val_samples=50, seed=1)
    assert len(a.search_val) == 50 and a.search_val.indices == b.search_val.indices
    assert c.search_val.indices != a.search_val.indices
    assert set(a.search_val.indices) <= set(range(len(a.val)))
    assert load_data("digits", val_samples=10_000).search_val is None  # all of it: no subset
    assert len(a.loader("search", 256).dataset) == 50 and len(a.loader("val", 256).dataset) == len(a.val)


GUARDED = '''
import traceback
from torch.utils.data import Dataset, Subset
from autoprune.train.data import load_digits

READS = []  # (inside run_trial, inside final_stage) per test image read


class Guarded(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        names = {f.name for f in traceback.extract_stack()}
        READS.append(("run_trial" in names, "final_stage" in names))
        return self.ds[i]


def bundle():
    b = load_digits(16, 0.25, 0)
    idx = b.val.indices
    b.val, b.test = Subset(b.val.dataset, idx[:-100]), Guarded(Subset(b.val.dataset, idx[-100:]))
    return b
'''


@pytest.mark.slow
def test_search_never_reads_the_test_split(tmp_path, fast_profile, monkeypatch):
    import autoprune
    from autoprune.config import load_run_config

    (tmp_path / "guarded_data.py").write_text(textwrap.dedent(GUARDED))
    monkeypatch.syspath_prepend(str(tmp_path))
    import guarded_data

    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=2, data="guarded_data:bundle", val_samples=60)
    res = autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))))
    reads = guarded_data.READS
    assert reads and not any(in_trial for in_trial, _ in reads)  # no trial ever read a test image
    assert any(in_final for _, in_final in reads)  # the final stage did
    dense = json.loads((tmp_path / "out" / "dense.json").read_text())
    assert {"accuracy", "search_accuracy", "test_accuracy"} <= set(dense)
    done = [t for t in res.study.trials if t.values]
    assert done and all(abs(t.values[0] * 60 - round(t.values[0] * 60)) < 1e-9 for t in done)  # scored on the 60
    final = json.loads((tmp_path / "out" / "final.json").read_text())
    pareto = json.loads((tmp_path / "out" / "pareto.json").read_text())["pareto"]
    assert pareto and all(r["test_accuracy"] == final[str(r["trial"])]["test_accuracy"] for r in pareto)
    assert all(final[str(r["trial"])]["steps"] == 0 and r["accuracy"] == final[str(r["trial"])]["final_accuracy"]
               for r in pareto)
    meta = json.loads((tmp_path / "out" / pareto[0]["artifacts"] / "metadata.json").read_text())
    assert meta["test_accuracy"] == pareto[0]["test_accuracy"]


def test_run_config_keys():
    from autoprune.config import load_run_config

    cfg = load_run_config(None, {"augment": [{"RandomCrop": {"size": 28, "padding": 2}}, "RandomHorizontalFlip"], "val_samples": 500})
    assert cfg.val_samples == 500 and cfg.augment[1] == "RandomHorizontalFlip"
    with pytest.raises(ConfigError, match=r"key 'augment': .*'default', 'none' or a list of torchvision.transforms.v2"):
        load_run_config(None, {"augment": "heavy"})
    with pytest.raises(ConfigError, match=r"key 'val_samples'"):
        load_run_config(None, {"val_samples": 0})
    shipped = load_run_config("fashion-mnist")
    assert (shipped.data, shipped.model, shipped.val_samples) == ("fashion-mnist", "resnet18", 1000)


# --------------------------------------------------------------------------- the DATASETS registry
class _Toy(data_pkg.DataSource):
    """A source of one's own, ``toy:N``: N float images of two classes."""

    takes_argument = True

    def load(self, request: data_pkg.DataRequest) -> data_pkg.DataBundle:
        n = int(request.arg or 8)
        ds = torch.utils.data.TensorDataset(torch.randn(n, 1, 4, 4), torch.arange(n) % 2)
        return data_pkg.DataBundle(ds, ds, 2, (1, 4, 4), name="toy")


def test_data_sources_are_registered_by_name(monkeypatch):
    from autoprune.registry import DATASETS
    from autoprune.trust import data_code

    monkeypatch.setattr(DATASETS, "_factories", dict(DATASETS._factories))  # the test's registrations go away
    assert {"digits", "digits-cluttered", "fashion-mnist", "cifar10", "cifar100", "object"} <= set(data_pkg.available())
    data_pkg.register("toy", _Toy)
    bundle = load_data("toy:6", val_samples=3)
    assert (bundle.name, len(bundle.train), len(bundle.search_val)) == ("toy", 6, 3)
    assert data_code("toy:6") is None  # a registered source with an argument names no code to import
    assert data_code("pkg.mod:make") == "pkg.mod:make"
    with pytest.warns(UserWarning, match="data source 'toy' is registered twice"):
        data_pkg.register("toy", lambda: _Toy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data_pkg.register("toy", _Toy, override=True)


def test_a_source_without_argument_leaves_name_colon_to_factories(tmp_path, monkeypatch):
    """``digits:make`` is a function ``make`` in a user module ``digits``: the digits source takes no argument."""
    (tmp_path / "digits.py").write_text(
        "import torch\n"
        "def make():\n"
        "    ds = torch.utils.data.TensorDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))\n"
        "    return ds, ds, 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "digits", raising=False)
    bundle = load_data("digits:make")
    assert (bundle.name, bundle.num_classes, len(bundle.train)) == ("make", 2, 4)
    assert load_data("digits").name == "digits"


def test_evaluation_reuses_one_loader_across_trials(monkeypatch):
    """Every trial's evaluation reads the search split through the same DataLoader (issue 21,
    item 4): no loader, and with train.num_workers no worker processes, built per trial; shuffled
    training loaders stay per call (their order is seeded per call); pickling drops the cache."""
    from autoprune.train.models import build_model, evaluate

    data = load_data("digits", 16, 0.2, 0, "none", 40)
    built = []
    real = bundle_mod.DataLoader

    def counting(*a, **k):
        built.append(k.get("shuffle"))
        return real(*a, **k)

    monkeypatch.setattr(bundle_mod, "DataLoader", counting)
    model = build_model("demo", data.num_classes, in_channels=data.input_shape[0])
    accs = [evaluate(model, data, split="search") for _ in range(3)]
    assert built == [False] and len(set(accs)) == 1
    assert data.loader("search", 256) is data.loader("search", 256)
    assert data.loader("val", 256) is not data.loader("search", 256)
    assert data.loader("train", 8, shuffle=True, seed=1) is not data.loader("train", 8, shuffle=True, seed=1)
    assert pickle.loads(pickle.dumps(data))._loaders == {}
