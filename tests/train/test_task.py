"""Models whose outputs are not one tensor (output adapter) and tasks beyond classification."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import AUX_MODEL_SOURCE, ROOT, tiny_run_config, write_yaml
from torch.utils.data import TensorDataset

import autoprune
from autoprune.config import FinetuneConfig, load_run_config
from autoprune.errors import ConfigError
from autoprune.outputs import drop_aux_heads, load_adapter, main_output, without_dropped
from autoprune.train.data import DataBundle, load_digits
from autoprune.train.finetune import finetune
from autoprune.train.models import DemoResNet, evaluate, pretrain
from autoprune.train.task import ClassificationTask, SegmentationTask, Task, load_task

REPO = ROOT


# --------------------------------------------------------------------------- output adapter
def test_main_output_of_tensor_namedtuple_dict_tuple():
    from torchvision.models import GoogLeNetOutputs, InceptionOutputs

    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    assert main_output(a) is a
    assert main_output(GoogLeNetOutputs(a, b, c)) is a  # logits, aux2, aux1
    assert main_output(InceptionOutputs(a, b)) is a
    assert main_output(OrderedDict(aux=b, out=a)) is a  # torchvision segmentation: "out", not the first key
    assert main_output({"hidden": b, "logits": a}) is a
    assert main_output({"pred": a, "feat": b}) is a  # no known key: the first value
    assert main_output((a, b)) is a and main_output([a, b]) is a
    assert main_output(((a, b), c)) is a  # nested: first of first
    with pytest.raises(TypeError, match="output: module:function"):
        main_output(3)


def test_configured_adapter_is_imported_and_checked(tmp_path, monkeypatch):
    (tmp_path / "my_outputs.py").write_text("def second(out):\n    return out[1]\n\nNOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a, b = torch.randn(2), torch.randn(2)
    assert load_adapter("my_outputs:second")((a, b)) is b
    assert load_adapter(None) is main_output
    with pytest.raises(ConfigError, match="key 'output'.*cannot import"):
        load_adapter("my_outputs:missing")
    with pytest.raises(ConfigError, match="key 'output'.*cannot import"):
        load_adapter("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="not a function"):
        load_adapter("my_outputs:NOT_A_FUNCTION")
    with pytest.raises(ConfigError, match="package.module:function"):
        load_adapter("my_outputs")
    # the task uses it: a model returning (features, logits) trains and scores on the logits
    task = load_task("classification", "my_outputs:second")
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    pair = lambda inp: (torch.zeros(5, 7), model(inp))  # noqa: E731
    assert torch.equal(task.outputs(pair, x), model(x))
    assert task.evaluate(pair, [(x, y)]) == int((model(x).argmax(1) == y).sum()) / 5


def test_drop_aux_heads_gives_one_output_and_old_checkpoints_still_load():
    from torchvision.models import googlenet

    full = googlenet(weights=None, num_classes=5, aux_logits=True, init_weights=False)
    sd = full.state_dict()
    assert any(k.startswith("aux1.") for k in sd)
    model = googlenet(weights=None, num_classes=5, aux_logits=True, init_weights=False)
    assert drop_aux_heads(model) == ["aux1", "aux2"]
    assert model.aux1 is None and model.aux2 is None and not model.aux_logits
    model.load_state_dict(without_dropped(sd, model))  # strict: only the aux heads' keys were dropped
    model.train()
    assert isinstance(model(torch.randn(2, 3, 32, 32)), torch.Tensor)  # train mode: logits, not GoogLeNetOutputs
    assert drop_aux_heads(nn.Linear(2, 2)) == []


# --------------------------------------------------------------------------- classification = today's behaviour
def distill_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float, T: float) -> torch.Tensor:
    """The fine-tune loss as train/finetune.py computed it before tasks existed (the reference)."""
    ce = F.cross_entropy(student, y)
    if alpha <= 0:
        return ce
    kd = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean", log_target=True) * (T * T)
    return (1 - alpha) * ce + alpha * kd


def _old_finetune(model, data, cfg, teacher, steps, seed):
    """The fine-tune loop as it was before tasks existed (CE + KL via distill_loss)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    teacher.eval()
    done, epoch = 0, 0
    while done < steps:
        model.train()
        for x, y in data.loader("train", cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            out = model(x)
            with torch.no_grad():
                t_out = teacher(x)
            loss = distill_loss(out, t_out, y, cfg.distill_alpha, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
        epoch += 1
    model.eval()


def test_classification_task_reproduces_the_old_loss_accuracy_and_finetune_exactly():
    torch.manual_seed(0)
    s, t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    task = ClassificationTask()
    model, teacher = (lambda _x: s), (lambda _x: t)
    for alpha in (0.0, 0.5, 1.0):
        got = task.loss(model, (None, y), teacher if alpha else None, alpha, 4.0)
        assert torch.equal(got, distill_loss(s, t, y, alpha, 4.0))
    assert torch.equal(task.loss(model, (None, y)), F.cross_entropy(s, y))

    data = load_digits(16)
    base = DemoResNet(10, 1, widths=(8, 16, 16))
    pretrain(base, data, 0, steps=3)
    correct = sum(int((base(x).argmax(1) == yy).sum()) for x, yy in data.loader("val", 256))
    assert evaluate(base, data) == correct / len(data.val)
    assert evaluate(base, data, batch_size=64, max_batches=2) == evaluate(base, data, batch_size=64, max_batches=2, task=task)

    cfg = FinetuneConfig(steps=4, batch_size=32)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    finetune(a, data, cfg, teacher=base, seed=3)
    _old_finetune(b, data, cfg, base, 4, 3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


# --------------------------------------------------------------------------- segmentation
def test_segmentation_task_miou_loss_and_per_pixel_distillation():
    task = SegmentationTask()
    y = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [255, 255, 0, 0]]])
    perfect = F.one_hot(y.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 10
    assert task.evaluate(lambda _x: {"out": perfect}, [(None, y)]) == 1.0
    wrong = perfect.clone()
    wrong[0, :, 2, :2] = torch.tensor([10.0, 0, 0]).view(3, 1)  # two class-2 pixels called background
    # background: 6 right of 8 predicted (IoU 6/8); class 1: 4/4; class 2: 2 of 4 (2/4); ignored pixels count nowhere
    assert task.evaluate(lambda _x: wrong, [(None, y)]) == pytest.approx((6 / 8 + 1 + 2 / 4) / 3)
    # the loss upsamples a coarser output and ignores 255
    coarse = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = task.criterion(coarse, y)
    loss.backward()
    assert loss.ndim == 0 and coarse.grad is not None
    # per-pixel KL: the mean over pixels of each pixel's KL, times T^2
    s, t, T = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), 2.0
    per_pixel = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1)
    assert task.distill(s, t, T) == pytest.approx(float(per_pixel.mean() * T * T), rel=1e-5)


