"""The command line: pick, bench, groups and clear errors (exit code 2, message on stderr)."""

import json
import shutil
import subprocess
import sys

from autoprune.cli import main


def test_pick_by_latency_writes_bundle(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out, run)
    rows = json.loads((run / "pareto.json").read_text())["pareto"]
    fastest = min(rows, key=lambda r: r["latency_ms"])
    best = max(rows, key=lambda r: r["accuracy"])
    assert main(["pick", str(run), "--max-latency-ms", str(fastest["latency_ms"])]) == 0
    meta = json.loads((run / "picked" / "metadata.json").read_text())
    assert meta["trial"] == fastest["trial"]
    assert (run / "picked" / "model.onnx").exists() and (run / "picked" / "model.xml").exists()
    assert main(["pick", str(run), "--dest", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "metadata.json").read_text())["trial"] == best["trial"]
    assert main(["pick", str(run), "--max-params", "1"]) == 2
    assert "no Pareto model meets the budget" in capsys.readouterr().err


def test_bench_measures_onnx(tiny_run, fast_profile, capsys):
    onnx = next((tiny_run.out / "pareto").glob("*/model.onnx"))
    assert main(["bench", str(onnx), "--device-profile", str(fast_profile), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["median_ms"] > 0 and res["n"] >= 5 and res["input_shape"] == [1, 1, 16, 16]


def test_bench_corrupt_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["bench", str(bad)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_groups_lists_names(capsys):
    assert main(["groups", "--model", "demo"]) == 0
    assert "layers.0.conv1" in capsys.readouterr().out


def test_missing_model_file_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "nope.pt not found" in p.stderr


def test_bad_config_key_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trails: 5\n")
    p = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "c.yaml" in p.stderr and "trails" in p.stderr and "allowed keys" in p.stderr
