"""Export parity: an exported file that computes something else than the PyTorch model fails the
trial (or, for the dense model, the run) with the measured difference; a normal pruned model
passes on onnxruntime and OpenVINO; the tolerance comes from the device profile."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_PROFILE, tiny_run_config, write_yaml
from optuna.trial import TrialState
from torch import nn

import autoprune
import autoprune.measure.parity as parity_mod
from autoprune.config import DeviceProfile, load_run_config
from autoprune.errors import ExportError
from autoprune.measure.backends import ModelArtifact
from autoprune.measure.candidate import measure_model
from autoprune.measure.onnx import export_onnx
from autoprune.measure.parity import (
    check_export_parity,
    compare,
    parity_batch,
    parity_runtimes,
)
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import find_groups
from autoprune.results.report import write_report

FAST = {"threads": 1, "warmup": 1, "repeats": 3, "target_rel_ci": None, "cache": False}


class ExportSkew(nn.Module):
    """Computes one thing eagerly and another inside the exporter: the kind of forward (a branch
    on export state, a tensor value read in Python, a global) that exports without an error."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, skew: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)
        self.skew = skew

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.body(x))
        if torch.onnx.is_in_onnx_export():
            y = y + self.skew
        return y


def export_skew_model(num_classes: int = 10) -> nn.Module:
    """``model: test_parity:export_skew_model`` in a run config."""
    torch.manual_seed(0)
    return ExportSkew(num_classes)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return ExportSkew(skew=0.0).eval()


def test_compare_rule_scales_with_the_logits_and_excuses_near_ties():
    ref = np.array([[10.0, 0.0, -3.0], [1.0, 1.0 + 1e-6, 0.0]])
    ok = compare("x", ref + 5e-3, ref, atol=1e-4, rtol=1e-3)  # tol = 1e-4 + 1e-3 * 10
    assert ok.ok and ok.max_abs_diff == pytest.approx(5e-3) and ok.tolerance == pytest.approx(0.0101)
    assert not compare("x", ref + 0.02, ref, atol=1e-4, rtol=1e-3).ok
    flipped = ref.copy()
    flipped[1] = [1.0 + 2e-6, 1.0, 0.0]  # a near-tie flips: excused, the other sample is clear
    r = compare("x", flipped, ref, atol=1e-4, rtol=1e-3)
    assert r.ok and r.top1_agree == 0.5 and r.top1_checked == 1 and r.top1_flips == 0


def test_export_that_differs_fails_with_the_difference(tmp_path: Path):
    model = ExportSkew().eval()
    x = torch.randn(1, 1, 12, 12)
    path = export_onnx(model, x, tmp_path / "m.onnx", "torchscript")
    prof = DeviceProfile(name="ov", backend="openvino", device="CPU", **FAST)
    calib = [(torch.randn(5, 1, 12, 12), torch.zeros(5))]
    with pytest.raises(ExportError, match=r"max abs diff 0\.5 vs tolerance [0-9.e-]+ \(parity_atol 0\.0001 \+ parity_rtol 0\.001"):
        check_export_parity(model, ModelArtifact(path), parity_batch(x, calib, 8), prof, 1)
    # the trial's measure step (export, parity, latency) refuses it before timing it
    with pytest.raises(ExportError, match="onnxruntime: max abs diff 0.5"):
        measure_model(model, x, prof, tmp_path / "trial.onnx", "torchscript", calib=calib)


def test_tolerance_and_switch_come_from_the_profile(tmp_path: Path):
    model = ExportSkew().eval()
    x = torch.randn(1, 1, 12, 12)
    path = export_onnx(model, x, tmp_path / "m.onnx", "torchscript")
    loose = DeviceProfile(name="ort", backend="onnxruntime", parity_atol=1.0, **FAST)
    res = check_export_parity(model, ModelArtifact(path), parity_batch(x, None, 8), loose, 1)
    assert [r["runtime"] for r in res] == ["onnxruntime"] and res[0]["max_abs_diff"] == pytest.approx(0.5, abs=1e-4)
    off = DeviceProfile(name="ort", backend="onnxruntime", parity_samples=0, **FAST)
    assert check_export_parity(model, ModelArtifact(path), x, off, 1) == []


