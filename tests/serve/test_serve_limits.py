"""Issue 12 items 7–11: `autoprune serve-latency` is an open port on an edge box.

Every test talks to a server on 127.0.0.1 only, with bounded request counts and waits. The module
server runs with small limits (1 s header/body timeouts, 2 s per measurement, 256 MB of extra
memory for the measuring process, 64 MB per tensor) so the limits trip quickly.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import threading
import time
from typing import Any, Optional

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from autoprune.config import DeviceProfile
from autoprune.errors import ConfigError
from autoprune.measure import backends
from autoprune.measure.backends import ModelArtifact
from autoprune.measure.server import make_server

TOKEN = "test-token-0123456789"
LIMITS: dict[str, Any] = dict(max_connections=24, header_timeout_s=1.0, body_timeout_s=1.0, max_measure_s=2.0,
                              kill_grace_s=2.0, max_memory_mb=256, max_tensor_mb=64)
OPSET = [h.make_opsetid("", 17)]


@pytest.fixture(scope="module")
def srv():
    s = make_server("127.0.0.1", 0, TOKEN, max_upload_mb=4, **LIMITS)
    th = threading.Thread(target=s.serve_forever, daemon=True)
    th.start()
    yield s
    s.shutdown()
    s.server_close()


def _model(nodes: list, inputs: list, outputs: list, inits: Optional[list] = None, **kw: Any) -> onnx.ModelProto:
    return h.make_model(h.make_graph(nodes, "g", inputs, outputs, inits or [], **kw), opset_imports=OPSET)


def _relu() -> onnx.ModelProto:
    return _model([h.make_node("Relu", ["x"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                  [h.make_tensor_value_info("y", T.FLOAT, [1, 4])])


def _matmul(n: int = 384) -> onnx.ModelProto:
    """A few milliseconds per inference on one thread: 20000 of them take far longer than 2 s."""
    w = nh.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    return _model([h.make_node("MatMul", ["x", "w"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [n, n])],
                  [h.make_tensor_value_info("y", T.FLOAT, [n, n])], [w])


def _post(srv, model: bytes, settings: Optional[dict] = None, token: str = TOKEN, timeout: float = 30.0,
          extra: Optional[list[tuple[str, bytes]]] = None) -> tuple[int, bytes]:
    """POST /v1/measure; returns (status, raw body) so tests can parse the JSON strictly."""
    parts = [("model", model)] + (extra or [])
    settings = {"warmup": 0, "repeats": 5, "target_rel_ci": None, "parts": [[k, len(b)] for k, b in parts], **(settings or {})}
    c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=timeout)
    try:
        c.request("POST", "/v1/measure", body=b"".join(b for _, b in parts),
                  headers={"Authorization": f"Bearer {token}", "X-Autoprune-Settings": json.dumps(settings)})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _strict_json(raw: bytes) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"reply is not valid JSON: it contains {name}")

    return json.loads(raw, parse_constant=no_constants)


def _error(raw: bytes) -> str:
    return _strict_json(raw)["error"]


def _info_ok(srv) -> bool:
    c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    try:
        c.request("GET", "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})
        return c.getresponse().status == 200
    finally:
        c.close()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (whatever it sends before closing)."""
    end = time.monotonic() + seconds
    try:
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                return True
    except (TimeoutError, socket.timeout):
        return False
    except OSError:
        return True  # reset by the server: closed as well
    return False


# --------------------------------------------------------------------------- item 7: slow clients
def test_stalled_connections_before_auth_are_bounded_and_closed(srv):
    before = threading.active_count()
    socks = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=5)
            s.sendall(b"POST /v1/measure HTTP/1.1\r\n")  # a request line, then nothing
            socks.append(s)
        time.sleep(0.3)
        # At most max_connections handler threads; the rest are turned away at once.
        assert threading.active_count() - before <= LIMITS["max_connections"] + 2
        # Every stalled connection is closed soon after the header timeout (1 s here).
        t0 = time.monotonic()
        assert all(_closed_within(s, max(0.1, 4.0 - (time.monotonic() - t0))) for s in socks)
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert threading.active_count() - before <= 2
    assert _info_ok(srv)


def test_trickled_headers_hit_the_header_deadline(srv):
    """One byte every 0.2 s never trips a per-read timeout; the whole-header deadline closes it."""
    s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=5)
    closed_at = None
    t0 = time.monotonic()
    try:
        for b in b"GET /v1/info HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nX-Pad: " + b"a" * 40:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed_at = time.monotonic() - t0
                break
            if _closed_within(s, 0.2):
                closed_at = time.monotonic() - t0
                break
            if time.monotonic() - t0 > 5:
                break
    finally:
        s.close()
    assert closed_at is not None and closed_at < 3.0


