"""Seconds per trial phase and trials per hour for a real-sized model on this machine.

    python benchmarks/throughput.py                                 # ResNet-50, 224 px, train.device auto
    python benchmarks/throughput.py --image-size 64 --steps 2 --batch 8 --trials 2 --device cpu   # small CPU form
    python benchmarks/throughput.py --device cuda --precision bf16 --channels-last --steps 40 --batch 64

A generated ImageFolder (random noise images written as PNG into a temporary folder, nothing
downloaded) and torchvision's ResNet-50 without weights (``pretrain_steps: 0``: the timings do
not depend on what the weights are). The run is prepared once (``study/context.py::prepare``,
sensitivity scan off); then each trial prunes the dense model uniformly (ratios 0.25, 0.5, ...)
through the search's own steps and times them one by one:

* prune: ``build_candidate`` (copy, dependency graph, channel removal, BN recalibration);
* export: ``export_onnx`` from the CPU fp32 copy;
* latency: the device profile's backend on that file (``--profile``, default onnxruntime-cpu);
* fine-tune: ``--steps`` distilled steps at ``--batch`` on the train device;
* evaluation: held-out accuracy (``--val-images`` images).

Prints the median seconds of each phase over ``--trials`` trials, their share, the trials per
hour they add up to, and which devices gave the numbers. Results vary with machine load; the
medians are over few trials, so treat them as the order of magnitude they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from autoprune.config import load_device_profile, load_run_config
from autoprune.measure import backends
from autoprune.measure.onnx import cpu_fp32, export_onnx
from autoprune.prune.plan import PruningPlan
from autoprune.study.context import prepare
from autoprune.study.trial import build_candidate, finetune_candidate
from autoprune.train.models import evaluate

PHASES = ("prune", "export", "latency", "finetune", "evaluation")


def write_image_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """``classes`` folders of ``per_class`` noise PNGs each (one colour bias per class)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] //= 2
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20, help="fine-tune steps per trial")
    ap.add_argument("--batch", type=int, default=32, help="fine-tune batch size")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--images", type=int, default=64, help="images per class (a quarter held out)")
    ap.add_argument("--profile", default="onnxruntime-cpu")
    ap.add_argument("--device", default="auto", help="train.device")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="autoprune-throughput-") as tmpd:
        tmp = Path(tmpd)
        data = write_image_folder(tmp / "data", args.classes, args.images, args.image_size)
        cfg = load_run_config(None, {
            "model": args.model, "data": str(data), "image_size": args.image_size, "pretrain_steps": 0,
            "device_profile": args.profile, "out": str(tmp / "run"), "exporter": args.exporter,
            "finetune.steps": args.steps, "finetune.batch_size": args.batch,
            "efficiency.sensitivity_scan": False, "efficiency.multi_fidelity": False,
            "train.device": args.device, "train.precision": args.precision, "train.channels_last": args.channels_last,
            "train.num_workers": args.num_workers,
        })
        t0 = time.perf_counter()
        ctx = prepare(cfg, console=print)
        prepare_s = time.perf_counter() - t0
        profile = load_device_profile(args.profile)
        times: dict[str, list[float]] = {p: [] for p in PHASES}
        for n in range(args.trials):
            ratio = min(0.25 * (n + 1), 0.7)
            plan = PruningPlan({g.name: min(ratio, g.high) for g in ctx.groups}, round_to=ctx.space.round_to)
            sync = torch.cuda.synchronize if ctx.train is not None and ctx.train.device.type == "cuda" else (lambda: None)

            t = time.perf_counter()
            cand = build_candidate(ctx, plan, n)
            sync()
            times["prune"].append(time.perf_counter() - t)
            t = time.perf_counter()
            onnx = export_onnx(cand.model, ctx.example, tmp / f"t{n}.onnx", cfg.exporter)
            times["export"].append(time.perf_counter() - t)
            t = time.perf_counter()
            stats = backends.measure(backends.ModelArtifact(onnx, cpu_fp32(cand.model)), profile, ctx.example.numpy())
            times["latency"].append(time.perf_counter() - t)
            t = time.perf_counter()
            finetune_candidate(ctx, cand.model, n, lambda _acc: False)
            sync()
            times["finetune"].append(time.perf_counter() - t)
            t = time.perf_counter()
            acc = evaluate(cand.model, ctx.data, setup=ctx.train)
            times["evaluation"].append(time.perf_counter() - t)
            print(f"trial {n}: ratio {ratio:.2f} params {cand.params:,} latency {stats.median_ms:.2f} ms acc {acc:.3f} "
                  + " ".join(f"{p} {times[p][-1]:.2f}s" for p in PHASES))

    med = {p: statistics.median(v) for p, v in times.items()}
    total = sum(med.values())
    dev = ctx.train.device if ctx.train is not None else "cpu"
    gpu = torch.cuda.get_device_name(dev) if getattr(dev, "type", "") == "cuda" else None
    where = (f"train device {dev}{f' ({gpu})' if gpu else ''}, {args.precision}, {ctx.train.threads if ctx.train else '?'} "
             f"thread(s); latency on {profile.name} ({profile.backend}/{profile.device}); CPU {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores")
    print(f"\n{args.model} at {args.image_size} px, fine-tune {args.steps} steps x batch {args.batch}, "
          f"median of {args.trials} trial(s) ({where}):")
    for p in PHASES:
        print(f"  {p:<11} {med[p]:8.2f} s  {100 * med[p] / total:5.1f} %")
    print(f"  {'trial':<11} {total:8.2f} s  -> {3600 / total:.1f} trials/hour (prepare once: {prepare_s:.1f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": where, "median_s": med, "trial_s": total,
                                              "trials_per_hour": 3600 / total, "prepare_s": prepare_s, "runs": times}, indent=2))


if __name__ == "__main__":
    main()
