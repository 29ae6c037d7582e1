"""Deploy bundles: budget selection, bundle contents, model card, and a clean-process reload
that reproduces the recorded held-out accuracy with onnxruntime and OpenVINO."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.deploy.bundle import rebuild_model
from autoprune.deploy.pick import choose, pick
from autoprune.errors import ConfigError
from autoprune.measure.stats import latency_ms
from autoprune.train.checkpoint import load_model


def _row(trial: int, acc: float, lat: float, params: int = 1000, flops: float = 1e6, onnx_bytes: int = 2_000_000) -> dict:
    return {"trial": trial, "accuracy": acc, "latency_ms": lat, "params": params, "flops": flops, "onnx_bytes": onnx_bytes}


ROWS = [
    _row(1, 0.90, 0.10, params=100, flops=1e5, onnx_bytes=400_000),
    _row(2, 0.95, 0.20, params=200, flops=2e5, onnx_bytes=800_000),
    _row(3, 0.97, 0.40, params=400, flops=4e5, onnx_bytes=1_600_000),
]


@pytest.mark.parametrize(
    "budget, expected",
    [
        ({}, 3),
        ({"max_latency_ms": 0.25}, 2),
        ({"max_params": 150}, 1),
        ({"max_flops": 3e5}, 2),
        ({"max_size_mb": 1.0}, 2),  # 1.6 MB ONNX is over, 0.8 MB is within
        ({"max_size_mb": 0.5, "min_accuracy": 0.85}, 1),
        ({"min_accuracy": 0.96}, 3),
        ({"trial": 1}, 1),
    ],
)
def test_choose_most_accurate_within_every_budget(budget, expected):
    assert choose(ROWS, **budget)["trial"] == expected


def test_choose_errors_name_the_way_out():
    with pytest.raises(ConfigError, match="fastest Pareto model: 0.100 ms.*Relax a budget"):
        choose(ROWS, max_latency_ms=0.2, min_accuracy=0.99)
    with pytest.raises(ConfigError, match=r"front trials: \[1, 2, 3\]"):
        choose(ROWS, trial=7)
    with pytest.raises(TypeError, match="max_size_mb"):
        pick("unused", max_sizemb=1)


# run_copy (conftest): picking writes into the run folder and other tests read the shared one.


@pytest.fixture(scope="module")
def bundle(run_copy) -> tuple[dict, Path]:
    front = json.loads((run_copy / "pareto.json").read_text())["pareto"]
    best = max(front, key=lambda r: (r["accuracy"], -r["latency_ms"]))
    row, dest = pick(run_copy, run_copy.parent / "bundle", min_accuracy=best["accuracy"])
    assert row["trial"] == best["trial"]
    return row, dest


def test_bundle_files_and_model_card(bundle, tiny_run):
    row, dest = bundle
    card = json.loads((dest / "model_card.json").read_text())
    for f in ("model.onnx", "model.xml", "model.bin", "model.pt", "state_dict.pt", "infer_example.py"):
        assert (dest / f).stat().st_size > 0, f
    # torch.export and TorchScript: the installed torch writes both for this model, so both files
    # are there, load with torch's own loaders and compute what model.pt computes; no error excused.
    assert card["export_errors"] == {}
    x = torch.randn(card["input"]["shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(dest / "model.pt").eval()(x)
        for out in (torch.export.load(str(dest / "model.pt2")).module()(x), torch.jit.load(str(dest / "model.torchscript.pt"))(x)):
            assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-4)
    assert card["max_abs_diff_vs_pytorch"]["torch_export"] < 1e-4 and card["max_abs_diff_vs_pytorch"]["torchscript"] < 1e-4
    assert {"model.pt2", "model.torchscript.pt"} <= set(card["written_files"])
    assert card["trial"] == row["trial"] and card["accuracy"] == row["accuracy"]
    assert card["params"] == row["params"] and card["flops"] == row["flops"]
    # full latency statistics come from the study: at least the tiny profile's 5 samples; the
    # front's latency is the headline figure (ratio to dense x the dense quiet estimate)
    prof = tiny_run.ctx.profile.name
    lat = card["latency"][prof]
    assert latency_ms(lat) == pytest.approx(row["latency_ms"]) and lat["n"] >= 5 and lat["backend"] == "onnxruntime"
    assert lat["ratio"] is not None and lat["median_ms"] > 0  # raw figures kept beside it
    assert {g: v["ratio"] for g, v in card["layers"].items()} == row["ratios"]
    assert all(v["method"] for v in card["layers"].values())
    assert card["sizes"]["onnx"] == (dest / "model.onnx").stat().st_size
    assert card["config"]["data"] == "digits" and card["config"]["finetune"]["steps"] == 3
    assert {"torch", "onnxruntime", "openvino", "optuna"} <= set(card["versions"]["bundle"])
    assert card["rebuild"]["class"] == "autoprune.train.models.DemoResNet"
    assert card["max_abs_diff_vs_pytorch"]["onnxruntime"] < 1e-4
    assert card["max_abs_diff_vs_pytorch"]["openvino_f32"] < 1e-3
    assert card["input"]["shape"] == [1, 1, 16, 16] and card["output"]["shape"] == [1, 10]
    # OpenVINO's default precision is a name, not the str() of an openvino.Type
    assert card["openvino_default_inference_precision"] in ("f32", "bf16", "f16")
    assert "openvino_default" in card["max_abs_diff_vs_pytorch"]
    assert not any("<" in k or " " in k for k in card["max_abs_diff_vs_pytorch"])


def test_openvino_precision_names():
    import openvino as ov

    from autoprune.deploy.bundle import precision_name

    assert [precision_name(t) for t in (ov.Type.bf16, ov.Type.f32, ov.Type.f16)] == ["bf16", "f32", "f16"]
    assert precision_name("F32") == "f32"


def test_card_evaluation_names_the_data_seed_that_split_the_data():
    """Following the card must rebuild the held-out split, not a split that overlaps training."""
    from autoprune.deploy.bundle import evaluation
    from autoprune.train.data import load_data

    cfg = {"data": "digits", "image_size": None, "val_fraction": 0.25, "data_seed": 0, "search": {"seed": 1}}
    ev = evaluation(cfg)
    assert ev["data_seed"] == 0 and "seed" not in ev and "seed=data_seed" in ev["how"]
    searched = load_data("digits", None, 0.25, seed=0)  # what prepare() scored trials on
    val = load_data(ev["data"], ev["image_size"], ev["val_fraction"], seed=ev["data_seed"]).val
    assert val.indices == searched.val.indices
    assert set(load_data("digits", None, 0.25, seed=1).val.indices) & set(searched.train.indices)  # the old card's split
    # studies made before data_seed existed split with search.seed
    assert evaluation({"data": "digits", "search": {"seed": 3}})["data_seed"] == 3


def test_card_rebuild_instruction_runs(bundle):
    _, dest = bundle
    card = json.loads((dest / "model_card.json").read_text())
    scope: dict = {}
    exec(card["rebuild"]["python"].replace("<bundle folder>", str(dest)), scope)
    ref = load_model(dest / "model.pt")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](x), ref(x), rtol=0, atol=1e-6)


def test_rebuild_from_code_and_state_dict(bundle):
    _, dest = bundle
    ref = load_model(dest / "model.pt")
    model = rebuild_model(dest)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


CLEAN_EVAL = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    bundle = sys.argv[1]
    sys.path.insert(0, bundle)
    import infer_example as ie
    from autoprune.train.data import load_data  # only to rebuild the held-out split named in the card

    card = ie.card()
    ev = card["evaluation"]
    val = load_data(ev["data"], ev["image_size"], ev["val_fraction"], seed=ev["data_seed"]).val
    x = np.stack([val[i][0].numpy() for i in range(len(val))]).astype(np.float32)
    y = np.array([int(val[i][1]) for i in range(len(val))])
    bs = card["input"]["shape"][0]
    out = {"n": int(len(y))}
    for name, run in (("onnxruntime", ie.load_onnxruntime()), ("openvino", ie.load_openvino())):
        out[name] = int((ie.predict(run, x, bs).argmax(1) == y).sum())
    print(json.dumps(out))
    """
)