def test_stalled_body_gets_408(srv):
    s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
    try:
        settings = json.dumps({"parts": [["model", 1000]]})
        s.sendall(f"POST /v1/measure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"X-Autoprune-Settings: {settings}\r\nContent-Length: 1000\r\n\r\n".encode() + b"\0" * 10)
        t0 = time.monotonic()
        s.settimeout(8)
        reply = s.recv(4096)
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- item 8: time per request
def test_warmup_and_repeats_are_capped_by_time(srv):
    t0 = time.monotonic()
    status, raw = _post(srv, _matmul().SerializeToString(), {"warmup": 10000, "repeats": 10000, "max_time_s": 60})
    wall = time.monotonic() - t0
    assert wall < LIMITS["max_measure_s"] + LIMITS["kill_grace_s"] + 3
    assert status == 200, raw[:300]
    res = _strict_json(raw)
    assert res["time_limited"] is True and res["limits"]["max_measure_s"] == LIMITS["max_measure_s"]
    assert 1 <= res["latency"]["n"] < 10000


def _endless_loop() -> onnx.ModelProto:
    """One inference never ends (a Loop with 10**12 iterations): only killing it stops it."""
    body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Add", ["v_in", "one"], ["v_out"])],
                        "body", [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                                 h.make_tensor_value_info("v_in", T.FLOAT, [1])],
                        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, [1])],
                        [nh.from_array(np.ones(1, np.float32), "one")])
    return _model([h.make_node("Loop", ["M", "cond", "x"], ["y"], body=body)], [h.make_tensor_value_info("x", T.FLOAT, [1])],
                  [h.make_tensor_value_info("y", T.FLOAT, [1])],
                  [nh.from_array(np.array(10**12, np.int64), "M"), nh.from_array(np.array(True), "cond")])


def test_an_endless_inference_is_killed_and_the_server_recovers(srv):
    t0 = time.monotonic()
    status, raw = _post(srv, _endless_loop().SerializeToString(), {"warmup": 0, "repeats": 1}, timeout=30)
    wall = time.monotonic() - t0
    assert status == 422 and "max-measure-s" in _error(raw), raw[:300]
    assert wall < LIMITS["max_measure_s"] + LIMITS["kill_grace_s"] + 3
    status, raw = _post(srv, _relu().SerializeToString(), timeout=60)  # a fresh measuring process
    assert status == 200, raw[:300]


def test_a_killed_measuring_process_fails_the_request_not_the_server(srv):
    """What the kernel's OOM killer (or a runtime crash) would do mid-measurement."""
    got: list = []
    th = threading.Thread(target=lambda: got.append(_post(srv, _matmul().SerializeToString(),
                                                          {"warmup": 10000, "repeats": 10000})), daemon=True)
    th.start()
    end = time.monotonic() + 10
    while srv.measure_lock.acquire(blocking=False):  # wait until the request holds the device
        srv.measure_lock.release()
        assert time.monotonic() < end
        time.sleep(0.05)
    time.sleep(0.5)
    pid = srv.worker.pid
    os.kill(pid, signal.SIGKILL)
    th.join(timeout=20)
    status, raw = got[0]
    assert status == 500 and "died" in _error(raw) and "signal 9" in _error(raw), raw[:300]
    status, raw = _post(srv, _relu().SerializeToString(), timeout=60)
    assert status == 200 and srv.worker.pid != pid, raw[:300]


