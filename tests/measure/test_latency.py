"""Timing protocol, dense-reference speed-up, architecture cache and the predictor's shared file."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from autoprune.config import DeviceProfile
from autoprune.measure.cache import LatencyCache, architecture_hash
from autoprune.runfolder import RunFolder
from autoprune.measure.onnx import export_onnx
from autoprune.measure.stats import (
    LatencyStats,
    median_rel_ci,
    summarize,
    time_callable,
    time_pair,
)

FAST = dict(name="ort-test", backend="onnxruntime", device="cpu", threads=1, warmup=1, repeats=8, target_rel_ci=None)


def _net(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def _timed(values):
    it = iter(values)

    def one() -> float:
        return next(it)

    return one


def test_summary_statistics_are_order_statistics():
    s = summarize(np.array([1, 2, 3, 4, 100], dtype=float) / 1000.0)
    assert s.median_ms == pytest.approx(3.0)
    assert s.min_ms == pytest.approx(1.0)
    assert s.p90_ms == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    assert s.cv > 1.0  # the outlier shows in CV, not in the median
    assert median_rel_ci(np.ones(4)) == math.inf  # too few samples for an interval
    assert median_rel_ci(np.ones(50)) == 0.0


def test_adaptive_repeats_stop_when_stable_and_continue_when_noisy():
    steady = time_callable(lambda: None, warmup=2, repeats=20, target_rel_ci=0.02, max_time_s=5,
                           timed=_timed(itertools.repeat(1e-3)))
    assert steady.n == 20 and steady.median_ms == pytest.approx(1.0) and steady.rel_ci == 0.0
    rng = np.random.default_rng(0)
    noisy = time_callable(lambda: None, warmup=0, repeats=20, target_rel_ci=0.02, max_time_s=5,
                          timed=_timed(1e-3 * rng.lognormal(0, 0.2, 100_000)))
    assert noisy.n > 20  # kept sampling until the median's CI was narrow enough
    assert noisy.rel_ci <= 0.02
    capped = time_callable(lambda: None, warmup=0, repeats=10, target_rel_ci=1e-9, max_time_s=5,
                           timed=_timed(1e-3 * rng.lognormal(0, 0.5, 100_000)))
    assert capped.n == 100 * 10  # never converges: the sample cap ends it


def test_interleaved_reference_ratio_survives_load_drift():
    # The machine slows down 3x half-way (another job starts): absolute medians move, the ratio does not.
    drift = np.concatenate([np.ones(200), 3 * np.ones(2000)])
    i_a, i_b = iter(drift), iter(drift)
    cand = lambda: 1e-3 * next(i_a)  # noqa: E731
    ref = lambda: 4e-3 * next(i_b)  # noqa: E731
    st = time_pair(cand, ref, warmup=0, repeats=300, target_rel_ci=None)
    assert st.speedup == pytest.approx(4.0)
    assert st.reference_median_ms == pytest.approx(4 * st.median_ms)


def test_a_deadline_cuts_warmup_and_repeats_short():
    """The latency server's per-request time cap: counts give way to the clock, one sample at least."""
    import time

    def slow() -> float:
        time.sleep(0.01)
        return 0.01

    for timing in (lambda d: time_callable(lambda: None, timed=slow, warmup=1000, repeats=1000, target_rel_ci=None, deadline=d),
                   lambda d: time_pair(slow, slow, warmup=1000, repeats=1000, target_rel_ci=None, deadline=d)):
        t0 = time.perf_counter()
        st = timing(t0 + 0.3)
        assert time.perf_counter() - t0 < 1.0 and 1 <= st.n < 1000
        st = timing(time.perf_counter() - 1)  # already past: warm-up skipped, one sample
        assert st.n == 1


def test_stats_round_trip_through_json_dict():
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0, 5.0]) / 1e3, batch_size=4)
    s.speedup = 2.5
    d = s.to_dict()
    assert d["throughput"] == pytest.approx(4000 / 3.0)
    assert LatencyStats.from_dict(d) == s


