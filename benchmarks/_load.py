"""Competing load for the latency benchmarks (``--load N``): N torch training processes that run
for the whole measurement and are stopped at the end.

A search measures on the machine it trains on (``--workers N``, data loading beside a GPU run),
so the latency figures that matter are the ones taken while something trains next to them. Each
process trains a small CNN on random images in a loop, one intra-op thread (a worker of a
``--workers`` search pins one thread per core the same way). They are separate processes, not
threads, so they compete for cores the way another job does and are stopped by their PID.

    with competing_load(2):
        ...  # measure
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Iterator

#: The training loop one load process runs until it is terminated.
TRAIN_LOOP = """
import torch, torch.nn as nn
torch.set_num_threads({threads})
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
print("ready", flush=True)
while True:
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
"""


@contextlib.contextmanager
def competing_load(n: int, threads: int = 1) -> Iterator[list[int]]:
    """Run ``n`` training processes for the duration of the block (yields their PIDs); each has
    taken its first step before the block starts, and all are terminated (killed after 10 s)
    and reaped when it ends, also on an exception or Ctrl-C."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", TRAIN_LOOP.format(threads=threads)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": str(threads)}))
        for p in procs:
            if p.stdout is not None and p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"load process {p.pid} did not start (exit status {p.poll()})")
        time.sleep(0.5 if n else 0.0)  # let the first training steps run before anything is timed
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
