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
  ``max_tensor_mb`` (:mod:`autoprune.measure.server.model_check`);
* models run only in the measuring process (:mod:`autoprune.measure.server.worker`) under an
  address-space limit (``max_memory_mb``) and a time limit (``max_measure_s`` for loading,
  warm-up and timing together; killed ``kill_grace_s`` later if one inference overruns);
* the only code that touches a model is the inference runtime (onnxruntime or OpenVINO) with
  no custom-op libraries; no pickle, no torch, nothing from the client is executed;
* measurements are serialised (one at a time), so concurrent clients do not disturb each other;
* error replies never contain server paths; replies are strict JSON (no NaN/Infinity);
* it listens on 127.0.0.1 unless ``--host`` says otherwise, and warns when it does not. There is
  no TLS: the token and the models cross the network in clear text.

The package, in the order a request meets it: :mod:`~autoprune.measure.server.limits` (the bounds
and the settings header), :mod:`~autoprune.measure.server.httpd` (connections, token, body),
:mod:`~autoprune.measure.server.worker` (the parent's handle of the measuring process),
:mod:`~autoprune.measure.server.worker_main` (the measuring process itself) and
:mod:`~autoprune.measure.server.model_check` (the static checks it runs on an upload).
Importing this package loads neither torch nor a runtime: only the measuring process does.
"""

from __future__ import annotations

from autoprune.measure.server.httpd import LatencyServer, make_server
from autoprune.measure.server.limits import BadRequest, ServerLimits, check_token, exposure_warning, is_loopback

__all__ = ["LatencyServer", "ServerLimits", "BadRequest", "make_server", "check_token", "exposure_warning", "is_loopback"]
