"""Export: PyTorch → ONNX (what every backend reads) → OpenVINO IR (what OpenVINO deploys).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from autoprune.errors import ExportError
from autoprune.outputs import MainOutput
from autoprune.files import temp_sibling


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings per call; a search exports hundreds of models."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _root_cause(exc: BaseException) -> BaseException:
    """The exporters wrap the real error in pages of advice; users need the innermost message."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def cpu_fp32(model: nn.Module) -> nn.Module:
    """``model`` itself when it is already an fp32, contiguous-format CPU module; else an eval-mode
    CPU fp32 copy (the original stays where it trains). What is exported, timed and deployed is
    always the fp32 CPU model, whatever device and precision trained it (``train:`` section)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) and t.is_contiguous()
           for t in tensors):
        return model
    out = copy.deepcopy(model).to("cpu", torch.float32)
    if any(not t.is_contiguous() for t in out.parameters()):
        out = out.to(memory_format=torch.contiguous_format)  # channels_last training
    return out.eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, exporter: str = "dynamo", opset: int = 18) -> Path:
    """Write ``model`` as ONNX with input ``input`` and output ``logits``; the batch axis stays
    static (latency is measured at the profile's batch size, and static shapes let runtimes plan).
    A model on a GPU (or in another dtype) is exported from a CPU fp32 copy (:func:`cpu_fp32`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = cpu_fp32(model).eval()
    example = example.detach().to("cpu", torch.float32)
    tmp = temp_sibling(path)  # unique: workers sharing a run folder may export the same file at once
    try:
        with torch.no_grad():
            if not isinstance(model(example), torch.Tensor):
                model = MainOutput(model).eval()  # a dict/tuple output: export its main output only
        kwargs = {"external_data": False} if exporter == "dynamo" else {}
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=(exporter == "dynamo"),
                **kwargs,
            )
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - exporters raise many types
        root = _root_cause(exc)
        raise ExportError(
            f"ONNX export ({exporter}) failed: {type(root).__name__}: {str(root)[:500]}"
            + ("" if root is exc else f" (reported as {type(exc).__name__}); try exporter: torchscript if the model is not torch.export-able")
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the export was interrupted
    return path


def export_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """Convert ONNX to OpenVINO IR (.xml + .bin), keeping fp32 weights so accuracy is unchanged."""
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ov_model = ov.convert_model(str(onnx_path))
        ov.save_model(ov_model, str(xml_path), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"OpenVINO conversion of {onnx_path} failed: {exc}") from exc
    return xml_path


def file_size(path: Path) -> int:
    return Path(path).stat().st_size


def gzip_size(path: Path) -> int:
    """Compressed size: what zeroed (unstructured) weights actually save on disk or over the wire."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=6))


def external_data_files(model: Any, folder: Path) -> list[Path]:
    """The files holding ``model``'s (an ``onnx.ModelProto``) externally stored tensors (``onnx.save_model(...,
    save_as_external_data=True)``, needed above 2 GB), resolved against ``folder``, the .onnx
    file's folder, as onnxruntime and OpenVINO resolve them; each file once, in graph order.
    Covers initializers, Constant-node tensors and subgraphs (If/Loop/Scan bodies)."""
    import onnx

    found: dict[Path, None] = {}

    def tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from tensors(attr.g)
                for sub in attr.graphs:
                    yield from tensors(sub)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location:
                found[folder / location] = None
    return list(found)


@dataclass
class ModelArtifact:
    """What a backend may need: the ONNX file always, the torch module for the torch backend.

    ``onnx_path`` may also be an OpenVINO IR ``.xml`` (the openvino backend reads both).
    ``quantized`` marks a file that already went through post-training quantization, so an int8
    profile does not quantize it again.
    """

    onnx_path: Optional[Path] = None
    torch_model: Optional[nn.Module] = None
    quantized: bool = False
