"""autoprune: hardware-aware automated pruning search for PyTorch models.

Finds coupled channel groups (torch-pruning), searches per-group sparsity with Optuna, scores
trials by fine-tuned accuracy and latency measured on the target backend, and exports the
Pareto front as deployable ONNX / OpenVINO models.

The public names below are imported on first use (PEP 562): ``import autoprune`` and
``autoprune --help`` then do not pay for torch, Optuna and the runtimes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_PUBLIC = {
    "search": "autoprune.api",
    "run": "autoprune.api",
    "bench": "autoprune.api",
    "export": "autoprune.api",
    "remeasure": "autoprune.api",
    "SearchResult": "autoprune.api",
    "FrontRow": "autoprune.api",
    "Picked": "autoprune.api",
    "Exported": "autoprune.api",
    "pick": "autoprune.deploy.pick",
    "AutopruneError": "autoprune.errors",
    "ConfigError": "autoprune.errors",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
