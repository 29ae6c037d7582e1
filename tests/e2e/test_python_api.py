"""The object-first Python API: ``autoprune.search(model, train, val)`` on an nn.Module and
Datasets a notebook holds, the front and ``pick`` it returns, resume rules for objects, and the
``examples/python_api.py`` script in its small form."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import autoprune
from autoprune.config import load_run_config
from autoprune.errors import ConfigError
from conftest import FAST_PROFILE, ROOT, write_yaml

REPO = ROOT

#: Run-config keys that keep a search of the tiny model to seconds.
FAST = {"finetune.steps": 2, "finetune.batch_size": 32, "exporter": "torchscript", "efficiency.sensitivity_scan": False,
        "efficiency.staircases": False, "search.seed": 0}


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


def datasets() -> tuple[TensorDataset, TensorDataset]:
    """Four classes told apart by which quadrant of an 8x8 image is bright: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (256,), generator=g)
    x = 0.3 * torch.randn(256, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] += 1.0
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory):
    """One object-first search (2 trials), shared by the tests that read it."""
    profile = write_yaml(tmp_path_factory.mktemp("prof") / "fast.yaml", FAST_PROFILE)
    train, val = datasets()
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("objects") / "run"
    # config= a RunConfig object; the arguments and keyword overrides go on top of it
    base = load_run_config(None, {"search.trials": 5, "finetune.lr": 0.003})
    result = autoprune.search(model, train=train, val=val, device_profile=str(profile), trials=2, out=out, config=base, **FAST)
    return {"result": result, "model": model, "before": before, "train": train, "val": val, "profile": profile, "out": out}


def test_object_first_search_returns_a_front_and_a_picked_model_that_runs(searched: dict, tmp_path: Path) -> None:
    result, model = searched["result"], searched["model"]
    assert result.ctx.cfg.search.trials == 2 and result.ctx.cfg.finetune.lr == 0.003  # argument over config=
    assert result.ctx.cfg.model.startswith("object:Sequential@")
    front = result.front
    assert front, "empty front"
    for row in front:
        assert isinstance(row, autoprune.FrontRow)
        assert 0.0 <= row.accuracy <= 1.0 and row.latency_ms > 0 and row.speedup and row.speedup > 0
        assert isinstance(row.trial, int)
    assert [r.latency_ms for r in front] == sorted(r.latency_ms for r in front)

    picked = result.pick()
    assert isinstance(picked, autoprune.Picked)
    assert picked.metrics["accuracy"] == max(r.accuracy for r in front)  # no budget: the most accurate
    x, y = searched["val"][:16]
    # Loaded inside torch.no_grad(), as a notebook would: the pruned architecture is still rebuilt.
    with torch.no_grad():
        net = picked.model
        logits = net(x)
    assert isinstance(net, nn.Module) and logits.shape == (16, 4)
    pruned = sum(p.numel() for p in net.parameters())
    assert pruned == picked.metrics["params"] < sum(p.numel() for p in model.parameters())
    assert picked.model is net  # loaded once

    # the caller's own module is neither trained nor pruned in place
    assert all(torch.equal(v, searched["before"][k]) for k, v in model.state_dict().items())

    bundle = picked.save(tmp_path / "bundle")
    assert (bundle / "model.onnx").is_file() and (bundle / "model_card.json").is_file()


def test_pick_budgets_and_targets(searched: dict) -> None:
    result = searched["result"]
    fastest = min(result.front, key=lambda r: r.latency_ms)
    assert result.pick(max_latency_ms=fastest.latency_ms).trial == fastest.trial
    dense_ms = result.dense["latency"]["median_ms"]
    # a target in ms is a latency limit; one no model meets is refused with the fastest named
    assert result.pick(target=f"{fastest.latency_ms}ms").trial == fastest.trial
    with pytest.raises(ConfigError, match="no Pareto model meets the budget"):
        result.pick(target=f"{dense_ms * 1000:.0f}x")
    with pytest.raises(ConfigError, match="no Pareto model meets the budget"):
        result.pick(min_accuracy=1.01)


