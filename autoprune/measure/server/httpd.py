"""The HTTP side of ``autoprune serve-latency``: a threading server with bounded connections,
deadlines on every read, token checks before any upload, and one measurement at a time.

What is enforced is listed in :mod:`autoprune.measure.server`; the numbers are
:class:`~autoprune.measure.server.limits.ServerLimits`. This process never parses a model: the
measuring process (:mod:`autoprune.measure.server.worker`) does, under its memory limit.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from autoprune.errors import ConfigError
from autoprune.measure.server.limits import (
    MAX_INPUT_RANK,
    BadRequest,
    ServerLimits,
    check_token,
    parse_settings,
    server_info,
)
from autoprune.measure.server.model_check import redact_paths
from autoprune.measure.server.worker import MeasureWorker, WorkerFailure, finite_json

__all__ = ["LatencyServer", "make_server"]

log = logging.getLogger("autoprune.serve")
_MB = 2**20


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
        # (worker_main.check_job), which answers a rejected model as a client error (400).
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
