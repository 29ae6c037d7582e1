"""Re-measuring the Pareto models on another device profile, and picking by that profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoprune.deploy.pick import pick
from autoprune.errors import ConfigError
from autoprune.results.front import non_dominated
from autoprune.results.remeasure import remeasure

TINY = {"device": "cpu", "threads": 1, "warmup": 1, "repeats": 5, "target_rel_ci": None, "batch_size": 1}


def _profile(folder: Path, name: str, **kw) -> Path:
    import yaml

    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, **TINY, **kw}))
    return p


@pytest.fixture(scope="module")
def ov_result(run_copy) -> dict:
    return remeasure(run_copy, str(_profile(run_copy.parent, "ov-tiny", backend="openvino", device="CPU")))


def test_remeasure_on_openvino_marks_non_dominated(run_copy, ov_result):
    front = json.loads((run_copy / "pareto.json").read_text())["pareto"]
    saved = json.loads((run_copy / "remeasure" / "ov-tiny.json").read_text())
    assert saved["profile_name"] == "ov-tiny" and saved["profile"]["backend"] == "openvino"
    assert saved["search_profile"] == json.loads((run_copy / "pareto.json").read_text())["dense"]["profile"]
    assert sorted(r["trial"] for r in saved["rows"]) == sorted(r["trial"] for r in front)
    by_trial = {r["trial"]: r for r in front}
    for r in saved["rows"]:
        assert r["latency"]["n"] == 5 and r["latency_ms"] == r["latency"]["median_ms"] > 0
        assert r["accuracy"] == by_trial[r["trial"]]["accuracy"]
        assert r["search_latency_ms"] == by_trial[r["trial"]]["latency_ms"]
    mask = non_dominated([(r["accuracy"], r["latency_ms"]) for r in saved["rows"]])
    assert [r["non_dominated"] for r in saved["rows"]] == mask
    assert saved["still_non_dominated"] == [r["trial"] for r in saved["rows"] if r["non_dominated"]]
    assert saved["dense"]["latency"]["median_ms"] > 0  # the dense baseline on the new target too


def test_remeasure_other_batch_size_reexports(run_copy):
    res = remeasure(run_copy, str(_profile(run_copy.parent, "ort-b2", backend="onnxruntime", batch_size=2)), include_dense=False)
    assert res["input_shape"] == [2, 1, 16, 16]
    assert all(r["latency"]["batch_size"] == 2 for r in res["rows"])
    assert len(list((run_copy / "remeasure" / "ort-b2").glob("*.onnx"))) == len(res["rows"])
    assert res["dense"] is None


def test_pick_on_remeasured_profile(run_copy, ov_result, tmp_path):
    rows = ov_result["rows"]
    fastest = min(rows, key=lambda r: r["latency_ms"])
    prof = str(run_copy.parent / "ov-tiny.yaml")
    row, dest = pick(run_copy, tmp_path / "b", profile=prof, max_latency_ms=fastest["latency_ms"])
    assert row["trial"] == fastest["trial"] and row["latency_ms"] == fastest["latency_ms"]
    card = json.loads((dest / "model_card.json").read_text())
    assert card["selection"]["latency_profile"] == "ov-tiny"
    assert card["latency"]["ov-tiny"]["source"] == "remeasure"
    assert card["latency"]["ov-tiny"]["median_ms"] == fastest["latency_ms"]
    assert card["latency"]["ov-tiny"]["non_dominated"] == fastest["non_dominated"]
    assert len(card["latency"]) >= 2  # the search profile's numbers are kept next to it


def test_pick_on_unmeasured_profile_says_what_to_run(run_copy):
    with pytest.raises(ConfigError, match="autoprune remeasure .* --device-profile openvino-cpu"):
        pick(run_copy, profile="openvino-cpu", max_latency_ms=1.0)


def test_remeasure_cli(run_copy, capsys):
    from autoprune.cli import main

    prof = _profile(run_copy.parent, "torch-tiny", backend="torch")
    assert main(["remeasure", str(run_copy), "--device-profile", str(prof)]) == 0
    cap = capsys.readouterr()
    err = cap.out + cap.err
    saved = json.loads((run_copy / "remeasure" / "torch-tiny.json").read_text())
    assert "torch-tiny" in err and f"{saved['rows'][0]['latency_ms']:.3f}" in err  # the table shows the numbers
    assert main(["remeasure", str(run_copy.parent / "nope"), "--device-profile", str(prof)]) == 2
