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
from autoprune.errors import ConfigError, UntrustedPickle
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
