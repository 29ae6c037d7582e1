"""Sliced ONNX export (issue 21, item 3): a candidate's file written through the dense model's
translated graph is the file a fresh export writes, on every supported family, and anything the
slicer does not handle is exported fresh, never wrong."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from prune.test_every_model import ARCHS

from autoprune.config import DeviceProfile
from autoprune.errors import ExportError
from autoprune.measure import backends
from autoprune.measure.candidate import export_checked
from autoprune.measure.onnx import export_onnx
from autoprune.measure.onnx_slice import OnnxSlicer, graph_difference, slicer_for
from autoprune.measure.parity import check_export_parity
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import find_groups

PROFILE = DeviceProfile(name="t", backend="onnxruntime", device="cpu", threads=1)


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    return np.asarray(backends.load(backends.ModelArtifact(path), PROFILE)(x.numpy()))


def _slicer(model: nn.Module, x: torch.Tensor) -> tuple[OnnxSlicer, list]:
    groups = [g for g in find_groups(model, x, 10) if g.kind != "heads"]
    for g in groups:
        g.high = 0.8
    return slicer_for(model, x, "dynamo", groups, lambda m, r: apply_plan(m, x, PruningPlan(r, round_to=4), 10)), groups


#: Families the slicer does not follow, with the reason it gives: ConvNeXt's graph holds a float
#: constant whose size follows a width (its layer scale), so each candidate is exported fresh.
FRESH_ON = {"convnext_tiny": "changes size with the widths"}


@pytest.mark.parametrize("name,build,size", ARCHS)
def test_sliced_export_is_the_fresh_export_on_every_family(tmp_path, name, build, size):
    """Same graph (nodes, attributes, wiring, initializers) as a fresh dynamo export of the same
    candidate, and the same outputs as the fresh file and PyTorch on onnxruntime."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slicer, groups = _slicer(model, x)
        cand = copy.deepcopy(model)
        # Other ratios than either probe's, some groups left whole.
        apply_plan(cand, x, PruningPlan({g.name: (0.2, 0.0, 0.45)[i % 3] for i, g in enumerate(groups)}, round_to=4), 10)
        sliced = slicer.export(cand, tmp_path / "sliced.onnx")
        fresh = export_onnx(cand, x, tmp_path / "fresh.onnx")
    if name in FRESH_ON:  # the slicer refuses this family and the candidate is exported fresh: never a wrong file
        assert not sliced and FRESH_ON[name] in (slicer.reason or ""), slicer.reason
        with torch.no_grad():
            np.testing.assert_allclose(_ort(tmp_path / "sliced.onnx", x), cand(x).numpy(), rtol=1e-3, atol=1e-4)
        return
    assert sliced, f"{name}: exported fresh: {slicer.reason}"
    assert slicer.stats.sliced == 1
    assert graph_difference(onnx.load(str(tmp_path / "sliced.onnx")), onnx.load(str(fresh))) is None
    with torch.no_grad():
        ref = cand(x).numpy()
    got = _ort(tmp_path / "sliced.onnx", x)
    np.testing.assert_allclose(got, _ort(fresh, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


class _WidthScaled(nn.Module):
    """A forward that writes a float derived from a width into the graph (1 / channels): no
    integer the slicer can follow, so every candidate must be exported fresh."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.mean((2, 3)) * (1.0 / self.conv2.in_channels))


def test_a_graph_the_slicer_cannot_follow_is_exported_fresh_with_the_reason(tmp_path, caplog):
    torch.manual_seed(0)
    model = _WidthScaled().eval()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slicer, groups = _slicer(model, x)
        cand = copy.deepcopy(model)
        apply_plan(cand, x, PruningPlan({g.name: 0.5 for g in groups}, round_to=4), 10)
        with caplog.at_level(logging.WARNING, logger="autoprune"):
            assert slicer.export(cand, tmp_path / "m.onnx") is False
    assert not slicer.enabled and "not an integer" in slicer.reason
    assert "ONNX slicing off" in caplog.text
    assert slicer.stats.fresh == 1 and slicer.stats.sliced == 0
    with torch.no_grad():
        np.testing.assert_allclose(_ort(tmp_path / "m.onnx", x), cand(x).numpy(), rtol=1e-4, atol=1e-5)


def test_replaced_modules_and_other_inputs_are_exported_fresh(tmp_path):
    """A candidate whose tensors are not the dense model's (a module swapped) or an input of
    another shape is exported fresh; slicing stays on for the next candidate."""
    torch.manual_seed(0)
    model = _resnetish()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slicer, groups = _slicer(model, x)
        swapped = copy.deepcopy(model)
        swapped.head = nn.Sequential(nn.Linear(16, 10))  # parameter names change
        assert slicer.export(swapped, tmp_path / "a.onnx") is False
        assert slicer.export(copy.deepcopy(model), tmp_path / "b.onnx", torch.randn(2, 3, 16, 16)) is False
        assert slicer.enabled, slicer.reason
        assert slicer.export(copy.deepcopy(model), tmp_path / "c.onnx") is True
    assert any("not the dense model's" in r for r in slicer.stats.reasons)
    assert any("input shape" in r for r in slicer.stats.reasons)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(tmp_path / "a.onnx", x), swapped(x).numpy(), rtol=1e-4, atol=1e-5)


def _resnetish() -> nn.Module:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h = torch.relu(h + self.b(self.dw(h)))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))

    return M().eval()


def test_a_sliced_file_failing_parity_is_replaced_by_a_fresh_export(tmp_path, monkeypatch, caplog):
    """Never a wrong model: a sliced file that does not compute what the model computes is
    re-exported fresh (the check passes) and slicing is off for the run."""
    torch.manual_seed(0)
    model = _resnetish()
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slicer, groups = _slicer(model, x)
        cand = copy.deepcopy(model)
        apply_plan(cand, x, PruningPlan({g.name: 0.5 for g in groups}, round_to=4), 10)
        assert slicer._ready() is None, slicer.reason
        real_write = slicer._write

        def broken_write(m: nn.Module, path: Path) -> None:  # a slicer bug: the head's weights zeroed
            m = copy.deepcopy(m)
            nn.init.zeros_(m.head.weight)
            real_write(m, path)

        monkeypatch.setattr(slicer, "_write", broken_write)
        path = tmp_path / "m.onnx"
        check = lambda: check_export_parity(cand, backends.ModelArtifact(path), x.repeat(4, 1, 1, 1) + torch.randn(4, 3, 16, 16),  # noqa: E731
                                            PROFILE, 1)
        with caplog.at_level(logging.WARNING, logger="autoprune"):
            results = export_checked(cand, x, path, "dynamo", slicer, check)
    assert results and results[0]["ok"]
    assert not slicer.enabled and "parity" in slicer.reason
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, x), cand(x).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ExportError):  # the broken file really was broken
        real = tmp_path / "broken.onnx"
        broken_write(cand, real)
        check_export_parity(cand, backends.ModelArtifact(real), x, PROFILE, 1)
