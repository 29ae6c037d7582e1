"""Every backend that runs here measures a tiny model and agrees with another backend's outputs;
int8 quantization keeps predictions; missing devices/providers fail with what to install."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from autoprune.config import DeviceProfile, load_device_profile, shipped_dir, validate
from autoprune.errors import BackendUnavailable, ConfigError
from autoprune.measure import backends
from autoprune.measure.backends import ModelArtifact
from autoprune.measure.onnx import export_onnx

FAST = dict(threads=1, warmup=2, repeats=10, target_rel_ci=None)
LOCAL = [("onnxruntime", "cpu"), ("openvino", "CPU"), ("torch", "cpu")]


def _net(width: int = 16, in_ch: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1, groups=width // 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model = _net()
    x = torch.randn(2, 1, 16, 16)
    path = export_onnx(model, x, tmp_path_factory.mktemp("tiny") / "model.onnx", "torchscript")
    with torch.no_grad():
        want = model(x).numpy()
    return model, x.numpy(), path, want


@pytest.mark.parametrize("backend,device", LOCAL)
def test_backend_measures_and_agrees_with_pytorch(tiny, backend, device):
    model, x, path, want = tiny
    prof = DeviceProfile(name=f"{backend}-test", backend=backend, device=device, **FAST)
    art = ModelArtifact(path, model)
    got = backends.load(art, prof)(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    st = backends.measure(art, prof, x)
    assert st.n >= 10 and 0 < st.min_ms <= st.median_ms <= st.p90_ms
    assert st.batch_size == 2 and st.throughput == pytest.approx(2000 / st.median_ms)
    # OpenVINO is timed by its own per-request clock, as benchmark_app is; the others by the host's
    assert st.clock == ("openvino_infer" if backend == "openvino" else "perf_counter")


def test_torch_cpu_measurement_restores_the_thread_count(tiny):
    """Defect 3: a torch-cpu profile with threads=1 used to leave the whole process on one
    thread (every later fine-tune ran single-threaded). The count holds only while measuring,
    and a runner kept and called later runs on the profile's count without keeping it."""
    model, x, _, _ = tiny
    prof = DeviceProfile(name="torch-cpu-t1", backend="torch", device="cpu", **FAST)
    before = torch.get_num_threads()
    other = 3 if before != 3 else 2  # differs from the profile's 1 whatever the machine has
    seen: list[int] = []
    # registered before load: the backend's deep copy of the model carries the hook
    hook = model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    torch.set_num_threads(other)
    try:
        art = ModelArtifact(None, model)
        st = backends.measure(art, prof, x, reference=art)
        assert st.n >= 10 and st.speedup is not None
        assert set(seen) == {1}  # timed on the profile's thread count
        assert torch.get_num_threads() == other
        runner = backends.load(art, prof)
        assert torch.get_num_threads() == other
        seen.clear()
        runner(x)
        assert seen == [1] and torch.get_num_threads() == other
    finally:
        hook.remove()
        torch.set_num_threads(before)


def test_onnxruntime_and_openvino_agree_on_the_same_file(tiny):
    _, x, path, _ = tiny
    ort = backends.load(ModelArtifact(path), DeviceProfile(name="a", backend="onnxruntime"))(x)
    ov = backends.load(ModelArtifact(path), DeviceProfile(name="b", backend="openvino", device="CPU"))(x)
    np.testing.assert_allclose(ort, ov, rtol=1e-4, atol=1e-5)


