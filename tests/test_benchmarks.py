"""The search-vs-baselines benchmark in its small form (CI); the full run is documented in README."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from search_vs_baselines import hypervolume, speedup_at_equal_accuracy  # noqa: E402


def test_hypervolume_against_reference():
    # one point at acc 0.95 (dense 0.95, window 0.1), latency ratio 0.5: box 0.1 x 0.5
    assert hypervolume([(0.95, 0.5)], 0.95) == pytest.approx(0.05)
    # dominated and out-of-window points add nothing
    assert hypervolume([(0.95, 0.5), (0.90, 0.6), (0.80, 0.1), (0.99, 1.2)], 0.95) == pytest.approx(0.05)
    assert hypervolume([], 0.9) == 0.0


def test_speedup_at_equal_accuracy():
    pts = [(0.95, 0.5), (0.945, 0.25), (0.90, 0.1)]
    assert speedup_at_equal_accuracy(pts, 0.95) == pytest.approx(4.0)
    assert speedup_at_equal_accuracy([(0.5, 0.1)], 0.95) == 0.0


def test_small_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_vs_baselines.py"), "--small", "--equal-wall", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"autoprune", "random", "uniform", "random-wall"}
    for s in res["summary"].values():
        assert s["hypervolume"] >= 0 and s["front"]
    assert res["summary"]["uniform"]["trials"] == 3
    assert "hv_autoprune_over_random" in res["ratios"] and "hv_autoprune_over_random_equal_wall" in res["ratios"]
    # equal wall-clock: random search ran until autoprune's wall time was used up (the last trial may overrun)
    s = res["summary"]
    assert s["random-wall"]["wall_s"] >= 0.8 * s["autoprune"]["wall_s"] and s["random-wall"]["trials"] >= 1
    assert "autoprune" in p.stdout and "ratios:" in p.stdout


@pytest.mark.slow
def test_benchmark_app_agreement_runs_in_its_small_form(tmp_path):
    """The agreement script end to end on one small model, one short round: both tools run on the
    same file and the summary line is printed (the numbers themselves are not asserted: timings
    on a shared CI machine are not a unit-test matter; the README quotes a full run)."""
    out = tmp_path / "agree.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark_app_agreement.py"), "--models", "mobilenet_v2-pruned",
                        "--rounds", "1", "--seconds", "1", "--px", "32", "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    (row,) = res["results"]
    assert row["model"] == "mobilenet_v2-pruned" and "pruned" in row["description"]
    assert row["autoprune_median_ms"] > 0 and row["benchmark_app_median_ms"] > 0
    assert "worst:" in p.stdout and "-infer_precision f32" in p.stdout


def test_predictor_error_small_reports_held_out_error_beside_noise(tmp_path):
    """benchmarks/predictor_error.py --small: real candidates, real timing; only the report's
    shape is checked (numbers on a shared CI machine are not asserted)."""
    out = tmp_path / "pred.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "predictor_error.py"), "--small", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("within10: ") and last.endswith("%")
    (row,) = json.loads(out.read_text())["rows"]
    assert row["calib_points"] == 1 + 8 and row["test"] == 4  # the dense model + 8 calibrate, 4 others score
    assert row["loo"]["n"] == row["calib_points"] and row["noise"]["n"] == 2
    assert set(row["per_feature_set"]) >= {"macs", "kinds"}
    assert float(last.split()[1].rstrip("%")) == pytest.approx(row["within10_pct"])