def test_bundle_reproduces_accuracy_in_clean_process(bundle, tmp_path):
    _, dest = bundle
    moved = tmp_path / "shipped"  # the bundle must not depend on the run folder
    shutil.copytree(dest, moved)
    script = tmp_path / "clean_eval.py"
    script.write_text(CLEAN_EVAL)
    p = subprocess.run([sys.executable, str(script), str(moved)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    card = json.loads((moved / "model_card.json").read_text())
    recorded = round(card["accuracy"] * res["n"])
    assert abs(res["onnxruntime"] - recorded) <= 1, (res, card["accuracy"])
    assert abs(res["openvino"] - recorded) <= 1, (res, card["accuracy"])


def test_inference_example_runs_as_script(bundle, tmp_path):
    _, dest = bundle
    x = np.random.default_rng(3).standard_normal((3, 1, 16, 16)).astype(np.float32)  # 3 inputs, static batch 1
    np.save(tmp_path / "x.npy", x)
    p = subprocess.run([sys.executable, str(dest / "infer_example.py"), str(tmp_path / "x.npy")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    ref = load_model(dest / "model.pt")
    with torch.no_grad():
        top1 = ref(torch.from_numpy(x)).argmax(1).tolist()
    assert f"onnxruntime: top-1 {top1}" in p.stdout and f"openvino: top-1 {top1}" in p.stdout
    src = (dest / "infer_example.py").read_text()
    assert "import autoprune" not in src and "from autoprune" not in src  # deployable without autoprune


def test_inference_example_has_usage_and_options(tmp_path):
    """``infer_example.py --help`` prints its usage (it used to open a file named '--help'); a
    missing input file is one line naming it. Runs from a copy, as a user's bundle would."""
    import autoprune.deploy.bundle as bundle_module

    template = Path(bundle_module.__file__).parent / "templates" / bundle_module.EXAMPLE
    script = tmp_path / bundle_module.EXAMPLE
    shutil.copy(template, script)
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage: infer_example.py") and "--runtime" in p.stdout and "INPUTS.npy" in p.stdout
    assert "Traceback" not in p.stderr
    (tmp_path / "model_card.json").write_text(json.dumps({"input": {"shape": [1, 1, 16, 16]}}))
    p = subprocess.run([sys.executable, str(script), "missing.npy"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "missing.npy: no such file" in p.stderr


def test_pick_cli_size_budget_and_clear_error(run_copy, tmp_path, capsys):
    from autoprune.cli import main

    front = json.loads((run_copy / "pareto.json").read_text())["pareto"]
    small = min(front, key=lambda r: r["onnx_bytes"])
    limit = small["onnx_bytes"] / 1e6
    expected = choose(front, max_size_mb=limit)
    assert main(["pick", str(run_copy), "--max-size-mb", str(limit), "--dest", str(tmp_path / "b")]) == 0
    card = json.loads((tmp_path / "b" / "model_card.json").read_text())
    assert card["trial"] == expected["trial"] and card["sizes"]["onnx"] <= limit * 1e6
    assert card["selection"]["budget"] == {"max_size_mb": limit}
    assert main(["pick", str(run_copy), "--max-size-mb", str(limit / 10)]) == 2
    assert "no Pareto model meets the budget" in capsys.readouterr().err
