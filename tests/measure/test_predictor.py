"""The latency predictor (measure/predictor.py): honest held-out error, refusal before calibration,
persistence in the run folder, and budget rejections that never drop a candidate within budget."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from autoprune.config import DeviceProfile
from autoprune.measure.candidate import _predicted_rejection, measure_model
from autoprune.measure.predictor import (
    MIN_POINTS,
    Fit,
    LatencyPredictor,
    held_out_errors,
    model_features,
)
from autoprune.measure.stats import LatencyStats
from autoprune.runfolder import RunFolder

PROFILE = dict(name="ort-test", backend="onnxruntime", device="cpu", threads=1, warmup=1, repeats=5, target_rel_ci=None)
X = torch.randn(1, 3, 16, 16)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The feature pass runs hundreds of tiny forwards: on a busy shared CPU, torch's default
    thread pool makes each cost tens of ms. One thread, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(w1: int, w2: int, w3: int) -> nn.Module:
    """A small CNN whose widths play the role of a pruned candidate's kept channels."""
    return nn.Sequential(nn.Conv2d(3, w1, 3, padding=1), nn.BatchNorm2d(w1), nn.ReLU(),
                         nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(w2, w2, 3, padding=1, groups=w2), nn.Conv2d(w2, w3, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, 10)).eval()


def _widths(rnd: random.Random) -> tuple[int, int, int]:
    return rnd.choice(range(8, 65, 8)), rnd.choice(range(8, 97, 8)), rnd.choice(range(8, 129, 8))


def _true_ms(widths: tuple[int, int, int], rnd: random.Random) -> float:
    """A made-up target: not linear in any feature set (power law, a penalty for widths that are
    not multiples of 16, 3 % multiplicative noise), so the predictor's fit is only approximate."""
    f = model_features(_net(*widths), X)
    macs = sum(v for k, v in f.items() if k.startswith("macs:"))
    odd = sum(w % 16 != 0 for w in widths) / 3
    return (0.02 + (macs / 1e5) ** 0.9 * 0.1 * (1 + 0.3 * odd)) * math.exp(rnd.gauss(0, 0.03))


def test_features_count_what_pruning_removes():
    wide, narrow = model_features(_net(32, 64, 64), X), model_features(_net(16, 32, 64), X)
    assert wide["macs:conv:16"] == 16 * 16 * 32 * 3 * 9 and wide["macs:dw:8"] == 8 * 8 * 64 * 9
    for k in ("macs:conv:16", "macs:conv:8", "macs:dw:8", "macs:pw:8", "act_bytes", "weight_bytes"):
        assert narrow[k] < wide[k], k
    assert narrow["macs:linear"] == wide["macs:linear"] and narrow["layers"] == wide["layers"] == 5
    # channels padded to 16: 24 channels cost as many as 32 do, 32 as 32
    assert model_features(_net(24, 64, 64), X)["macs16:conv:16"] == wide["macs16:conv:16"]


def test_refuses_to_predict_until_calibrated_with_a_known_held_out_error(tmp_path: Path):
    rnd = random.Random(0)
    pred = LatencyPredictor(tmp_path / "p.json", DeviceProfile(**PROFILE))
    for i in range(MIN_POINTS - 1):
        w = _widths(rnd)
        pred.add(model_features(_net(*w), X), _true_ms(w, rnd))
        assert not pred.ready and pred.predict(model_features(_net(8, 8, 8), X)) is None
        assert pred.held_out() == {"n": i + 1}
    w = _widths(rnd)
    pred.add(model_features(_net(*w), X), _true_ms(w, rnd))
    assert pred.ready and pred.predict(model_features(_net(8, 8, 8), X)) > 0
    held = pred.held_out()
    assert held["n"] == MIN_POINTS and held["feature_set"] == "macs"  # the only set with enough points yet
    assert pred.margin() >= pred.profile.lut_margin


def test_held_out_error_never_scores_a_point_with_a_fit_that_saw_it():
    rnd = random.Random(1)
    pts = []
    for _ in range(12):
        w = _widths(rnd)
        pts.append((model_features(_net(*w), X), _true_ms(w, rnd)))
    pts[5] = (pts[5][0], pts[5][1] * 3)  # one wildly mismeasured point
    err = held_out_errors("kinds", pts)
    for i in (0, 5, 11):  # each equals the error of a fit made without that point
        f, m = pts[i]
        assert err[i] == pytest.approx((Fit("kinds", pts[:i] + pts[i + 1:])(f) - m) / m)
    in_sample = Fit("kinds", pts)
    assert abs(err[5]) > abs((in_sample(pts[5][0]) - pts[5][1]) / pts[5][1])  # the fit that saw it flatters it
    assert err[5] < -0.5  # held out, the outlier is badly under-predicted, as it should be