# --------------------------------------------------------------------------- load_task
def test_load_task_by_name_and_by_object(tmp_path, monkeypatch):
    assert isinstance(load_task(None), ClassificationTask)
    assert load_task("segmentation").metric_name == "miou"
    with pytest.raises(ConfigError, match="key 'task'.*unknown task 'detection'.*classification, segmentation"):
        load_task("detection")
    (tmp_path / "my_task.py").write_text(
        "import torch.nn.functional as F\n"
        "metric_name = 'neg_loss'\n"
        "def loss(model, batch):\n"
        "    x, y = batch\n"
        "    return F.cross_entropy(model(x), y)\n"
        "def evaluate(model, loader):\n"
        "    return -sum(float(loss(model, b).detach()) for b in loader)\n"
        "class NoEval:\n"
        "    def loss(self, model, batch):\n"
        "        return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("my_task:")  # a module is a task too
    assert isinstance(task, Task) and task.metric_name == "neg_loss"
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert torch.equal(task.loss(model, (x, y), teacher=model, alpha=0.5), F.cross_entropy(model(x), y))
    assert task.evaluate(model, [(x, y)]) == pytest.approx(-float(F.cross_entropy(model(x), y)))
    with pytest.raises(ConfigError, match="has no evaluate"):
        load_task("my_task:NoEval")
    with pytest.raises(ConfigError, match="cannot import"):
        load_task("my_task:Missing")


class Top1Percent(ClassificationTask):
    """A custom task for the search test: classification scored in percent, under its own name."""

    metric_name = "top1_percent"

    def evaluate(self, model, loader):
        return 100.0 * super().evaluate(model, loader)


def test_custom_task_metric_name_reaches_trials_and_pareto_json(tmp_path, fast_profile):
    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=1, pretrain_steps=20, task="test_task:Top1Percent")
    result = autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))))
    assert result.dense["metric_name"] == "top1_percent" and 1.0 < result.dense["accuracy"] <= 100.0
    done = [t for t in result.study.trials if t.values]
    assert done and all(t.user_attrs["metric_name"] == "top1_percent" and t.values[0] > 1.0 for t in done)
    rows = json.loads((tmp_path / "out" / "pareto.json").read_text())["pareto"]
    assert rows and all(r["metric_name"] == "top1_percent" for r in rows)


def test_unknown_task_fails_before_training(tmp_path, fast_profile):
    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=1, task="no_such_pkg:task")
    with pytest.raises(ConfigError, match="key 'task'"):
        autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))))
    assert not (tmp_path / "out" / "base_model.pt").exists()


