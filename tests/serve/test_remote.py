"""`autoprune serve-latency` on loopback: token, upload cap, model validation, and real measurements."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from autoprune.config import DeviceProfile
from autoprune.errors import BackendUnavailable, RemoteError
from autoprune.measure import backends
from autoprune.measure.backends import ModelArtifact
from autoprune.measure.backends.remote import post_parts
from autoprune.measure.onnx import export_onnx
from autoprune.measure.server import make_server

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def server():
    srv = make_server("127.0.0.1", 0, TOKEN, max_upload_mb=0.25)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    return export_onnx(m, torch.randn(1, 1, 8, 8), tmp_path_factory.mktemp("remote") / "model.onnx", "torchscript")


def _profile(srv, monkeypatch, **kw) -> DeviceProfile:
    monkeypatch.setenv("AUTOPRUNE_LATENCY_TOKEN", TOKEN)
    return DeviceProfile(name="remote-test", backend="remote", url=srv.url, threads=1, warmup=2, repeats=10,
                         target_rel_ci=None, **kw)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_measures_a_good_model_and_outputs_agree_with_local(server, model_file, monkeypatch, runtime):
    prof = _profile(server, monkeypatch, remote_backend=runtime, device="CPU" if runtime == "openvino" else "cpu")
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    st = backends.measure(ModelArtifact(model_file), prof, x)
    assert st.n == 10 and 0 < st.median_ms <= st.p90_ms
    remote_out = backends.load(ModelArtifact(model_file), prof)(x)
    local = backends.load(ModelArtifact(model_file), DeviceProfile(name="local", backend="onnxruntime"))(x)
    np.testing.assert_allclose(remote_out, local, rtol=1e-4, atol=1e-5)


def test_reference_ratio_and_int8_go_through(server, model_file, monkeypatch):
    prof = _profile(server, monkeypatch, precision="int8")
    x = np.zeros((1, 1, 8, 8), np.float32)
    st = backends.measure(ModelArtifact(model_file), prof, x, reference=ModelArtifact(model_file))
    assert st.speedup is not None and st.reference_median_ms > 0
    assert model_file.with_name("model.int8.onnx").is_file()  # quantized here, sent as QDQ ONNX


def test_rejects_a_bad_token(server, model_file, monkeypatch):
    with pytest.raises(RemoteError) as e:
        post_parts(server.url, "wrong", [("model", model_file.read_bytes())], {})
    assert e.value.status == 401
    prof = _profile(server, monkeypatch)
    monkeypatch.setenv("AUTOPRUNE_LATENCY_TOKEN", "also-wrong")
    with pytest.raises(BackendUnavailable, match="rejected the token"):
        backends.measure(ModelArtifact(model_file), prof, np.zeros((1, 1, 8, 8), np.float32))
    monkeypatch.delenv("AUTOPRUNE_LATENCY_TOKEN")
    with pytest.raises(BackendUnavailable, match="AUTOPRUNE_LATENCY_TOKEN"):
        backends.measure(ModelArtifact(model_file), prof, np.zeros((1, 1, 8, 8), np.float32))


def test_rejects_an_oversize_upload(server):
    with pytest.raises(RemoteError) as e:
        post_parts(server.url, TOKEN, [("model", b"\0" * 300_000)], {})
    assert e.value.status == 413 and "limit" in str(e.value)


def test_rejects_corrupt_and_unsafe_models(server, model_file, tmp_path):
    with pytest.raises(RemoteError, match="not a valid ONNX") as e:
        post_parts(server.url, TOKEN, [("model", b"this is not onnx" * 50)], {})
    assert e.value.status == 400
    truncated = model_file.read_bytes()[:-200]
    with pytest.raises(RemoteError) as e:
        post_parts(server.url, TOKEN, [("model", truncated)], {})
    assert e.value.status == 400
    # External data could make the server read any file: refused.
    m = onnx.load(str(model_file))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.bin", size_threshold=0)
    with pytest.raises(RemoteError, match="external data"):
        post_parts(server.url, TOKEN, [("model", (tmp_path / "ext.onnx").read_bytes())], {})
    # Custom operator domains would need code on the server: refused.
    m2 = onnx.load(str(model_file))
    m2.graph.node[0].domain = "evil.custom"
    with pytest.raises(RemoteError, match="domains"):
        post_parts(server.url, TOKEN, [("model", m2.SerializeToString())], {})
    # Only the inference runtimes run a model: no torch (pickles), no other backend.
    with pytest.raises(RemoteError, match="not served here"):
        post_parts(server.url, TOKEN, [("model", model_file.read_bytes())], {"backend": "torch"})
    # A runtime failure (wrong input shape) is a 500 with the reason; the server stays up.
    with pytest.raises(RemoteError) as e:
        post_parts(server.url, TOKEN, [("model", model_file.read_bytes())], {"input_shape": [1, 1, 9, 9]})
    assert e.value.status == 500 and "measurement failed" in str(e.value)
    assert "latency" in post_parts(server.url, TOKEN, [("model", model_file.read_bytes())], {"repeats": 3, "warmup": 0})


def test_server_stays_up_and_reports_info(server, model_file):
    import json
    import urllib.request

    req = urllib.request.Request(server.url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})
    info = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert set(info["backends"]) == {"onnxruntime", "openvino"} and "onnxruntime" in info


def test_unreachable_server_is_a_clear_error(model_file, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_LATENCY_TOKEN", TOKEN)
    prof = DeviceProfile(name="r", backend="remote", url="http://127.0.0.1:9", request_timeout_s=5)
    with pytest.raises(BackendUnavailable, match="cannot reach.*serve-latency"):
        backends.measure(ModelArtifact(model_file), prof, np.zeros((1, 1, 8, 8), np.float32))


def test_cli_refuses_to_serve_without_a_token(monkeypatch, capsys):
    from autoprune.cli import main

    monkeypatch.delenv("AUTOPRUNE_LATENCY_TOKEN", raising=False)
    assert main(["serve-latency", "--port", "0"]) == 2
    assert "needs a token" in capsys.readouterr().err
