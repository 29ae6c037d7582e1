"""Client of ``autoprune serve-latency``: latency measured on the target device over HTTP.

A profile with ``backend: remote`` and ``url`` sends the (already exported, and for int8 already
quantized) ONNX file to the server, which times it with its own onnxruntime/OpenVINO using the
profile's settings and returns the statistics. Nothing but ONNX bytes and a small JSON of
settings crosses the wire; the token comes from the environment variable ``token_env``.

Wire format (``POST /v1/measure``): header ``Authorization: Bearer <token>``, header
``X-Autoprune-Settings: <json>`` with ``parts`` (``[[kind, nbytes], ...]``, kind ``model``,
``reference`` or ``input``: raw float32 of ``input_shape``), body = the parts concatenated.
Replies are strict JSON: a non-finite number (``rel_ci`` with under 5 samples) comes as null,
and ``time_limited`` says the server's per-request time cap cut warm-up or repeats short.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import numpy as np

from autoprune.config import DeviceProfile
from autoprune.errors import BackendUnavailable, RemoteError
from autoprune.measure.backends.base import Backend, FnRunner, Runner
from autoprune.measure.onnx import ModelArtifact
from autoprune.measure.stats import LatencyStats
from autoprune.registry import BACKENDS

log = logging.getLogger(__name__)

#: Profile keys the server accepts (anything else is ignored there).
SETTINGS_KEYS = ("device", "threads", "warmup", "repeats", "target_rel_ci", "max_time_s", "precision", "mode")


def remote_input(shape: list[int], seed: int = 0) -> np.ndarray:
    """The input the server times (and returns outputs for): reproducible on both sides."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def post_parts(url: str, token: str, parts: list[tuple[str, bytes]], settings: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    """POST parts to ``<url>/v1/measure``; returns the server's JSON or raises RemoteError."""
    body = b"".join(b for _, b in parts)
    settings = {**settings, "parts": [[k, len(b)] for k, b in parts]}
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/measure",
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/octet-stream",
            "X-Autoprune-Settings": json.dumps(settings),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", exc.reason)
        except Exception:  # noqa: BLE001
            msg = str(exc.reason)
        raise RemoteError(exc.code, msg) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise BackendUnavailable(
            f"cannot reach the latency server at {url} ({getattr(exc, 'reason', exc)}); start it on the target with "
            "`autoprune serve-latency --host 0.0.0.0 --port 8765` and check the profile's url"
        ) from None


class RemoteBackend(Backend):
    name = "remote"

    def check(self, profile: DeviceProfile) -> None:
        """The token is in the environment (the server itself is reached at the first measurement)."""
        self._token(profile)

    def _token(self, profile: DeviceProfile) -> str:
        tok = os.environ.get(profile.token_env, "")
        if not tok:
            raise BackendUnavailable(
                f"device profile {profile.name}: backend remote needs the server's token in the environment variable "
                f"{profile.token_env} (export {profile.token_env}=<token given to autoprune serve-latency>)"
            )
        return tok

    def settings(self, profile: DeviceProfile) -> dict[str, Any]:
        s = {k: getattr(profile, k) for k in SETTINGS_KEYS}
        s["backend"] = profile.remote_backend
        return s

    def request(self, artifact: ModelArtifact, profile: DeviceProfile, reference: Optional[ModelArtifact] = None,
                x: Optional[np.ndarray] = None, **extra: Any) -> dict[str, Any]:
        if artifact.onnx_path is None or not str(artifact.onnx_path).endswith(".onnx"):
            raise ValueError("backend remote sends ONNX files; got " + str(artifact.onnx_path))
        parts = [("model", Path(artifact.onnx_path).read_bytes())]
        if reference is not None and reference.onnx_path is not None:
            parts.append(("reference", Path(reference.onnx_path).read_bytes()))
        if x is not None:
            parts.append(("input", np.ascontiguousarray(x, dtype=np.float32).tobytes()))
        try:
            return post_parts(profile.url or "", self._token(profile), parts, {**self.settings(profile), **extra},
                              profile.request_timeout_s)
        except RemoteError as exc:
            if exc.status == 401:
                raise BackendUnavailable(f"device profile {profile.name}: the latency server at {profile.url} rejected "
                                         f"the token in {profile.token_env}") from None
            raise

    def measure(self, artifact: ModelArtifact, profile: DeviceProfile, x: np.ndarray,
                reference: Optional[ModelArtifact] = None) -> LatencyStats:
        res = self.request(artifact, profile, reference, input_shape=list(x.shape))
        lat = dict(res["latency"])
        if lat.get("rel_ci") is None:  # strict JSON has no Infinity: the server sends null (too few samples)
            lat["rel_ci"] = math.inf
        if res.get("time_limited"):
            log.warning("latency server %s stopped timing at its limit of %s s per request: %s samples instead of "
                        "the %s asked for", profile.url, res.get("limits", {}).get("max_measure_s"), lat.get("n"), profile.repeats)
        return LatencyStats.from_dict(lat)

    def load(self, artifact: ModelArtifact, profile: DeviceProfile) -> Runner:
        """A runner that asks the server for outputs (for cross-checks; each call is one request)."""

        def run(x: np.ndarray) -> np.ndarray:
            res = self.request(artifact, profile, None, x=x, input_shape=list(x.shape), return_output=True,
                               warmup=0, repeats=1, target_rel_ci=None)
            return np.asarray(res["output"], dtype=np.float32).reshape(res["output_shape"])

        return FnRunner(run, info={"url": profile.url})


BACKENDS.register("remote", RemoteBackend)
