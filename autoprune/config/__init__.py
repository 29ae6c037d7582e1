"""Configuration: YAML files → validated pydantic models.

Three kinds of file exist, each in its own folder so users can mix and match:

* search spaces (:mod:`~autoprune.config.search_space`) – which groups may be pruned, ratio
  ranges, per-layer overrides;
* device profiles (:mod:`~autoprune.config.device_profile`) – the target backend, how to
  measure latency, and budgets;
* a run config (:mod:`~autoprune.config.run_config`) – model, data, fine-tune and search
  settings that point at one search space and one device profile.

:mod:`~autoprune.config.loading` reads them (a YAML path or a shipped name) and turns every
mistake into one :class:`~autoprune.errors.ConfigError` line. Importing the config imports
neither torch nor Optuna: ``autoprune --help`` and tools that only read configs stay fast.
"""

from __future__ import annotations

from autoprune.config.base import StrictModel, added, added_defaults, resume, resume_keys
from autoprune.config.device_profile import Budget, DeviceProfile
from autoprune.config.loading import (
    SHIPPED_FOLDERS,
    config_hash,
    load_device_profile,
    load_run_config,
    load_search_space,
    load_yaml,
    parse_assignments,
    resolve_named,
    shipped_dir,
    validate,
)
from autoprune.config.run_config import (
    DATA_HELP,
    DEFAULT_PRETRAIN_SECONDS,
    TRAIN_DEVICE_PATTERN,
    EfficiencyConfig,
    FinetuneConfig,
    RunConfig,
    ScreenSettings,
    SearchSettings,
    TrainConfig,
    parse_target,
)
from autoprune.config.search_space import (
    DEFAULT_ROUND_TO,
    GRANULARITY_HELP,
    Granularity,
    LayerRule,
    SearchSpace,
    parse_granularity,
)

__all__ = [
    "Budget", "DATA_HELP", "DEFAULT_PRETRAIN_SECONDS", "DEFAULT_ROUND_TO", "DeviceProfile", "EfficiencyConfig", "FinetuneConfig",
    "GRANULARITY_HELP", "Granularity", "LayerRule", "RunConfig", "SHIPPED_FOLDERS", "ScreenSettings", "SearchSettings", "SearchSpace",
    "StrictModel", "TRAIN_DEVICE_PATTERN", "TrainConfig", "added", "added_defaults", "config_hash", "load_device_profile",
    "load_run_config", "load_search_space", "load_yaml", "parse_assignments", "parse_granularity", "parse_target",
    "resolve_named", "resume", "resume_keys", "shipped_dir", "validate",
]