# --------------------------------------------------------------------------- item 9: memory
def _bombs() -> dict[str, onnx.ModelProto]:
    i64 = lambda name, v: nh.from_array(np.array(v, np.int64), name)
    out = h.make_tensor_value_info("y", T.FLOAT, ["d0", "d1"])
    out1 = h.make_tensor_value_info("y", T.FLOAT, ["d0"])
    x4 = h.make_tensor_value_info("x", T.FLOAT, [1, 4])
    c = lambda name, v: h.make_node("Constant", [], [name], value=i64(name + "_v", v))
    # Every model has the input the server feeds ([1, 4]), used or not, so only the size check can stop it.
    return {
        # The bomb of the issue: 5e8 floats (2 GB) from one 8-byte initializer.
        "constant_of_shape": _model([h.make_node("ConstantOfShape", ["s"], ["y"])], [x4], [out1], [i64("s", [500_000_000])]),
        # The shape is computed from constants (folded by shape inference).
        "folded_concat": _model([c("a", [20000]), c("b", [5000]), h.make_node("Concat", ["a", "b"], ["s"], axis=0),
                                 h.make_node("ConstantOfShape", ["s"], ["y"])], [x4], [out]),
        "expand": _model([h.make_node("Expand", ["x", "s"], ["y"])], [x4], [out], [i64("s", [25_000_000, 4])]),
        "tile": _model([h.make_node("Tile", ["x", "r"], ["y"])], [x4], [out], [i64("r", [100000, 1000])]),
        "resize": _model([h.make_node("Resize", ["x", "", "", "sz"], ["y"])], [x4], [out], [i64("sz", [10000, 10000])]),
        "random_normal": _model([h.make_node("RandomNormal", [], ["y"], shape=[10000, 10000])], [x4], [out]),
        # A declared output shape beyond the limit.
        "declared": _model([h.make_node("Relu", ["x"], ["y"])], [x4], [h.make_tensor_value_info("y", T.FLOAT, [10**8])]),
    }


@pytest.mark.parametrize("name", list(_bombs()))
def test_models_that_would_allocate_huge_tensors_are_rejected_before_running(srv, name):
    rss = psutil.Process().memory_info().rss
    status, raw = _post(srv, _bombs()[name].SerializeToString(), {"input_shape": [1, 4]})
    assert status == 400 and "max-tensor-mb" in _error(raw), raw[:300]
    assert psutil.Process().memory_info().rss - rss < 100e6


def test_a_memory_bomb_at_run_time_fails_the_request_not_the_server(srv):
    """The size comes from the input (400 MB): no static check can see it; the memory limit can."""
    m = _model([h.make_node("Cast", ["x"], ["s"], to=T.INT64), h.make_node("ConstantOfShape", ["s"], ["y"])],
               [h.make_tensor_value_info("x", T.FLOAT, [1])], [h.make_tensor_value_info("y", T.FLOAT, ["n"])])
    rss = psutil.Process().memory_info().rss
    status, raw = _post(srv, m.SerializeToString(), {"warmup": 0, "repeats": 1, "input_shape": [1]},
                        extra=[("input", np.array([1e8], np.float32).tobytes())], timeout=60)
    assert status == 422 and "max-memory-mb" in _error(raw), raw[:300]
    assert psutil.Process().memory_info().rss - rss < 100e6
    status, raw = _post(srv, _relu().SerializeToString(), timeout=60)
    assert status == 200, raw[:300]


