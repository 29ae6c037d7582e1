"""The command line: pick, bench, groups, search flags, and clear errors (exit code 2, one line on stderr)."""

import errno
import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
from conftest import AUX_MODEL_SOURCE

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
    """`groups` lists exactly the groups the structure analysis finds (name, kind, width,
    members), no more and no fewer, and counts them on its last line."""
    import torch

    from autoprune.prune.structure import find_groups
    from autoprune.train.models import DemoResNet

    assert main(["groups", "--model", "demo"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("\t") == ["group", "kind", "channels", "range", "methods", "members"]
    rows = [line.split("\t") for line in lines[1:-1]]
    listed = {r[0]: (r[1], int(r[2]), frozenset(r[5].split(", "))) for r in rows if r[1] != "unprunable"}
    expected = {g.name: (g.kind, g.channels, frozenset(g.members))
                for g in find_groups(DemoResNet(num_classes=10, in_channels=1).eval(), torch.zeros(1, 1, 16, 16), 10)}
    assert len(expected) == 9 and listed == expected
    assert all(r[3] == "[0.00, 0.70]" and r[4] == "l1" for r in rows)  # the default search space
    assert lines[-1].startswith(f"{len(expected)} prunable groups of demo at [1, 16, 16]")


def _printed_groups(out: str) -> list[tuple[str, float, float, list[str]]]:
    """(name, low, high, methods) of every group line ``groups`` prints when piped."""
    rows = []
    for line in out.splitlines()[1:]:
        cells = line.split("\t")
        if len(cells) == 6 and cells[1] != "unprunable":
            low, high = (float(v) for v in cells[3].strip("[]").split(", "))
            rows.append((cells[0], low, high, cells[4].split(",")))
    return rows


def test_groups_prints_exactly_the_groups_search_searches(tmp_path, fast_profile, capsys):
    """``groups`` and ``search`` find groups with one function (study.context.check_model) on the
    same config: the same input, device profile, search-space rules and pruning check."""
    import yaml

    from autoprune.config import load_run_config
    from autoprune.study.context import prepare

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"low": 0.1, "high": 0.6, "methods": ["l1", "l2"],
                                     "layers": [{"pattern": "layers.0*", "high": 0.3}, {"pattern": "layers.1*", "skip": True}]}))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": "demo", "data": "digits", "pretrain_steps": 0, "search_space": str(space),
                                   "device_profile": str(fast_profile), "out": str(tmp_path / "out"), "exporter": "torchscript",
                                   "efficiency": {"sensitivity_scan": False}}))
    assert main(["groups", "--config", str(run), "--image-size", "12"]) == 0
    printed = _printed_groups(capsys.readouterr().out)
    ctx = prepare(load_run_config(str(run), image_size=12))
    searched = [(g.name, round(g.low, 2), round(g.high, 2), g.methods) for g in ctx.groups]
    assert printed == searched and len(printed) >= 2 and any(high == 0.3 for _, _, high, _ in printed)


