"""Data the user's own code gives: a ``module:function`` factory, or Datasets passed to the
Python API (``object:data@...``, :mod:`autoprune.objects`)."""

from __future__ import annotations

from typing import Any

from autoprune import objects
from autoprune.coderef import import_ref, split_ref
from autoprune.errors import ConfigError
from autoprune.registry import DATASETS
from autoprune.train.data.bundle import DataBundle, DataRequest, DataSource, augment_train

__all__ = ["from_factory"]


def from_factory(ref: str) -> DataBundle:
    """What a ``module:function`` returns: a DataBundle, or ``(train, val[, num_classes])``."""
    fn = import_ref(ref, "data")
    fn_name = split_ref(ref)[1]
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


class _PythonObjects(DataSource):
    """``object:data@...``: the splits registered by :func:`autoprune.search` in this process."""

    takes_argument = True

    def load(self, request: DataRequest) -> DataBundle:
        reg = objects.registered_data(request.ref)
        return augment_train(DataBundle(reg.train, reg.val, reg.num_classes, reg.input_shape, name="python objects",
                                        test=reg.test), request.augment)


DATASETS.register("object", _PythonObjects)
