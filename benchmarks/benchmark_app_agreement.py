"""Does our OpenVINO latency agree with OpenVINO's own ``benchmark_app``?

Same ONNX file (torchvision ResNet-18, weights=None, 1x3x224x224), same settings on both sides:
sync API, one stream, one infer request, N threads, fp32 inference precision, no explicit hint (the plugin then
reports PERFORMANCE_HINT=LATENCY, which is what our backend sets). The
two tools are run alternately for a few rounds (load on a shared machine drifts), and we report
each tool's median per round, the median over rounds, and the % difference. Target: within 5%.

    python benchmarks/benchmark_app_agreement.py --threads 1 2 --rounds 3 --out benchmarks/agreement.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def benchmark_app_cmd() -> list[str]:
    """The ``benchmark_app`` console script of the openvino wheel, else its module."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    return [exe] if Path(exe).is_file() else [sys.executable, "-m", "openvino.tools.benchmark.main"]


def run_benchmark_app(onnx: Path, threads: int, seconds: float) -> float:
    cmd = benchmark_app_cmd() + [
        "-m", str(onnx), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
        "-nireq", "1", "-api", "sync", "-infer_precision", "f32", "-t", str(int(seconds)),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Median:\s+([0-9.]+)\s*ms", out)
    if not m:
        raise RuntimeError("could not find 'Median: ... ms' in benchmark_app output:\n" + out[-2000:])
    return float(m.group(1))


def run_ours(onnx: Path, threads: int, seconds: float) -> dict:
    import numpy as np

    from autoprune.config import DeviceProfile
    from autoprune.measure import backends

    prof = DeviceProfile(name=f"openvino-cpu-{threads}t", backend="openvino", device="CPU", threads=threads,
                         warmup=10, repeats=50, target_rel_ci=0.005, max_time_s=seconds)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return backends.measure(backends.ModelArtifact(onnx), prof, x).to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="per tool per round")
    ap.add_argument("--onnx", help="use this ONNX file instead of exporting ResNet-18")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ap-bench-"))
    onnx = Path(args.onnx) if args.onnx else tmp / "resnet18.onnx"
    if not args.onnx:
        import torch
        import torchvision

        from autoprune.measure.onnx import export_onnx

        export_onnx(torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 224, 224), onnx, "torchscript")
    results = []
    for n in args.threads:
        ours, theirs = [], []
        for r in range(args.rounds):
            o = run_ours(onnx, n, args.seconds)
            b = run_benchmark_app(onnx, n, args.seconds)
            ours.append(o["median_ms"])
            theirs.append(b)
            print(f"threads={n} round {r}: autoprune median {o['median_ms']:.3f} ms (n={o['n']}, CV {o['cv']:.3f}, "
                  f"CI ±{100 * o['rel_ci']:.1f}%) | benchmark_app median {b:.3f} ms", flush=True)
        mo, mb = statistics.median(ours), statistics.median(theirs)
        diff = 100.0 * (mo - mb) / mb
        per_round = [100.0 * (a - b) / b for a, b in zip(ours, theirs)]
        results.append({"threads": n, "autoprune_ms": ours, "benchmark_app_ms": theirs, "autoprune_median_ms": mo,
                        "benchmark_app_median_ms": mb, "diff_pct": diff, "diff_pct_per_round": per_round,
                        "within_5pct": abs(diff) <= 5.0})
        print(f"threads={n}: autoprune {mo:.3f} ms vs benchmark_app {mb:.3f} ms -> {diff:+.2f}% "
              f"({'OK' if abs(diff) <= 5 else 'OUTSIDE'} 5%)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": "resnet18 (weights=None) 1x3x224x224", "onnx": str(onnx),
                                              "results": results}, indent=2))
    return 0 if all(r["within_5pct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
