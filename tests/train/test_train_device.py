"""The ``train:`` section: device choice and its errors, autocast precision, CPU threads restored,
loader options, CPU fp32 copies for export, and ``--workers`` planning."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from autoprune.config import FinetuneConfig, TrainConfig, load_run_config, load_search_space
from autoprune.errors import ConfigError
from autoprune.measure.onnx import cpu_fp32, export_onnx
from autoprune.runfolder import RunFolder
from autoprune.study.pool import plan_slots, worker_config
from autoprune.train.data import DataBundle, load_digits
from autoprune.train.device import TrainSetup, resolve_device, setup_from_config, torch_threads
from autoprune.train.finetune import finetune
from autoprune.train.models import DemoResNet, evaluate

from conftest import tiny_run_config, write_yaml

NO_CUDA = not torch.cuda.is_available()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in model.parameters()]


def _small_data(n: int = 96) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataBundle(TensorDataset(x, y), TensorDataset(x[:32], y[:32]), 10, (1, 16, 16))


# --------------------------------------------------------------------------- device and precision
@pytest.mark.skipif(not NO_CUDA, reason="checks the behaviour of a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error_naming_the_key_and_fix():
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=r"train\.device: cuda.*no CUDA device.*train\.device: auto or cpu"):
            setup_from_config(TrainConfig(device=name))


def test_device_values_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"train\.device"):
        load_run_config(None, {"train.device": "gpu"})
    cfg = load_run_config(None, {"train.device": "cpu", "train.threads": 1})
    assert setup_from_config(cfg.train).device == torch.device("cpu")


def test_fp16_training_on_cpu_is_refused():
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs a CUDA device"):
        load_run_config(None, {"train.device": "cpu", "train.precision": "fp16"})
    if NO_CUDA:  # auto resolves to the CPU here: refused when resolved, before any training
        with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs a CUDA device.*bf16 or fp32"):
            setup_from_config(TrainConfig(precision="fp16"))


def test_bf16_autocast_finetune_runs_in_bf16_on_cpu_and_changes_fp32_weights():
    model, data = DemoResNet(), _small_data()
    before = _weights(model)
    seen: list[torch.dtype] = []
    model.stem[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    setup = TrainSetup(torch.device("cpu"), "bf16", threads=1)
    assert finetune(model, data, FinetuneConfig(steps=3, batch_size=16), seed=0, setup=setup) == 3
    assert seen and all(d == torch.bfloat16 for d in seen)  # the convs really ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_threads_are_set_during_training_and_restored_after():
    model, data = DemoResNet(), _small_data()
    inside: list[int] = []
    model.stem[0].register_forward_hook(lambda m, i, o: inside.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    finetune(model, data, FinetuneConfig(steps=2, batch_size=16), setup=TrainSetup(torch.device("cpu"), threads=want))
    evaluate(model, data, setup=TrainSetup(torch.device("cpu"), threads=want))
    assert inside and set(inside) == {want}
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(want):  # restored on errors too
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_loader_options_reach_every_dataloader():
    setup = setup_from_config(TrainConfig(device="cpu", num_workers=1, persistent_workers=True, pin_memory=False, threads=1))
    data = _small_data()
    data.loader_kwargs = setup.loader_kwargs()
    loader = data.loader("train", 16, shuffle=True)
    assert loader.num_workers == 1 and loader.persistent_workers and not loader.pin_memory
    model = DemoResNet()
    before = _weights(model)
    assert finetune(model, data, FinetuneConfig(steps=2, batch_size=16), setup=setup) == 2  # through the worker process
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(model)))


# --------------------------------------------------------------------------- what is exported
def test_export_uses_a_cpu_fp32_copy_and_leaves_the_trained_model_alone(tmp_path):
    model = DemoResNet().eval()
    x = torch.randn(1, 1, 16, 16)
    assert cpu_fp32(model) is model  # already CPU fp32: no copy
    odd = copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last)
    copy_ = cpu_fp32(odd)
    assert copy_ is not odd and all(p.dtype == torch.float32 and p.is_contiguous() for p in copy_.parameters())
    assert next(odd.parameters()).dtype == torch.bfloat16  # the original keeps training as it was
    path = export_onnx(odd, x, tmp_path / "m.onnx", "torchscript")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = copy_(x).numpy()
    assert abs(got - ref).max() < 1e-4


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_amp_finetune_then_export_from_a_cpu_copy(tmp_path, precision):
    setup = setup_from_config(TrainConfig(device="cuda", precision=precision, channels_last=True))
    assert setup.device.type == "cuda" and setup.pin_memory
    data = load_digits()
    data.loader_kwargs = setup.loader_kwargs()
    teacher = DemoResNet().to(setup.device).eval()
    model = copy.deepcopy(teacher)
    before = _weights(model)
    finetune(model, data, FinetuneConfig(steps=5, batch_size=32), teacher=teacher, setup=setup)
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.float32
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(model)))
    assert 0.0 <= evaluate(model, data, setup=setup) <= 1.0
    x = torch.randn(1, 1, 16, 16)
    path = export_onnx(model, x, tmp_path / "m.onnx", "torchscript")
    assert next(model.parameters()).is_cuda  # exported from a copy
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model.eval().float()(x.cuda()).cpu().numpy()
    assert abs(got - ref).max() < 1e-3


# --------------------------------------------------------------------------- search level
def test_train_settings_do_not_change_the_resume_hash(tmp_path):
    from autoprune.study.study import search_hash

    space = load_search_space("default")
    prof = SimpleNamespace(model_dump=lambda mode: {"name": "p"})
    groups = [SimpleNamespace(name="g", low=0.0, high=0.5, methods=["l1"])]
    h = [search_hash(SimpleNamespace(cfg=load_run_config(None, sets), space=space, profile=prof, groups=groups))
         for sets in ({}, {"train.device": "cpu", "train.precision": "bf16", "train.threads": 3, "search.mlflow": "file:///x"},
                      {"finetune.steps": 7})]
    assert h[0] == h[1] != h[2]


def test_search_with_bf16_training_runs_trials(tmp_path, fast_profile):
    import autoprune

    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=2, pretrain_steps=10,
                          train={"device": "cpu", "precision": "bf16", "threads": 1}, finetune={"steps": 2})
    res = autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))))
    done = [t for t in res.study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and all(t.user_attrs["finetune_steps"] > 0 or t.user_attrs.get("skipped_finetune") for t in done)
    saved = torch.load(RunFolder(res.out).trial(done[0].number).model, weights_only=True)
    assert all(v.device.type == "cpu" and (not v.is_floating_point() or v.dtype == torch.float32) for v in saved["state_dict"].values())


# --------------------------------------------------------------------------- --workers
def test_workers_get_disjoint_cores_and_their_own_gpu():
    slots = plan_slots(2, "cpu", cores=[0, 1, 2, 3, 4])
    assert [s.cores for s in slots] == [(0, 1), (2, 3)] and [s.threads for s in slots] == [2, 2]
    assert all(s.gpu is None for s in slots)
    assert [s.gpu for s in plan_slots(3, "auto", cores=[0, 1, 2], gpus=["5", "7"])] == ["5", "7", "5"]
    assert [s.threads for s in plan_slots(2, "cpu", threads=4, cores=[0, 1])] == [4, 4]  # train.threads wins
    assert plan_slots(3, "cpu", cores=[0, 1])[0].cores is None  # fewer cores than workers: no pinning
    cfg = load_run_config(None, {"train.precision": "bf16"})
    w = worker_config(cfg, plan_slots(2, "auto", cores=[0, 1], gpus=["3"])[1], "sqlite:////x/study.db")
    assert (w.train.device, w.train.threads, w.train.precision) == ("cuda", 1, "bf16")
    assert (w.search.storage, w.search.study_name) == ("sqlite:////x/study.db", "autoprune")


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, fast_profile):
    """``--workers 2`` on the demo: the dense model is trained once, both workers run trials of
    the one study, which ends with exactly ``trials`` complete trials."""
    from autoprune.cli import main

    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=3, pretrain_steps=10, finetune={"steps": 2})
    assert main(["search", "--config", str(write_yaml(tmp_path / "run.yaml", cfg)), "--workers", "2"]) == 0
    import optuna

    study = optuna.load_study(study_name="autoprune", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3
    sessions = study.user_attrs["sessions"]
    assert len({s["pid"] for s in sessions}) == 2  # two worker processes registered on the study
    assert len({t.user_attrs.get("worker") for t in study.trials if "worker" in t.user_attrs}) >= 1


# --------------------------------------------------------------------------- MLflow
def test_mlflow_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from autoprune.study import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"search\.mlflow.*pip install 'autoprune\[mlflow\]'"):
        tracking.check_available("sqlite:///x.db")
    tracking.check_available(None)  # off: nothing needed


@pytest.mark.slow  # MLflow creates its SQLite schema first (migrations): ~5 s CPU, a minute on a busy machine
def test_mlflow_logs_every_finished_trial(tmp_path):
    pytest.importorskip("mlflow")
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from autoprune.study.tracking import MlflowLogger

    run = RunFolder(tmp_path / "run")
    run.trial(0).model.parent.mkdir(parents=True)
    run.trial(0).model.write_bytes(b"x")
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"ratio/layers.0": FloatDistribution(0.0, 0.7)}
    study.add_trial(create_trial(params={"ratio/layers.0": 0.25}, distributions=dist, values=[0.9, 1.5], user_attrs={
        "params": 1234, "flops": 5.0e6, "latency": {"median_ms": 1.5, "p90_ms": 1.7}, "trial_s": 3.0, "worker": "h:1"}))
    study.add_trial(create_trial(params={"ratio/layers.0": 0.5}, distributions=dist, state=TrialState.FAIL,
                                 user_attrs={"fail_reason": "ExportError: x"}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MlflowLogger(uri, "autoprune/test", run, ("accuracy", "latency_ms"))
    for t in study.trials:
        logger(study, t)
    runs = {r.info.run_name: r for r in logger.client.search_runs([logger.experiment_id])}
    assert set(runs) == {"trial-0", "trial-1"}
    ok = runs["trial-0"].data
    assert ok.metrics["accuracy"] == 0.9 and ok.metrics["latency_ms"] == 1.5 and ok.metrics["params"] == 1234
    assert ok.metrics["latency_p90_ms"] == 1.7 and ok.params["ratio/layers.0"] == "0.25"
    assert ok.tags["autoprune.model_pt"] == str(run.trial(0).model.resolve()) and ok.tags["autoprune.worker"] == "h:1"
    assert runs["trial-1"].info.status == "FAILED" and runs["trial-1"].data.tags["autoprune.fail_reason"] == "ExportError: x"
    # a second logger (another worker) finds the same experiment instead of failing
    assert MlflowLogger(uri, "autoprune/test", run, ("accuracy", "latency_ms")).experiment_id == logger.experiment_id


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_an_unreachable_mlflow_server_is_said_once_and_the_search_goes_on(tmp_path, fast_profile, caplog):
    """Issue 23: MLflow's client retried for minutes, then the search stopped with an error."""
    pytest.importorskip("mlflow")
    import logging
    import time

    import optuna

    from autoprune.api import run
    from autoprune.config import load_run_config
    from conftest import tiny_run_config, write_yaml

    uri = f"http://127.0.0.1:{_closed_port()}"
    data = tiny_run_config(tmp_path / "out", fast_profile, trials=2, pretrain_steps=10,
                           search={"trials": 2, "seed": 0, "mlflow": uri})
    cfg = load_run_config(str(write_yaml(tmp_path / "run.yaml", data)))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        res = run(cfg, export=False)
    assert len([t for t in res.study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
    said = [r.getMessage() for r in caplog.records if "search.mlflow" in r.getMessage()]
    assert len(said) == 1 and uri in said[0] and "cannot be reached" in said[0] and "goes on" in said[0], said
    assert time.monotonic() - t0 < 300


def test_a_trial_mlflow_fails_to_log_is_deleted_not_left_half_way(tmp_path, caplog, monkeypatch):
    pytest.importorskip("mlflow")
    import logging

    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from autoprune.study.tracking import MlflowLogger

    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"ratio/layers.0": FloatDistribution(0.0, 0.7)}
    for i in range(3):
        study.add_trial(create_trial(params={"ratio/layers.0": 0.1 * i}, distributions=dist, values=[0.9, 1.5]))
    logger = MlflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "autoprune/test", RunFolder(tmp_path / "run"), ("accuracy", "latency_ms"))
    client = logger.client
    logger(study, study.trials[0])
    calls = []

    def down(*a, **k):  # the server went away after the run was created
        calls.append(a)
        raise ConnectionError("connection refused")

    monkeypatch.setattr(client, "log_batch", down)
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        logger(study, study.trials[1])
        logger(study, study.trials[2])
    names = {r.info.run_name for r in client.search_runs([logger.experiment_id])}
    assert names == {"trial-0"}  # trial 1's half-logged run is gone; trial 2 was not tried
    assert len(calls) == 1
    said = [r.getMessage() for r in caplog.records if "search.mlflow" in r.getMessage()]
    assert len(said) == 1 and "trial 1 was not logged" in said[0]


def test_workers_must_be_positive(tmp_path, capsys):
    from autoprune.cli import main

    assert main(["search", "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_crashed_worker_is_described_with_its_slot_and_error():
    from autoprune.study.pool import WorkerOutcome, WorkerSlot

    slot = WorkerSlot(1, gpu="3", cores=(2, 3), threads=2)
    killed = WorkerOutcome(slot, -9)
    assert killed.failed and killed.describe() == "worker 1 (GPU 3, cores 2-3, 2 thread(s)) was killed by signal 9"
    err = WorkerOutcome(slot, 2, "train.device: cuda but torch sees no CUDA device here")
    assert err.failed and err.describe().endswith("exited with code 2: train.device: cuda but torch sees no CUDA device here")
    assert not WorkerOutcome(slot, 0).failed and not WorkerOutcome(slot, 130).failed  # done / stopped by Ctrl-C
