"""autoprune from Python, notebook style: your own module and datasets in, a pruned model out.

    PYTHONPATH=. python examples/python_api.py            # 12 trials: 8 min on a 2-core machine shared with other jobs
    PYTHONPATH=. python examples/python_api.py --small    # 2 tiny trials, under a minute (tests/e2e/test_python_api.py)

A small CNN is trained for a few seconds on scikit-learn's 8x8 digits (shipped with it: nothing
downloads), then ``autoprune.search`` looks for pruned versions of it that are faster on the
``onnxruntime-cpu`` device profile, ``result.pick`` chooses one under a latency budget, and
``picked.save`` writes its deploy bundle.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import autoprune


def digits_datasets() -> tuple[TensorDataset, TensorDataset]:
    """8x8 digits as (1, 8, 8) float images, 3/4 for training and 1/4 held out."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = len(x) * 3 // 4
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train(model: nn.Module, data: TensorDataset, steps: int) -> None:
    """Your own training loop: autoprune takes the module as trained."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()


def main(small: bool, out: Path) -> autoprune.Picked:
    torch.manual_seed(0)
    train_set, val_set = digits_datasets()
    model = small_cnn()
    train(model, train_set, steps=30 if small else 300)

    result = autoprune.search(
        model,
        train=DataLoader(train_set, batch_size=32),  # a Dataset works too
        val=val_set,
        device_profile="onnxruntime-cpu",
        trials=2 if small else 12,
        out=out / "run",
        # any run-config key, dots for nesting (docs: reference/run-config)
        **{"finetune.steps": 2 if small else 40, "exporter": "torchscript",
           "efficiency.sensitivity_scan": not small, "efficiency.staircases": False},
    )
    for row in result.front:
        print(f"trial {row.trial}: accuracy {row.accuracy:.3f}, {row.latency_ms:.3f} ms, "
              f"{row.speedup or 0:.2f}x faster than the dense model")

    # The fastest front model within 2 points of the best accuracy (a budget that always has a model;
    # pick(max_latency_ms=...) or pick(target="2x") set a latency budget instead).
    best = max(row.accuracy for row in result.front)
    picked = min((result.pick(trial=row.trial) for row in result.front if row.accuracy >= best - 0.02),
                 key=lambda p: p.metrics["latency_ms"])
    print("picked:", picked.metrics)
    with torch.no_grad():
        x, _ = val_set[:8]
        print("predictions:", picked.model(x).argmax(1).tolist())  # a plain nn.Module
    bundle = picked.save(out / "bundle")
    print("deploy bundle:", sorted(p.name for p in bundle.iterdir()))
    return picked


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="two trials of two fine-tune steps (a smoke test)")
    ap.add_argument("--out", type=Path, help="where the run folder and the bundle go (default: a temporary folder)")
    args = ap.parse_args()
    if args.out:
        main(args.small, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(args.small, Path(tmp))
