"""``autoprune serve-latency``: measure ONNX files sent over HTTP, on the device this runs on.

Run it on the target (an edge box, a GPU server); a device profile with ``backend: remote`` and
``url`` then measures every candidate there. Safety is the point of this module:

* every request needs ``Authorization: Bearer <token>`` (constant-time comparison);
* ``Content-Length`` is required and capped before a byte of the body is read;
* a model must parse, pass ``onnx.checker``, keep all weights inside the file (external data
  could name any file on the server) and use only standard operator domains;
* the only code that touches a model is the inference runtime (onnxruntime or OpenVINO) with
  no custom-op libraries; no pickle, no torch, nothing from the client is executed;
* measurements are serialised (one at a time), so concurrent clients do not disturb each other;
* it listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import platform
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import numpy as np

from autoprune.config import DeviceProfile, validate
from autoprune.errors import ConfigError
from autoprune.measure import backends
from autoprune.measure.backends.remote import remote_input

log = logging.getLogger("autoprune.serve")

#: Operator domains a served model may use (standard ONNX, ONNX-ML, onnxruntime contrib ops).
ALLOWED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
DEFAULT_MAX_UPLOAD_MB = 256.0
#: Caps on client-chosen settings, so a request cannot hold the device for long.
MAX_TIME_S_CAP = 60.0
MAX_REPEATS_CAP = 10_000


class BadRequest(ValueError):
    """A client error; the message goes back in the response body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def validate_onnx(blob: bytes, what: str = "model") -> Any:
    """Parse and check an uploaded ONNX model; raise BadRequest naming what is wrong."""
    import onnx

    try:
        model = onnx.load_from_string(blob)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise BadRequest(f"{what}: not a valid ONNX protobuf ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not model.graph.node:
        raise BadRequest(f"{what}: the ONNX graph has no nodes (corrupt or empty model)")
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                tensors.append(a.t)
            tensors.extend(a.tensors)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise BadRequest(f"{what}: tensor {t.name!r} uses external data; send a self-contained ONNX file "
                             "(onnx.save(model, path, save_as_external_data=False))")
    # Domains of the nodes actually used (tools list unused domains in opset_import; harmless).
    local_fns = {(f.domain, f.name) for f in model.functions}
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    bad = sorted({n.domain for n in nodes if n.domain not in ALLOWED_DOMAINS and (n.domain, n.op_type) not in local_fns})
    if bad:
        raise BadRequest(f"{what}: operator domains {bad} are not allowed (allowed: {sorted(ALLOWED_DOMAINS)}); "
                         "custom operators would need code on the server")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise BadRequest(f"{what}: onnx.checker rejected it: {str(exc)[:300]}") from None
    return model


def static_input_shape(model: Any) -> Optional[list[int]]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value for d in dims]
    return shape if shape and all(s > 0 for s in shape) else None


def _profile(settings: dict[str, Any], allowed_backends: tuple[str, ...]) -> Any:
    """Client settings → a DeviceProfile for the local runtime, clamped to the server's caps."""

    backend = settings.get("backend", "onnxruntime")
    if backend not in allowed_backends:
        raise BadRequest(f"settings.backend {backend!r} is not served here (allowed: {list(allowed_backends)})")
    keep = {k: settings[k] for k in ("device", "threads", "warmup", "repeats", "target_rel_ci", "max_time_s", "precision", "mode")
            if k in settings}
    try:
        keep["threads"] = min(int(keep.get("threads", 1)), os.cpu_count() or 1)
        keep["max_time_s"] = min(float(keep.get("max_time_s", 5.0)), MAX_TIME_S_CAP)
        keep["repeats"] = min(int(keep.get("repeats", 50)), MAX_REPEATS_CAP)
        keep["warmup"] = min(int(keep.get("warmup", 10)), MAX_REPEATS_CAP)
    except (TypeError, ValueError):
        raise BadRequest("settings threads/repeats/warmup must be integers and max_time_s a number") from None
    try:
        return validate(DeviceProfile, {"name": "remote-request", "backend": backend, **keep}, "request settings")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None


class LatencyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], token: str, max_upload_bytes: int,
                 allowed_backends: tuple[str, ...] = ("onnxruntime", "openvino"), read_timeout_s: float = 60.0) -> None:
        if not token:
            raise ValueError("serve-latency needs a non-empty token")
        super().__init__(addr, _Handler)
        self.token = token.encode()
        self.max_upload_bytes = max_upload_bytes
        self.allowed_backends = allowed_backends
        self.read_timeout_s = read_timeout_s
        self.measure_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: LatencyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        ok = got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.server.token)
        if not ok:
            self._send(401, {"error": "missing or wrong token (send Authorization: Bearer <token>)"})
        return ok

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path != "/v1/info":
            self._send(404, {"error": f"unknown path {self.path}; use GET /v1/info or POST /v1/measure"})
            return
        self._send(200, server_info(self.server.allowed_backends))

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path != "/v1/measure":
            self._send(404, {"error": f"unknown path {self.path}; use POST /v1/measure"})
            return
        try:
            self._send(200, self._measure())
        except BadRequest as exc:
            self._send(exc.status, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - runtime failures go back to the client, the server stays up
            log.exception("measurement failed")
            self._send(500, {"error": f"measurement failed on the server: {type(exc).__name__}: {str(exc)[:500]}"})

    def _measure(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("Content-Length is required", 411)
        n = int(length)
        if n > self.server.max_upload_bytes:
            raise BadRequest(f"upload of {n} bytes exceeds this server's limit of {self.server.max_upload_bytes} bytes "
                             "(start it with a larger --max-upload-mb)", 413)
        try:
            settings = json.loads(self.headers.get("X-Autoprune-Settings", "{}"))
            assert isinstance(settings, dict)
            parts = [(str(k), int(v)) for k, v in settings.get("parts", [["model", n]])]
        except Exception:  # noqa: BLE001
            raise BadRequest("header X-Autoprune-Settings must be a JSON object with parts: [[kind, nbytes], ...]") from None
        if sum(v for _, v in parts) != n or any(v < 0 for _, v in parts):
            raise BadRequest(f"parts sizes {parts} do not add up to Content-Length {n}")
        if not {k for k, _ in parts} <= {"model", "reference", "input"} or [k for k, _ in parts].count("model") != 1:
            raise BadRequest("parts must hold exactly one 'model' and optionally 'reference' and 'input'")
        self.connection.settimeout(self.server.read_timeout_s)
        body = self.rfile.read(n)
        if len(body) != n:
            raise BadRequest(f"body ended after {len(body)} of {n} bytes")
        blobs, off = {}, 0
        for k, v in parts:
            blobs[k] = body[off:off + v]
            off += v
        model = validate_onnx(blobs["model"], "model")
        if "reference" in blobs:
            validate_onnx(blobs["reference"], "reference")
        profile = _profile(settings, self.server.allowed_backends)
        shape = settings.get("input_shape") or static_input_shape(model)
        if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise BadRequest("the model's input has dynamic dimensions; send settings.input_shape (with the batch size)")
        if int(np.prod(shape)) * 4 > self.server.max_upload_bytes:
            raise BadRequest(f"input_shape {shape} is larger than this server allows")
        if "input" in blobs:
            if len(blobs["input"]) != int(np.prod(shape)) * 4:
                raise BadRequest(f"input part has {len(blobs['input'])} bytes, expected float32 of shape {shape}")
            x = np.frombuffer(blobs["input"], dtype=np.float32).reshape(shape).copy()
        else:

            x = remote_input(shape, int(settings.get("seed", 0)))
        return run_measurement(blobs["model"], blobs.get("reference"), profile, x, bool(settings.get("return_output")),
                               self.server.measure_lock)


def run_measurement(model: bytes, reference: Optional[bytes], profile: Any, x: np.ndarray, return_output: bool,
                    lock: threading.Lock) -> dict[str, Any]:
    """Write the validated bytes to a private temp dir and time them with the local runtime."""

    with tempfile.TemporaryDirectory(prefix="autoprune-serve-") as d, lock:
        mp = Path(d) / "model.onnx"
        mp.write_bytes(model)
        art = backends.ModelArtifact(mp, quantized=True)  # the client quantized it (or it is fp32 on purpose)
        ref = None
        if reference is not None:
            rp = Path(d) / "reference.onnx"
            rp.write_bytes(reference)
            ref = backends.ModelArtifact(rp, quantized=True)
        out: dict[str, Any] = {}
        if return_output:
            y = backends.load(art, profile)(x)
            out["output"] = np.asarray(y, dtype=np.float32).ravel().tolist()
            out["output_shape"] = list(np.shape(y))
        stats = backends.measure(art, profile, x, reference=ref)
        out["latency"] = stats.to_dict()
        out["profile"] = profile.model_dump(mode="json")
        return out


def server_info(allowed_backends: tuple[str, ...]) -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                            "backends": list(allowed_backends)}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    try:
        import openvino as ov

        info["openvino"] = {"version": ov.__version__, "devices": ov.Core().available_devices}
    except ImportError:
        pass
    return info


def make_server(host: str = "127.0.0.1", port: int = 8765, token: Optional[str] = None,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> LatencyServer:
    if not token:
        raise ValueError("serve-latency needs a token: export AUTOPRUNE_LATENCY_TOKEN=$(python -c "
                         "'import secrets; print(secrets.token_urlsafe(32))') (or pass --token-file)")
    return LatencyServer((host, port), token, int(max_upload_mb * 1024 * 1024))