def _vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a process (VmHWM), in kB."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM needs Linux /proc")
def test_server_process_peak_memory_stays_small_whatever_is_sent(tmp_path):
    """Issue 23: the server's own process parsed and shape-inferred uploads; a 140-byte
    ConstantOfShape grew it to 21 GB, a legal 76 MB model took its peak from 61 MB to 2.8 GB.
    Its peak (VmHWM) must stay under 200 MB: models are checked in the measuring process."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AUTOPRUNE_LATENCY_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "serve-latency", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "serve-latency on" in line:
                break
        assert proc.poll() is None, "".join(lines)

        class Srv:
            server_address = ("127.0.0.1", port)

        idle = _vm_hwm_kb(proc.pid)
        i64 = nh.from_array(np.array([500_000_000], np.int64), "s")
        bomb = _model([h.make_node("ConstantOfShape", ["s"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                      [h.make_tensor_value_info("y", T.FLOAT, ["d0"])], [i64]).SerializeToString()
        assert len(bomb) < 150
        status, raw = _post(Srv, bomb, {"repeats": 1}, timeout=120)
        assert status == 400 and "max-tensor-mb" in _error(raw), raw[:300]
        w = nh.from_array(np.ones((4, 5_000_000), np.float32), "w")  # 2e7 floats: 76 MiB, under --max-tensor-mb
        legal = _model([h.make_node("MatMul", ["x", "w"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                       [h.make_tensor_value_info("y", T.FLOAT, [1, 5_000_000])], [w]).SerializeToString()
        del w
        status, raw = _post(Srv, legal, {"repeats": 1}, timeout=120)
        assert status == 200, raw[:300]
        peak = _vm_hwm_kb(proc.pid)
        # the body itself (76 MB) is held while it is passed on; nothing else grows with the model
        assert peak < 200 * 1024, (idle, peak)
        assert peak - idle < len(legal) / 1024 + 40 * 1024, (idle, peak)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- item 10: every graph
def _external(name: str, location: str) -> onnx.TensorProto:
    t = h.make_tensor(name, T.FLOAT, [1], [1.0])
    t.ClearField("float_data")
    t.data_location = T.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


def _if(then_nodes: list, then_inits: list, **graph_kw: Any) -> onnx.ModelProto:
    then_g = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info("w", T.FLOAT, [1])], then_inits, **graph_kw)
    else_g = h.make_graph([h.make_node("Identity", ["x"], ["o"])], "else", [], [h.make_tensor_value_info("o", T.FLOAT, [1])])
    return _model([h.make_node("Greater", ["x", "zero"], ["c"]), h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                  [h.make_tensor_value_info("x", T.FLOAT, [1])], [h.make_tensor_value_info("y", T.FLOAT, [1])],
                  [nh.from_array(np.zeros(1, np.float32), "zero")])


def _loop_with(init: onnx.TensorProto) -> onnx.ModelProto:
    body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Add", ["v_in", init.name], ["v_out"])],
                        "body", [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                                 h.make_tensor_value_info("v_in", T.FLOAT, [1])],
                        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, [1])], [init])
    return _model([h.make_node("Loop", ["M", "", "x"], ["y"], body=body)], [h.make_tensor_value_info("x", T.FLOAT, [1])],
                  [h.make_tensor_value_info("y", T.FLOAT, [1])], [nh.from_array(np.array(2, np.int64), "M")])


def _sparse_initializer(location: str) -> onnx.ModelProto:
    sp = h.make_sparse_tensor(_external("w", location), nh.from_array(np.array([0], np.int64), "w_idx"), [1])
    m = _model([h.make_node("Add", ["x", "w"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [1])],
               [h.make_tensor_value_info("y", T.FLOAT, [1])], sparse_initializer=[sp])
    return m


HIDDEN = {
    "if_initializer": lambda loc: _if([h.make_node("Identity", ["wi"], ["w"])], [_external("wi", loc)]),
    "if_constant_attribute": lambda loc: _if([h.make_node("Constant", [], ["w"], value=_external("wc", loc))], []),
    "loop_initializer": lambda loc: _loop_with(_external("wl", loc)),
    "sparse_initializer": _sparse_initializer,
}


@pytest.mark.parametrize("where", list(HIDDEN))
@pytest.mark.parametrize("location", ["../../../../etc/hostname", "/etc/hostname", "no-such-file.bin"])
def test_external_data_anywhere_is_refused_without_echoing_paths(srv, where, location):
    status, raw = _post(srv, HIDDEN[where](location).SerializeToString(), {"input_shape": [1]})
    msg = _error(raw)
    assert status == 400 and "external data" in msg, msg
    for leak in ("/etc", "hostname", "no-such-file", "/tmp", "autoprune-serve", "outside", "regular file"):
        assert leak not in msg, msg


def test_custom_domains_inside_subgraphs_are_refused(srv):
    m = _if([h.make_node("Evil", ["x"], ["w"], domain="evil.custom")], [])
    m.opset_import.append(h.make_opsetid("evil.custom", 1))
    status, raw = _post(srv, m.SerializeToString(), {"input_shape": [1]})
    assert status == 400 and "domains" in _error(raw), raw[:300]


def test_runtime_errors_do_not_echo_server_paths(srv):
    m = _model([h.make_node("Nonexistent", ["x"], ["y"], domain="com.microsoft")], [h.make_tensor_value_info("x", T.FLOAT, [1])],
               [h.make_tensor_value_info("y", T.FLOAT, [1])])
    m.opset_import.append(h.make_opsetid("com.microsoft", 1))
    status, raw = _post(srv, m.SerializeToString())
    msg = _error(raw)
    assert status == 500 and "Nonexistent" in msg, msg
    assert "/tmp" not in msg and "autoprune-serve" not in msg and "model.onnx" not in msg, msg


# --------------------------------------------------------------------------- item 11: small holes
@pytest.mark.parametrize("settings", [{"input_shape": [2**32, 2**32]}, {"input_shape": [2**62, 2**62, 4]},
                                      {"input_shape": [True, 4]}, {"input_shape": [1.5, 4]}, {"input_shape": "1,4"},
                                      {"seed": "x"}, {"seed": -1}, {"seed": 1.5}, {"warmup": "many"},
                                      {"max_time_s": "NaN"}, {"parts": "model"}, {"parts": [["model", 10**9]]},
                                      {"return_output": "yes"}, {"device": "../../etc/passwd"}, {"device": "/dev/null"},
                                      {"device": 3}, {"device": "npu"}])
def test_bad_settings_are_400_not_500(srv, settings):
    status, raw = _post(srv, _relu().SerializeToString(), settings)
    assert status == 400, raw[:300]
    assert _error(raw)


def test_replies_are_strict_json_and_the_client_reads_null_rel_ci(srv, monkeypatch, tmp_path):
    status, raw = _post(srv, _relu().SerializeToString(), {"warmup": 0, "repeats": 1})
    assert status == 200
    lat = _strict_json(raw)["latency"]  # n=1: no confidence interval
    assert lat["rel_ci"] is None and lat["n"] == 1

    monkeypatch.setenv("AUTOPRUNE_LATENCY_TOKEN", TOKEN)
    prof = DeviceProfile(name="r", backend="remote", url=srv.url, warmup=0, repeats=1, target_rel_ci=None)
    path = tmp_path / "relu.onnx"
    onnx.save(_relu(), str(path))
    st = backends.measure(ModelArtifact(path), prof, np.zeros((1, 4), np.float32))
    assert st.n == 1 and math.isinf(st.rel_ci)


@pytest.mark.parametrize("token", ["", "x", "short-token", " " * 20, "sixteen-chars-ok\n" + "x"])
def test_weak_or_malformed_tokens_are_refused(token):
    with pytest.raises(ConfigError, match="token"):
        make_server("127.0.0.1", 0, token)


def test_a_port_in_use_is_a_config_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            make_server("127.0.0.1", taken.getsockname()[1], TOKEN)


def _fake_server(monkeypatch) -> list:
    """Replace make_server in the CLI path: no port is opened (and none on 0.0.0.0)."""
    import autoprune.measure.server as server_mod

    made: list = []

    class Fake:
        url = "http://fake:1"
        limits = server_mod.ServerLimits() if hasattr(server_mod, "ServerLimits") else None

        def serve_forever(self) -> None:
            raise KeyboardInterrupt

        def server_close(self) -> None:
            pass

    def fake(host: str, port: int, token: str, *a: Any, **kw: Any) -> Fake:
        made.append(host)
        return Fake()

    monkeypatch.setattr(server_mod, "make_server", fake)
    return made


def test_cli_warns_when_listening_beyond_loopback(monkeypatch, capsys):
    from autoprune.cli import main

    made = _fake_server(monkeypatch)
    monkeypatch.setenv("AUTOPRUNE_LATENCY_TOKEN", TOKEN)
    assert main(["serve-latency", "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert made == ["0.0.0.0"] and "warning" in err and "other machines" in err and "TLS" in err
    assert main(["serve-latency", "--host", "127.0.0.1", "--port", "0"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_missing_token_file_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    from autoprune.cli import main

    _fake_server(monkeypatch)
    assert main(["serve-latency", "--port", "0", "--token-file", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.txt" in err and "\n" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- still answers 20 clients at once
def test_twenty_concurrent_clients_are_all_answered(srv):
    model = _relu().SerializeToString()
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client() -> None:
        t0 = time.monotonic()
        status, _ = _post(srv, model, {"warmup": 2, "repeats": 10}, timeout=60)
        with lock:
            results.append((status, time.monotonic() - t0))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    wall = time.monotonic() - t0
    assert len(results) == 20 and all(s == 200 for s, _ in results), results
    lat = sorted(d for _, d in results)
    print(f"\n20 concurrent clients: wall {wall:.2f} s, per request median {lat[10]:.3f} s, max {lat[-1]:.3f} s")
    assert _info_ok(srv)


def test_measuring_process_imports_the_servers_own_tree(tmp_path):
    """The child is started as ``python -m <CHILD_MODULE>`` with the folder that holds this
    ``autoprune`` first on PYTHONPATH: it must import the same code as the server (not another
    checkout or an installed copy), and that module must exist there."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    import autoprune
    from autoprune.measure.server import worker

    code = (f"import importlib.util, autoprune; print(autoprune.__file__); "
            f"print(importlib.util.find_spec({worker.CHILD_MODULE!r}).origin)")
    env = {**os.environ, "PYTHONPATH": worker._ROOT}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    pkg, child = out.stdout.split()
    assert Path(pkg) == Path(autoprune.__file__).resolve()
    assert Path(child) == Path(worker.__file__).resolve().with_name("worker_main.py")
    assert importlib.util.find_spec(worker.CHILD_MODULE) is not None
