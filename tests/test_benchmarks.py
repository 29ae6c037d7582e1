"""The search-vs-baselines benchmark in its small form (CI); the full run is documented in docs/benchmarks.md."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from search_vs_baselines import hypervolume, kendall_tau, speedup_at_equal_accuracy  # noqa: E402


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
    """The budget benchmark's CI form: every method picks a model per target, the searches get
    equal wall-clock, and --report prints the table with the worst margin as its last line."""
    out = tmp_path / "bench"
    script = str(ROOT / "benchmarks" / "search_vs_baselines.py")
    p = subprocess.run([sys.executable, script, "--small", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = out.glob("search_vs_baselines_fmnist_demo.json")
    res = json.loads(path.read_text())["demo"]
    assert res["dense"]["test_accuracy"] > 0.5
    # Baselines: the least-pruned snapshot whose measured speed-up reaches each target.
    speedups = res["baselines"]["speedups"]
    for meth, per_target in res["baselines"]["chosen"].items():
        for tkey, key in per_target.items():
            if key is not None:
                assert key.startswith(meth + "/") and speedups[key] >= float(tkey[:-1])
    row = res["seeds"]["0"]
    ap, rnd = row["searches"]["autoprune"], row["searches"]["random"]
    assert ap["finetuned"] >= 1 and rnd["finetuned"] >= 1
    assert 0.8 * ap["wall_s"] <= rnd["wall_s"] <= 1.5 * ap["wall_s"] + 10  # equal wall-clock (a trial may overrun)
    targets = [t for t in ap["trials"] if t.get("target_ms")]
    assert targets, "autoprune's trials carry the target they were aimed at"
    chosen = {k: v for k, v in row["chosen"].items() if v}
    assert any(k.startswith("autoprune/") for k in chosen) and any(k.startswith("uniform/") for k in chosen)
    for key, v in chosen.items():
        assert v["speedup"] >= float(key.split("/")[1][:-1]) and 0 <= v["test_accuracy"] <= 1
    rep = subprocess.run([sys.executable, script, "--report", "--results", str(out)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-2000:]
    lines = rep.stdout.strip().splitlines()
    assert lines[-1].startswith("worst margin: ") and "Kendall tau" in rep.stdout
    assert any("uniform" in line and "tp-taylor" in line and "autoprune" in line for line in lines)  # the table header


def test_committed_results_report():
    """The committed full run: --report reads it and ends with the worst margin."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_vs_baselines.py"), "--report"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.fullmatch(r"worst margin: [+-]\d+\.\d pt", p.stdout.strip().splitlines()[-1])
    assert "resnet18" in p.stdout and "mobilenet_v2" in p.stdout


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)


@pytest.mark.slow
def test_benchmark_app_agreement_runs_in_its_small_form(tmp_path):
    """The agreement script end to end on one small model, one short round: both tools run on the
    same file and the summary line is printed (the numbers themselves are not asserted: timings
    on a shared CI machine are not a unit-test matter; docs/benchmarks.md quotes a full run)."""
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


def test_throughput_small_reports_phases_in_train_steps(tmp_path):
    """benchmarks/throughput.py --small: start-up, scan per group and every trial phase in
    seconds and train-step equivalents, the overhead line last (numbers are not asserted:
    timings on a shared CI machine are not a unit-test matter)."""
    out = tmp_path / "throughput.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--small", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"overhead: (\d+\.\d) train-steps per trial", last)
    assert m, last
    res = json.loads(out.read_text())
    assert float(m.group(1)) == pytest.approx(res["overhead_steps"], abs=0.05)
    step = res["train_step_s"]
    assert step > 0 and len(res["train_step_samples"]) >= 10  # interleaved: sampled before every trial
    # Both candidates went through the ONNX slicer (its set-up reported beside start-up).
    assert res["onnx_slicing"] == {"sliced": 2, "fresh": 0, "off_reason": None}
    assert res["startup_s"]["onnx_slicer_once"] > 0
    for phase in ("prune", "export", "parity", "latency", "finetune", "evaluation"):
        assert len(res["runs"][phase]) == 2 and res["median_s"][phase] > 0
        assert res["median_steps"][phase] == pytest.approx(res["median_s"][phase] / step)
    assert res["median_s"]["timed"] <= res["median_s"]["latency"]
    assert set(res["scan_per_group_steps"]) == {"sensitivity", "flops_savings"} and res["scan_groups"] == 1
    assert res["startup_s"]["prepare"] > 0 and "start-up prepare" in p.stdout and "scan per group" in p.stdout
