"""``autoprune bench``: the latency of one ONNX file (or of a module exported to ONNX) on a
device profile, with the code the search measures with.

The file is checked before it is timed, so that a user's mistake is one line naming the fix
rather than a runtime's traceback: it must be a readable ONNX model, its external weights files
must be beside it (and a remote target, which receives the .onnx file alone, cannot have any),
its batch size must agree with ``--batch-size``, and dynamic dimensions need the profile's
``input_shape``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn

from autoprune.config import load_device_profile, shipped_dir
from autoprune.errors import ConfigError
from autoprune.measure import backends
from autoprune.measure.onnx import external_data_files

__all__ = ["bench", "onnx_profiles"]


def onnx_profiles() -> list[str]:
    """Names of the shipped device profiles that can time an ONNX file (backend other than torch)."""
    names = []
    for path in sorted(shipped_dir("device_profiles").glob("*.yaml")):
        with contextlib.suppress(ConfigError):
            if load_device_profile(str(path)).backend != "torch":
                names.append(path.stem)
    return names


def bench(
    onnx_path: Union[str, Path, nn.Module],
    device_profile: str = "onnxruntime-cpu",
    batch_size: Optional[int] = None,
    *,
    example: Optional[Any] = None,
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Latency of an ONNX file, or of an ``nn.Module`` exported to ONNX (give ``example``, one
    input batch), on a device profile, with the code the search uses."""
    if isinstance(onnx_path, nn.Module):
        import copy
        import tempfile

        import torch

        from autoprune.measure.onnx import cpu_fp32, export_onnx

        if not isinstance(example, torch.Tensor):
            raise ConfigError("bench: give example= an input tensor with its batch dimension (e.g. torch.zeros(1, 3, 224, 224)) "
                              "to export the module to ONNX")
        with tempfile.TemporaryDirectory(prefix="autoprune-bench-") as tmp:
            path = export_onnx(cpu_fp32(copy.deepcopy(onnx_path)).eval(),  # the caller's module keeps its mode
                                example.detach().cpu().float(), Path(tmp) / "model.onnx", exporter)
            res = bench(path, device_profile, batch_size)
        return {**res, "onnx": f"<{type(onnx_path).__name__} exported to ONNX>"}
    import numpy as np
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise ConfigError(f"{onnx_path}: file not found" if not p.exists() else f"{onnx_path}: not a file; pass an .onnx file")
    profile = load_device_profile(device_profile)
    if profile.backend == "torch":
        raise ConfigError(
            f"{onnx_path}: device profile {profile.name!r} (backend torch) times PyTorch modules, not ONNX files; "
            f"bench it with a profile whose backend is onnxruntime, openvino or remote (shipped: {', '.join(onnx_profiles())})"
        )
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{onnx_path}: not a readable ONNX model ({' '.join(str(exc).split())[:300]})") from None
    external = external_data_files(m, p.parent)
    missing = [f for f in external if not f.is_file()]
    if missing:
        saved = ", ".join(os.path.relpath(f, p.parent) for f in external)
        raise ConfigError(f"{onnx_path}: its weights are stored in {missing[0]}, which is missing; copy the file(s) saved with "
                          f"the model ({saved}, relative to the .onnx file) there, or re-save the model as one file")
    if external and profile.backend == "remote":
        raise ConfigError(f"{onnx_path}: backend remote sends the .onnx file alone, and its weights are in "
                          f"{', '.join(os.path.relpath(f, p.parent) for f in external)}; bench a single-file ONNX (onnx.save_model without "
                          "save_as_external_data, models under 2 GB) or time it with `autoprune bench` on the target")
    dims = m.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else None for d in dims]
    if batch_size and shape[0] is not None and batch_size != shape[0]:
        raise ConfigError(f"{onnx_path}: the model's batch size is fixed at {shape[0]} (static input shape {shape}); "
                          f"drop --batch-size {batch_size}, or export the model with that batch size")
    shape[0] = batch_size or shape[0] or profile.batch_size
    if any(s is None for s in shape):
        if not profile.input_shape:
            raise ConfigError(f"{onnx_path}: input has dynamic dimensions {shape}; set input_shape in the device profile")
        shape = [shape[0], *profile.input_shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stats = backends.measure(backends.ModelArtifact(p), profile, x)
    return {"onnx": str(p), "profile": profile.name, "backend": profile.backend, "threads": profile.threads, "input_shape": shape, **stats.to_dict()}


