"""Command-line flags that set run-config keys: one table, used by every subcommand that takes them.

Each flag names the key it sets; its help ends with that key and the key's default, read from the
schema (:class:`autoprune.config.RunConfig`), so the help, the docs and the config cannot
disagree, and a flag cannot be forgotten when the options are turned into config overrides
(:func:`run_overrides`). ``--config`` and ``--set`` are the two flags that are not one key.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from autoprune.config import DATA_HELP, RunConfig


@dataclass(frozen=True)
class RunFlag:
    """A flag that sets one run-config key (``None`` when not given: the file's value stays)."""

    flag: str
    #: Dotted run-config key the flag sets.
    key: str
    help: str
    #: Converts the text (None: a string); unused with ``const``.
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[tuple[str, ...]] = None
    #: A switch without a value that sets the key to this.
    const: Any = None

    @property
    def dest(self) -> str:
        """The argparse attribute: the key with dots as double underscores (``search__trials``)."""
        return self.key.replace(".", "__")


#: Every flag that sets a run-config key. ``search`` takes them all; ``groups`` the ones in
#: :data:`GROUPS_FLAGS` (what decides the groups a search would search).
RUN_FLAGS: tuple[RunFlag, ...] = (
    RunFlag("--model", "model", "the model: demo | a torchvision name | package.module:function | a checkpoint .pt"),
    RunFlag("--data", "data", f"the training data: {DATA_HELP}"),
    RunFlag("--search-space", "search_space", "search space: a YAML file or a shipped name (search_spaces/)"),
    RunFlag("--device-profile", "device_profile", "device profile latency is measured on: a YAML file or a shipped name (device_profiles/)"),
    RunFlag("--trials", "search.trials", "complete trials the study ends with", int),
    RunFlag("--out", "out", "run folder (holds the study and artifacts; re-run to resume)"),
    RunFlag("--storage", "search.storage", "Optuna storage URL (e.g. postgresql://...) for several workers"),
    RunFlag("--study-name", "search.study_name", "study name in the storage"),
    RunFlag("--seed", "search.seed", "sampler and fine-tune seed", int),
    RunFlag("--sampler", "search.sampler", "Optuna sampler", choices=("nsga2", "tpe", "random", "gp")),
    RunFlag("--finetune-steps", "finetune.steps", "distilled fine-tune steps per trial", int),
    RunFlag("--pretrain-steps", "pretrain_steps", "train a model without weights for exactly this many steps", int),
    RunFlag("--pretrain-seconds", "pretrain_seconds",
            "train a model without weights for this much wall time instead of --pretrain-steps (not reproducible)", float),
    RunFlag("--image-size", "image_size", "input height and width the data is resized to (digits: 16, ImageFolder: 224)", int),
    RunFlag("--timeout", "search.timeout_s", "stop starting new trials after this many seconds", float),
    RunFlag("--no-sensitivity-scan", "efficiency.sensitivity_scan",
            "skip the per-group sensitivity scan before the trials (one evaluation per group, minutes on large models)",
            const=False),
    RunFlag("--trust-pickle", "trust_pickle",
            "also load full pickles (a --model saved with torch.save(model), or run-folder files an older autoprune wrote); "
            "unpickling runs any code in the file, so only for files you trust", const=True),
)
#: The flags of ``groups``: everything that decides which groups a search searches.
GROUPS_FLAGS = ("--model", "--data", "--search-space", "--device-profile", "--image-size", "--seed", "--trust-pickle")


def _schema_default(key: str) -> Any:
    """The default of a dotted run-config key, from the schema."""
    model: Any = RunConfig
    *heads, last = key.split(".")
    for head in heads:
        model = model.model_fields[head].annotation
    field = model.model_fields[last]
    return field.get_default(call_default_factory=True)


def _help(f: RunFlag) -> str:
    default = _schema_default(f.key)
    shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
    return f"{f.help} (run-config key {f.key}; default {shown})"


def add_config_flags(parser: argparse.ArgumentParser, only: Optional[Sequence[str]] = None) -> None:
    """``--config``, the table's flags (all, or those named in ``only``) and ``--set``."""
    parser.add_argument("--config", help="run config: a YAML file or a shipped name (e.g. digits); the flags below override it")
    for f in RUN_FLAGS:
        if only is not None and f.flag not in only:
            continue
        if f.const is not None:
            parser.add_argument(f.flag, dest=f.dest, action="store_const", const=f.const, default=None, help=_help(f))
        else:
            parser.add_argument(f.flag, dest=f.dest, type=f.type, choices=f.choices, help=_help(f),
                                metavar=None if f.choices else f.flag.removeprefix("--").replace("-", "_").upper())
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="set any run-config key, dotted for sections, value in YAML (repeatable): "
                             "--set efficiency.final_finetune_steps=200 --set search.max_accuracy_drop=0.05")


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config key → value of every table flag the parser defined (None = not given)."""
    return {f.key: getattr(args, f.dest) for f in RUN_FLAGS if hasattr(args, f.dest)}


def load_config(args: argparse.Namespace) -> RunConfig:
    """The run config ``--config``, the table's flags and ``--set`` describe."""
    from autoprune.config import load_run_config, parse_assignments

    return load_run_config(args.config, parse_assignments(args.set), **run_overrides(args))


__all__ = ["GROUPS_FLAGS", "RUN_FLAGS", "RunFlag", "add_config_flags", "load_config", "run_overrides"]
