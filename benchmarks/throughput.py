"""What a trial costs besides its fine-tune, in train-step equivalents, on this machine.

    python benchmarks/throughput.py --model resnet18 --size 64                # 5 trials, 1 thread
    python benchmarks/throughput.py --model mobilenet_v3_small --size 224 --out benchmarks/results/x.json
    python benchmarks/throughput.py --small                                   # CI form (seconds of work)

A generated ImageFolder (noise PNGs in a temporary folder, nothing downloaded) and a torchvision
model without weights (``pretrain_steps: 0``: the timings do not depend on the weights). Every
phase is reported in seconds and in **train-step equivalents**: its seconds divided by the
seconds of one dense training step (forward, backward, SGD step of the dense model on one batch
of ``--batch`` images, same threads), timed interleaved with the phases (before every trial and
between the start-up parts), so machine load hits both sides of the ratio alike. On a machine
shared with other jobs read the ratios, not the seconds.

Phases:

* start-up: ``study/context.py::prepare`` (data, structure analysis, the check that every group
  prunes, the dense model's measurement on the target), without pre-training and without the scan;
* scan per group: the sensitivity scan (one group pruned alone, BN recalibration, scored) and the
  FLOPs-saved count of the seeds, per group (the scan's once-per-run dense reference left out);
* the ONNX slicer's set-up (``measure/onnx_slice.py``: the dense model and two probes translated,
  one probe exported fresh to check the sliced file against), paid once per run by the first
  trial, reported beside start-up;
* per trial: ``prune`` (``build_candidate``: prune, BN recalibration, counts), ``export`` (the
  run's slicer; a fresh dynamo export where it does not apply, ``--no-slicing`` always),
  ``parity`` (the export checked on the profile's runtime), ``latency`` (the backend's session,
  warm-up and timed inferences; the timed inferences are split out as ``timed``), ``finetune``
  (``--steps`` distilled steps) and ``evaluation`` (``score_candidate``: the search subset).

The last line is ``overhead: N.N train-steps per trial``: everything a trial costs but its
fine-tune and its timed inferences.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from autoprune.config import load_run_config
from autoprune.measure import backends
from autoprune.measure.onnx import cpu_fp32, export_onnx
from autoprune.measure.parity import check_export_parity, parity_batch
from autoprune.prune.plan import PruningPlan
from autoprune.study.context import SearchContext, prepare
from autoprune.study.priors import flops_savings, sensitivity_scan
from autoprune.study.trial import build_candidate, finetune_candidate, score_candidate
from autoprune.train.device import batches_to, model_device, training

TRIAL_PHASES = ("prune", "export", "parity", "latency", "finetune", "evaluation")
MODELS = ("resnet18", "mobilenet_v3_small", "resnet50")


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


class StepClock:
    """Times one dense training step (forward, backward, SGD step) on a fixed batch, on a copy of
    the dense model with the run's training setup; every call adds samples, and the median of all
    of them is the unit the phases are divided by."""

    def __init__(self, ctx: SearchContext, batch: int) -> None:
        self.ctx = ctx
        self.model = copy.deepcopy(ctx.base)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        x, y = next(iter(ctx.data.loader("train", batch, shuffle=True, seed=0)))
        dev = model_device(self.model)
        ((self.x, self.y),) = batches_to([(x, y)], dev)
        self.samples: list[float] = []
        self.sample(1, keep=False)  # first step allocates: not a training step's cost

    def sample(self, n: int = 2, keep: bool = True) -> None:
        sync = torch.cuda.synchronize if self.x.is_cuda else (lambda: None)
        with training(self.ctx.train):
            self.model.train()
            for _ in range(n):
                t = time.perf_counter()
                self.opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.model(self.x), self.y).backward()
                self.opt.step()
                sync()
                if keep:
                    self.samples.append(time.perf_counter() - t)

    @property
    def step_s(self) -> float:
        return statistics.median(self.samples)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="autoprune-throughput-") as tmpd:
        tmp = Path(tmpd)
        data = write_image_folder(tmp / "data", args.classes, args.images, args.size)
        overrides = {
            "model": args.model, "data": str(data), "image_size": args.size, "pretrain_steps": 0,
            "device_profile": args.profile, "out": str(tmp / "run"), "exporter": args.exporter,
            "finetune.steps": args.steps, "finetune.batch_size": args.batch, "val_samples": args.val_samples,
            "efficiency.sensitivity_scan": False, "efficiency.multi_fidelity": False,
            "train.device": args.device, "train.threads": args.threads, "train.num_workers": 0,
            "efficiency.onnx_slicing": not args.no_slicing,
        }
        cfg = load_run_config(None, overrides)
        ctx, prepare_s = timed(lambda: prepare(cfg, console=lambda s: None))
        clock = StepClock(ctx, args.batch)
        clock.sample(3)
        # A second start-up in a fresh run folder: the first one paid for imports and first-call
        # set-up, which a search pays once per process, not per run; both are reported.
        cfg2 = load_run_config(None, {**overrides, "out": str(tmp / "run2")})
        _, prepare2_s = timed(lambda: prepare(cfg2, console=lambda s: None))
        clock.sample(3)

        # Sensitivity scan and FLOPs-saved counts on the first --scan-groups groups.
        eff = cfg.efficiency
        scan_groups = [g for g in ctx.groups if g.high > 0][: args.scan_groups]
        calib = ctx.calib[: eff.bn_batches] if eff.bn_recalibration else []
        scan = lambda gs: sensitivity_scan(ctx.base, gs, ctx.data, ctx.example1, calib, eff.sensitivity_ratio,  # noqa: E731
                                           ctx.space.round_unit, setup=ctx.train, task=ctx.task)
        _, ref_s = timed(lambda: scan([]))  # the dense reference, once per scan
        _, scan_s = timed(lambda: scan(scan_groups))
        clock.sample(3)
        _, savings_s = timed(lambda: flops_savings(ctx.base, scan_groups, ctx.example1, ctx.data.num_classes,
                                                   eff.sensitivity_ratio, ctx.space.round_unit, counter=ctx.count_flops))
        clock.sample(3)
        slicer = ctx.onnx_slicer()
        _, slicer_s = timed(lambda: slicer.prepare() if slicer is not None else None)
        clock.sample(3)
        k = max(1, len(scan_groups))
        scan_per_group = {"sensitivity": max(0.0, scan_s - ref_s) / k, "flops_savings": savings_s / k}

        times: dict[str, list[float]] = {p: [] for p in (*TRIAL_PHASES, "timed")}
        units: list[float] = []
        for n in range(args.trials):
            clock.sample(2)
            ratio = 0.1 + 0.5 * n / max(1, args.trials - 1)
            plan = PruningPlan({g.name: min(ratio, g.high) for g in ctx.groups}, round_to=ctx.space.round_unit, widths=ctx.widths)
            cand, t_prune = timed(lambda: build_candidate(ctx, plan, n))
            cpu = cpu_fp32(cand.model)
            onnx = tmp / f"t{n}.onnx"
            _, t_export = timed(lambda: slicer.export(cpu, onnx, ctx.example) if slicer is not None
                                else export_onnx(cpu, ctx.example, onnx, cfg.exporter))
            _, t_parity = timed(lambda: check_export_parity(cpu, backends.ModelArtifact(onnx),
                                                            parity_batch(ctx.example, ctx.calib, ctx.profile.parity_samples),
                                                            ctx.profile, int(ctx.example.shape[0])))
            stats, t_latency = timed(lambda: backends.measure(backends.ModelArtifact(onnx, cpu), ctx.profile, ctx.example.numpy()))
            _, t_ft = timed(lambda: finetune_candidate(ctx, cand.model, n, lambda _acc: False))
            (acc, _), t_eval = timed(lambda: score_candidate(ctx, cand.model, onnx))
            for p, v in zip(TRIAL_PHASES, (t_prune, t_export, t_parity, t_latency, t_ft, t_eval)):
                times[p].append(v)
            times["timed"].append(min(t_latency, stats.n * stats.mean_ms / 1e3))
            units.append(clock.step_s)
            print(f"trial {n}: ratio {ratio:.2f} params {cand.params:,} latency {stats.median_ms:.2f} ms acc {acc:.3f} "
                  + " ".join(f"{p} {times[p][-1]:.2f}s" for p in TRIAL_PHASES), flush=True)
        clock.sample(2)

    step = clock.step_s
    med = {p: statistics.median(v) for p, v in times.items()}
    overhead_s = [sum(times[p][i] for p in TRIAL_PHASES if p != "finetune") - times["timed"][i] for i in range(args.trials)]
    med["overhead"] = statistics.median(overhead_s)
    startup = {"prepare_first": prepare_s, "prepare": prepare2_s, "onnx_slicer_once": slicer_s}
    return {
        "args": vars(args), "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "groups": len(ctx.groups), "scan_groups": len(scan_groups),
        "train_step_s": step, "train_step_samples": clock.samples,
        "startup_s": startup, "startup_steps": {k: v / step for k, v in startup.items()},
        "scan_per_group_s": scan_per_group, "scan_per_group_steps": {k: v / step for k, v in scan_per_group.items()},
        "median_s": med, "median_steps": {k: v / step for k, v in med.items()},
        "overhead_steps": med["overhead"] / step, "runs": times,
        "onnx_slicing": ({"sliced": slicer.stats.sliced, "fresh": slicer.stats.fresh, "off_reason": slicer.reason or None}
                         if slicer is not None else "off (--no-slicing)"),
        "where": (f"train device {ctx.train.device if ctx.train else 'cpu'}, {args.threads} thread(s); latency on "
                  f"{ctx.profile.name} ({ctx.profile.backend}/{ctx.profile.device}); CPU {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"),
    }


def report(res: dict[str, Any]) -> None:
    a, step, steps = res["args"], res["train_step_s"], res["median_steps"]
    print(f"\n{a['model']} at {a['size']} px, {res['groups']} groups; one dense train step (batch {a['batch']}) = {step:.3f} s "
          f"(median of {len(res['train_step_samples'])}, interleaved); median of {a['trials']} trial(s); {res['where']}")
    print(f"  {'phase':<26} {'seconds':>9} {'train-steps':>12}")
    for k, v in res["startup_s"].items():
        print(f"  {'start-up ' + k:<26} {v:9.2f} {res['startup_steps'][k]:12.1f}")
    for k, v in res["scan_per_group_s"].items():
        print(f"  {'scan per group: ' + k:<26} {v:9.2f} {res['scan_per_group_steps'][k]:12.1f}")
    for p in (*TRIAL_PHASES, "timed"):
        label = "  of which timed inferences" if p == "timed" else f"trial: {p}"
        print(f"  {label:<26} {res['median_s'][p]:9.2f} {steps[p]:12.1f}")
    print(f"  ONNX slicing: {res['onnx_slicing']}")
    print(f"overhead: {res['overhead_steps']:.1f} train-steps per trial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=MODELS)
    ap.add_argument("--size", type=int, default=64, choices=(32, 64, 224), help="image size (px); 32 only for --small")
    ap.add_argument("--steps", type=int, default=20, help="fine-tune steps per trial")
    ap.add_argument("--batch", type=int, default=32, help="fine-tune (and train-step unit) batch size")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--scan-groups", type=int, default=4, help="groups the sensitivity scan is timed on")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--images", type=int, default=48, help="images per class (a quarter held out)")
    ap.add_argument("--val-samples", type=int, default=32, help="held-out images trials are scored on")
    ap.add_argument("--threads", type=int, default=1, help="train.threads (the profile sets the runtime's)")
    ap.add_argument("--profile", default="onnxruntime-cpu")
    ap.add_argument("--device", default="cpu", help="train.device")
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    ap.add_argument("--no-slicing", action="store_true", help="export every candidate fresh (efficiency.onnx_slicing: false)")
    ap.add_argument("--small", action="store_true", help="CI form: mobilenet_v3_small at 32 px, 2 trials of 2 steps")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    if args.small:
        args.model, args.size, args.steps, args.batch, args.trials, args.scan_groups = "mobilenet_v3_small", 32, 2, 8, 2, 1
        args.images, args.val_samples = 8, 8
    threads = torch.get_num_threads()
    try:
        res = run(args)
    finally:
        torch.set_num_threads(threads)
    report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
