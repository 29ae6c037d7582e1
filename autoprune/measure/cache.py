"""Measure each pruned architecture once per device profile.

Different trials often produce the same architecture (ratios snap to ``round_to`` multiples), and a
resumed search re-visits old ones. Latency depends on the graph's structure and tensor shapes, not on
weight values, so the key is a hash of the exported ONNX graph with names and weights stripped
(:func:`architecture_hash`) plus everything in the profile that changes a measurement (backend,
device, threads, precision, batch, timing protocol — not the budget) and the runtime versions.
The store is a small SQLite file in the run folder: safe for several workers on one machine.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Optional

from autoprune.config import DeviceProfile
from autoprune.measure.stats import LatencyStats

#: Profile keys that do not change what a measurement returns.
_NOT_MEASUREMENT = {"budget", "cache", "request_timeout_s", "token_env", "staircases"}


def architecture_hash(onnx_path: Path) -> str:
    """Hash of an ONNX graph's structure and shapes: op types, attributes, wiring, initializer shapes
    and dtypes, input/output shapes. Tensor names and weight values are ignored, so two exports of
    the same architecture with different weights hash the same."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    ids: dict[str, int] = {}

    def tid(name: str) -> int:
        if name == "":
            return -1
        return ids.setdefault(name, len(ids))

    def shape(vi: Any) -> list[Any]:
        t = vi.type.tensor_type
        return [t.elem_type, [d.dim_value or d.dim_param for d in t.shape.dim]]

    def attr(a: Any) -> Any:
        if a.type == onnx.AttributeProto.TENSOR:
            return ["T", list(a.t.dims), a.t.data_type]
        if a.type == onnx.AttributeProto.GRAPH:
            return ["G", len(a.g.node)]
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        if isinstance(v, list):
            v = [x.decode(errors="replace") if isinstance(x, bytes) else x for x in v]
        return v

    g = m.graph
    blob = {
        "opset": sorted((o.domain, o.version) for o in m.opset_import),
        "inputs": [[tid(i.name), shape(i)] for i in g.input],
        "init": sorted([tid(t.name), list(t.dims), t.data_type] for t in g.initializer),
        "nodes": [
            [n.op_type, n.domain, [tid(i) for i in n.input], [tid(o) for o in n.output],
             sorted((a.name, attr(a)) for a in n.attribute)]
            for n in g.node
        ],
        "outputs": [[tid(o.name), shape(o)] for o in g.output],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _runtime_versions() -> dict[str, str]:
    """Versions of the runtimes that produced a number: a new runtime may be faster."""
    out: dict[str, str] = {}
    for mod in ("onnxruntime", "openvino", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def _uses_openvino(profile: DeviceProfile) -> bool:
    return profile.backend == "openvino" or (profile.backend == "remote" and profile.remote_backend == "openvino")


def profile_key(profile: DeviceProfile) -> str:
    d = {k: v for k, v in profile.model_dump(mode="json").items() if k not in _NOT_MEASUREMENT}
    if not _uses_openvino(profile):
        d.pop("cpu_pinning", None)  # an OpenVINO setting: other backends' cached numbers stay valid
    d["_runtimes"] = _runtime_versions()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class LatencyCache:
    """``(profile, architecture) → LatencyStats`` in SQLite (``<run>/latency_cache.sqlite``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS latency (profile_key TEXT, arch TEXT, profile_name TEXT, "
                "stats TEXT, created REAL, hits INTEGER DEFAULT 0, PRIMARY KEY (profile_key, arch))"
            )

    def _conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, profile: DeviceProfile, arch: str) -> Optional[LatencyStats]:
        k = profile_key(profile)
        with self._conn() as c:
            row = c.execute("SELECT stats FROM latency WHERE profile_key=? AND arch=?", (k, arch)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE latency SET hits = hits + 1 WHERE profile_key=? AND arch=?", (k, arch))
        return LatencyStats.from_dict(json.loads(row[0]))

    def put(self, profile: DeviceProfile, arch: str, stats: LatencyStats) -> None:
        with self._conn() as c:
            c.execute(
                "INSERT OR REPLACE INTO latency (profile_key, arch, profile_name, stats, created, hits) VALUES (?,?,?,?,?,0)",
                (profile_key(profile), arch, profile.name, json.dumps(stats.to_dict()), time.time()),
            )

    def stats(self) -> dict[str, int]:
        with self._conn() as c:
            n, hits = c.execute("SELECT COUNT(*), COALESCE(SUM(hits), 0) FROM latency").fetchone()
        return {"entries": int(n), "hits": int(hits)}