def test_architecture_hash_ignores_weights_but_not_widths(tmp_path: Path):
    x = torch.randn(1, 1, 8, 8)
    a, b = _net(16), _net(16)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_()
    c = _net(24)
    ha = architecture_hash(export_onnx(a, x, tmp_path / "a.onnx", "torchscript"))
    hb = architecture_hash(export_onnx(b, x, tmp_path / "b.onnx", "torchscript"))
    hc = architecture_hash(export_onnx(c, x, tmp_path / "c.onnx", "torchscript"))
    assert ha == hb != hc


def test_cache_hits_on_identical_architecture_per_profile(tmp_path: Path):
    from autoprune.measure.candidate import measure_model

    run = tmp_path / "run"
    prof = DeviceProfile(**FAST)
    x = torch.randn(1, 1, 8, 8)
    rf = RunFolder(run)
    first = measure_model(_net(16), x, prof, run / "trials" / "00000" / "model.onnx", "torchscript", run=rf)
    other_weights = _net(16)
    with torch.no_grad():
        for p in other_weights.parameters():
            p.mul_(-2)
    second = measure_model(other_weights, x, prof, run / "trials" / "00001" / "model.onnx", "torchscript", run=rf)
    assert first["latency_cached"] is False and second["latency_cached"] is True
    assert second["latency"] == first["latency"] and second["arch_hash"] == first["arch_hash"]
    # Another width, or the same width on another thread count, is a new measurement.
    assert measure_model(_net(24), x, prof, run / "trials" / "00002" / "model.onnx", "torchscript", run=rf)["latency_cached"] is False
    prof2 = prof.model_copy(update={"threads": 2})
    assert measure_model(_net(16), x, prof2, run / "trials" / "00003" / "model.onnx", "torchscript", run=rf)["latency_cached"] is False
    assert (run / "latency_cache.sqlite").is_file()
    assert LatencyCache(run / "latency_cache.sqlite").stats() == {"entries": 3, "hits": 1}


def test_measurement_caches_live_in_the_run_folder_it_is_given(tmp_path: Path):
    """The run folder is said, never guessed from a file path: with --out X/trials the dense
    model's cache and lookup table belong to X/trials, not to X (they used to land in X)."""
    from autoprune.measure.candidate import measure_model

    rf = RunFolder(tmp_path / "X" / "trials")
    prof = DeviceProfile(**{**FAST, "lut": True})
    measure_model(_net(16), torch.randn(1, 1, 8, 8), prof, rf.dense_onnx, "torchscript", run=rf)
    assert rf.latency_cache.is_file() and list((rf.root / "predictor").glob("*.json"))
    assert sorted(p.name for p in (tmp_path / "X").iterdir()) == ["trials"]
    # Without a run folder nothing is cached or tabled anywhere.
    measure_model(_net(16), torch.randn(1, 1, 8, 8), prof, tmp_path / "alone" / "m.onnx", "torchscript")
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["m.onnx"]


def test_predictor_save_merges_what_other_workers_saved(tmp_path: Path):
    """Defect 9 (found in the per-layer table the predictor replaced): saving the in-memory copy
    dropped what another worker had stored since it loaded. Saves read-merge-write under a file
    lock: interleaved and concurrent writers lose no calibration point or prediction."""
    import threading

    from autoprune.measure.predictor import LatencyPredictor

    prof = DeviceProfile(**FAST)
    path = tmp_path / "predictor" / "t.json"
    a, b = LatencyPredictor(path, prof), LatencyPredictor(path, prof)  # two workers, both loaded nothing
    a.add({"macs:conv:8": 1.0}, 2.0)
    b.add({"macs:conv:8": 3.0}, 4.0, predicted=5.0)
    a.add({"macs:conv:8": 5.0}, 6.0)
    a.save()  # saving again appends nothing twice
    got = LatencyPredictor(path, prof)
    assert [m for _, m in got.points] == [2.0, 4.0, 6.0] and got.predictions == [(5.0, 4.0)]
    assert a.points == got.points  # the saver adopts the merged points

    # concurrently: four workers, each adding its own points and saving every time
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        pred = LatencyPredictor(path, prof)
        try:
            for i in range(25):
                pred.add({"worker": float(w), "i": float(i)}, 1.0 + i)
        except BaseException as e:  # noqa: BLE001 - asserted on below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    got = LatencyPredictor(path, prof)
    assert sorted((f["worker"], f["i"]) for f, _ in got.points[3:]) == sorted((float(w), float(i)) for w in range(4) for i in range(25))