def test_runtimes_follow_the_profile():
    def names(**kw):
        return [label for label, _ in parity_runtimes(DeviceProfile(name="p", **kw))]

    assert names(backend="onnxruntime") == ["onnxruntime"]
    assert names(backend="torch") == ["onnxruntime"]
    assert names(backend="openvino", device="CPU") == ["onnxruntime", "openvino CPU"]
    assert names(backend="openvino", device="CPU", precision="int8") == ["onnxruntime", "openvino CPU f32"]
    assert names(backend="remote", url="http://x:1", remote_backend="openvino") == ["onnxruntime", "openvino CPU f32"]
    assert names(backend="remote", url="http://x:1") == ["onnxruntime"]


@pytest.mark.parametrize("batch", [1, 2])
def test_pruned_model_passes_on_onnxruntime_and_openvino(tmp_path: Path, batch: int):
    model = _net()
    x = torch.randn(batch, 1, 12, 12)
    pruned = copy.deepcopy(model)
    widths = apply_plan(pruned, x[:1], PruningPlan({g.name: 0.5 for g in find_groups(pruned, x[:1], 10)}, round_to=8), 10)
    assert any(after < before for before, after in widths.values())
    calib = [(torch.randn(3, 1, 12, 12), torch.zeros(3)), (torch.randn(3, 1, 12, 12), torch.zeros(3))]
    prof = DeviceProfile(name="ov", backend="openvino", device="CPU", **FAST)
    got = measure_model(pruned.eval(), x, prof, tmp_path / "p.onnx", "torchscript", calib=calib)
    assert [r["runtime"] for r in got["parity"]] == ["onnxruntime", "openvino CPU"]
    for r in got["parity"]:
        assert r["ok"] and r["samples"] == 6 and r["max_abs_diff"] <= r["tolerance"] and r["top1_agree"] == 1.0


@pytest.mark.slow
def test_search_fails_the_mismatched_trials_and_goes_on(tmp_path: Path, monkeypatch):
    """A runtime that computes something else for some candidates (simulated by perturbing the
    outputs of every second parity run after the dense model's): those trials FAIL with the
    difference in fail_reason and the search finishes the others."""
    real = parity_mod.run_batched
    calls = []

    def perturbed(runner, xs, batch):
        calls.append(1)
        out = real(runner, xs, batch)
        return out + 1.0 if len(calls) % 2 == 0 else out

    monkeypatch.setattr(parity_mod, "run_batched", perturbed)
    prof = write_yaml(tmp_path / "p.yaml", FAST_PROFILE)
    cfg = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", prof, trials=2, pretrain_steps=5))
    res = autoprune.run(load_run_config(str(cfg)), export=False)
    trials = res.study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and len(failed) >= 2  # trials counts COMPLETE ones: failed trials are replaced
    for t in failed:
        reason = t.user_attrs["fail_reason"]
        assert reason.startswith("ExportError:") and "max abs diff 1" in reason and "tolerance" in reason
    for t in done:
        assert all(r["ok"] for r in t.user_attrs["parity"])
    assert all(r["ok"] for r in res.ctx.dense["parity"])
    page = write_report(res.out).read_text()  # the report says why they are missing from the front
    assert "Failed trials" in page and "max abs diff 1" in page


def test_dense_mismatch_stops_the_run_before_any_trial(tmp_path: Path):
    prof = write_yaml(tmp_path / "p.yaml", FAST_PROFILE)
    cfg = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", prof, trials=2, pretrain_steps=0,
                                                            model="test_parity:export_skew_model"))
    with pytest.raises(ExportError, match=r"dense.*max abs diff 0\.5"):
        autoprune.run(load_run_config(str(cfg)), export=False)
    assert not (tmp_path / "out" / "dense.json").exists()
