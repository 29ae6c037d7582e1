"""``autoprune serve-latency``: measure ONNX files sent over HTTP, on the device this runs on.

Run it on the target (an edge box, a GPU server); a device profile with ``backend: remote`` and
``url`` then measures every candidate there. The port is open to whoever can reach it, so safety
is the point of this module. What is trusted: whoever holds the token may have models timed here
and use up to the limits below. What is not: everyone else (they get 401 after at most
``header_timeout_s`` of a connection slot), and the models themselves (never trusted to be
small, fast or well-formed).

* every request needs ``Authorization: Bearer <token>`` (constant-time comparison; at least 16
  printable characters);
* slow clients are bounded: headers within ``header_timeout_s`` of the request's first byte
  (whole-request deadline, so trickling bytes does not help), the body within
  ``body_timeout_s`` plus ``size / min_upload_rate_mb_s`` (else 408), at most
  ``max_connections`` at once (more get 503 without a thread);
* ``Content-Length`` is required and capped before a byte of the body is read, and all bodies in
  flight together are capped;
* a model must parse, keep all weights inside the file, use only standard operator domains (in
  every subgraph too), pass ``onnx.checker`` and declare or imply no tensor over
  ``max_tensor_mb`` (:mod:`autoprune.measure.model_check`);
* models run only in the measuring process (:mod:`autoprune.measure.isolated`) under an
  address-space limit (``max_memory_mb``) and a time limit (``max_measure_s`` for loading,
  warm-up and timing together; killed ``kill_grace_s`` later if one inference overruns);
* the only code that touches a model is the inference runtime (onnxruntime or OpenVINO) with
  no custom-op libraries; no pickle, no torch, nothing from the client is executed;
* measurements are serialised (one at a time), so concurrent clients do not disturb each other;
* error replies never contain server paths; replies are strict JSON (no NaN/Infinity);
* it listens on 127.0.0.1 unless ``--host`` says otherwise, and warns when it does not. There is
  no TLS: the token and the models cross the network in clear text.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import platform
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from autoprune.errors import ConfigError
from autoprune.measure.isolated import MeasureWorker, WorkerFailure, finite_json
from autoprune.measure.model_check import redact_paths

log = logging.getLogger("autoprune.serve")

DEFAULT_MAX_UPLOAD_MB = 256.0
#: Caps on client-chosen settings (the time a request may take is ServerLimits.max_measure_s).
MAX_TIME_S_CAP = 60.0
MAX_REPEATS_CAP = 10_000
MIN_TOKEN_CHARS = 16
MAX_INPUT_RANK = 8
_TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_MB = 2**20
#: What a device name may look like (onnxruntime: cpu, cuda:0; OpenVINO: CPU, GPU.1, AUTO:GPU,CPU, HETERO:...):
#: never a path.
_DEVICE = re.compile(r"[A-Za-z][A-Za-z0-9_.:,()\-]{0,63}")


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Every bound the latency server enforces. Defaults suit an edge box with a few GB of RAM;
    the CLI exposes the ones a user is likely to change."""

    #: One request's body (model + reference + input).
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    #: All bodies being received or waiting for the device together (default: 4 uploads).
    max_inflight_upload_mb: Optional[float] = None
    #: Open connections at once; each is one thread. More are answered 503 and closed.
    max_connections: int = 32
    #: The request line and headers must all arrive within this many seconds (also the idle
    #: time allowed between requests on a kept-alive connection).
    header_timeout_s: float = 10.0
    #: The body must arrive within this plus its size at ``min_upload_rate_mb_s``; else 408.
    body_timeout_s: float = 30.0
    min_upload_rate_mb_s: float = 1.0
    #: A client that does not read its reply for this long is dropped.
    write_timeout_s: float = 30.0
    #: Wall-clock time one request may use the device: loading, warm-up and timing together.
    max_measure_s: float = 120.0
    #: If one inference (or loading) overruns max_measure_s by this much, the process is killed.
    kill_grace_s: float = 30.0
    #: Address space the measuring process may add to what the runtimes use idle; 0 = no limit
    #: (needed for CUDA/TensorRT, whose drivers reserve huge address ranges).
    max_memory_mb: float = 4096.0
    #: Largest tensor a model may declare or imply (shapes, constant shape inputs).
    max_tensor_mb: float = 1024.0
    #: Largest output returned with return_output (float32 bytes; it travels as a JSON list).
    max_output_mb: float = 16.0
    #: How long a request waits for the device (other requests being measured) before 503;
    #: below the client's default request_timeout_s (300), so it gets the 503, not a time-out.
    queue_timeout_s: float = 240.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (v == 0 and f.name != "max_memory_mb"):
                raise ConfigError(f"serve-latency: {f.name} must be a positive number, got {v!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * _MB)

    @property
    def max_inflight_bytes(self) -> int:
        return int((self.max_inflight_upload_mb or 4 * self.max_upload_mb) * _MB)

    @property
    def max_tensor_bytes(self) -> int:
        return int(self.max_tensor_mb * _MB)

    @property
    def max_output_bytes(self) -> int:
        return int(self.max_output_mb * _MB)

    def body_seconds(self, n: int) -> float:
        """Time allowed for a body of ``n`` bytes."""
        return self.body_timeout_s + n / (self.min_upload_rate_mb_s * _MB)


class BadRequest(ValueError):
    """A client error; the message goes back in the response body."""

    def __init__(self, message: str, status: int = 400, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def check_token(token: Optional[str]) -> str:
    """The token if it is fit to guard an open port; ConfigError saying how to make one otherwise."""
    if not token:
        raise ConfigError(f"serve-latency needs a token: export AUTOPRUNE_LATENCY_TOKEN=$({_TOKEN_HINT}) (or pass --token-file)")
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ConfigError("serve-latency: the token must be printable ASCII without spaces or line breaks (it travels "
                          f"in an HTTP header); make one with {_TOKEN_HINT}")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"serve-latency: the token is {len(token)} character{'s' if len(token) != 1 else ''} long; "
                          f"use at least {MIN_TOKEN_CHARS} "
                          f"(a guessable token opens this machine to anyone on the network); make one with {_TOKEN_HINT}")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int) -> Optional[str]:
    """What to tell the user when the server is reachable from other machines (None on loopback)."""
    if is_loopback(host):
        return None
    return (f"listening on {host}:{port}, so the port is reachable from other machines. The token is the only "
            "authentication, and there is no TLS: the token and the models cross the network unencrypted. Use a "
            "trusted network, or keep --host 127.0.0.1 and reach it through an SSH tunnel "
            f"(ssh -L {port}:127.0.0.1:{port} <this machine>).")


