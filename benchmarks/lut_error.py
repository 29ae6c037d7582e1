"""How well does the per-layer lookup table (autoprune/lut.py) predict measured latency?

Prunes torchvision ResNet-18 (weights=None) with random per-group ratios, predicts each
candidate's latency from the LUT (calibrated on the dense model only, then refined online as the
search would), measures it on the profile, and prints the prediction error and LUT cost.

    python benchmarks/lut_error.py --size 112 --candidates 8 --profile onnxruntime-cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from autoprune.config import load_device_profile
from autoprune.measure.candidate import measure_model
from autoprune.runfolder import RunFolder
from autoprune.measure.lut import LatencyLUT
from autoprune.prune.plan import PruningPlan, apply_plan
from autoprune.prune.structure import find_groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--profile", default="onnxruntime-cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()

    prof = load_device_profile(args.profile).model_copy(update={"cache": False, "lut": True})
    run = Path(tempfile.mkdtemp(prefix="ap-lut-"))
    torch.manual_seed(args.seed)
    rnd = random.Random(args.seed)
    base = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    groups = find_groups(base, x, 10)
    t0 = time.perf_counter()
    rf = RunFolder(run)
    dense = measure_model(base, x, prof, rf.dense_onnx, "torchscript", run=rf)
    t_dense = time.perf_counter() - t0
    rows = []
    for i in range(args.candidates):
        ratios = {g.name: rnd.choice([0.0, 0.25, 0.5, 0.75]) for g in groups}
        m = copy.deepcopy(base)
        apply_plan(m, x, PruningPlan(ratios, round_to=8), 10)
        t0 = time.perf_counter()
        r = measure_model(m, x, prof, rf.trial(i).onnx, "torchscript", run=rf)
        rows.append({"predicted_ms": r["lut_predicted_ms"], "measured_ms": r["latency"]["median_ms"],
                     "error_pct": 100 * (r["lut_predicted_ms"] - r["latency"]["median_ms"]) / r["latency"]["median_ms"],
                     "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    lut = LatencyLUT.for_run(rf, prof)
    summary = {"profile": prof.name, "input": list(x.shape), "dense_ms": dense["latency"]["median_ms"],
               "dense_wall_s_incl_lut_build": t_dense, "lut_entries": len(lut.table), "error": lut.error(),
               "candidates": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "candidates"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
