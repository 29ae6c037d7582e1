"""Does the search beat what an engineer does by hand? autoprune vs uniform sweep vs random search.

Same model, data, device profile and fine-tune for all; one dense model, trained before any timed
run and copied into each run folder:

* ``autoprune``:   the defaults (NSGA-II, uniform + sensitivity-allocated seeds, sensitivity-shaped
  ranges, BN recalibration, multi-fidelity, duplicate skipping), ``--trials`` trials, and the
  hypervolume window as ``search.max_accuracy_drop``;
* ``random``:      random sampler over the same [0, 0.9] box, same trial count, no efficiency features;
* ``random-wall``: (``--equal-wall``) the same, for as long as autoprune took (as many trials as fit);
* ``uniform``:     one L1 ratio for every group, 0.1 … 0.9 (9 trials).

Latency noise across runs made minutes apart would dominate sub-millisecond models, so at the end
every front model and the dense model are **re-measured interleaved in one loop** (round-robin,
medians), and hypervolume and speed-ups use those numbers.

Hypervolume is computed by Optuna (``optuna._hypervolume.compute_hypervolume``) on
(1 − accuracy, latency / dense latency) with reference point (1 − (dense accuracy − 0.10), 1.0):
it rewards models within 10 accuracy points of the dense model that are faster than it.
``hypervolume_2x`` uses latency reference 0.5 (only models ≥ 2× faster): a view of where methods
differ, not the goal metric. Speed-up at equal accuracy: the best dense/latency ratio among front
models whose accuracy is within 1 point of the dense model.

    python benchmarks/search_vs_baselines.py --small --equal-wall   # what CI runs (tests/test_benchmarks.py)
    python benchmarks/search_vs_baselines.py --trials 30 --equal-wall --out runs/bench-digits-final
    python benchmarks/search_vs_baselines.py --model resnet18 --data digits-cluttered --pretrain-steps 1500 \
        --trials 40 --equal-wall --out runs/bench-r18c-final
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprune.api import run  # noqa: E402
from autoprune.config import load_device_profile, load_run_config  # noqa: E402
from autoprune.measure.backends import ModelArtifact, get  # noqa: E402


def hypervolume(points: list[tuple[float, float]], dense_acc: float, acc_window: float = 0.10, lat_ref: float = 1.0) -> float:
    """HV of (accuracy ↑, latency ratio ↓) points against (dense acc − window, ratio ``lat_ref``)."""
    from optuna._hypervolume import compute_hypervolume

    ref = np.array([1.0 - (dense_acc - acc_window), lat_ref])
    loss = np.array([[1.0 - a, r] for a, r in points if 1.0 - a < ref[0] and r < ref[1]])
    if len(loss) == 0:
        return 0.0
    return float(compute_hypervolume(loss, ref))


def speedup_at_equal_accuracy(points: list[tuple[float, float]], dense_acc: float, tol: float = 0.01) -> float:
    ok = [1.0 / r for a, r in points if a >= dense_acc - tol]
    return max(ok) if ok else 0.0


def remeasure_interleaved(onnx_files: dict[str, Path], profile_ref: str, rounds: int = 15, per_round: int = 20) -> dict[str, float]:
    """Median latency of each file, sampled round-robin so machine noise hits all alike."""
    import time as _t

    profile = load_device_profile(profile_ref)
    backend = get(profile.backend)
    runners, inputs = {}, {}
    for key, path in onnx_files.items():
        import onnx

        dims = [d.dim_value or 1 for d in onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim]
        inputs[key] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
        runners[key] = backend.load(ModelArtifact(path), profile)
        for _ in range(profile.warmup):
            runners[key](inputs[key])
    samples: dict[str, list[float]] = {k: [] for k in onnx_files}
    for _ in range(rounds):
        for key in onnx_files:
            r, x = runners[key], inputs[key]
            for _ in range(per_round):
                t0 = _t.perf_counter()
                r(x)
                samples[key].append(_t.perf_counter() - t0)
    return {k: float(np.median(v)) * 1000 for k, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--device-profile", default="onnxruntime-cpu")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sampler", default="nsga2", choices=["nsga2", "tpe", "gp", "random"], help="autoprune's sampler")
    ap.add_argument("--seed-spread", type=float, default=0.3, help="autoprune's search_space.seed_spread")
    ap.add_argument("--equal-wall", action="store_true",
                    help="also run random search for as long as autoprune took (as many trials as fit)")
    ap.add_argument("--accuracy-window", type=float, default=0.10,
                    help="hypervolume counts models within this accuracy of dense; autoprune gets it as search.max_accuracy_drop")
    ap.add_argument("--search-seed", type=int, default=0,
                    help="sampler / fine-tune seed of every method (repeat runs with others for a spread); the data split stays data_seed 0")
    ap.add_argument("--methods", default="autoprune,random,uniform", help="comma-separated subset to run (pilots)")
    ap.add_argument("--out", default="runs/bench-search")
    ap.add_argument("--small", action="store_true", help="tiny CI version: 6 trials, 3 uniform ratios, 4 fine-tune steps")
    ap.add_argument("--json", default=None, help="write results here (default: <out>/results.json)")
    args = ap.parse_args()

    trials, ft, pre = args.trials, args.finetune_steps, args.pretrain_steps
    uniform = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    exporter = "dynamo"
    seed_levels = [0.2, 0.4, 0.6, 0.8]  # autoprune's seeds: each level uniform + sensitivity-allocated
    if args.small:
        trials, ft, pre, uniform, exporter = 6, 4, 60, [0.25, 0.5, 0.75], "torchscript"
        seed_levels = [0.3, 0.7]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = dict(model=args.model, data=args.data, image_size=args.image_size, device_profile=args.device_profile,
                  pretrain_steps=pre, exporter=exporter, **{"finetune.steps": ft, "search.seed": args.search_seed})

    # One dense model for everyone: train it once in the first run folder, copy to the others.
    variants: dict[str, dict[str, Any]] = {
        "autoprune": {"search.trials": trials, "search.sampler": args.sampler, "search.max_accuracy_drop": args.accuracy_window},
        "random": {"search.trials": trials, "search.sampler": "random",
                   "efficiency.bn_recalibration": False, "efficiency.sensitivity_scan": False, "efficiency.multi_fidelity": False},
        "uniform": {"search.trials": len(uniform), "search.sampler": "random",
                    "efficiency.bn_recalibration": False, "efficiency.sensitivity_scan": False, "efficiency.multi_fidelity": False},
    }
    # All three search the same box: every group's ratio in [0, 0.9] (the uniform sweep's range).
    import yaml

    from autoprune.config import SearchSpace

    out.mkdir(parents=True, exist_ok=True)
    spaces = {
        "autoprune": SearchSpace(name="bench", high=0.9, step=0.05, seed_uniform=seed_levels, seed_spread=args.seed_spread),
        "random": SearchSpace(name="bench-random", high=0.9, step=0.05, seed_uniform=[], seed_spread=0),
        "uniform": SearchSpace(name="bench-uniform", high=0.9, step=0.05, seed_uniform=uniform, seed_spread=0),
    }
    # One dense model for everyone, trained (and measured) before any timed run, so no method's
    # wall time includes training it.
    from autoprune.study.context import prepare

    dense_dir = out / "dense-model"
    t0 = time.perf_counter()
    prepare(load_run_config(None, out=str(dense_dir), **common, **{"efficiency.sensitivity_scan": False}), console=print)
    print(f"[dense] trained and measured in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.equal_wall:
        variants["random-wall"] = {**variants["random"]}  # same wall time as autoprune (set below)
        spaces["random-wall"] = spaces["random"]
    wanted = set(args.methods.split(",")) | ({"random-wall"} if args.equal_wall else set())
    variants = {k: v for k, v in variants.items() if k in wanted}
    results: dict[str, Any] = {}
    for name, extra in variants.items():
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(dense_dir / "base_model.pt", run_dir / "base_model.pt")
        if name == "random-wall":
            # As many random trials as fit in autoprune's wall time (the last may overrun a little).
            extra = {**extra, "search.trials": 100_000, "search.timeout_s": max(1.0, results["autoprune"]["wall_s"] - results["random"]["prep_s"])}
        # uniform: every trial is an enqueued uniform ratio, exactly the hand-made sweep.
        space_path = out / f"space_{name}.yaml"
        space_path.write_text(yaml.safe_dump(spaces[name].model_dump(mode="json")))
        extra = {**extra, "search_space": str(space_path)}
        cfg = load_run_config(None, out=str(run_dir), **common, **{k: v for k, v in extra.items() if v is not None})
        t0 = time.perf_counter()
        res = run(cfg)
        wall = time.perf_counter() - t0
        trial_s = [t.user_attrs.get("trial_s", 0.0) for t in res.study.trials if t.state.name == "COMPLETE"]
        results[name] = {"wall_s": wall, "trials": len(trial_s), "trial_s_sum": sum(trial_s), "prep_s": wall - sum(trial_s),
                         "dense": res.dense, "pareto": res.pareto, "dir": str(run_dir)}
        print(f"[{name}] {len(res.pareto)} Pareto models, {len(trial_s)} trials, wall {wall:.0f}s", flush=True)

    # Re-measure every front model + dense side by side.
    first = next(iter(results.values()))
    files = {"dense": Path(first["dir"]) / "dense" / "model.onnx"}
    for name, r in results.items():
        for row in r["pareto"]:
            if row.get("artifacts"):
                files[f"{name}:{row['trial']}"] = Path(r["dir"]) / row["artifacts"] / "model.onnx"
    lat = remeasure_interleaved(files, args.device_profile)
    dense_lat = lat["dense"]
    dense_acc = first["dense"]["accuracy"]
    summary = {}
    for name, r in results.items():
        pts = [(row["accuracy"], lat[f"{name}:{row['trial']}"] / dense_lat) for row in r["pareto"] if f"{name}:{row['trial']}" in lat]
        summary[name] = {
            "hypervolume": hypervolume(pts, dense_acc, args.accuracy_window),
            # Secondary view, not the goal metric: only models at least 2x faster than dense.
            # Most of the main HV is a region every method covers (slow, accurate models).
            "hypervolume_2x": hypervolume(pts, dense_acc, args.accuracy_window, lat_ref=0.5),
            "speedup_at_equal_accuracy": speedup_at_equal_accuracy(pts, dense_acc),
            "front": [{"accuracy": a, "latency_ratio": x} for a, x in sorted(pts, key=lambda p: p[1])],
            "wall_s": r["wall_s"],
            "trials": r["trials"],
            "trial_s_sum": r["trial_s_sum"],
        }
    hv = {k: v["hypervolume"] for k, v in summary.items()}
    def over(a: str, b: str) -> float:
        if a not in hv or b not in hv:
            return float("nan")  # a pilot that ran a subset of the methods
        return hv[a] / hv[b] if hv[b] else float("inf")

    ratios = {
        "hv_autoprune_over_random": over("autoprune", "random"),
        **({"hv_autoprune_over_random_equal_wall": over("autoprune", "random-wall")} if "random-wall" in hv else {}),
        "hv_autoprune_over_uniform": over("autoprune", "uniform"),
        "speedup_autoprune_minus_uniform": (summary["autoprune"]["speedup_at_equal_accuracy"] - summary["uniform"]["speedup_at_equal_accuracy"])
        if {"autoprune", "uniform"} <= set(summary) else float("nan"),
    }
    report = {"dense_accuracy": dense_acc, "dense_latency_ms": dense_lat, "profile": args.device_profile, "model": args.model,
              "small": args.small, "summary": summary, "ratios": ratios}
    path = Path(args.json) if args.json else out / "results.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"dense: acc {dense_acc:.4f}, latency {dense_lat:.3f} ms (re-measured)")
    print(f"{'method':<12} {'trials':>6} {'wall s':>7} {'HV':>8} {'HV(>=2x)':>9} {'speed-up@acc-1pt':>17}")
    for name, s in summary.items():
        print(f"{name:<12} {s['trials']:>6} {s['wall_s']:>7.0f} {s['hypervolume']:>8.4f} {s['hypervolume_2x']:>9.4f} {s['speedup_at_equal_accuracy']:>16.2f}x")
    print("ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