class _ByteBudget:
    """Bytes of request bodies held at once (received or waiting for the device)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.total, timeout):
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _DeadlineReader(io.RawIOBase):
    """Socket reads that all end by one deadline (``time.monotonic()``), not per read: a client
    that sends one byte every few seconds still runs out of time."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline: Optional[float] = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request deadline passed")
            self.sock.settimeout(left)
        return self.sock.recv_into(b)


class LatencyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], token: str, limits: Optional[ServerLimits] = None,
                 allowed_backends: tuple[str, ...] = ("onnxruntime", "openvino")) -> None:
        self.token = check_token(token).encode()
        self.limits = limits or ServerLimits()
        self.allowed_backends = allowed_backends
        self.measure_lock = threading.Lock()
        self.uploads = _ByteBudget(self.limits.max_inflight_bytes)
        self._conn_lock = threading.Lock()
        self.connections = 0
        # Before binding: socketserver calls server_close() when bind fails, and that closes the worker.
        self.worker = MeasureWorker(allowed_backends, self.limits.max_memory_mb,
                                    max_reply_bytes=_MB + 32 * self.limits.max_output_bytes)
        try:
            super().__init__(addr, _Handler)
        except OSError as exc:
            raise ConfigError(f"serve-latency: cannot listen on {addr[0]}:{addr[1]} ({exc.strerror or exc})") from None
        try:
            self.worker.start()
        except WorkerFailure as exc:
            super().server_close()
            raise ConfigError(f"serve-latency: {exc}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # Connections: a bounded number of threads; the rest are turned away before a thread exists.
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            busy = self.connections >= self.limits.max_connections
            if not busy:
                self.connections += 1
        if busy:
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._conn_lock:
                self.connections -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.connections -= 1

    def _turn_away(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"server busy: {self.limits.max_connections} connections open; retry later"}).encode()
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
                f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        try:
            request.setblocking(False)  # this is the accept thread: never wait on a client here
            request.send(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client went away or timed out mid-reply: routine on an open port
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.exception("error while handling a request from %s", client_address)

    def server_close(self) -> None:
        super().server_close()
        self.worker.close()


class _Handler(BaseHTTPRequestHandler):
    server: LatencyServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket reader; replaced by one with a deadline
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 64 * 1024)

    def handle_one_request(self) -> None:
        # The whole request line and headers (and idle time before them) share one deadline;
        # http.server answers a TimeoutError by closing the connection.
        self._reader.deadline = time.monotonic() + self.server.limits.header_timeout_s
        super().handle_one_request()

    def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def send_response_only(self, code: int, message: Optional[str] = None) -> None:
        self.connection.settimeout(self.server.limits.write_timeout_s)  # every reply, error pages included
        super().send_response_only(code, message)

    def _send(self, status: int, payload: dict[str, Any], retry_after: Optional[int] = None) -> None:
        body = json.dumps(finite_json(payload), allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        ok = got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode("latin-1", "replace"), self.server.token)
        if not ok:
            self._send(401, {"error": "missing or wrong token (send Authorization: Bearer <token>)"})
        return ok

    def handle_expect_100(self) -> bool:
        # No "100 Continue" (an invitation to upload) before the token is checked.
        return self._authorized() and super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body we do not read must not be parsed as the next request
        if self.path != "/v1/info":
            self._send(404, {"error": "unknown path; use GET /v1/info or POST /v1/measure"})
            return
        self._send(200, {**server_info(self.server.allowed_backends, self.server.worker.info.get("runtimes", {})),
                         "limits": dataclasses.asdict(self.server.limits)})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path != "/v1/measure":
            self._send(404, {"error": "unknown path; use POST /v1/measure"})
            return
        try:
            self._send(200, self._measure())
        except BadRequest as exc:
            self._send(exc.status, {"error": str(exc)}, exc.retry_after)
        except Exception as exc:  # noqa: BLE001 - the server stays up; the client learns what, not where
            log.exception("request failed")
            self._send(500, {"error": f"the latency server failed: {type(exc).__name__}: {redact_paths(str(exc))[:300]}"})

    def _measure(self) -> dict[str, Any]:
        lim = self.server.limits
        if "Transfer-Encoding" in self.headers:
            raise BadRequest("Transfer-Encoding is not supported; send Content-Length", 411)
        length = self.headers.get("Content-Length", "")
        if not re.fullmatch(r"[0-9]{1,15}", length.strip()):
            raise BadRequest("Content-Length is required", 411)
        n = int(length)
        if n > lim.max_upload_bytes:
            raise BadRequest(f"upload of {n} bytes exceeds this server's limit of {lim.max_upload_bytes} bytes "
                             "(start it with a larger --max-upload-mb)", 413)
        req = parse_settings(self.headers.get("X-Autoprune-Settings", "{}"), n, lim, self.server.allowed_backends)
        if not self.server.uploads.acquire(n, lim.queue_timeout_s):
            raise BadRequest("server busy: too many uploads in flight; retry later", 503, retry_after=30)
        try:
            body = self._read_body(n)
            blobs, off = {}, 0
            view = memoryview(body)
            for k, v in req["parts"]:
                blobs[k] = view[off:off + v]
                off += v
            if not self.server.measure_lock.acquire(timeout=lim.queue_timeout_s):
                raise BadRequest(f"server busy: still measuring for others after {lim.queue_timeout_s:g} s; retry later",
                                 503, retry_after=60)
            try:
                # Validation runs under the lock too: nothing CPU-heavy of ours beside a timing loop.
                return self._run(req, blobs)
            finally:
                self.server.measure_lock.release()
        finally:
            self.server.uploads.release(n)

    def _read_body(self, n: int) -> bytes:
        seconds = self.server.limits.body_seconds(n)
        self._reader.deadline = time.monotonic() + seconds
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise BadRequest(f"the request body did not arrive within {seconds:.0f} s", 408) from None
        finally:
            self._reader.deadline = None
        if len(body) != n:
            raise BadRequest(f"body ended after {len(body)} of {n} bytes")
        return body

    def _run(self, req: dict[str, Any], blobs: dict[str, memoryview]) -> dict[str, Any]:
        lim = self.server.limits
        # Nothing here parses the model: parsing, onnx.checker and shape inference allocate in
        # proportion to what the model holds or implies (a 140-byte ConstantOfShape made shape
        # inference materialise 2 GB), so they run in the memory-capped measuring process
        # (isolated_main.check_job), which answers a rejected model as a client error (400).
        kinds = [k for k, _ in req["parts"]]
        job = {"parts": kinds, "profile": req["profile"], "input_shape": req["input_shape"], "seed": req["seed"],
               "return_output": req["return_output"], "max_measure_s": lim.max_measure_s,
               "max_output_bytes": lim.max_output_bytes,
               "check": {"max_tensor_bytes": lim.max_tensor_bytes, "max_input_bytes": min(lim.max_upload_bytes, lim.max_tensor_bytes),
                         "max_input_rank": MAX_INPUT_RANK}}
        try:
            reply = self.server.worker.run(job, [blobs[k] for k in kinds], lim.max_measure_s + lim.kill_grace_s)
        except WorkerFailure as exc:
            if exc.kind == "timeout":
                raise BadRequest(f"stopped: loading or one inference took longer than this server's limit of "
                                 f"{lim.max_measure_s:g} s per request (--max-measure-s)", 422) from None
            if exc.kind == "died":
                raise BadRequest(f"{exc}; the model may need more memory than this server allows "
                                 f"(--max-memory-mb {lim.max_memory_mb:g})", 500) from None
            raise BadRequest(str(exc), 503, retry_after=30) from None
        if not reply.get("ok"):
            err = str(reply.get("error", "unknown error"))
            if reply.get("kind") == "memory":
                raise BadRequest(f"the model needed more memory than this server allows (--max-memory-mb "
                                 f"{lim.max_memory_mb:g}): {err}", 422)
            if reply.get("kind") == "client":
                raise BadRequest(err)
            raise BadRequest(f"measurement failed on the server: {err}", 500)
        out = {k: reply[k] for k in ("latency", "output", "output_shape", "profile") if k in reply}
        out["time_limited"] = bool(reply.get("time_limited"))
        out["limits"] = {"max_measure_s": lim.max_measure_s}
        return out