def test_resume_with_the_same_object_and_refusal_of_another(searched: dict) -> None:
    """The run folder records the object's architecture fingerprint and weights: the same
    object resumes (nothing re-run), other weights or another architecture are refused."""
    kw = dict(train=searched["train"], val=searched["val"], device_profile=str(searched["profile"]), trials=2,
              out=searched["out"], **{**FAST, "finetune.lr": 0.003})  # the settings it ran with (config= gave lr)
    again = autoprune.search(searched["model"], **kw)
    assert len(again.study.trials) == len(searched["result"].study.trials)
    assert [r.trial for r in again.front] == [r.trial for r in searched["result"].front]

    retrained = tiny_cnn(seed=1)  # same architecture, other weights
    with pytest.raises(ConfigError, match="another model object.*same architecture with other weights"):
        autoprune.search(retrained, **kw)
    other_val = TensorDataset(searched["val"].tensors[0] + 0.5, searched["val"].tensors[1])
    with pytest.raises(ConfigError, match="made with a different model, data.*changed: data"):
        autoprune.search(searched["model"], **{**kw, "val": other_val})
    wider = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4))
    with pytest.raises(ConfigError, match="another model object.*another architecture"):
        autoprune.search(wider, **kw)


def test_objects_cannot_go_to_worker_processes_or_the_cli(searched: dict) -> None:
    from autoprune.train.models import build_model

    cfg = searched["result"].ctx.cfg
    with pytest.raises(ConfigError, match="workers=2: the model or data is a Python object"):
        autoprune.run(cfg, workers=2)
    # another process (the CLI, a worker) has no such object: one line naming the fix
    with pytest.raises(ConfigError, match="cannot be rebuilt from its name.*model=<the same object>"):
        build_model("object:Sequential@000000000000-000000000000", 4)


def test_export_and_remeasure_take_the_object(searched: dict, tmp_path: Path) -> None:
    result = searched["result"]
    trial = result.front[0].trial
    exported = autoprune.export(searched["out"], trial, tmp_path / "exp", model=searched["model"])
    assert (exported.dest / "model.onnx").is_file()
    with torch.no_grad():
        assert exported.model(searched["val"][:2][0]).shape == (2, 4)
    res = autoprune.remeasure(searched["out"], str(searched["profile"]), model=searched["model"])
    assert {r["trial"] for r in res["rows"]} == {r.trial for r in result.front}
    with pytest.raises(ConfigError, match="another model object"):
        autoprune.export(searched["out"], trial, tmp_path / "exp2", model=tiny_cnn(seed=2))


def test_bench_takes_a_module(searched: dict) -> None:
    model = tiny_cnn()
    model.train()
    res = autoprune.bench(model, str(searched["profile"]), example=torch.zeros(1, 1, 8, 8), exporter="torchscript")
    assert res["median_ms"] > 0 and res["input_shape"] == [1, 1, 8, 8]
    assert model.training  # the caller's module keeps its mode
    with pytest.raises(ConfigError, match="example= an input tensor"):
        autoprune.bench(model, str(searched["profile"]))


def test_argument_errors_are_one_line_config_errors() -> None:
    train, val = datasets()
    with pytest.raises(ConfigError, match="give both train= and val="):
        autoprune.search(tiny_cnn(), train=train)
    with pytest.raises(ConfigError, match="train=/val= datasets or data= a data reference, not both"):
        autoprune.search(tiny_cnn(), train=train, val=val, data="digits")
    with pytest.raises(ConfigError, match="expected a torch Dataset or DataLoader"):
        autoprune.search(tiny_cnn(), train=[1, 2], val=5)
    with pytest.raises(ConfigError, match="does not accept one val input"):
        autoprune.search(nn.Linear(3, 2), train=train, val=val)


@pytest.mark.slow
def test_python_api_example_runs_in_small_form(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "examples/python_api.py", "--small", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "picked: {'trial'" in proc.stdout and "predictions: [" in proc.stdout
    assert "model.onnx" in proc.stdout and (tmp_path / "bundle" / "model.onnx").is_file()
