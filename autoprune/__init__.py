"""autoprune: hardware-aware automated pruning search for PyTorch models.

Finds coupled channel groups (torch-pruning), searches per-group sparsity with Optuna, scores
trials by fine-tuned accuracy and latency measured on the target backend, and exports the
Pareto front as deployable ONNX / OpenVINO models.
"""

__version__ = "0.1.0"

from .api import SearchResult, bench, run, search  # noqa: E402
from .config import ConfigError  # noqa: E402
from .deploy import pick  # noqa: E402

__all__ = ["search", "run", "pick", "bench", "SearchResult", "ConfigError", "__version__"]
