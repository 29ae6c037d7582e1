"""Minimal inference with this autoprune bundle, with onnxruntime and with OpenVINO.

Needs only numpy plus the runtime you deploy on (``pip install onnxruntime`` or
``pip install openvino``); autoprune itself is not imported.

    python infer_example.py              # a random input through both runtimes: top-1 and agreement
    python infer_example.py batch.npy    # your own float32 inputs, shape (N, *model_card input shape[1:])
    python infer_example.py --help       # every option (one runtime only, OpenVINO device, bundle folder)

In your code::

    from infer_example import load_onnxruntime, predict
    run = load_onnxruntime("path/to/bundle")
    logits = predict(run, images, batch_size=card()["input"]["shape"][0])

The card's accuracy is on the search's held-out split. To check it, rebuild that split with
autoprune (inference never needs it) from the card's ``evaluation`` keys, ``ev = card()["evaluation"]``:
``autoprune.train.data.load_data(ev["data"], ev["image_size"], ev["val_fraction"], seed=ev["data_seed"]).val``.
The split follows ``data_seed``, not the search seed, which would mix training images into it.

PyTorch: ``model.pt`` is weights-only (a state dict plus the recipe that rebuilds the module; it
never runs pickled code) and loads with autoprune, ``autoprune.train.checkpoint.load_model("model.pt")``
(``card()["rebuild"]``); ``model.pt2``, where written, loads without it: ``torch.export.load("model.pt2").module()``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
Runner = Callable[[np.ndarray], np.ndarray]


def card(bundle: str | Path = HERE) -> dict:
    """The model card: accuracy, latency per device profile, input shape, files, provenance."""
    return json.loads((Path(bundle) / "model_card.json").read_text())


def load_onnxruntime(bundle: str | Path = HERE, providers: list[str] | None = None) -> Runner:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(bundle) / "model.onnx"), providers=providers or ["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def load_openvino(bundle: str | Path = HERE, device: str = "CPU", precision: str | None = "f32") -> Runner:
    """``precision="f32"`` reproduces the card's accuracy; ``None`` keeps OpenVINO's default,
    which is bf16 on CPUs that support it (faster, but logits differ by ~1e-2)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision} if precision and device.upper().startswith("CPU") else {}
    compiled = ov.Core().compile_model(str(Path(bundle) / "model.xml"), device, config)
    out = compiled.output(0)
    return lambda x: compiled(np.ascontiguousarray(x, dtype=np.float32))[out]


def predict(run: Runner, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits for any number of inputs: the exported batch axis is static, so split into
    batches of ``batch_size`` and zero-pad the last one."""
    outs = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(run(chunk)[:n])
    return np.concatenate(outs)


def parse_args(argv: list[str]) -> "argparse.Namespace":
    import argparse

    p = argparse.ArgumentParser(
        prog="infer_example.py",
        description="Run this autoprune bundle's model with onnxruntime and OpenVINO: top-1 per input, "
                    "and how far the two runtimes' logits are apart.",
        epilog="The batch axis is static (the card's input shape); inputs are split into batches of that size. "
               "Needs numpy and onnxruntime and/or openvino; autoprune itself is not needed.")
    p.add_argument("inputs", nargs="?", metavar="INPUTS.npy",
                   help="float32 inputs, shape (N, *input shape[1:]) from model_card.json (default: one random batch)")
    p.add_argument("--runtime", choices=("both", "onnxruntime", "openvino"), default="both",
                   help="which runtime(s) to run (default: both, and compare them)")
    p.add_argument("--device", default="CPU", help="OpenVINO device (default CPU)")
    p.add_argument("--bundle", default=str(HERE), help="bundle folder (default: the folder of this script)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    info = card(args.bundle)
    shape = info["input"]["shape"]
    if args.inputs:
        path = Path(args.inputs)
        if not path.is_file():
            print(f"error: {path}: no such file; pass a .npy file of float32 inputs, shape (N, {', '.join(map(str, shape[1:]))})",
                  file=sys.stderr)
            return 2
        x = np.load(path).astype(np.float32)
    else:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    loaders = {"onnxruntime": lambda: load_onnxruntime(args.bundle),
               "openvino": lambda: load_openvino(args.bundle, args.device)}
    if args.runtime != "both":
        loaders = {args.runtime: loaders[args.runtime]}
    results = {}
    for name, loader in loaders.items():
        try:
            results[name] = predict(loader(), x, shape[0])
        except ImportError as exc:
            print(f"{name}: not installed ({exc}); pip install {name}")
    for name, logits in results.items():
        if logits.ndim > 2:  # dense predictions (segmentation): a class per pixel
            mask = logits.argmax(1)
            counts = dict(zip(*(v.tolist() for v in np.unique(mask[0], return_counts=True))))
            print(f"{name}: class mask {list(mask.shape)}; pixels per class in image 0: {counts}")
        else:
            print(f"{name}: top-1 {logits.argmax(1).tolist()}")
    if len(results) == 2:
        a, b = results.values()
        print(f"max |onnxruntime - openvino| = {float(np.abs(a - b).max()):.2e}")
    print(f"trial {info['trial']}: {info.get('metric_name', 'accuracy')} {info['accuracy']:.4f}, params {info['params']:,}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