def test_openvino_pins_threads_streams_and_fp32(tiny):
    _, _, path, _ = tiny
    r = backends.load(ModelArtifact(path), DeviceProfile(name="ov", backend="openvino", device="CPU", threads=2))
    cfg = r.info["config"]
    assert cfg["NUM_STREAMS"] == "1" and cfg["INFERENCE_NUM_THREADS"] == "2"
    assert cfg["INFERENCE_PRECISION_HINT"] == "f32"  # no silent bf16 on AMX/AVX512-BF16 CPUs
    assert cfg["PERFORMANCE_HINT"] == "LATENCY"
    assert r.info["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"  # what the plugin really runs, not only what we asked
    tput = backends.load(ModelArtifact(path), DeviceProfile(name="ov", backend="openvino", device="CPU", mode="throughput"))
    assert tput.info["config"]["PERFORMANCE_HINT"] == "THROUGHPUT" and tput.info["config"]["NUM_STREAMS"] == "1"


def test_openvino_pins_cpu_threads_like_benchmark_app_unless_the_profile_says_not(tiny):
    """benchmark_app runs with ENABLE_CPU_PINNING on; so does the backend by default, set
    explicitly (not left to the plugin's OS- and version-dependent default), and the compiled
    model reports it; ``cpu_pinning: false`` turns it off. Latency caches and staircases of
    OpenVINO profiles tell the two apart; other backends' keys ignore the setting."""
    from autoprune.measure.cache import profile_key
    from autoprune.measure.staircase import fingerprint

    model, x, path, _ = tiny
    x = torch.from_numpy(x)
    pinned = DeviceProfile(name="ov", backend="openvino", device="CPU")
    r = backends.load(ModelArtifact(path), pinned)
    assert r.info["config"]["ENABLE_CPU_PINNING"] == "YES"
    assert r.info["compiled"]["ENABLE_CPU_PINNING"] == "True"
    loose = DeviceProfile(name="ov", backend="openvino", device="CPU", cpu_pinning=False)
    r = backends.load(ModelArtifact(path), loose)
    assert r.info["config"]["ENABLE_CPU_PINNING"] == "NO" and r.info["compiled"]["ENABLE_CPU_PINNING"] == "False"
    assert profile_key(pinned) != profile_key(loose)
    assert fingerprint(pinned, model, x) != fingerprint(loose, model, x)
    ort = DeviceProfile(name="o", backend="onnxruntime")
    assert profile_key(ort) == profile_key(ort.model_copy(update={"cpu_pinning": False}))


@pytest.mark.parametrize("backend,device", [("onnxruntime", "cpu"), ("openvino", "CPU")])
def test_reused_request_reads_the_callers_current_data(tiny, backend, device):
    """The runners keep one request/IOBinding and share the caller's array instead of building a
    feed dict per call (the per-call overhead benchmark_app does not pay). Each call must still
    infer the array's current values, return an output that the next call does not overwrite,
    and accept an array of another dtype (converted, not shared)."""
    model, x, path, want = tiny
    run = backends.load(ModelArtifact(path), DeviceProfile(name="t", backend=backend, device=device, threads=1))
    buf = x.copy()
    first = run(buf)
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-4)
    kept = first.copy()
    buf[:] = -buf  # same array object, new values
    with torch.no_grad():
        np.testing.assert_allclose(run(buf), model(torch.from_numpy(buf)).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_allclose(run(x.astype(np.float64)), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(x), want, rtol=1e-4, atol=1e-4)


def test_dense_reference_speedup(tmp_path: Path):
    x = torch.randn(1, 1, 32, 32)
    dense = export_onnx(_net(128), x, tmp_path / "dense.onnx", "torchscript")
    small = export_onnx(_net(16), x, tmp_path / "small.onnx", "torchscript")
    prof = DeviceProfile(name="ort", backend="onnxruntime", threads=1, warmup=3, repeats=30, target_rel_ci=0.05, max_time_s=3)
    st = backends.measure(ModelArtifact(small), prof, x.numpy(), reference=ModelArtifact(dense))
    assert st.reference_median_ms > st.median_ms
    assert st.speedup > 1.5  # ~40x fewer FLOPs; the ratio comes from interleaved pairs


@pytest.mark.parametrize("backend,device,suffix", [("onnxruntime", "cpu", ".int8.onnx"), ("openvino", "CPU", ".int8.xml")])
def test_int8_quantization_keeps_predictions(tmp_path: Path, backend, device, suffix):
    from autoprune.measure.candidate import evaluate_model_file
    from autoprune.measure.quantize import calibration_batches, quantize_artifact
    from autoprune.train.data import load_digits
    from autoprune.train.models import evaluate

    data = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):  # a few epochs: enough for >85% on digits, in ~1 s
        for xb, yb in data.loader("train", 64, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    x = data.example_input(1)
    path = export_onnx(model, x, tmp_path / "model.onnx", "torchscript")
    prof = DeviceProfile(name="q", backend=backend, device=device, precision="int8", **FAST)
    calib = calibration_batches(list(data.loader("train", 32)), 1, 32)
    assert len(calib) == 32 and calib[0].shape == (1, 1, 16, 16)
    q = quantize_artifact(ModelArtifact(path, model), prof, calib)
    assert q.quantized and str(q.onnx_path).endswith(suffix) and Path(q.onnx_path).is_file()
    fp32 = evaluate(model, data)
    int8 = evaluate_model_file(Path(q.onnx_path), data, prof)
    assert fp32 > 0.5 and abs(int8 - fp32) < 0.05
    # a task's evaluate on the quantized file (what trials call) scores it the same way
    from autoprune.train.task import ClassificationTask

    assert evaluate_model_file(Path(q.onnx_path), data, prof, task=ClassificationTask()) == int8
    st = backends.measure(q, prof, x.numpy())
    assert st.median_ms > 0


def test_missing_devices_name_what_to_install(tiny):
    model, x, path, _ = tiny
    with pytest.raises(BackendUnavailable, match="NPU.*not found.*available"):
        backends.load(ModelArtifact(path), DeviceProfile(name="npu", backend="openvino", device="NPU"))
    with pytest.raises(BackendUnavailable, match="AUTO|GPU"):
        backends.load(ModelArtifact(path), DeviceProfile(name="auto", backend="openvino", device="AUTO:GPU.3,CPU"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match=r"autoprune\[cuda\].*never install both"):
            backends.load(ModelArtifact(path), DeviceProfile(name="c", backend="onnxruntime", device="cuda"))
    with pytest.raises(BackendUnavailable, match="fp16.*tensorrt"):
        backends.load(ModelArtifact(path), DeviceProfile(name="h", backend="onnxruntime", precision="fp16"))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA device"):
            backends.load(ModelArtifact(path, model), DeviceProfile(name="t", backend="torch", device="cuda"))


def test_profile_validation_names_the_problem():
    with pytest.raises(ConfigError, match="url"):
        validate(DeviceProfile, {"name": "r", "backend": "remote"}, "r.yaml")
    with pytest.raises(ConfigError, match="int8.*not torch"):
        validate(DeviceProfile, {"name": "t", "backend": "torch", "precision": "int8"}, "t.yaml")
    with pytest.raises(ConfigError, match="precision"):
        validate(DeviceProfile, {"name": "t", "backend": "openvino", "precision": "int4"}, "t.yaml")


def test_shipped_profiles_validate():
    names = sorted(p.stem for p in shipped_dir("device_profiles").glob("*.yaml"))
    assert {"openvino-cpu-int8", "onnxruntime-cpu-int8", "torch-cpu", "remote-example"} <= set(names)
    for n in names:
        assert load_device_profile(n).name == n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch CUDA-event timing and fp16 not exercised")
def test_torch_cuda_events_and_fp16(tiny):
    model, x, _, want = tiny
    for precision in ("fp32", "fp16"):
        prof = DeviceProfile(name="tc", backend="torch", device="cuda", precision=precision, **FAST)
        got = backends.load(ModelArtifact(None, model), prof)(x)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
        st = backends.measure(ModelArtifact(None, model), prof, x)
        assert st.clock == "cuda_events" and st.median_ms > 0
    assert next(model.parameters()).device.type == "cpu"  # the caller's model was not moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: onnxruntime CUDA provider not exercised")
def test_onnxruntime_cuda_provider(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed (pip install 'autoprune[cuda]')")
    _, x, path, want = tiny
    got = backends.load(ModelArtifact(path), DeviceProfile(name="oc", backend="onnxruntime", device="cuda"))(x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_torch_compile_cpu(tiny):
    model, x, _, want = tiny
    prof = DeviceProfile(name="tc", backend="torch", device="cpu", compile=True, **FAST)
    np.testing.assert_allclose(backends.load(ModelArtifact(None, model), prof)(x), want, rtol=1e-4, atol=1e-4)


def test_search_with_int8_reference_and_cache(tmp_path: Path):
    """A tiny search on onnxruntime int8: accuracy is the quantized model's, the dense reference
    ratio is recorded, and the architecture cache is populated."""
    from conftest import FAST_PROFILE, tiny_run_config, write_yaml

    import autoprune
    from autoprune.config import load_run_config

    prof = write_yaml(tmp_path / "int8.yaml", {**FAST_PROFILE, "name": "ort-int8", "precision": "int8",
                                                "measure_reference": True, "calib_samples": 32})
    cfg = write_yaml(tmp_path / "run.yaml", tiny_run_config(tmp_path / "out", prof, trials=1))
    res = autoprune.run(load_run_config(str(cfg)), export=False)
    trials = [t for t in res.study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 1
    for t in trials:
        ua = t.user_attrs
        assert Path(ua["quantized_model"]).name == "model.int8.onnx" and Path(ua["quantized_model"]).is_file()
        assert ua["accuracy"] == t.values[0] and "accuracy_fp32" in ua
        assert abs(ua["accuracy"] - ua["accuracy_fp32"]) < 0.15
        assert ua["latency"]["speedup"] > 0 and ua["latency"]["reference_median_ms"] > 0
    assert (tmp_path / "out" / "latency_cache.sqlite").is_file()
