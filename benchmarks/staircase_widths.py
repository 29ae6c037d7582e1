"""What do staircase-aware kept widths buy over ``round_to: 8`` and ``round_to: 1``?

For each model (torchvision, random init, 10 classes) and backend (1 thread): measure the latency
staircase of every prunable group (measure/staircase.py, one export per width shared by the
backends), derive the allowed widths, then prune the model three ways to (as close as
achievable) the same MACs: a uniform ratio for every group, kept widths snapped to the learned
widths / rounded to multiples of 8 / rounded to 1 channel. The uniform ratio of each variant is
found by bisection on its MACs. All variants and the dense model are then timed interleaved
(each a median of paired ratios to dense, :func:`autoprune.measure.staircase.time_ratios`), the
whole round repeated ``--rounds`` times; medians over rounds are printed as ratios.

    python benchmarks/staircase_widths.py --models resnet18 mobilenet_v2 --size 64 --rounds 5
    python benchmarks/staircase_widths.py --small --out /tmp/s.json     # CI form (tests/benchmarks/test_benchmarks.py)

Ratios, not milliseconds: on a shared machine only interleaved ratios are worth quoting.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision

from autoprune.config import load_device_profile
from autoprune.measure.onnx import export_onnx
from autoprune.measure.staircase import (
    export_widths,
    learned_widths,
    probe_widths,
    time_ratios,
)
from autoprune.prune.plan import kept_channels, slice_to_widths
from autoprune.prune.structure import PrunableGroup, find_groups


def macs(model: nn.Module, x: torch.Tensor) -> float:
    """Conv/linear multiply-accumulates of one forward (fast hooks; what pruning changes)."""
    total = [0.0]

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hs:
            h.remove()
    return total[0]


def build(name: str) -> nn.Module:
    """A torchvision model (random init, 10 classes), or ``tiny``: two conv layers and a linear
    one (two prunable groups; the CI form)."""
    if name == "tiny":
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                             nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    return getattr(torchvision.models, name)(weights=None, num_classes=10).eval()


def widths_for(groups: list[PrunableGroup], ratio: float, round_to: int, allowed: Optional[dict[str, list[int]]]) -> dict[str, tuple[int, int]]:
    return {g.name: (g.channels, kept_channels(g.channels, ratio, round_to, g.ch_groups, (allowed or {}).get(g.name)))
            for g in groups}


def pruned(base: nn.Module, x: torch.Tensor, widths: dict[str, tuple[int, int]]) -> nn.Module:
    m = copy.deepcopy(base)
    slice_to_widths(m, x, widths, 10)
    return m


def at_macs(base: nn.Module, x: torch.Tensor, groups: list[PrunableGroup], target: float, round_to: int,
            allowed: Optional[dict[str, list[int]]], high: float) -> tuple[float, dict[str, tuple[int, int]], float]:
    """(ratio, widths, MACs fraction) of the uniform ratio whose pruned MACs are closest to ``target``."""
    dense = macs(base, x)
    cache: dict[tuple[int, ...], float] = {}

    def frac(r: float) -> tuple[float, dict[str, tuple[int, int]]]:
        w = widths_for(groups, r, round_to, allowed)
        key = tuple(v[1] for v in w.values())
        if key not in cache:
            cache[key] = macs(pruned(base, x, w), x) / dense
        return cache[key], w

    lo, hi = 0.0, high
    best = (9.0, 0.0, {}, 1.0)
    for _ in range(10):
        mid = (lo + hi) / 2
        f, w = frac(mid)
        if abs(f - target) < best[0]:
            best = (abs(f - target), mid, w, f)
        lo, hi = (mid, hi) if f > target else (lo, mid)
    return best[1], best[2], best[3]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"], help="torchvision names, or tiny")
    ap.add_argument("--profiles", nargs="+", default=["onnxruntime-cpu", "openvino-cpu"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5], help="MACs fractions of dense to compare at")
    ap.add_argument("--widths", type=int, default=6, help="widths probed per group (staircase)")
    ap.add_argument("--high", type=float, default=0.7, help="largest ratio searched (the default space's high)")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write all numbers as JSON here")
    ap.add_argument("--small", action="store_true", help="CI form: the tiny model at 32 px on onnxruntime, 3 widths per group, 1 round")
    args = ap.parse_args()
    if args.small:
        args.models, args.profiles, args.size, args.widths, args.rounds = ["tiny"], ["onnxruntime-cpu"], 32, 3, 1

    torch.manual_seed(0)
    profiles = [load_device_profile(p).model_copy(update={"threads": 1}) for p in args.profiles]
    report: dict[str, Any] = {"args": vars(args), "models": {}}
    for name in args.models:
        base = build(name)
        x = torch.randn(1, 3, args.size, args.size)
        groups = find_groups(base, x, 10)
        for g in groups:
            g.high = args.high
        todo = {g.name: (g.channels, [w for w in probe_widths(g.channels, g.high, g.ch_groups, args.widths) if w < g.channels])
                for g in groups}
        with tempfile.TemporaryDirectory(prefix="ap-stair-bench-") as d:
            t0 = time.perf_counter()
            files = export_widths(base, x, 10, todo, Path(d), "torchscript")
            t_export = time.perf_counter() - t0
            print(f"{name}: {len(groups)} groups, {len(files) - 1} staircase widths exported in {t_export:.0f} s")
            per_model: dict[str, Any] = {"groups": len(groups), "staircase_widths": len(files) - 1, "export_s": t_export}
            for prof in profiles:
                t0 = time.perf_counter()
                ratios = time_ratios(files, prof, x.numpy())
                t_time = time.perf_counter() - t0
                stairs: dict[str, dict[int, float]] = {g.name: {} for g in groups}
                for (gname, w), r in ratios.items():
                    stairs[gname][w] = r
                allowed = learned_widths(stairs, groups, args.tolerance)
                odd = [r for (gname, w), r in ratios.items() if w == dict(todo)[gname][1][0] and w % 2]
                print(f"  {prof.name}: staircases timed in {t_time:.0f} s; allowed widths per group "
                      f"{np.mean([len(v) for v in allowed.values()]):.1f} (of {np.mean([len(v[1]) + 1 for v in todo.values()]):.1f} probed); "
                      f"odd width just below full: median latency {np.median(odd) if odd else float('nan'):.3f}x dense")
                rows = []
                for target in args.targets:
                    variants = {
                        "staircase": at_macs(base, x, groups, target, 8, allowed, args.high),
                        "round_to 8": at_macs(base, x, groups, target, 8, None, args.high),
                        "round_to 1": at_macs(base, x, groups, target, 1, None, args.high),
                    }
                    vfiles = {("", 0): files[("", 0)]}
                    for i, (vname, (_, w, _)) in enumerate(variants.items()):
                        vfiles[(vname, 0)] = export_onnx(pruned(base, x, w), x, Path(d) / f"v{i}.onnx", "torchscript")
                    samples: dict[str, list[float]] = {v: [] for v in variants}
                    for _ in range(args.rounds):
                        for (vname, _), r in time_ratios(vfiles, prof, x.numpy()).items():
                            samples[vname].append(r)
                    med = {v: float(np.median(s)) for v, s in samples.items()}
                    for v, (r, w, f) in variants.items():
                        rows.append({"target_macs": target, "variant": v, "ratio": r, "macs_frac": f, "latency_vs_dense": med[v],
                                     "widths": {k: list(x) for k, x in w.items()},
                                     "vs_round_to_8": med[v] / med["round_to 8"], "samples": samples[v]})
                        print(f"    MACs {f:.3f} (target {target}) {v:11s} uniform ratio {r:.3f}: latency {med[v]:.3f}x dense, "
                              f"{med[v] / med['round_to 8']:.3f}x round_to 8 (median of {args.rounds} rounds)")
                per_model[prof.name] = {"staircases": {k: {str(w): r for w, r in v.items()} for k, v in stairs.items()},
                                        "allowed": allowed, "timing_s": t_time, "rows": rows}
        report["models"][name] = per_model
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