def test_points_persist_in_the_run_folder_and_workers_merge(tmp_path: Path):
    rf = RunFolder(tmp_path / "run")
    prof = DeviceProfile(**PROFILE)
    a, b = LatencyPredictor.for_run(rf, prof), LatencyPredictor.for_run(rf, prof)
    assert a.path.parent == rf.root / "predictor" and a.path.name.startswith("ort-test-")
    rnd = random.Random(2)
    for i in range(8):
        w = _widths(rnd)
        (a if i % 2 else b).add(model_features(_net(*w), X), _true_ms(w, rnd), predicted=1.0 if i > 5 else None)
    again = LatencyPredictor.for_run(rf, prof)
    assert len(again.points) == 8 and len(again.predictions) == 2 and again.ready
    assert sorted(m for _, m in again.points) == sorted(m for _, m in a.points)  # the last saver (a) adopted all
    f = model_features(_net(32, 32, 32), X)
    assert again.predict(f) == pytest.approx(a.predict(f))
    # another profile (other threads) is another file: its points are not mixed in
    assert LatencyPredictor.for_run(rf, prof.model_copy(update={"threads": 2})).points == []


def test_a_predicted_rejection_never_drops_a_candidate_within_budget(tmp_path: Path):
    """The key property, over many candidates near the budget: the search calibrates online on
    what it measured, and every candidate rejected on its prediction alone is truly over budget."""
    rnd = random.Random(3)
    cands = [_widths(rnd) for _ in range(150)]
    truth = {w: _true_ms(w, rnd) for w in set(cands)}
    budget = float(np.median(list(truth.values())))  # half the candidates are over, many close to it
    prof = DeviceProfile(**PROFILE, lut=True, lut_margin=0.0, budget={"max_latency_ms": budget})
    pred = LatencyPredictor(tmp_path / "p.json", prof)
    rejected = kept_over = 0
    for w in cands:
        model = _net(*w)
        f = model_features(model, X)
        p = pred.predict(f)
        if _predicted_rejection(p, pred, X, model, prof) is not None:
            rejected += 1
            assert truth[w] > budget, (w, p, truth[w], budget, pred.margin())
            continue
        kept_over += truth[w] > budget
        pred.add(f, truth[w], p)
    assert rejected >= 20 and kept_over > 0  # it did reject, and kept borderline ones for measurement
    assert pred.margin() > 0  # lut_margin 0: the margin came from the held-out error alone


def test_measure_model_rejects_without_export_and_records_both_latencies(tmp_path: Path, monkeypatch):
    from autoprune.measure import backends

    calls: list[Path] = []

    def fake_measure(artifact, profile, x, reference=None, calib=None, deadline=None):
        calls.append(Path(artifact.onnx_path))
        ms = 0.01 * sum(v for k, v in model_features(artifact.torch_model, torch.from_numpy(x)).items() if k.startswith("macs:")) / 1e5
        return LatencyStats(ms, ms, ms, ms, 0.0, 5, 0.0, 1)

    monkeypatch.setattr(backends, "measure", fake_measure)
    rf = RunFolder(tmp_path / "run")
    prof = DeviceProfile(**PROFILE, lut=True, cache=False, budget={"max_latency_ms": 0.05})
    outs = [measure_model(_net(8 * (i + 1), 16, 8 * (i + 2)), X, prof, rf.trial(i).onnx, "torchscript", run=rf)
            for i in range(MIN_POINTS)]
    assert all(o["predicted_latency_ms"] is None and o["measured_latency_ms"] > 0 for o in outs)
    near = measure_model(_net(8, 16, 16), X, prof, rf.trial(10).onnx, "torchscript", run=rf)
    assert near["predicted_latency_ms"] > 0 and near["measured_latency_ms"] > 0 and len(calls) == MIN_POINTS + 1
    far = measure_model(_net(64, 96, 128), X, prof, rf.trial(11).onnx, "torchscript", run=rf)
    assert far["latency_predicted"] is True and far["measured_latency_ms"] is None
    assert far["predicted_latency_ms"] > 0.05 * (1 + far["predictor_margin"])
    assert not rf.trial(11).onnx.exists() and len(calls) == MIN_POINTS + 1  # neither exported nor measured
    assert LatencyPredictor.for_run(rf, prof).error()["n"] == 1  # the prediction made before measuring `near`


