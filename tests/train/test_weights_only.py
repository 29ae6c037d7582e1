"""Model files load weights-only: a planted pickle never runs, a full-model ``--model`` needs
``--trust-pickle``, and a run folder's dense model is reused only for the model it was built from."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import optuna
import pytest
import torch

from autoprune.cli import main
from autoprune.config import load_run_config
from autoprune.deploy.bundle import rebuild_model
from autoprune.errors import ConfigError, UntrustedCode, UntrustedPickle
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import find_groups
from autoprune.study.context import prepare
from autoprune.train.checkpoint import FORMAT, dense_recipe, load_model, pruned_recipe, read_model_file, save_model
from autoprune.train.models import DemoResNet, build_model

from conftest import FAST_EXTRAS, tiny_run_config, write_yaml


class Evil:
    """A pickle whose loading runs a shell command that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"echo pwned > {shlex.quote(str(self.marker))}",))


def plant(path: Path, marker: Path) -> Path:
    """Replace ``path`` by a malicious pickle (and prove that unpickling it would fire)."""
    torch.save(Evil(marker), path)
    probe = marker.with_name(marker.name + ".probe")
    torch.save(Evil(probe), probe.with_suffix(".pt"))
    torch.load(probe.with_suffix(".pt"), weights_only=False)
    assert probe.is_file()  # the payload works: only weights-only loading keeps it from running
    probe.unlink()
    return path


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], marker: Path, *needles: str) -> str:
    """Run the CLI: exit 2, one ``error:`` line (no traceback) that contains ``needles``, and the
    marker never written. Returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not marker.exists()
    return lines[0]


# --------------------------------------------------------------------------- the file format
def test_pruned_model_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    model = DemoResNet(10, 1).eval()
    example = torch.zeros(1, 1, 16, 16)
    ratios = {g.name: 0.4 for g in find_groups(model, example, 10)}
    widths = apply_plan(model, example, PruningPlan(ratios, {g: "l1" for g in ratios}), 10)
    recipe = pruned_recipe(dense_recipe("demo", 10, 1, (16, 16), (1, 16, 16)), widths)
    save_model(model, tmp_path / "m.pt", recipe)

    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # tensors and plain data only
    assert raw["format"] == FORMAT and raw["recipe"]["widths"]["stem.0"] == list(widths["stem.0"])
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training


def test_planted_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = plant(tmp_path / "model.pt", marker)
    with pytest.raises(UntrustedPickle, match=r"model\.pt: a full pickle.*--trust-pickle"):
        load_model(evil)
    with pytest.raises(UntrustedPickle, match="--trust-pickle"):
        build_model(str(evil), 10)
    assert not marker.exists()


def test_full_model_pickle_as_model_needs_trust_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = plant(tmp_path / "evil.pt", marker)
    out = tmp_path / "run"
    refused(capsys, ["search", "--model", str(evil), "--out", str(out), "--trials", "1"], marker,
            "evil.pt: model checkpoint is a full pickle", "--trust-pickle", "'arch'")
    assert not (out / "base_model.pt").exists() and not (out / "study.db").exists()
    refused(capsys, ["groups", "--model", str(evil)], marker, "--trust-pickle")

    genuine = tmp_path / "full.pt"
    torch.save(DemoResNet(10, 1), genuine)
    refused(capsys, ["groups", "--model", str(genuine)], marker, "--trust-pickle")
    assert main(["groups", "--model", str(genuine), "--trust-pickle"]) == 0
    assert "layers.0.conv1" in capsys.readouterr().out
    # an {'arch', 'state_dict'} checkpoint holds tensors only: no flag needed
    torch.save({"arch": "demo", "state_dict": DemoResNet(10, 1).state_dict(), "num_classes": 10}, tmp_path / "sd.pt")
    assert main(["groups", "--model", str(tmp_path / "sd.pt")]) == 0


def test_trusted_full_pickle_model_runs_and_its_files_stay_weights_only(tmp_path: Path, fast_profile: Path) -> None:
    """With trust_pickle the user's pickle is the architecture: base_model.pt records the file and
    its hash, and rebuilding (here: resuming) needs the flag again."""
    ckpt = tmp_path / "full.pt"
    torch.save(DemoResNet(10, 1), ckpt)
    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=1, model=str(ckpt), **FAST_EXTRAS)
    ctx = prepare(load_run_config(str(write_yaml(tmp_path / "run.yaml", {**cfg, "trust_pickle": True}))))
    base_file = torch.load(tmp_path / "out" / "base_model.pt", weights_only=True)
    assert base_file["recipe"]["build"]["pickle"]["path"] == str(ckpt.resolve())
    with pytest.raises(UntrustedPickle, match=r"architecture is the full-model pickle .*full\.pt.*--trust-pickle"):
        load_model(tmp_path / "out" / "base_model.pt")
    again = load_model(tmp_path / "out" / "base_model.pt", trust_pickle=True)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), ctx.base(x))


# --------------------------------------------------------------------------- a run folder
@pytest.fixture()
def run_dir(tiny_run, tmp_path: Path, fast_profile: Path) -> tuple[Path, Path]:
    """A private copy of the shared tiny run (trials included) and a config that resumes it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.out, run)
    cfg = tiny_run_config(run, fast_profile, efficiency={"final_finetune_steps": 2, "sensitivity_scan": True})
    return run, write_yaml(tmp_path / "resume.yaml", cfg)


