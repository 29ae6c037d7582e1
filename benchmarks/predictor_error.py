"""How well does the latency predictor (autoprune/measure/predictor.py) predict held-out candidates?

For each backend, model (torchvision, weights=None) and input size: prune the model with random
per-group ratios (the default search space's grid, 0-0.7 in steps of 0.05, widths rounded to 8,
through prune/plan.py), measure every candidate on the profile, calibrate the predictor on the
dense model + the first ``--calib`` candidates exactly as a search would, and score it on the
next ``--test`` candidates, which it never saw.

Every candidate is measured as a search measures it: :func:`autoprune.measure.backends.measure`
with the dense model as reference, timed interleaved in rounds until the ratio's 95 % interval
is within ±2 % or the profile's time cap (measure/stats.py: ``time_pair``). The predictor learns
and is scored on those ratios to dense (the dense model itself: 1), so load cancels; ms in the
output are ratio × D, D the dense model's quiet estimate timed alone at the start. The first
``--repeat`` held-out candidates are measured a second time, and the spread of the two ratios is
printed beside the predictor error ("noise"): a predictor cannot look better than the
measurements it is scored against. ``--clock`` sets the profile's clock (default cpu: the
process's CPU time, see DeviceProfile.clock). ``--load N`` runs N competing torch training processes
(benchmarks/_load.py) for the whole measurement.

Prints one line per configuration and, last, ``within10: N%`` — the worst configuration's share
of held-out candidates predicted within ±10 %.

    python benchmarks/predictor_error.py                      # 2 backends x 2 models x 2 sizes
    python benchmarks/predictor_error.py --small              # seconds: CI form (tests/benchmarks/test_benchmarks.py)
    python benchmarks/predictor_error.py --load 1             # with one competing training process
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from _load import competing_load

from _common import prune
from autoprune.config import load_device_profile
from autoprune.measure import backends
from autoprune.measure.onnx import ModelArtifact, export_onnx
from autoprune.measure.predictor import (
    FEATURE_SETS,
    Fit,
    LatencyPredictor,
    model_features,
)
from autoprune.prune.structure import find_groups

GRID = [round(0.05 * i, 2) for i in range(15)]  # default search space: low 0, high 0.7, step 0.05


def candidates(base: torch.nn.Module, x: torch.Tensor, n: int, seed: int, num_classes: int) -> list[torch.nn.Module]:
    """``n`` pruned copies of ``base`` with random per-group ratios, as the search draws them."""
    rnd = random.Random(seed)
    groups = find_groups(base, x, num_classes)
    return [prune(base, x, num_classes, lambda _g: rnd.choice(GRID), groups=groups)[0] for _ in range(n)]


def measure_ratio(model: torch.nn.Module, x: torch.Tensor, prof: Any, dense: ModelArtifact, tmp: Path) -> Any:
    """The candidate's stats from one interleaved session with the dense model (ratio, interval,
    noisy flag): exactly what a search records for a trial."""
    p = export_onnx(model, x, tmp / "cand.onnx", "torchscript")
    return backends.measure(ModelArtifact(p, model), prof, x.numpy(), reference=dense)


def pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q) * 100) if a.size else float("nan")


def run_config(profile: str, model_name: str, base: torch.nn.Module, x: torch.Tensor, cands: list[torch.nn.Module],
               args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``cands`` on ``profile``, calibrate on the first ``args.calib``, score the rest."""
    prof = load_device_profile(profile).model_copy(update={
        "threads": 1, "warmup": 3, "repeats": args.repeats, "max_time_s": args.max_time, "target_rel_ci": 0.02,
        "clock": args.clock})
    size = int(x.shape[-1])
    with tempfile.TemporaryDirectory(prefix="ap-pred-") as d:
        tmp = Path(d)
        dense = ModelArtifact(export_onnx(base, x, tmp / "dense.onnx", "torchscript"), base)
        t0 = time.perf_counter()
        D = float(backends.measure(dense, prof, x.numpy()).quiet_ms)  # the dense model's quiet estimate
        stats = [measure_ratio(m, x, prof, dense, tmp) for m in cands]
        again = [measure_ratio(m, x, prof, dense, tmp) for m in cands[args.calib:args.calib + args.repeat]]
        t_measure = time.perf_counter() - t0
    ratios = [float(s.ratio) for s in stats]
    feats = [model_features(m, x) for m in cands]

    pred = LatencyPredictor(Path(tempfile.mkdtemp(prefix="ap-pred-")) / "p.json", prof)
    pred.add(model_features(base, x), 1.0)  # the dense model first, as prepare() measures it
    for f, r in zip(feats[:args.calib], ratios[:args.calib]):
        pred.add(f, r)
    test_f, test_r = feats[args.calib:], np.array(ratios[args.calib:])
    held = pred.held_out()
    p = np.array([pred.predict(f) for f in test_f]) if pred.ready else np.full(len(test_f), np.nan)
    err = np.abs(p - test_r) / test_r
    # each feature set forced, on the same split: the choice is made by measurement
    per_set = {}
    for fs in FEATURE_SETS:
        fit = Fit(fs, pred.points)
        e = np.abs(np.array([fit(f) for f in test_f]) - test_r) / test_r
        per_set[fs] = {"within10_pct": float((e <= 0.10).mean() * 100), "median_abs_pct": pct(e, 50)}
    first = np.array(ratios[args.calib:args.calib + len(again)])
    second = np.array([float(s.ratio) for s in again])
    noise = np.abs(first - second) / ((first + second) / 2)
    rel_ci = np.array([s.ratio_rel_ci if s.ratio_rel_ci is not None else np.inf for s in stats + again])
    return {"profile": profile, "model": model_name, "size": size, "dense_ms": D, "calib_points": len(pred.points),
            "test": len(test_r), "feature_set": held.get("feature_set"),
            "within10_pct": float((err <= 0.10).mean() * 100), "median_abs_pct": pct(err, 50), "p90_abs_pct": pct(err, 90),
            "loo": held, "margin": pred.margin(), "per_feature_set": per_set,
            "noise": {"n": int(noise.size), "median_pct": pct(noise, 50), "p90_pct": pct(noise, 90),
                      "within10_pct": float((noise <= 0.10).mean() * 100) if noise.size else float("nan")},
            "ratio_ci": {"median_rel_pct": pct(rel_ci, 50), "noisy": int(sum(bool(s.noisy) for s in stats + again)),
                         "measurements": len(stats) + len(again), "median_rounds": float(np.median([s.rounds for s in stats + again]))},
            "measured_range_ms": [float(D * test_r.min()), float(D * test_r.max())], "measure_s": t_measure, "clock": args.clock,
            "raw_median_ms": [float(s.median_ms) for s in stats], "dense_median_ms_in_session": [float(s.reference_median_ms) for s in stats],
            "points": {"features": [model_features(base, x)] + feats, "ratio": [1.0] + ratios}}  # dense first: offline analysis


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="onnxruntime-cpu,openvino-cpu")
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--calib", type=int, default=10, help="pruned candidates that calibrate (plus the dense model)")
    ap.add_argument("--test", type=int, default=10, help="held-out candidates that score")
    ap.add_argument("--repeat", type=int, default=5, help="held-out candidates measured twice (noise)")
    ap.add_argument("--repeats", type=int, default=10, help="fewest inferences of each model per measurement")
    ap.add_argument("--max-time", type=float, default=3.0, help="time cap of one measurement (s): rounds stop there if the "
                    "ratio's interval is not yet within +-2%%")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="the profile's clock: cpu (process CPU time of each 1-thread inference: what time slicing on an "
                    "oversubscribed machine cannot inflate) or wall")
    ap.add_argument("--load", type=int, default=0, help="competing torch training processes during the measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="CI: onnxruntime, ResNet-18 at 32 px, 8 + 4 candidates")
    ap.add_argument("--out", help="write all figures as JSON here")
    args = ap.parse_args()
    if args.small:
        args.profiles, args.models, args.sizes = "onnxruntime-cpu", "resnet18", "32"
        args.calib, args.test, args.repeat, args.repeats, args.max_time = 8, 4, 2, 10, 1.0

    t0 = time.perf_counter()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {args.load} competing training process(es)")
    print(f"{'profile':16} {'model':13} {'px':>4} {'dense ms':>8} {'set':>10} {'within10':>8} {'median':>7} {'p90':>7}"
          f" {'LOO p90':>7} {'noise med':>9} {'noise p90':>9} {'noise w10':>9} {'CI med':>6} {'noisy':>5}")
    with competing_load(args.load):
        rows = measure_all(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "wall_s": time.perf_counter() - t0,
                                              "load_avg_end": os.getloadavg()[0]}, indent=1))
    print(f"wall: {time.perf_counter() - t0:.0f} s; held-out = candidates not used to calibrate; noise = spread of two "
          "measurements of the same candidate's ratio, |a-b|/mean; CI med = median half-width of the ratios' 95% intervals; "
          "noisy = measurements the time cap stopped before +-2%")
    print(f"within10: {min(r['within10_pct'] for r in rows):.0f}%")
    return 0


