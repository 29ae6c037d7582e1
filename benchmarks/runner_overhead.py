"""Per-call overhead of our runners: the call as it was vs the reused-request/IOBinding runner.

Both calls run one real inference on the same array of the same ONNX file in the same process and
read the output; they are timed interleaved (A, B, B, A, ...) by the project's own
:func:`autoprune.measure.stats.time_pair`, so the median of per-pair ratios (before / after)
survives load drift on a shared machine. Prints each model's medians, the ratio and the
difference in microseconds per call.

    python benchmarks/runner_overhead.py --threads 1 --px 64 --seconds 6
    python benchmarks/runner_overhead.py --small       # CI form: the tiny model at 32 px, 0.5 s per backend
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _common import timer


def old_openvino(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The runner as it was before: ``request.infer({0: x})`` then a copy of output 0."""
    from autoprune.measure.ov_core import shared_core

    core = shared_core()
    cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads),
           "INFERENCE_PRECISION_HINT": "f32"}
    request = core.compile_model(str(path), "CPU", cfg).create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    return run


def old_onnxruntime(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The runner as it was before: ``sess.run(None, {name: x})``."""
    import onnxruntime as ort

    from autoprune.measure.backends.onnxruntime_backend import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(None, {name: x})[0]).astype(np.float32, copy=False)

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6.0, help="per model per backend")
    ap.add_argument("--models", nargs="+", default=["tiny", "mobilenet_v2", "resnet18"],
                    help="torchvision names, or 'tiny' (one 3x3 conv and a linear layer: almost only per-call overhead)")
    ap.add_argument("--small", action="store_true", help="CI form: the tiny model at 32 px, 0.5 s per backend")
    args = ap.parse_args()
    if args.small:
        args.models, args.px, args.seconds = ["tiny"], 32, 0.5

    import torch
    import torchvision

    from autoprune.config import DeviceProfile
    from autoprune.measure import backends
    from autoprune.measure.onnx import export_onnx
    from autoprune.measure.stats import time_pair

    tmp = Path(tempfile.mkdtemp(prefix="ap-overhead-"))
    x = np.random.default_rng(0).standard_normal((1, 3, args.px, args.px)).astype(np.float32)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; threads={args.threads}", flush=True)
    for name in args.models:
        torch.manual_seed(0)
        net = (torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
               if name == "tiny" else getattr(torchvision.models, name)(weights=None))
        path = export_onnx(net.eval(), torch.from_numpy(x), tmp / f"{name}.onnx", "torchscript")
        for backend, device, old in [("openvino", "CPU", old_openvino), ("onnxruntime", "cpu", old_onnxruntime)]:
            prof = DeviceProfile(name="b", backend=backend, device=device, threads=args.threads)
            new_fn = backends.load(backends.ModelArtifact(path), prof)
            old_fn = old(path, args.threads)
            np.testing.assert_allclose(new_fn(x), old_fn(x), rtol=1e-4, atol=1e-4)  # the same inference
            st = time_pair(timer(new_fn, x), timer(old_fn, x), warmup=20, repeats=200, target_rel_ci=0.002,
                           max_time_s=args.seconds)
            ref = st.reference_median_ms or 0.0
            print(f"{name:13s} {backend:11s} before {ref:.3f} ms  after {st.median_ms:.3f} ms  "
                  f"before/after {st.speedup:.3f}  ({1000 * (ref - st.median_ms):+.0f} us/call, n={st.n} pairs)", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