def _front(run: Path) -> list[dict]:
    return json.loads((run / "pareto.json").read_text())["pareto"]


def test_every_model_file_autoprune_writes_loads_weights_only(run_dir, tmp_path: Path) -> None:
    run, _ = run_dir
    assert main(["pick", str(run), "--dest", str(tmp_path / "bundle")]) == 0
    files = [run / "base_model.pt", *run.glob("trials/*/model*.pt"), *run.glob("pareto/*/model.pt"), tmp_path / "bundle" / "model.pt"]
    assert len(files) >= 5
    for f in files:
        assert torch.load(f, weights_only=True)["format"] == FORMAT, f
    card = json.loads((tmp_path / "bundle" / "model_card.json").read_text())
    scope: dict = {}
    exec(card["rebuild"]["pytorch"].split(" (")[0].replace("<bundle folder>", str(tmp_path / "bundle")), scope)
    assert sum(p.numel() for p in scope["model"].parameters()) == card["params"]


def test_planted_pickles_never_run_under_pick_export_remeasure_or_resume(run_dir, tmp_path: Path, capsys) -> None:
    run, resume = run_dir
    marker = tmp_path / "pwned"
    row = _front(run)[0]
    n = row["trial"]
    pareto_pt = run / row["artifacts"] / "model.pt"
    saved = {p: p.read_bytes() for p in (pareto_pt, run / "base_model.pt", run / "trials" / f"{n:05d}" / "model.pt")}

    plant(pareto_pt, marker)
    refused(capsys, ["pick", str(run), "--trial", str(n), "--dest", str(tmp_path / "b")], marker, "model.pt: a full pickle", "--trust-pickle")
    profile = write_yaml(tmp_path / "b2.yaml", {"name": "ort-b2", "backend": "onnxruntime", "device": "cpu", "threads": 1,
                                                "warmup": 1, "repeats": 3, "target_rel_ci": None, "batch_size": 2})
    refused(capsys, ["remeasure", str(run), "--device-profile", str(profile)], marker, "--trust-pickle")
    for trial_file in run.glob("trials/*/model*.pt"):  # what a resumed search exports
        plant(trial_file, marker)
    refused(capsys, ["search", "--config", str(resume)], marker, "a full pickle", "--trust-pickle")
    refused(capsys, ["export", str(run), "--trial", str(n), "--dest", str(tmp_path / "e")], marker, "--trust-pickle")

    for p, data in saved.items():
        p.write_bytes(data)
    plant(run / "base_model.pt", marker)
    refused(capsys, ["search", "--config", str(resume)], marker, "base_model.pt: a full pickle", "--trust-pickle")
    refused(capsys, ["export", str(run), "--trial", str(n), "--dest", str(tmp_path / "e"), "--rebuild"], marker,
            "base_model.pt: a full pickle")
    assert not marker.exists()


