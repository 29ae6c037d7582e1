"""Python objects handed to the object-first API (``autoprune.search(model, train, val)``).

A run config names its model and data by strings (``resnet18``, ``pkg.nets:build``, ``digits``),
because every part of a run rebuilds them from the config: the dense model from its recipe, a
trial's model file, ``export --rebuild``, a worker on another machine. An ``nn.Module`` or a
``Dataset`` a notebook holds has no such name, so it gets one here: a reference
``object:<Class>@<architecture>-<weights>`` (or ``object:data@<digest>-<classes>``) registered in this
process. ``build_model`` and ``load_data`` resolve these references from the registry (a copy of
the object each time, so the caller's object is never trained or pruned in place).

What that means for a run folder, which outlives the process:

* ``base_model.pt`` holds the object's state dict, and its recipe records the reference: the
  architecture fingerprint (module tree, layer settings, parameter names and shapes) and the
  weights' hash. Resuming needs the same object passed again (same fingerprint); another object
  (another architecture or other weights) is refused with the reason instead of mixing two
  models in one study.
* Anything that rebuilds a model from the run folder (``SearchResult.pick().model``,
  ``autoprune.export``, ``autoprune.remeasure``) works in a process where the object is
  registered, i.e. passed to the call. The CLI cannot rebuild it, and says so; the exported ONNX
  and OpenVINO files of the front need no rebuild.
* ``--workers N`` processes cannot see this process's objects and are refused; several Python
  processes that each pass the same objects may share a study through ``storage``.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autoprune.errors import ConfigError

PREFIX = "object:"

_models: dict[str, nn.Module] = {}
_data: dict[str, "_Data"] = {}


@dataclass
class _Data:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    test: Optional[Dataset] = None


def is_object_ref(ref: Any) -> bool:
    """True for a reference this module made (a model or data given as a Python object)."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def _digest(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:12]


def _architecture_fingerprint(model: nn.Module) -> str:
    """What the module is, apart from its weights: every submodule's name, class and settings
    (``extra_repr``: kernel sizes, strides, ...) and every parameter's and buffer's name, shape and
    dtype. Two objects with the same fingerprint load each other's state dicts and compute the
    same function of them (up to custom ``forward`` code, which cannot be fingerprinted)."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}|{type(m).__module__}.{type(m).__qualname__}|{m.extra_repr()}\n".encode())
    for k, v in model.state_dict().items():
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}\n".encode())
    return _digest(h)


def _weights_fingerprint(model: nn.Module) -> str:
    """Hash of the state dict's values (what ``base_model.pt`` stores)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())  # numpy has no bfloat16
    return _digest(h)


def _model_ref(model: nn.Module) -> str:
    return f"{PREFIX}{type(model).__name__}@{_architecture_fingerprint(model)}-{_weights_fingerprint(model)}"


def register_model(model: nn.Module) -> str:
    """Keep a CPU copy of ``model`` under its reference (the caller's object is left alone)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module or a model reference string, got {type(model).__name__}")
    ref = _model_ref(model)
    if ref not in _models:
        kept = copy.deepcopy(model).cpu().eval()
        _models[ref] = kept
    return ref


def build(ref: str) -> nn.Module:
    """A fresh copy of the registered model ``ref`` (``train.models.build_model``)."""
    if ref not in _models:
        raise ConfigError(
            f"model: {ref} is a Python object given to autoprune.search() in another process, and a module object cannot be "
            "rebuilt from its name; call the Python API (autoprune.search / export / remeasure with model=<the same object>) "
            "in one process, or use the exported ONNX/OpenVINO files of the front"
        )
    return copy.deepcopy(_models[ref]).train()


# --------------------------------------------------------------------------- data
def as_dataset(obj: Any, what: str) -> tuple[Dataset, Optional[int]]:
    """A Dataset and the batch size of a DataLoader it came from (None for a Dataset).

    autoprune builds its own loaders (batch size, shuffling seeded per trial, ``train:`` loader
    options), so a DataLoader contributes its dataset and batch size; its sampler and
    ``collate_fn`` are not used."""
    if isinstance(obj, DataLoader):
        return obj.dataset, obj.batch_size
    if isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        return obj, None
    raise ConfigError(f"{what}: expected a torch Dataset or DataLoader of (input, target) pairs, got {type(obj).__name__}")


def _sample(ds: Dataset, i: int, what: str) -> tuple[torch.Tensor, Any]:
    try:
        item = ds[i]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{what}: reading item {i} failed ({' '.join(str(exc).split())[:200]})") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor)):
        raise ConfigError(f"{what}: items must be (input tensor, target) pairs, got {type(item).__name__}")
    return item[0], item[1]


def _data_fingerprint(train: Dataset, val: Dataset, test: Optional[Dataset] = None) -> str:
    """Digest of the splits: every tensor of a TensorDataset, else the lengths and 16 evenly
    spaced items per split. Recorded in the run config, so resuming with other data is refused."""
    h = hashlib.sha256()
    for name, ds in (("train", train), ("val", val), ("test", test)):
        if ds is None:
            continue
        n = len(ds)  # type: ignore[arg-type]
        h.update(f"{name}|{type(ds).__qualname__}|{n}\n".encode())
        if isinstance(ds, TensorDataset):
            for t in ds.tensors:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            continue
        for i in sorted({int(k * (n - 1) / 15) for k in range(16)} if n else set()):
            x, y = _sample(ds, i, f"{name} data")
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
            h.update(repr(y.tolist() if isinstance(y, torch.Tensor) else y).encode())
    return _digest(h)


def register_data(train: Dataset, val: Dataset, num_classes: int, test: Optional[Dataset] = None) -> str:
    """Register the splits under their reference (``data:`` of the run config)."""
    x, _ = _sample(val, 0, "val data")
    # The class count is part of the name: the same tensors read with another num_classes are other data.
    ref = f"{PREFIX}data@{_data_fingerprint(train, val, test)}-{int(num_classes)}"
    _data.setdefault(ref, _Data(train, val, int(num_classes), tuple(x.shape), test))
    return ref


def registered_data(ref: str) -> "_Data":
    """The splits registered under ``ref`` (``train.data.load_data`` makes its DataBundle)."""
    d = _data.get(ref)
    if d is None:
        raise ConfigError(
            f"data: {ref} are Python datasets given to autoprune.search() in another process; pass the same train= and val= "
            "to the Python API call (autoprune.search / export) in this process"
        )
    return d


def infer_num_classes(model: nn.Module, val: Dataset) -> int:
    """The model's number of outputs per sample: channel 1 of its main output on one val item
    (class logits, or per-pixel class scores for segmentation)."""
    from autoprune.outputs import main_output

    x, _ = _sample(val, 0, "val data")
    probe = copy.deepcopy(model).cpu().eval()
    try:
        with torch.no_grad():
            out = main_output(probe(x.unsqueeze(0).float()))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model: does not accept one val input of shape {[1, *x.shape]} "
                          f"({' '.join(str(exc).split())[:200]})") from None
    if out.dim() < 2:
        raise ConfigError(f"model: its output has shape {list(out.shape)}; expected (batch, classes, ...); "
                          "pass num_classes= if the model's output is laid out otherwise")
    return int(out.shape[1])
