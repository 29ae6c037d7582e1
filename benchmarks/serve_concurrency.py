"""``autoprune serve-latency`` under 20 concurrent clients, and whether moving the timing loop
into a separate measuring process changed the numbers: two source trees, rounds interleaved.

    python benchmarks/serve_concurrency.py                    # b4e46c8 (before issue 12 items 7-11) vs this tree
    python benchmarks/serve_concurrency.py --base HEAD~5 --rounds 5
    python benchmarks/serve_concurrency.py --small --base-path . --out /tmp/s.json   # CI form (this tree twice)

Each tree runs its own ``python -m autoprune.cli serve-latency`` on 127.0.0.1 (loopback only)
through PYTHONPATH; the clients here use plain ``http.client``, so both servers see identical
requests. A round is (a) ``--clients`` (20) clients at once, each POSTing the same small MLP (warm-up 2, 20
repeats): wall time until all are answered, per-request latency; (b) ``--fidelity`` sequential
requests with ``--repeats`` (200) repeats each: the medians the server reports. Rounds alternate base/new,
swapping which goes first, so drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from _common import REPO, imported_from, source_tree, tree_env

DEFAULT_BASE = "b4e46c8"


def mlp(width: int = 512, layers: int = 4) -> bytes:
    """A few hundred microseconds per inference on one thread."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        inits.append(nh.from_array((rng.standard_normal((width, width)) / width**0.5).astype(np.float32), f"w{i}"))
        nodes += [h.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]), h.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        cur = f"r{i}"
    nodes[-1].output[0] = "y"
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, [1, width])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, width])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tree: Path, token: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    imported_from(tree, Path(tempfile.gettempdir()))  # the tree itself, not an installed autoprune
    proc = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "serve-latency", "--host", "127.0.0.1", "--port", str(port)],
                            env=tree_env(tree, AUTOPRUNE_LATENCY_TOKEN=token), cwd=tempfile.gettempdir(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            if request(port, token, "GET", "/v1/info", b"", {})[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server from {tree} did not start")


def request(port: int, token: str, method: str, path: str, body: bytes, settings: dict[str, Any]) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        hdr = {"Authorization": f"Bearer {token}"}
        if method == "POST":
            hdr["X-Autoprune-Settings"] = json.dumps({**settings, "parts": [["model", len(body)]]})
        c.request(method, path, body=body or None, headers=hdr)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def concurrent(port: int, token: str, model: bytes, clients: int = 20) -> dict[str, Any]:
    settings = {"warmup": 2, "repeats": 20, "target_rel_ci": None, "threads": 1}
    got: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        t0 = time.perf_counter()
        status, _ = request(port, token, "POST", "/v1/measure", model, settings)
        with lock:
            got.append((status, time.perf_counter() - t0))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    lat = sorted(d for _, d in got)
    return {"ok": sum(s == 200 for s, _ in got), "wall_s": wall, "median_s": statistics.median(lat), "max_s": lat[-1]}


def fidelity(port: int, token: str, model: bytes, n: int, repeats: int = 200) -> list[float]:
    settings = {"warmup": min(20, repeats), "repeats": repeats, "target_rel_ci": None, "threads": 1}
    return [request(port, token, "POST", "/v1/measure", model, settings)[1]["latency"]["median_ms"] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=DEFAULT_BASE, help="git revision of the base tree")
    ap.add_argument("--base-path", type=Path, help="source tree to use as the base instead of --base")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=20, help="concurrent clients per round")
    ap.add_argument("--fidelity", type=int, default=5, help="sequential requests per round and tree")
    ap.add_argument("--repeats", type=int, default=200, help="timed repeats of each sequential request")
    ap.add_argument("--small", action="store_true", help="CI form: 1 round, 4 clients, 1 sequential request of 20 repeats")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_concurrency.json")
    args = ap.parse_args()
    if args.small:
        args.rounds, args.clients, args.fidelity, args.repeats = 1, 4, 1, 20
    token = secrets.token_urlsafe(32)
    model = mlp(width=64 if args.small else 512)
    with contextlib.ExitStack() as stack:
        base = args.base_path or stack.enter_context(source_tree(args.base, "autoprune"))
        servers = {"base": start(base, token), "new": start(REPO, token)}
        res: dict[str, dict[str, list]] = {k: {"concurrent": [], "fidelity_ms": []} for k in servers}
        try:
            for r in range(args.rounds):
                for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                    port = servers[name][1]
                    res[name]["concurrent"].append(concurrent(port, token, model, args.clients))
                    res[name]["fidelity_ms"] += fidelity(port, token, model, args.fidelity, args.repeats)
                    print(name, res[name]["concurrent"][-1], flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    summary = {name: {"all_answered": all(c["ok"] == args.clients for c in v["concurrent"]),
                      "wall_s_median": statistics.median(c["wall_s"] for c in v["concurrent"]),
                      "request_s_median": statistics.median(c["median_s"] for c in v["concurrent"]),
                      "request_s_max": max(c["max_s"] for c in v["concurrent"]),
                      "reported_median_ms": statistics.median(v["fidelity_ms"])} for name, v in res.items()}
    out = {"base": str(args.base_path or args.base), "rounds": args.rounds, "clients": args.clients, "cpu_count": os.cpu_count(), "summary": summary, "raw": res}
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