def test_planted_pickle_in_a_bundle_never_runs(run_dir, tmp_path: Path) -> None:
    run, _ = run_dir
    bundle = tmp_path / "bundle"
    assert main(["pick", str(run), "--dest", str(bundle)]) == 0
    marker = tmp_path / "pwned"
    plant(bundle / "model.pt", marker)
    with pytest.raises(UntrustedPickle, match="--trust-pickle"):
        load_model(bundle / "model.pt")
    assert rebuild_model(bundle).training is False  # the code + state_dict.pt route does not read model.pt
    plant(bundle / "state_dict.pt", marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        rebuild_model(bundle)
    assert not marker.exists()


def test_run_folder_of_an_older_autoprune_says_how_to_proceed(run_dir, tmp_path: Path, capsys) -> None:
    """Full pickles written before this format: a one-line error naming --trust-pickle; with the
    flag they load, and a resumed search rewrites base_model.pt and the front weights-only."""
    run, resume = run_dir
    for f in [run / "base_model.pt", *run.glob("trials/*/model*.pt"), *run.glob("pareto/*/model.pt")]:
        torch.save(load_model(f), f)  # what autoprune wrote before: torch.save(model)
    n = _front(run)[0]["trial"]
    err = refused(capsys, ["pick", str(run), "--trial", str(n), "--dest", str(tmp_path / "b")], tmp_path / "none",
                  "an older autoprune", "--trust-pickle")
    assert "pareto" in err
    assert main(["pick", str(run), "--trial", str(n), "--dest", str(tmp_path / "b"), "--trust-pickle"]) == 0
    capsys.readouterr()
    refused(capsys, ["search", "--config", str(resume)], tmp_path / "none", "base_model.pt: a full pickle", "--trust-pickle")
    assert main(["search", "--config", str(resume), "--trust-pickle"]) == 0
    for f in [run / "base_model.pt", *run.glob("pareto/*/model.pt")]:
        assert torch.load(f, weights_only=True)["format"] == FORMAT, f
    assert main(["pick", str(run), "--trial", str(n), "--dest", str(tmp_path / "c")]) == 0


# --------------------------------------------------------------------------- item 3: base_model.pt reuse
def _prepare(tmp_path: Path, profile: Path, name: str, **extra) -> object:
    cfg = tiny_run_config(tmp_path / "out", profile, trials=1, pretrain_steps=2, **{**FAST_EXTRAS, **extra})
    return load_run_config(str(write_yaml(tmp_path / f"{name}.yaml", cfg)))


def test_base_model_of_another_model_is_refused_before_any_trial(tmp_path: Path, fast_profile: Path, monkeypatch) -> None:
    import autoprune

    prepare(_prepare(tmp_path, fast_profile, "demo"))  # trained, then the run failed before the study
    (tmp_path / "mymodels.py").write_text(
        "from autoprune.train.models import DemoResNet\n"
        "def wide(num_classes=10):\n    return DemoResNet(num_classes, 1, (48, 96, 192))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for other in ("resnet18", "mymodels:wide"):
        with pytest.raises(ConfigError, match=rf"base_model\.pt: the dense model here was built from demo .* asks for {other} "
                                              rf".*model: demo -> {other}.*new --out, or delete base_model\.pt"):
            autoprune.run(_prepare(tmp_path, fast_profile, "other", model=other))
        study_db = tmp_path / "out" / "study.db"
        assert not study_db.exists() or not optuna.load_study(study_name="autoprune", storage=f"sqlite:///{study_db}").trials
    with pytest.raises(ConfigError, match=r"num_classes: 10 -> 12"):
        prepare(_prepare(tmp_path, fast_profile, "classes", num_classes=12))
    prepare(_prepare(tmp_path, fast_profile, "same"))  # what it was built from: reused


def test_base_model_of_another_checkpoint_is_refused(tmp_path: Path, fast_profile: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"arch": "demo", "state_dict": DemoResNet(10, 1).state_dict(), "num_classes": 10}, ckpt)
    ctx = prepare(_prepare(tmp_path, fast_profile, "a", model=str(ckpt)))
    recipe = read_model_file(tmp_path / "out" / "base_model.pt")["recipe"]
    assert recipe["build"]["model"] == "demo" and recipe["trained"] is None  # the arch, not the file: self-contained
    moved = tmp_path / "elsewhere.pt"  # the same checkpoint at another path (another worker): accepted
    shutil.copy(ckpt, moved)
    assert torch.equal(next(iter(prepare(_prepare(tmp_path, fast_profile, "b", model=str(moved))).base.state_dict().values())),
                       next(iter(ctx.base.state_dict().values())))
    retrained = {k: v + 1 if v.is_floating_point() else v for k, v in ctx.base.state_dict().items()}
    torch.save({"arch": "demo", "state_dict": retrained, "num_classes": 10}, ckpt)
    with pytest.raises(ConfigError, match=r"base_model\.pt: .*checkpoint_sha256: \w+ -> \w+.*delete base_model\.pt"):
        prepare(_prepare(tmp_path, fast_profile, "c", model=str(ckpt)))


# --------------------------------------------------------------------------- issue 23: code from a recipe
def _set_recipe_model(path: Path, ref: str) -> None:
    """Edit the architecture a weights-only model file names (it still loads weights-only)."""
    obj = torch.load(path, weights_only=True)
    obj["recipe"]["build"]["model"] = ref
    torch.save(obj, path)
    assert torch.load(path, weights_only=True)["recipe"]["build"]["model"] == ref


@pytest.fixture()
def mkstemp_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """Every call of tempfile.mkstemp (the function an edited recipe names), made in an empty folder."""
    import tempfile

    calls: list = []
    real = tempfile.mkstemp
    watched = tmp_path / "tmpdir"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))

    def spy(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    yield calls
    assert calls or not os.listdir(watched)


def test_a_model_files_recipe_never_chooses_which_code_runs(run_dir, tmp_path: Path, capsys, mkstemp_calls) -> None:
    """Issue 23: pareto/trial_N/model.pt's recipe edited to 'tempfile:mkstemp' made pick create a
    temporary file before the error."""
    run, _ = run_dir
    row = _front(run)[0]
    n = row["trial"]
    pareto_pt = run / row["artifacts"] / "model.pt"
    _set_recipe_model(pareto_pt, "tempfile:mkstemp")
    none = tmp_path / "never-written"
    err = refused(capsys, ["pick", str(run), "--trial", str(n), "--dest", str(tmp_path / "b")], none,
                  "model.pt", "'tempfile:mkstemp'", "--trust-code")
    assert "never chooses which code runs" in err
    # naming other code does not help: it must be the code the file records
    refused(capsys, ["pick", str(run), "--trial", str(n), "--dest", str(tmp_path / "b"), "--model", "mymodels:net"], none,
            "'tempfile:mkstemp'", "mymodels:net")
    profile = write_yaml(tmp_path / "b2.yaml", {"name": "ort-b2", "backend": "onnxruntime", "device": "cpu", "threads": 1,
                                                "warmup": 1, "repeats": 3, "target_rel_ci": None, "batch_size": 2})
    refused(capsys, ["remeasure", str(run), "--device-profile", str(profile)], none, "'tempfile:mkstemp'", "--trust-code")
    trial_pt = run / "trials" / f"{n:05d}" / "model.pt"
    _set_recipe_model(trial_pt, "tempfile:mkstemp")
    refused(capsys, ["export", str(run), "--trial", str(n), "--dest", str(tmp_path / "e")], none,
            "'tempfile:mkstemp'", "--trust-code")
    assert mkstemp_calls == [] and not (tmp_path / "b").exists() and not (tmp_path / "e").exists()
    with pytest.raises(UntrustedCode):
        load_model(pareto_pt)
    # the card of a bundle does not choose either
    _set_recipe_model(pareto_pt, "demo")
    assert main(["pick", str(run), "--trial", str(n), "--dest", str(tmp_path / "b")]) == 0
    card = json.loads((tmp_path / "b" / "model_card.json").read_text())
    card["rebuild"]["model"] = "tempfile:mkstemp"
    (tmp_path / "b" / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(UntrustedCode, match="model_card.json.*tempfile:mkstemp"):
        rebuild_model(tmp_path / "b")
    assert mkstemp_calls == []


def test_a_stored_config_never_chooses_which_code_export_runs(run_dir, tmp_path: Path, capsys, mkstemp_calls) -> None:
    run, _ = run_dir
    n = _front(run)[0]["trial"]
    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{run / 'study.db'}")
    for key in ("data", "task", "output"):
        cfg = dict(study.user_attrs["config"])
        study.set_user_attr("config", {**cfg, key: "tempfile:mkstemp"})
        refused(capsys, ["export", str(run), "--trial", str(n), "--dest", str(tmp_path / "e")], tmp_path / "none",
                f"config key '{key}'", "'tempfile:mkstemp'", "--trust-code")
        study.set_user_attr("config", cfg)
    assert mkstemp_calls == []


def test_your_own_model_code_rebuilds_when_you_name_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodels.py").write_text(
        "from autoprune.train.models import DemoResNet\n"
        "def wide(num_classes=10):\n    return DemoResNet(num_classes, 1, (16, 32, 64))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mymodels:wide", 10, 1).eval()
    save_model(model, tmp_path / "m.pt", dense_recipe("mymodels:wide", 10, 1, (16, 16), (1, 16, 16)))
    with pytest.raises(UntrustedCode, match=r"m\.pt: its recipe names the code 'mymodels:wide'.*--model mymodels:wide"):
        load_model(tmp_path / "m.pt")
    with pytest.raises(UntrustedCode, match="this run was given mymodels:other"):
        load_model(tmp_path / "m.pt", model="mymodels:other")
    x = torch.randn(2, 1, 16, 16)
    for loaded in (load_model(tmp_path / "m.pt", model="mymodels:wide"), load_model(tmp_path / "m.pt", trust_code=True)):
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    # a checkpoint given as the model counts as naming its arch (the search's own config)
    torch.save({"arch": "mymodels:wide", "state_dict": model.state_dict(), "num_classes": 10}, tmp_path / "ck.pt")
    assert load_model(tmp_path / "m.pt", model=str(tmp_path / "ck.pt")) is not None
    # torchvision names and the demo need nothing
    save_model(build_model("resnet18", 10, 1), tmp_path / "r.pt", dense_recipe("resnet18", 10, 1, (32, 32), (1, 32, 32)))
    assert load_model(tmp_path / "r.pt") is not None