# --------------------------------------------------------------------------- torchvision GoogLeNet, end to end
@pytest.mark.slow
def test_googlenet_pretrains_prunes_finetunes_and_exports_one_output(tmp_path):
    import onnx
    import onnxruntime as ort
    from torchvision.models import googlenet

    from autoprune.measure.onnx import export_onnx
    from autoprune.prune.plan import PruningPlan, apply_plan
    from autoprune.prune.structure import find_groups
    from autoprune.train.models import build_model

    data = load_digits(32)
    # The torchvision model as is (aux heads on) pre-trains through the adapter: train mode
    # returns GoogLeNetOutputs, the task takes its logits (this was a TypeError).
    raw = googlenet(weights=None, num_classes=10, aux_logits=True, init_weights=False)
    raw.conv1.conv = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert pretrain(raw, data, 0, steps=1, batch_size=8) == 1

    model = build_model("googlenet", 10, in_channels=1)  # aux heads dropped: pruned with everything else
    pretrain(model, data, 0, steps=2, batch_size=16)
    x = data.example_input(1)
    groups = find_groups(model, x, 10)
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, x, PruningPlan({g.name: 0.5 for g in groups}, round_to=8), 10)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    # a train-mode fine-tune after pruning (with aux heads this was "expected ... 512 channels")
    assert finetune(model, data, FinetuneConfig(steps=2, batch_size=16), teacher=None) == 2
    path = export_onnx(model, x, tmp_path / "g.onnx", "torchscript")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert float((torch.from_numpy(got) - model(x)).abs().max()) < 1e-3


# --------------------------------------------------------------------------- the segmentation example
def _tiny_shapes(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("SHAPES_SIZE", "32")
    monkeypatch.setenv("SHAPES_TRAIN", "96")
    monkeypatch.setenv("SHAPES_VAL", "32")


def test_shapes_data_is_deterministic_and_labels_every_shape(monkeypatch):
    _tiny_shapes(monkeypatch)
    from examples.segmentation.shapes import CLASSES, data, make_shapes

    x1, m1 = make_shapes(16, 32, seed=5)
    x2, m2 = make_shapes(16, 32, seed=5)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert not torch.equal(make_shapes(16, 32, seed=6)[1], m1)
    assert x1.shape == (16, 3, 32, 32) and m1.shape == (16, 32, 32)
    assert set(m1.unique().tolist()) <= set(range(len(CLASSES))) and len(m1.unique()) == len(CLASSES)
    assert all(int((m > 0).sum()) > 0 for m in m1)  # every image holds at least one shape
    bundle = data()
    assert isinstance(bundle, DataBundle) and bundle.num_classes == 4 and bundle.input_shape == (3, 32, 32)
    assert isinstance(bundle.train, TensorDataset) and len(bundle.val) == 32


@pytest.mark.slow
def test_segmentation_example_searches_picks_and_runs_from_its_bundle(tmp_path, fast_profile, monkeypatch):
    import yaml

    _tiny_shapes(monkeypatch)
    cfg = yaml.safe_load((REPO / "examples" / "segmentation" / "shapes.yaml").read_text())
    cfg.update(out=str(tmp_path / "out"), device_profile=str(fast_profile), pretrain_steps=15, exporter="torchscript",
               finetune={"steps": 3, "batch_size": 16}, search={"trials": 2, "seed": 0},
               efficiency={"sensitivity_scan": False, "bn_batches": 2})
    result = autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))))
    assert result.dense["metric_name"] == "miou" and 0.0 < result.dense["accuracy"] <= 1.0
    done = [t for t in result.study.trials if t.values]
    assert len(done) == 2 and all(t.user_attrs["params"] < result.dense["params"] for t in done)
    # the model is the user's own code: pick builds it only when named again (a run folder never chooses code)
    row, dest = autoprune.pick(tmp_path / "out", model=cfg["model"])
    card = json.loads((dest / "model_card.json").read_text())
    assert card["metric_name"] == "miou" and "miou" in card["evaluation"]["metric"]
    import onnx

    assert len(onnx.load(str(dest / "model.onnx")).graph.output) == 1
    out = subprocess.run([sys.executable, "infer_example.py"], cwd=dest, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "onnxruntime: class mask [1, 32, 32]" in out.stdout and "miou" in out.stdout


def test_a_model_with_train_only_heads_is_refused_before_training(tmp_path, fast_profile, monkeypatch):
    (tmp_path / "aux_model.py").write_text(AUX_MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=1, model="aux_model:build")
    with pytest.raises(ConfigError, match=r"aux_model:build: aux run only in train mode.*aux_logits=False"):
        autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))))
    assert not (tmp_path / "out" / "base_model.pt").exists()
