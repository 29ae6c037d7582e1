"""Shared fixtures: tiny device profile, tiny search run (built once per session)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

#: The repository root, for tests in any subfolder (tests/<package>/test_*.py).
ROOT = Path(__file__).resolve().parents[1]

FAST_PROFILE = {
    "name": "ort-fast",
    "backend": "onnxruntime",
    "device": "cpu",
    "threads": 1,
    "warmup": 1,
    "repeats": 5,
    "target_rel_ci": None,
    "batch_size": 1,
}


#: Run-config keys that skip the per-group sensitivity scan: tests about faults, workers or
#: exports, where the scan would cost more than the trials under test.
FAST_EXTRAS = {"efficiency": {"sensitivity_scan": False}}


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the shared tiny run (without per-trial files) for tests that write into it."""
    import shutil

    dest = tmp_path_factory.mktemp("runcopy") / "run"
    shutil.copytree(tiny_run.out, dest, ignore=shutil.ignore_patterns("trials"))
    return dest


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def fast_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_yaml(tmp_path_factory.mktemp("profiles") / "ort-fast.yaml", FAST_PROFILE)


def tiny_run_config(out: Path, profile: Path, trials: int = 4, **extra) -> dict:
    cfg = {
        "model": "demo",
        "data": "digits",
        "pretrain_steps": 60,
        "device_profile": str(profile),
        "out": str(out),
        "exporter": "torchscript",
        "finetune": {"steps": 3, "batch_size": 32},
        "search": {"trials": trials, "seed": 0},
        # the scan costs a few seconds per run folder; the shared tiny_run exercises it
        "efficiency": {"sensitivity_scan": False},
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, fast_profile: Path):
    """A finished 4-trial search on digits; tests only read it."""
    import autoprune
    from autoprune.config import load_run_config

    root = tmp_path_factory.mktemp("run")
    cfg_path = write_yaml(root / "run.yaml", tiny_run_config(root / "out", fast_profile, efficiency={"final_finetune_steps": 2, "sensitivity_scan": True}))
    result = autoprune.run(load_run_config(str(cfg_path)))
    return result


def sigint_as_from_a_terminal() -> None:
    """``preexec_fn`` for a child a test sends Ctrl-C to: SIGINT at its default disposition, as a
    shell in a terminal starts a command. A suite started in the background (``cmd &`` in a
    script) inherits SIGINT ignored, Python keeps an ignored SIGINT, and the test's Ctrl-C would
    then be ignored rather than tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def still_running(procs: list) -> list:
    """The ``psutil.Process`` es of ``procs`` that have not exited. A zombie has exited: reaping
    an orphan is init's job, and a container's init may not do it."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


#: A model module whose auxiliary head runs only in train mode (``build``): search and groups refuse it.
AUX_MODEL_SOURCE = (
    "import torch.nn as nn\n"
    "class AuxNet(nn.Module):\n"
    "    def __init__(self, num_classes=10):\n"
    "        super().__init__()\n"
    "        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())\n"
    "        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))\n"
    "        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
    "    def forward(self, x):\n"
    "        f = self.body(x)\n"
    "        return (self.head(f), self.aux(f)) if self.training else self.head(f)\n"
    "def build(num_classes=10):\n"
    "    return AuxNet(num_classes)\n"
)
