"""Does our OpenVINO latency agree with OpenVINO's own ``benchmark_app``?

Five models (torchvision, random init, 1x3xPxP, P=64 by default): ResNet-18, ResNet-18 with half of
every prunable group's channels removed by the project's plan machinery (L1, rounded to 8),
MobileNetV2, MobileNetV2 pruned the same way, and ShuffleNetV2 x1.0 (channel shuffle and
split: a different op mix). Each is exported once to ONNX and both tools time that same file with
the same settings: the shipped ``openvino-cpu`` profile with ``threads`` = N on our side,
``benchmark_app -d CPU -hint none -nstreams 1 -nthreads N -nireq 1 -api sync -infer_precision f32``
on theirs (without ``-infer_precision f32`` benchmark_app runs bf16 on CPUs with AMX or
AVX512-BF16, 1.5-2.5x faster than the fp32 we measure). The tools alternate, per model, for
``--rounds`` rounds (load on a shared machine drifts on a scale of seconds); we report each
tool's median over rounds, the % difference, the spread of the per-round differences, the load
average and (the least load-sensitive statistic on a crowded machine) minimum vs minimum, then
one summary line ``worst: N.N% ...``.

``--load N`` runs N competing torch training processes (benchmarks/_load.py) for the whole
comparison, stopped at the end; since the two tools alternate round by round (``--rounds``,
default 3, of ``--seconds`` each), both see the same load.

    python benchmarks/benchmark_app_agreement.py --threads 1 --rounds 3 --seconds 5 --out agreement.json
    python benchmarks/benchmark_app_agreement.py --load 1 --out agreement_load1.json

Exit status 0 when every model was measured; with ``--check`` also 1 when the worst difference
is over ``--tolerance`` (default 3%).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _load import competing_load

MODELS = ["resnet18", "resnet18-pruned", "mobilenet_v2", "mobilenet_v2-pruned", "shufflenet_v2_x1_0"]


def benchmark_app_cmd() -> list[str]:
    """The ``benchmark_app`` console script of the openvino wheel, else its module."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    return [exe] if Path(exe).is_file() else [sys.executable, "-m", "openvino.tools.benchmark.main"]


def benchmark_app_args(onnx: Path, threads: int, seconds: float) -> list[str]:
    """The command line whose settings our ``openvino-cpu`` profile reproduces."""
    return ["-m", str(onnx), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
            "-nireq", "1", "-api", "sync", "-infer_precision", "f32", "-t", str(max(1, round(seconds)))]


def run_benchmark_app(onnx: Path, threads: int, seconds: float) -> dict[str, float]:
    """benchmark_app's median and minimum latency in ms."""
    out = subprocess.run(benchmark_app_cmd() + benchmark_app_args(onnx, threads, seconds),
                         capture_output=True, text=True, check=True).stdout
    got = {}
    for key in ("Median", "Min"):
        m = re.search(key + r":\s+([0-9.]+)\s*(ms|us)\b", out)  # sub-millisecond values are printed in us
        if not m:
            raise RuntimeError(f"could not find '{key}: ... ms|us' in benchmark_app output:\n" + out[-2000:])
        got[key.lower()] = float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0)
    return got


def run_ours(onnx: Path, threads: int, seconds: float, px: int) -> dict[str, Any]:
    """The shipped openvino-cpu profile (threads and time cap overridden), through the same
    :func:`autoprune.measure.backends.measure` a search uses."""
    import numpy as np

    from autoprune.config import load_device_profile
    from autoprune.measure import backends

    prof = load_device_profile("openvino-cpu").model_copy(update={
        "threads": threads, "max_time_s": seconds, "target_rel_ci": 0.005, "repeats": 50, "cache": False, "lut": False})
    x = np.random.default_rng(0).standard_normal((1, 3, px, px)).astype(np.float32)
    return backends.measure(backends.ModelArtifact(onnx), prof, x).to_dict()


def build(name: str, px: int, folder: Path) -> tuple[Path, str]:
    """Export model ``name`` (``-pruned``: half of every group's channels removed) to ONNX;
    returns the file and a one-line description."""
    import torch
    import torchvision

    from _common import prune
    from autoprune.measure.onnx import export_onnx

    base, _, pruned = name.partition("-")
    torch.manual_seed(0)
    model = getattr(torchvision.models, base)(weights=None).eval()
    x = torch.randn(1, 3, px, px)
    params = sum(p.numel() for p in model.parameters())
    desc = f"{base} {params / 1e6:.2f}M params"
    if pruned:
        model, _ = prune(model, x, 1000, 0.5)
        after = sum(p.numel() for p in model.parameters())
        desc = f"{base} pruned 50%/group: {params / 1e6:.2f}M -> {after / 1e6:.2f}M params"
    return export_onnx(model, x, folder / f"{name}.onnx", "torchscript"), desc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--px", type=int, default=64, help="input height and width")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per tool per round")
    ap.add_argument("--tolerance", type=float, default=3.0, help="%% difference reported as OK")
    ap.add_argument("--check", action="store_true", help="exit 1 when the worst difference is over --tolerance")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--load", type=int, default=0, help="competing torch training processes during the comparison")
    args = ap.parse_args()
    with competing_load(args.load):
        return compare(args)