def measure_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration, one printed line each."""
    rows = []
    for model_name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            torch.manual_seed(args.seed)
            base = getattr(torchvision.models, model_name)(weights=None, num_classes=1000).eval()
            x = torch.randn(1, 3, size, size)
            cands = candidates(base, x, args.calib + args.test, args.seed, 1000)  # the same candidates on every backend
            for profile in args.profiles.split(","):
                r = run_config(profile, model_name, base, x, cands, args)
                rows.append(r)
                print(f"{profile:16} {model_name:13} {size:4d} {r['dense_ms']:8.2f} {str(r['feature_set']):>10} "
                      f"{r['within10_pct']:7.0f}% {r['median_abs_pct']:6.1f}% {r['p90_abs_pct']:6.1f}% "
                      f"{r['loo'].get('p90_abs_pct', float('nan')):6.1f}% {r['noise']['median_pct']:8.1f}% "
                      f"{r['noise']['p90_pct']:8.1f}% {r['noise']['within10_pct']:8.0f}% "
                      f"{r['ratio_ci']['median_rel_pct']:5.1f}% {r['ratio_ci']['noisy']:2d}/{r['ratio_ci']['measurements']:<2d}",
                      flush=True)
                if args.out:  # after every row: a long run stopped early keeps what it measured
                    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "partial": True}, indent=1))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