def test_rounds_alternate_candidate_and_dense_blocks():
    """A round is a block of each model back to back; the order flips every round (A B, B A, ...),
    so neither model always runs on the warmer cache or right after the other."""
    seq: list[str] = []

    def cand() -> float:
        seq.append("A")
        return 1e-3

    def dense() -> float:
        seq.append("B")
        return 2e-3

    st = time_pair(cand, dense, warmup=0, repeats=8, target_rel_ci=None, block=2)
    assert "".join(seq[:12]) == "AABBBBAAAABB"
    assert seq.count("A") == seq.count("B") == st.n and st.rounds == st.n // 2 >= 8
    assert st.ratio == pytest.approx(0.5) and st.speedup == pytest.approx(2.0)
    assert st.ratio_ci_low == pytest.approx(0.5) and st.ratio_ci_high == pytest.approx(0.5) and st.noisy is False
    # Without ``block`` the warm-up sets it: rounds of ~ROUND_S (0.02 s / (1 + 2) ms = 6 per block).
    seq.clear()
    time_pair(cand, dense, warmup=2, repeats=8, target_rel_ci=None)
    assert "".join(seq[4:4 + 24]) == "A" * 6 + "B" * 12 + "A" * 6


def test_stop_rule_stops_at_2pct_on_low_noise_and_at_the_cap_on_noisy_timings():
    import time

    rng = np.random.default_rng(1)
    # Low noise: each round's load factor (1x..3x) hits both models alike, 1% jitter per inference.
    loads = np.repeat(rng.uniform(1, 3, 10_000), 2)
    i_a, i_b = iter(loads), iter(loads)
    quiet = time_pair(lambda: 1e-3 * next(i_a) * rng.lognormal(0, 0.01), lambda: 2e-3 * next(i_b) * rng.lognormal(0, 0.01),
                      warmup=0, repeats=10, target_rel_ci=0.02, max_time_s=30, block=2)
    assert quiet.noisy is False and quiet.ratio_rel_ci <= 0.02 and quiet.rounds < 50  # stopped by the interval
    assert quiet.ratio == pytest.approx(0.5, rel=0.02)
    assert quiet.ratio_ci_low <= 0.5 * 1.005 and quiet.ratio_ci_high >= 0.5 * 0.995
    assert quiet.median_ms > 1.5  # raw figures kept: the load is in them, not in the ratio

    def slow(scale: float):
        def one() -> float:
            time.sleep(2e-4)
            return scale * rng.lognormal(0, 1.0)
        return one

    t0 = time.perf_counter()
    noisy = time_pair(slow(1e-3), slow(2e-3), warmup=0, repeats=50, target_rel_ci=0.001, max_time_s=0.5, block=1)
    assert 0.5 <= time.perf_counter() - t0 < 3.0  # the time cap ended it
    assert noisy.noisy is True and noisy.ratio_rel_ci > 0.001 and noisy.rounds >= 8


def test_cpu_clock_does_not_count_time_the_process_waits():
    """``clock: cpu``: an inference that waits (here: sleeps, as a process does while other jobs
    hold its core) costs its CPU time only; the wall clock counts the wait. CPU devices only."""
    import time

    from autoprune.measure.backends import one_inference_timer

    def waits(x):
        time.sleep(0.05)
        return x

    x = np.zeros(1)
    assert one_inference_timer(waits, x, "cpu")() < 0.02 and one_inference_timer(waits, x)() >= 0.05
    assert one_inference_timer(waits, x, "cpu").clock == "process_cpu"
    with pytest.raises(ValueError, match="clock: cpu"):
        DeviceProfile(name="g", backend="onnxruntime", device="cuda", clock="cpu")