@pytest.mark.slow
def test_search_records_predicted_and_measured_latency_and_the_report_plots_them(tmp_path: Path, monkeypatch):
    """End to end on a tiny search with a deterministic fake target (latency ∝ MACs, the dense
    model 10 ms, budget 3 ms): once calibrated, trials carry the prediction made before measuring beside the
    measurement, candidates predicted far over budget are not measured, and the report plots
    predicted against measured latency."""
    from conftest import FAST_PROFILE, tiny_run_config, write_yaml

    import autoprune
    from autoprune.config import load_run_config
    from autoprune.measure import backends
    from autoprune.results.report import write_report

    dense_macs: list[float] = []
    measured: list[int] = []

    def fake_measure(artifact, profile, x, reference=None, calib=None, deadline=None):
        macs = sum(v for k, v in model_features(artifact.torch_model, torch.from_numpy(x)).items() if k.startswith("macs:"))
        dense_macs.append(dense_macs[0] if dense_macs else macs)
        measured.append(1)
        ms = 10.0 * macs / dense_macs[0]
        return LatencyStats(ms, ms, ms, ms, 0.0, 5, 0.0, 1)

    monkeypatch.setattr(backends, "measure", fake_measure)
    prof = write_yaml(tmp_path / "p.yaml", {**FAST_PROFILE, "lut": True, "cache": False, "budget": {"max_latency_ms": 3.0}})
    cfg = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", prof, trials=9))
    res = autoprune.run(load_run_config(str(cfg)))
    trials = res.study.get_trials(deepcopy=False)
    predicted = [t for t in trials if t.user_attrs.get("predicted_latency_ms") is not None]
    assert predicted, "the predictor never became ready"
    assert all("measured_latency_ms" in t.user_attrs for t in trials if "latency" in t.user_attrs)
    for t in predicted:
        if t.user_attrs.get("latency_predicted"):  # rejected: not measured, over budget by the margin
            assert t.user_attrs["measured_latency_ms"] is None and t.constraints["latency_ms"] > 0
            assert t.user_attrs["predicted_latency_ms"] > 3.0 * (1 + t.user_attrs["predictor_margin"])
        else:
            assert t.user_attrs["measured_latency_ms"] > 0
    seen = [(t.user_attrs["predicted_latency_ms"], t.user_attrs["measured_latency_ms"]) for t in predicted]
    assert any(m is None for _, m in seen) and any(m is not None for _, m in seen), seen  # rejected and measured
    assert len(measured) == 1 + sum(1 for t in trials if t.user_attrs.get("measured_latency_ms") is not None)
    html = write_report(res.out).read_text()
    assert 'id="plot-predictor"' in html and "Predicted vs measured latency" in html


def test_the_predictor_learns_ratios_so_load_cancels_and_ms_scale_with_dense(tmp_path: Path, monkeypatch):
    """Every measurement is interleaved with dense: under 3x load the raw ms triple, the ratio
    does not. The predictor calibrates on the ratios (the dense model: 1), predicts a ratio, and
    its ms are that ratio x the dense quiet estimate, so they scale with the dense model."""
    import json

    from autoprune.measure import backends

    dense_macs = sum(v for k, v in model_features(_net(64, 96, 128), X).items() if k.startswith("macs:"))
    load = iter([1.0] + [3.0, 1.0] * 20)  # the dense model on a quiet machine, then alternating load
    seen: list[float] = []

    def fake_measure(artifact, profile, x, reference=None, calib=None, deadline=None):
        f = model_features(artifact.torch_model, torch.from_numpy(x))
        ratio = 0.1 + 0.9 * sum(v for k, v in f.items() if k.startswith("macs:")) / dense_macs
        k = next(load)
        if reference is None:  # the dense model, measured alone at the start of the run
            return LatencyStats(2.2 * k, 2.5 * k, 2.2 * k, 1.9 * k, 0.0, 5, 0.0, 1, quiet_ms=2.0 * k)
        seen.append(k)
        return LatencyStats(2.2 * k * ratio, 2.5 * k * ratio, 2.2 * k * ratio, 1.9 * k * ratio, 0.0, 5, 0.0, 1,
                            reference_median_ms=2.2 * k, reference_quiet_ms=2.0 * k, ratio=ratio, speedup=1 / ratio)

    monkeypatch.setattr(backends, "measure", fake_measure)
    rf = RunFolder(tmp_path / "run")
    prof = DeviceProfile(**PROFILE, lut=True, cache=False)
    dense = measure_model(_net(64, 96, 128), X, prof, rf.dense_onnx, "torchscript", run=rf)
    assert dense["latency"]["corrected_ms"] == pytest.approx(2.0)  # the dense model's quiet estimate
    rf.dense_json.write_text(json.dumps({"latency": dense["latency"]}))
    rnd = random.Random(3)
    outs = [measure_model(_net(*_widths(rnd)), X, prof, rf.trial(i).onnx, "torchscript", run=rf) for i in range(12)]
    assert 3.0 in seen and 1.0 in seen
    pred = LatencyPredictor.for_run(rf, prof)
    assert pred.points[0][1] == 1.0  # the dense model first, ratio 1
    for o, (_, r) in zip(outs, pred.points[1:]):
        lat = o["latency"]
        assert r == pytest.approx(lat["ratio"])  # the load-free ratio, whatever the raw ms
        assert lat["corrected_ms"] == pytest.approx(2.0 * lat["ratio"])  # ratio x the run's dense quiet estimate
        assert o["measured_latency_ms"] == pytest.approx(lat["corrected_ms"])
    later = [o for o in outs if o["predicted_latency_ms"] is not None]
    assert later and all(o["predicted_latency_ms"] == pytest.approx(o["measured_latency_ms"], rel=0.1) for o in later)
    f = model_features(_net(16, 16, 16), X)
    r = pred.predict(f)
    assert 0 < r < 1  # a ratio: smaller than dense
    assert pred.predict_ms(f, 2.0) == pytest.approx(r * 2.0) and pred.predict_ms(f, 6.0) == pytest.approx(3 * pred.predict_ms(f, 2.0))
