"""What the latency server accepts: its limits (:class:`ServerLimits`), the token rule, and the
checks of a request's settings header, all made before a byte of the body is read.

Kept apart from the HTTP handling (:mod:`autoprune.measure.server.httpd`) so that every bound a
client can run into is in one place, and testable without a socket.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import platform
import re
from typing import Any, Optional

from autoprune.errors import ConfigError

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "MAX_TIME_S_CAP", "MAX_REPEATS_CAP", "MIN_TOKEN_CHARS", "MAX_INPUT_RANK",
           "ServerLimits", "BadRequest", "check_token", "is_loopback", "exposure_warning", "check_input_shape",
           "parse_settings", "server_info"]

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