def compare(args: argparse.Namespace) -> int:
    """Both tools on every model, alternating round by round; prints and writes the results."""

    tmp = Path(tempfile.mkdtemp(prefix="ap-agree-"))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {args.load} competing training process(es); "
          f"1x3x{args.px}x{args.px}; "
          f"{args.rounds} rounds x {args.seconds:g} s per tool; benchmark_app "
          + " ".join(benchmark_app_args(Path("MODEL.onnx"), args.threads[0], args.seconds)), flush=True)
    results = []
    for name in args.models:
        onnx, desc = build(name, args.px, tmp)
        for n in args.threads:
            ours, theirs, loads, mins_o, mins_b = [], [], [], [], []
            for r in range(args.rounds):
                loads.append(os.getloadavg()[0])
                # alternate which tool goes first, so neither always runs on a warmer/cooler machine
                if r % 2:
                    b = run_benchmark_app(onnx, n, args.seconds)
                    o = run_ours(onnx, n, args.seconds, args.px)
                else:
                    o = run_ours(onnx, n, args.seconds, args.px)
                    b = run_benchmark_app(onnx, n, args.seconds)
                ours.append(o["median_ms"])
                theirs.append(b["median"])
                mins_o.append(o["min_ms"])
                mins_b.append(b["min"])
                print(f"  {name} threads={n} round {r}: autoprune {o['median_ms']:.3f} ms (min {o['min_ms']:.3f}, n={o['n']}, "
                      f"CV {o['cv']:.3f}) | benchmark_app {b['median']:.3f} ms (min {b['min']:.3f}) | load {loads[-1]:.2f}", flush=True)
            mo, mb = statistics.median(ours), statistics.median(theirs)
            diff = 100.0 * (mo - mb) / mb
            # The minimum over a run is the least load-sensitive statistic on a crowded machine.
            min_o, min_b = min(mins_o), min(mins_b)
            min_diff = 100.0 * (min_o - min_b) / min_b
            per_round = [100.0 * (a - b) / b for a, b in zip(ours, theirs)]
            results.append({"model": name, "description": desc, "threads": n, "autoprune_ms": ours, "benchmark_app_ms": theirs,
                            "autoprune_median_ms": mo, "benchmark_app_median_ms": mb, "diff_pct": diff,
                            "diff_pct_per_round": per_round, "load_avg": loads, "autoprune_min_ms": min_o,
                            "benchmark_app_min_ms": min_b, "min_diff_pct": min_diff})
            print(f"{name} ({desc}) threads={n}: autoprune {mo:.3f} ms vs benchmark_app {mb:.3f} ms -> {diff:+.1f}% "
                  f"(rounds {min(per_round):+.1f}..{max(per_round):+.1f}%, load {min(loads):.1f}-{max(loads):.1f}; "
                  f"min {min_o:.3f} vs {min_b:.3f} ms -> {min_diff:+.1f}%) "
                  f"{'OK' if abs(diff) <= args.tolerance else 'OUTSIDE'}", flush=True)
    worst = max(results, key=lambda r: abs(r["diff_pct"]))
    worst_min = max(abs(r["min_diff_pct"]) for r in results)
    summary = (f"worst: {abs(worst['diff_pct']):.1f}% ({worst['model']}, threads={worst['threads']}) over {len(results)} "
               f"model/thread settings; median |diff| {statistics.median(abs(r['diff_pct']) for r in results):.1f}%; "
               f"worst min-vs-min {worst_min:.1f}%; "
               f"load average {min(min(r['load_avg']) for r in results):.1f}-{max(max(r['load_avg']) for r in results):.1f} "
               f"on {os.cpu_count()} CPUs; {args.load} competing training process(es)")
    print(summary)
    if args.out:
        Path(args.out).write_text(json.dumps({"px": args.px, "rounds": args.rounds, "seconds": args.seconds, "load": args.load,
                                              "cpus": os.cpu_count(), "results": results, "summary": summary}, indent=2))
    return 1 if args.check and abs(worst["diff_pct"]) > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
