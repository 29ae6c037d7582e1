"""``package.module:function`` references: one parser and importer for models, data, tasks and
output adapters, so each accepts the same forms and names the key in its error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from autoprune.coderef import import_ref, split_ref
from autoprune.errors import ConfigError, UntrustedPickle
from autoprune.measure.staircase import architecture_hash
from autoprune.outputs import load_adapter
from autoprune.train.checkpoint import dense_recipe, weights_hash
from autoprune.train.data import load_data
from autoprune.train.models import DemoResNet, build_model, checkpoint_arch, read_checkpoint
from autoprune.train.task import load_task
from autoprune.trust import model_code


@pytest.fixture
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "usercode_25b.py").write_text(
        "from autoprune.train.models import DemoResNet\n"
        "def net(num_classes=10):\n"
        "    return DemoResNet(num_classes, 1, widths=(8, 8, 8))\n"
        "def adapter(out):\n"
        "    return out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usercode_25b", raising=False)
    return "usercode_25b"


def test_split_and_import(user_code: str) -> None:
    assert split_ref("a.b:c") == ("a.b", "c") and split_ref("a.b") == ("a.b", "")
    assert import_ref(f"{user_code}:net", "model").__name__ == "net"
    assert import_ref(user_code, "task", module_alone=True).__name__ == user_code


@pytest.mark.parametrize("ref", [":net", "usercode_25b:missing", "no_such_module_25b:f"])
def test_every_kind_names_its_key_when_a_reference_does_not_import(user_code: str, ref: str) -> None:
    """A broken reference is one ConfigError naming the key (an empty module name was a raw
    ValueError from importlib)."""
    checks = [
        (lambda: build_model(ref, 10), r"^model: cannot import"),
        (lambda: load_adapter(ref), r"^run config: key 'output': "),
        (lambda: load_task(ref), r"^run config: key 'task': cannot import"),
        (lambda: load_data(ref), r"^data: cannot import"),
    ]
    for call, message in checks:
        with pytest.raises(ConfigError, match=message):
            call()


def test_user_checkpoints_are_read_by_one_reader(tmp_path: Path, user_code: str) -> None:
    """build_model, dense_recipe and the trust check read a ``--model`` checkpoint the same way:
    weights-only, the same refusal for a full pickle, the same ``arch``."""
    model = DemoResNet(10, 1, widths=(8, 8, 8))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"arch": f"{user_code}:net", "state_dict": model.state_dict(), "num_classes": 10}, ckpt)
    assert checkpoint_arch(read_checkpoint(ckpt)) == f"{user_code}:net" == model_code(str(ckpt))
    assert dense_recipe(str(ckpt), 10, 1, (16, 16), (1, 16, 16))["build"]["model"] == f"{user_code}:net"
    assert weights_hash(build_model(str(ckpt), 10)) == weights_hash(model)

    pickled = tmp_path / "full.pt"
    torch.save(model, pickled)
    with pytest.raises(UntrustedPickle) as direct:
        read_checkpoint(pickled)
    with pytest.raises(UntrustedPickle) as via_build:
        build_model(str(pickled), 10)
    with pytest.raises(UntrustedPickle) as via_recipe:
        dense_recipe(str(pickled), 10, 1, (16, 16), (1, 16, 16))
    assert str(direct.value) == str(via_build.value) == str(via_recipe.value)
    assert model_code(str(pickled)) is None


def test_architecture_hash_and_weights_hash_mean_different_things() -> None:
    """The staircase's hash ignores weights (a staircase depends on shapes); the study's and the
    model files' hash is of the weights."""
    a, b = DemoResNet(10, 1, widths=(8, 8, 8)), DemoResNet(10, 1, widths=(8, 8, 8))
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    assert architecture_hash(a) == architecture_hash(b) and weights_hash(a) != weights_hash(b)
    assert architecture_hash(a) != architecture_hash(DemoResNet(10, 1, widths=(8, 16, 8)))
