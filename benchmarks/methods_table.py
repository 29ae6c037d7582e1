"""Measure what each pruning granularity buys on CPU backends, and how criteria compare.

Part 1 — granularity × backend (criterion fixed to l1: speed does not depend on who ranked):
for the demo model (1×16×16) and ResNet-18 (random weights, 3×64×64) it exports dense,
structured, unstructured, N:M and hybrid variants to ONNX and OpenVINO IR and times them
*interleaved* (round-robin over variants, ``--rounds`` rounds of ``--runs`` runs each, 1 thread,
batch 1, OpenVINO sync + 1 stream + f32), reporting the median of the per-round medians, the
speed-up vs. dense measured in the same run, and the gzip size of the ONNX file.

Part 2 — criterion × granularity on the demo model trained on digits (``--pretrain-s``):
held-out accuracy right after pruning and after a short distilled fine-tune (zeros held).

    python benchmarks/methods_table.py                 # writes benchmarks/results/methods_table.{json,md}
    python benchmarks/methods_table.py --quick         # smoke run, a few seconds of timing
    python benchmarks/methods_table.py --small --out /tmp/mt   # CI form: demo model, l1 only (tests/benchmarks/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from _common import interleaved, prune, timer
from autoprune.config import FinetuneConfig
from autoprune.measure.onnx import export_onnx, export_openvino
from autoprune.prune import methods
from autoprune.train.data import load_data
from autoprune.train.finetune import finetune
from autoprune.train.models import DemoResNet, count_params, evaluate, pretrain

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {},
    "structured 50% ch": {"granularity": "structured", "ratio": 0.5},
    "unstructured 50% w": {"granularity": "unstructured", "ratio": 0.5},
    "unstructured 90% w": {"granularity": "unstructured", "ratio": 0.9},
    "nm 2:4": {"granularity": "nm:2:4", "ratio": 0.0},
    "hybrid 50% ch + 50% w": {"granularity": "hybrid", "ratio": 0.5, "wratio": 0.5},
}


def pruned(model: nn.Module, x: torch.Tensor, classes: int, spec: dict[str, Any], method: str = "l1",
           calib: Any = None) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """A copy of ``model`` pruned as a :data:`VARIANTS` entry says (unchanged for "dense")."""
    if not spec:
        return copy.deepcopy(model).eval(), {}
    return prune(model, x, classes, spec.get("ratio", 0.0), method=method, granularity=spec.get("granularity", "structured"),
                 weight_ratio=spec.get("wratio", 0.0), calib=calib)


def _ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda a: sess.run(None, {name: a})


def _ov_request(xml: Path):
    from autoprune.measure.ov_core import shared_core

    cfg = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    req = shared_core().compile_model(str(xml), "CPU", cfg).create_infer_request()
    return lambda a: req.infer([a])


def bench_granularities(name: str, model: nn.Module, x: torch.Tensor, classes: int, rounds: int, runs: int, tmp: Path,
                        variants: Optional[list[str]] = None) -> list[dict[str, Any]]:
    rows, runners = [], {}
    for label in ["dense"] + [v for v in (variants or VARIANTS) if v != "dense"]:  # dense first: the speed-ups' base
        spec = VARIANTS[label]
        m, widths = pruned(model.eval(), x, classes, spec)
        d = tmp / name / label.replace(" ", "_").replace("%", "").replace(":", "")
        onnx_path = export_onnx(m, x, d / "model.onnx", exporter="torchscript")
        xml = export_openvino(onnx_path, d / "model.xml")
        raw = onnx_path.read_bytes()
        rows.append({
            "model": name, "variant": label, "params": count_params(m),
            "nonzero_params": int(sum(int(torch.count_nonzero(p)) for p in m.parameters())),
            "weight_sparsity": methods.weight_sparsity(m), "onnx_bytes": len(raw),
            "onnx_gzip_bytes": len(gzip.compress(raw, compresslevel=6)),
            "channels_kept": sum(a for _, a in widths.values()) if widths else None,
        })
        runners[label] = {"onnxruntime": _ort_session(onnx_path), "openvino": _ov_request(xml)}
    a = x.numpy()
    samples = interleaved({(label, b): timer(f, a) for label, fns in runners.items() for b, f in fns.items()}, rounds, runs, warmup=5)
    times = {k: [statistics.median(r) * 1e3 for r in v] for k, v in samples.items()}  # per-round medians
    best = {k: min(min(r) for r in v) * 1e3 for k, v in samples.items()}
    for row in rows:
        for backend in ("onnxruntime", "openvino"):
            med = statistics.median(times[(row["variant"], backend)])
            dense = statistics.median(times[("dense", backend)])
            row[f"{backend}_ms"] = med
            row[f"{backend}_speedup"] = dense / med
            # min over all runs: the least contention-sensitive estimate on a shared machine
            row[f"{backend}_min_ms"] = best[(row["variant"], backend)]
            row[f"{backend}_min_speedup"] = best[("dense", backend)] / best[(row["variant"], backend)]
    dense_gz = rows[0]["onnx_gzip_bytes"]
    for row in rows:
        row["gzip_ratio_vs_dense"] = row["onnx_gzip_bytes"] / dense_gz
    return rows


def bench_criteria(pretrain_s: float, ft_steps: int, seed: int = 0, criteria: Optional[list[str]] = None) -> tuple[float, list[dict[str, Any]]]:
    torch.manual_seed(seed)
    data = load_data("digits", None, 0.25, seed)
    base = DemoResNet(num_classes=data.num_classes, in_channels=data.input_shape[0])
    pretrain(base, data, pretrain_s, seed=seed)
    base.eval()
    dense_acc = evaluate(base, data)
    x = data.example_input(1)
    calib = [b for _, b in zip(range(4), data.loader("train", 64, shuffle=True, seed=seed))]
    specs = {"structured 50% ch": VARIANTS["structured 50% ch"], "unstructured 70% w": {"granularity": "unstructured", "ratio": 0.7},
             "nm 2:4": VARIANTS["nm 2:4"]}
    rows = []
    for method in criteria or methods.available():
        for label, spec in specs.items():
            t0 = time.perf_counter()
            m, _ = pruned(base, x, data.num_classes, spec, method, calib)
            prune_s = time.perf_counter() - t0
            acc0 = evaluate(m, data)
            with methods.hold_zeros(m):
                finetune(m, data, FinetuneConfig(steps=ft_steps, batch_size=64), teacher=base, seed=seed)
            rows.append({"method": method, "granularity": label, "prune_s": prune_s, "acc_pruned": acc0, "acc_finetuned": evaluate(m, data)})
    return dense_acc, rows


def to_markdown(res: dict[str, Any]) -> str:
    out = [f"Measured by `{res['command']}` on {res['machine']} ({res['date']}); "
           f"{res['rounds']} interleaved rounds × {res['runs']} runs, 1 thread, batch 1; ms = median of round medians, "
           "speed-up vs dense from medians (in brackets: from the minimum over all runs).", ""]
    out.append("| model | variant | weight sparsity | params (non-zero) | ORT ms | ORT speed-up | OpenVINO ms | OV speed-up | ONNX gzip | gzip vs dense |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["granularity"]:
        out.append(
            f"| {r['model']} | {r['variant']} | {r['weight_sparsity']:.2f} | {r['params']:,} ({r['nonzero_params']:,}) | "
            f"{r['onnxruntime_ms']:.3f} | {r['onnxruntime_speedup']:.2f}× ({r['onnxruntime_min_speedup']:.2f}×) | "
            f"{r['openvino_ms']:.3f} | {r['openvino_speedup']:.2f}× ({r['openvino_min_speedup']:.2f}×) | "
            f"{r['onnx_gzip_bytes'] / 1e6:.2f} MB | {r['gzip_ratio_vs_dense']:.2f} |"
        )
    out += ["", f"Criteria on the digits demo model (dense accuracy {res['dense_acc']:.3f}; accuracy right after pruning → after "
            f"{res['ft_steps']} distilled fine-tune steps):", ""]
    grans = list(dict.fromkeys(r["granularity"] for r in res["criteria"]))
    out.append("| criterion | " + " | ".join(grans) + " | prune time (s, structured) |")
    out.append("|---|" + "---|" * (len(grans) + 1))
    for method in dict.fromkeys(r["method"] for r in res["criteria"]):
        cells = {r["granularity"]: r for r in res["criteria"] if r["method"] == method}
        out.append(f"| {method} | " + " | ".join(f"{cells[g]['acc_pruned']:.3f} → {cells[g]['acc_finetuned']:.3f}" for g in grans)
                   + f" | {cells[grans[0]]['prune_s']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pretrain-s", type=float, default=20.0)
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--resnet-size", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=["demo", "resnet18"], choices=["demo", "resnet18"], help="part 1's models")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="part 1's variants (default: all; dense always)")
    ap.add_argument("--criteria", nargs="+", choices=methods.available(), help="part 2's criteria (default: all registered)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    ap.add_argument("--small", action="store_true",
                    help="CI form: --quick on the demo model, dense/structured/hybrid, the l1 criterion only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods_table"))
    args = ap.parse_args(argv)
    if args.quick or args.small:
        args.rounds, args.runs, args.pretrain_s, args.ft_steps = 2, 3, 2.0, 2
    if args.small:
        args.models, args.criteria, args.pretrain_s = ["demo"], ["l1"], 1.0
        args.variants = ["dense", "structured 50% ch", "hybrid 50% ch + 50% w"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: Optional[list[str]]) -> int:
    torch.manual_seed(0)
    res: dict[str, Any] = {
        "command": "python benchmarks/methods_table.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "runs": args.runs, "ft_steps": args.ft_steps,
    }
    with tempfile.TemporaryDirectory() as td:
        rows = []
        if "demo" in args.models:
            rows += bench_granularities("demo", DemoResNet().eval(), torch.randn(1, 1, 16, 16), 10, args.rounds, args.runs, Path(td),
                                        args.variants)
        if "resnet18" in args.models:
            import torchvision

            rn = torchvision.models.resnet18(weights=None, num_classes=10).eval()
            s = args.resnet_size
            rows += bench_granularities(f"resnet18@{s}", rn, torch.randn(1, 3, s, s), 10, args.rounds, args.runs, Path(td),
                                        args.variants)
    res["granularity"] = rows
    res["dense_acc"], res["criteria"] = bench_criteria(args.pretrain_s, args.ft_steps, criteria=args.criteria)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
