"""Pruned models export to ONNX and OpenVINO and compute what PyTorch computes."""

import numpy as np
import pytest
import torch

from autoprune.config import DeviceProfile
from autoprune.errors import ExportError
from autoprune.measure.backends import ModelArtifact, get
from autoprune.measure.onnx import export_onnx, export_openvino
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import find_groups
from autoprune.train.models import build_model


@pytest.mark.parametrize(
    "name,shape,exporter",
    [("demo", (1, 1, 16, 16), "dynamo"), ("demo", (1, 1, 16, 16), "torchscript"), ("resnet18", (1, 3, 64, 64), "torchscript"),
     ("mobilenet_v2", (1, 3, 64, 64), "torchscript")],
)
def test_pruned_model_onnx_and_openvino_match_torch(tmp_path, name, shape, exporter):
    from autoprune.measure.ov_core import shared_core

    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = build_model(name, 10, in_channels=shape[1]).eval()
    groups = find_groups(model, x, 10)
    apply_plan(model, x, PruningPlan({g.name: 0.5 for g in groups}), 10)
    with torch.no_grad():
        ref = model(x).numpy()
    onnx_path = export_onnx(model, x, tmp_path / "m.onnx", exporter)
    prof = DeviceProfile(name="t", backend="onnxruntime")
    got = get("onnxruntime").load(ModelArtifact(onnx_path), prof)(x.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    xml = export_openvino(onnx_path, tmp_path / "m.xml")
    assert (tmp_path / "m.bin").stat().st_size > 0
    compiled = shared_core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got_ov = compiled({0: x.numpy()})[0]
    np.testing.assert_allclose(got_ov, ref, rtol=1e-3, atol=1e-3)
    # the exported graph really is narrower: its weights are fewer than the dense model's
    dense = build_model(name, 10, in_channels=shape[1]).eval()
    export_onnx(dense, x, tmp_path / "dense.onnx", "torchscript")
    assert onnx_path.stat().st_size < 0.6 * (tmp_path / "dense.onnx").stat().st_size


def test_export_failure_is_clear(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("unsupported layer")

    with pytest.raises(ExportError, match="ONNX export.*unsupported layer"):
        export_onnx(Bad(), torch.randn(1, 2), tmp_path / "bad.onnx", "dynamo")
    assert not (tmp_path / "bad.onnx").exists()