def test_groups_refuses_a_model_search_refuses(tmp_path, fast_profile, capsys, monkeypatch):
    """A model whose auxiliary head runs only in train mode cannot be searched; ``groups`` once
    listed its groups anyway (it had its own model check, with another example input)."""
    (tmp_path / "aux_cli_model.py").write_text(AUX_MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["--model", "aux_cli_model:build", "--device-profile", str(fast_profile)]
    assert main(["groups", *argv]) == 2
    groups_err = capsys.readouterr().err
    assert main(["search", *argv, "--out", str(tmp_path / "out"), "--pretrain-steps", "0"]) == 2
    search_err = capsys.readouterr().err
    error = groups_err.splitlines()[-1]
    assert error.startswith("error: model aux_cli_model:build: aux run only in train mode") and search_err.splitlines()[-1] == error


# Values that differ from each table flag's default (const flags set their const).
FLAG_VALUES = {"--model": "resnet18", "--data": "digits-cluttered", "--search-space": "mine", "--device-profile": "theirs",
               "--trials": "3", "--out": "elsewhere", "--storage": "sqlite:///x.db", "--study-name": "s", "--seed": "3",
               "--sampler": "tpe", "--finetune-steps": "3", "--pretrain-steps": "3", "--pretrain-seconds": "2.5",
               "--image-size": "24", "--timeout": "2.5"}


def _key(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("command", ["search", "groups"])
def test_every_table_flag_sets_its_config_key(command):
    from autoprune.cli import build_parser
    from autoprune.cli.flags import GROUPS_FLAGS, RUN_FLAGS, load_config

    parser = build_parser()
    flags = [f for f in RUN_FLAGS if command == "search" or f.flag in GROUPS_FLAGS]
    assert {f.flag for f in flags if f.const is None} <= set(FLAG_VALUES)
    for f in flags:
        argv = [command, f.flag] if f.const is not None else [command, f.flag, FLAG_VALUES[f.flag]]
        cfg = load_config(parser.parse_args(argv))
        expected = f.const if f.const is not None else (f.type or str)(FLAG_VALUES[f.flag])
        assert _key(cfg, f.key) == expected != _key(load_config(parser.parse_args([command])), f.key), f.flag


def test_search_and_groups_take_no_hand_mapped_config_flag():
    """Every search/groups option is a table flag, --config, --set, --workers or --help."""
    from autoprune.cli import build_parser
    from autoprune.cli.flags import RUN_FLAGS

    hook_subs = {a.dest: a for a in build_parser()._actions if a.dest == "cmd"}["cmd"].choices
    table = {f.flag for f in RUN_FLAGS}
    for name in ("search", "groups"):
        opts = {o for a in hook_subs[name]._actions for o in a.option_strings}
        assert opts - table == {"-h", "--help", "--config", "--set"} | ({"--workers"} if name == "search" else set())
        helps = {a.option_strings[0]: a.help for a in hook_subs[name]._actions if a.option_strings}
        assert helps["--data"] == {a.option_strings[0]: a.help for a in hook_subs["search"]._actions if a.option_strings}["--data"]


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


# --------------------------------------------------------------------------- one-line errors
@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Path:
    """A static-shape (batch 1) ONNX file, exported without a search."""
    import torch

    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(path), dynamo=False)
    return path


def _one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["bench", "{onnx}", "--device-profile", "torch-cpu"], r"m\.onnx: device profile 'torch-cpu' \(backend torch\) times PyTorch modules.*shipped: .*onnxruntime-cpu.*openvino-cpu"),
    (["bench", "{onnx}", "--batch-size", "4"], r"m\.onnx: the model's batch size is fixed at 1.*drop --batch-size 4"),
    (["bench", "{tmp}/missing.onnx"], r"missing\.onnx: file not found"),
    (["bench", "{tmp}"], r": not a file; pass an \.onnx file"),
    (["search", "--out", "{onnx}"], r"m\.onnx: --out \(run folder\) names a file, not a folder"),
    (["search", "--out", "{onnx}/run"], r"m\.onnx/run: --out \(run folder\) cannot be created"),
    (["search", "--set", "finetune.steps"], r"--set 'finetune\.steps': expected KEY=VALUE"),
    (["search", "--set", "search.trails=3"], r"key 'search\.trails': unknown key \(allowed keys: .*trials"),
    (["search", "--pretrain-steps", "3", "--pretrain-seconds", "2"], r"pretrain_steps \(3\) and pretrain_seconds \(2\.0\) are both set"),
    (["search", "--trials", "3", "--set", "search.trials=4"], r"search\.trials is given twice"),
    (["search", "--config", "{tmp}/bad.yaml"], r"bad\.yaml: invalid RunConfig: key 'finetune\.stesp': unknown key.*; key 'trails': unknown key"),
    (["serve-latency", "--token-file", "{tmp}/no-token"], r"no-token: --token-file cannot be read"),
])
def test_user_errors_are_one_line_without_traceback(argv, expected, small_onnx, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("trails: 5\nfinetune:\n  stesp: 3\n")
    argv = [a.format(onnx=small_onnx, tmp=tmp_path) for a in argv]
    assert re.search(expected, _one_line_error(capsys, argv))


def test_output_paths_that_are_files_are_refused_before_any_work(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = str(tiny_run.out)
    assert re.search(r"a-file: --dest names a file", _one_line_error(capsys, ["pick", run, "--dest", str(blocker)]))
    assert re.search(r"a-file: --dest names a file", _one_line_error(capsys, ["export", run, "--trial", "0", "--dest", str(blocker)]))
    assert re.search(r"a-file: --out's folder names a file, not a folder",
                     _one_line_error(capsys, ["report", run, "--out", str(blocker / "r.html")]))


def test_disk_full_is_one_line_but_bugs_keep_their_traceback(monkeypatch, small_onnx, capsys):
    import autoprune.api

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/model.onnx")

    monkeypatch.setattr(autoprune.api, "bench", full)
    assert "/data/runs/x/model.onnx: No space left on device" in _one_line_error(capsys, ["bench", str(small_onnx)])

    def bug(*a, **k):
        raise KeyError("latency")

    monkeypatch.setattr(autoprune.api, "bench", bug)
    with pytest.raises(KeyError):
        main(["bench", str(small_onnx)])
    monkeypatch.setattr(autoprune.api, "bench", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(2, "gone", "/x")))
    with pytest.raises(FileNotFoundError):  # not a machine condition: may be a bug, keeps its traceback
        main(["bench", str(small_onnx)])


# --------------------------------------------------------------------------- search flags
def test_search_flags_and_set_take_effect_and_a_final_stage_resumes(tmp_path, fast_profile, capfd):
    out = tmp_path / "run"
    argv = ["search", "--out", str(out), "--device-profile", str(fast_profile), "--trials", "1", "--finetune-steps", "2",
            "--pretrain-steps", "7", "--image-size", "12", "--set", "exporter=torchscript",
            "--set", "efficiency.sensitivity_scan=false"]
    optuna_log: list[str] = []
    listener = logging.Handler(logging.DEBUG)
    listener.emit = lambda record: optuna_log.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("optuna").addHandler(listener)
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default in a fresh process
    try:
        assert main([*argv, "--set", "search.population_size=4"]) == 0
    finally:
        logging.getLogger("optuna").removeHandler(listener)
    assert not [m for m in optuna_log if "A new study created" in m]  # Optuna's own INFO log is off in the CLI
    err = capfd.readouterr().err
    assert "training the dense demo model for 7 steps" in err
    meta = json.loads(next((out / "pareto").glob("*/metadata.json")).read_text())
    assert meta["input_shape"] == [1, 1, 12, 12]
    cfg = meta["config"]
    assert (cfg["pretrain_steps"], cfg["pretrain_seconds"], cfg["image_size"], cfg["exporter"]) == (7, None, 12, "torchscript")
    assert (cfg["efficiency"]["sensitivity_scan"], cfg["search"]["population_size"]) == (False, 4)

    # the same run with a final stage added (and another population size) resumes: no new trial
    assert main([*argv, "--set", "efficiency.final_finetune_steps=2", "--set", "search.population_size=6"]) == 0
    capfd.readouterr()
    final = json.loads((out / "final.json").read_text())
    assert final and all(v["steps"] == 2 for v in final.values())
    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 1

    # an explicit --pretrain-seconds is not ignored: it replaces the step budget, which would
    # change the dense model of this run folder, so the resume is refused and says why
    assert main([a for a in argv if a not in ("--pretrain-steps", "7")] + ["--pretrain-seconds", "1"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and re.search(r"changed: .*pretrain_steps: 7 -> None", err), err
