"""Speed-up of a head- and MLP-pruned ViT on onnxruntime and OpenVINO CPU (1 thread).

    python benchmarks/vit_heads.py [--model vit_b_16] [--size 224] [--heads 0.5] [--mlp 0.5] [--rounds 15]
    python benchmarks/vit_heads.py --small        # CI form: a 2-block ViT at 32 px, 3 rounds

torchvision ViT at random init (no download), pruned with autoprune's plan: ``--heads`` of every
attention module's heads (whole heads, L1) and ``--mlp`` of every MLP hidden width; the
embedding width is kept. Both models are exported to ONNX (and OpenVINO IR) and timed
interleaved (dense, pruned, dense, ...) one inference at a time, single-threaded, so drifts in
machine load hit both alike; prints medians, run counts and the ratio. Accuracy is not the point
here (random weights): the script checks the pruned ONNX output equals PyTorch's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from _common import flat, interleaved, prune, timer
from autoprune.measure.onnx import export_onnx, export_openvino
from autoprune.measure.ov_core import shared_core
from autoprune.prune.structure import find_groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_b_16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--mlp", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    ap.add_argument("--small", action="store_true", help="CI form: a 2-block, 4-head ViT (width 64) at 32 px, 3 rounds")
    args = ap.parse_args()
    if args.small:
        args.model, args.size, args.rounds = "small", 32, 3
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    if args.model == "small":
        dense = torchvision.models.VisionTransformer(image_size=args.size, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                                     mlp_dim=128, num_classes=1000).eval()
    else:
        dense = torchvision.models.get_model(args.model, num_classes=1000, image_size=args.size).eval()
    x = torch.randn(1, 3, args.size, args.size)
    groups = find_groups(dense, x, 1000)
    pruned, widths = prune(dense, x, 1000, lambda g: args.heads if g.kind == "heads" else args.mlp, groups=groups)
    heads = [w for n, w in widths.items() if n.endswith("(heads)")]
    mlp = [w for n, w in widths.items() if n in {g.name for g in groups} and not n.endswith("(heads)")]
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, pruned)]
    print(f"{args.model} @ {args.size}: heads {heads[0][0]}->{heads[0][1]} in {len(heads)} blocks, "
          f"MLP {mlp[0][0]}->{mlp[0][1]} in {len(mlp)} blocks; params {params[0] / 1e6:.1f}M -> {params[1] / 1e6:.1f}M")
    tmp = Path(tempfile.mkdtemp())
    runners = {}
    core = shared_core()
    for name, m in (("dense", dense), ("pruned", pruned)):
        onnx = export_onnx(m, x, tmp / f"{name}.onnx", args.exporter)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
        iname = sess.get_inputs()[0].name
        runners[("onnxruntime", name)] = lambda s=sess, i=iname: s.run(None, {i: x.numpy()})[0]
        compiled = core.compile_model(str(export_openvino(onnx, tmp / f"{name}.xml")), "CPU",
                                      {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
        runners[("openvino", name)] = lambda c=compiled: c({0: x.numpy()})[0]
    with torch.no_grad():
        ref = pruned(x).numpy()
    for backend in ("onnxruntime", "openvino"):
        np.testing.assert_allclose(runners[(backend, "pruned")](), ref, rtol=1e-2, atol=1e-3)
    rounds = interleaved({k: timer(fn) for k, fn in runners.items()}, args.rounds, warmup=1)
    times = {k: [t * 1e3 for t in flat(v)] for k, v in rounds.items()}
    for backend in ("onnxruntime", "openvino"):
        d, p = (statistics.median(times[(backend, n)]) for n in ("dense", "pruned"))
        print(f"{backend:12s} 1 thread: dense {d:.1f} ms, pruned {p:.1f} ms (medians of {args.rounds} interleaved runs) "
              f"-> speed-up {d / p:.2f}x")


if __name__ == "__main__":
    main()