def _strict_json(raw: str) -> Any:
    def reject(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=reject)


def _int(settings: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = settings.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v:
        raise BadRequest(f"settings.{key} must be an integer >= {lo}, got {str(v)[:40]!r}")
    return min(v, hi)


def _seconds(settings: dict[str, Any], key: str, default: float, hi: float) -> float:
    v = settings.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise BadRequest(f"settings.{key} must be a positive number, got {str(v)[:40]!r}")
    return min(float(v), hi)


def check_input_shape(shape: Any, lim: ServerLimits) -> list[int]:
    """A list of 1..8 positive integers whose float32 tensor fits the upload and tensor limits
    (Python integers: [2**32, 2**32] must not overflow to something small)."""
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_INPUT_RANK
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise BadRequest(f"settings.input_shape must be a list of 1 to {MAX_INPUT_RANK} positive integers, got {str(shape)[:80]}")
    size = math.prod(shape) * 4
    cap = min(lim.max_upload_bytes, lim.max_tensor_bytes)
    if size > cap:
        raise BadRequest(f"input_shape {shape} is {size:,} bytes of float32, over this server's limit of {cap:,} bytes")
    return shape


def parse_settings(raw: str, n: int, lim: ServerLimits, allowed_backends: tuple[str, ...]) -> dict[str, Any]:
    """Check the X-Autoprune-Settings header before reading the body; returns parts, profile
    settings (clamped to the server's caps), input_shape (None: from the model), seed, return_output."""
    try:
        settings = _strict_json(raw)
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise BadRequest("header X-Autoprune-Settings must be a JSON object")
    parts = settings.get("parts", [["model", n]])
    if (not isinstance(parts, list) or not 1 <= len(parts) <= 3
            or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], int)
                       and not isinstance(p[1], bool) and p[1] >= 0 for p in parts)):
        raise BadRequest("settings.parts must be [[kind, nbytes], ...] with kinds model, reference, input")
    kinds = [k for k, _ in parts]
    if sorted(set(kinds)) != sorted(kinds) or "model" not in kinds or not set(kinds) <= {"model", "reference", "input"}:
        raise BadRequest("parts must hold exactly one 'model' and optionally one 'reference' and one 'input'")
    if sum(v for _, v in parts) != n:
        raise BadRequest(f"parts sizes {parts} do not add up to Content-Length {n}")

    backend = settings.get("backend", "onnxruntime")
    if backend not in allowed_backends:
        raise BadRequest(f"settings.backend {str(backend)[:40]!r} is not served here (allowed: {list(allowed_backends)})")
    # The measuring process validates these as a DeviceProfile (this process stays free of torch,
    # which autoprune.config imports); here only the caps.
    keep: dict[str, Any] = {k: settings[k] for k in ("device", "target_rel_ci", "precision", "mode") if k in settings}
    if "device" in keep and not (isinstance(keep["device"], str) and _DEVICE.fullmatch(keep["device"]) and ".." not in keep["device"]):
        raise BadRequest(f"settings.device must be a device name such as cpu, cuda:0, CPU, GPU.1 or AUTO:GPU,CPU, "
                         f"got {str(keep['device'])[:40]!r}")
    keep["backend"] = backend
    keep["threads"] = _int(settings, "threads", 1, 1, os.cpu_count() or 1)
    keep["warmup"] = _int(settings, "warmup", 10, 0, MAX_REPEATS_CAP)
    keep["repeats"] = _int(settings, "repeats", 50, 1, MAX_REPEATS_CAP)
    keep["max_time_s"] = _seconds(settings, "max_time_s", 5.0, min(MAX_TIME_S_CAP, lim.max_measure_s))

    seed = settings.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadRequest(f"settings.seed must be an integer in [0, 2**63), got {str(seed)[:40]!r}")
    shape = settings.get("input_shape")
    if shape is not None:
        check_input_shape(shape, lim)
        if "input" in kinds and dict(parts)["input"] != math.prod(shape) * 4:
            raise BadRequest(f"input part has {dict(parts)['input']} bytes, expected float32 of shape {shape}")
    ret = settings.get("return_output", False)
    if not isinstance(ret, bool):
        raise BadRequest("settings.return_output must be true or false")
    return {"parts": [(k, v) for k, v in parts], "profile": keep, "input_shape": shape, "seed": seed, "return_output": ret}


def server_info(allowed_backends: tuple[str, ...], runtimes: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /v1/info`` says: this machine, the served backends, and the runtimes as the
    measuring process found them."""
    return {"host": platform.node(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "backends": list(allowed_backends), **runtimes}


def make_server(host: str = "127.0.0.1", port: int = 8765, token: Optional[str] = None,
                max_upload_mb: Optional[float] = None, limits: Optional[ServerLimits] = None,
                allowed_backends: tuple[str, ...] = ("onnxruntime", "openvino"), **overrides: Any) -> LatencyServer:
    """A bound server with its measuring process started (seconds: it loads the runtimes).

    ``limits`` (or the defaults) with ``max_upload_mb`` and any other :class:`ServerLimits` field
    given as a keyword replaced. Raises ConfigError for a weak token or an address in use.
    """
    check_token(token)
    if os.name != "posix":
        raise ConfigError("serve-latency needs Linux or macOS: it runs models in a child process that it talks to over "
                          "POSIX pipes and limits with setrlimit")
    if max_upload_mb is not None:
        overrides["max_upload_mb"] = max_upload_mb
    lim = dataclasses.replace(limits or ServerLimits(), **overrides)
    return LatencyServer((host, port), token or "", lim, allowed_backends)
