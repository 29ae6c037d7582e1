"""Every script in benchmarks/ run end to end in its small form (CI), and the helpers they share
(benchmarks/_common.py); the full runs are documented in docs/benchmarks.md. Timings on a shared
CI machine are not asserted, only that each script runs and reports what it says it does."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
from search_vs_baselines import hypervolume, kendall_tau, speedup_at_equal_accuracy, summarize  # noqa: E402


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
    # A target where autoprune has no model in some seed is reported missing, not skipped.
    assert re.fullmatch(r"worst margin: ([+-]\d+\.\d pt|missing \(autoprune has no model at .+\))", p.stdout.strip().splitlines()[-1])
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


def test_competing_load_runs_for_the_block_and_is_stopped_after_it():
    """benchmarks/_load.py (``--load N``): N training processes run inside the block, busy, and
    none outlives it."""
    import os
    import time

    from _load import competing_load

    with competing_load(2) as pids:
        assert len(pids) == 2
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, 0)  # alive
            with open(f"/proc/{pid}/stat") as f:
                assert int(f.read().split()[13]) > 0  # utime: it trains, it does not sleep
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_every_benchmark_script_is_run_by_a_test():
    """A script nobody runs breaks silently (throughput.py did): each one is named in this file."""
    text = Path(__file__).read_text()
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert scripts and [s for s in scripts if f'"{s}"' not in text] == []


def test_common_prune_applies_one_ratio_or_a_rule_per_group():
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(1, 3, 12, 12)
    before = [m.weight.shape for m in model if isinstance(m, nn.Conv2d)]
    pruned, widths = _common.prune(model, x, 10, 0.5)
    assert sorted(widths.values()) == [(16, 8), (32, 16)] and not pruned.training
    assert [m.weight.shape for m in model if isinstance(m, nn.Conv2d)] == before  # the model given is not changed
    seen = []
    _, widths = _common.prune(model, x, 10, lambda g: seen.append(g.channels) or (0.5 if g.channels == 32 else 0.0))
    assert sorted(seen) == [16, 32] and sorted(widths.values()) == [(16, 16), (32, 16)]
    assert pruned(x).shape == (1, 10)


def test_common_interleaved_runs_round_robin_and_alternates():
    calls: list[str] = []

    def t(name: str):
        return lambda: calls.append(name) or 0.001

    got = _common.interleaved({"a": t("a"), "b": t("b")}, rounds=3, per_round=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert got == {"a": [[0.001, 0.001]] * 3, "b": [[0.001, 0.001]] * 3} and _common.flat(got["a"]) == [0.001] * 6
    calls.clear()
    _common.interleaved({"a": t("a"), "b": t("b")}, rounds=3, alternate=True)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert _common.timer(lambda: sum(range(1000)), clock="cpu")() >= 0
    with pytest.raises(ValueError, match="clock"):
        _common.timer(print, clock="gpu")


def test_methods_table_small_writes_both_tables(tmp_path):
    out = tmp_path / "mt" / "methods_table"
    _run("methods_table.py", "--small", "--out", str(out))
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in res["granularity"]}
    assert list(rows) == ["dense", "structured 50% ch", "hybrid 50% ch + 50% w"]
    assert rows["dense"]["onnxruntime_speedup"] == 1.0 and rows["dense"]["openvino_speedup"] == 1.0
    assert rows["structured 50% ch"]["params"] < rows["dense"]["params"]
    assert rows["hybrid 50% ch + 50% w"]["weight_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert [(r["method"], r["granularity"]) for r in res["criteria"]] == [
        ("l1", "structured 50% ch"), ("l1", "unstructured 70% w"), ("l1", "nm 2:4")]
    assert "| l1 |" in out.with_suffix(".md").read_text()


def test_runner_overhead_small_times_both_runtimes():
    p = _run("runner_overhead.py", "--small")
    lines = [line for line in p.stdout.splitlines() if line.startswith("tiny")]
    assert [line.split()[1] for line in lines] == ["openvino", "onnxruntime"]
    assert all(re.search(r"before/after \d+\.\d+ .*n=\d+ pairs", line) for line in lines)


def test_staircase_widths_small_compares_three_roundings_at_equal_macs(tmp_path):
    out = tmp_path / "stairs.json"
    _run("staircase_widths.py", "--small", "--out", str(out))
    res = json.loads(out.read_text())["models"]["tiny"]
    assert res["groups"] == 2 and res["staircase_widths"] >= 2
    rows = res["onnxruntime-cpu"]["rows"]
    assert [r["variant"] for r in rows] == ["staircase", "round_to 8", "round_to 1"]
    assert all(abs(r["macs_frac"] - 0.5) < 0.1 and r["latency_vs_dense"] > 0 for r in rows)


def test_vit_heads_small_prunes_heads_and_mlp():
    p = _run("vit_heads.py", "--small")
    assert re.search(r"heads 4->2 in 2 blocks, MLP 128->64 in 2 blocks", p.stdout), p.stdout[-2000:]
    assert len(re.findall(r"-> speed-up \d+\.\d+x", p.stdout)) == 2


def test_serve_concurrency_small_answers_every_client_of_both_trees(tmp_path):
    out = tmp_path / "serve.json"
    _run("serve_concurrency.py", "--small", "--base-path", str(ROOT), "--out", str(out))
    res = json.loads(out.read_text())
    assert res["clients"] == 4 and set(res["summary"]) == {"base", "new"}
    for s in res["summary"].values():
        assert s["all_answered"] and s["reported_median_ms"] > 0


def test_startup_compares_a_git_revision_with_this_tree(tmp_path):
    """--base extracts a revision with git archive (the shared _common.source_tree); without a
    git checkout (an unpacked sdist) this tree is compared with itself."""
    git = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    out = tmp_path / "startup.json"
    _run("startup.py", "--runs", "1", *(["--base", "HEAD"] if git else ["--base-path", str(ROOT)]), "--json", str(out))
    res = json.loads(out.read_text())
    assert res["base"] == ("git HEAD" if git else str(ROOT)) and res["runs_each"] == 1
    assert res["median_s"]["base"] > 0 and res["median_s"]["new"] > 0


def test_every_committed_result_is_described_in_the_results_readme():
    """benchmarks/results/README.md says what each file is and which command made it: every file
    is named there in full, the archived ones in its archive section."""
    results = ROOT / "benchmarks" / "results"
    current, archive = (results / "README.md").read_text().split("## archive/")
    named = {n for n in re.findall(r"`([^`\s/]+)`", current + archive)}
    files = [p for p in results.rglob("*") if p.is_file() and p.name != "README.md"]
    assert [p.relative_to(results).as_posix() for p in files if p.name not in named] == []
    archived = {p.name for p in files if p.parent.name == "archive"}
    assert archived and archived <= set(re.findall(r"`([^`\s/]+)`", archive))
    assert not archived & set(re.findall(r"`([^`\s/]+)`", current))


def test_worst_margin_counts_a_missing_target_instead_of_skipping_it():
    def row(ap_4x):
        chosen = {f"{m}/{t}": {"test_accuracy": 0.8} for m in ("uniform", "tp-l1", "tp-taylor", "random", "autoprune") for t in ("2x", "3x", "4x")}
        chosen["autoprune/4x"] = ap_4x
        hv = {"hypervolume": 0.1, "wall_s": 1.0, "trials_run": 1}
        return {"done": True, "chosen": chosen, "searches": {"autoprune": hv, "random": hv}}

    res = {"m": {"dense": {}, "seeds": {"0": row({"test_accuracy": 0.81}), "1": row(None)}}}
    margins = {m["target"]: m for m in summarize(res)["margins"]}
    assert margins["4x"]["margin_pt"] is None and margins["4x"]["missing"] == 1  # one seed had no model at 4x
    assert margins["3x"]["margin_pt"] == pytest.approx(0.0)
