"""Search spaces: which groups may be pruned, by how much, with which criteria and granularities.

``low``/``high`` bound the fraction of channels removed from every prunable group; ``layers``
refines that per group with glob patterns on module names. Criterion names are checked against
the registry's names (:meth:`autoprune.registry.Registry.names`) and granularities are parsed
here, so a search space validates without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from autoprune.config.base import StrictModel, added
from autoprune.registry import METHODS

GRANULARITY_RE = re.compile(r"^(structured|unstructured|hybrid|nm:(\d+):(\d+))$")
GRANULARITY_HELP = "structured | unstructured | hybrid | nm:N:M (0 < N < M, e.g. nm:2:4)"


@dataclass(frozen=True)
class Granularity:
    """Parsed granularity string (``autoprune.prune.methods.granularity`` applies it)."""

    kind: str  # structured | unstructured | hybrid | nm
    n: int = 0
    m: int = 0

    @property
    def removes_channels(self) -> bool:
        return self.kind in ("structured", "hybrid")

    @property
    def zeros_weights(self) -> bool:
        return self.kind in ("unstructured", "hybrid", "nm")

    def __str__(self) -> str:
        return f"nm:{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_granularity(text: str) -> Granularity:
    """``'nm:2:4'`` → Granularity('nm', 2, 4); raises ValueError naming the allowed values."""
    mt = GRANULARITY_RE.match(str(text).strip())
    if not mt:
        raise ValueError(f"unknown granularity {text!r}; allowed: {GRANULARITY_HELP}")
    if mt.group(2):
        n, m = int(mt.group(2)), int(mt.group(3))
        if not 0 < n < m:
            raise ValueError(f"granularity {text!r}: need 0 < N < M; allowed: {GRANULARITY_HELP}")
        return Granularity("nm", n, m)
    return Granularity(mt.group(1))


class LayerRule(StrictModel):
    """Override for groups whose root module name matches ``pattern`` (fnmatch glob)."""

    #: fnmatch glob on a group's root module name or any of its member names (first matching rule wins;
    #: a pattern matching no group is an error).
    pattern: str
    #: Leave matching groups unpruned.
    skip: bool = False
    #: Lower bound of matching groups' ratio (null = the search space's ``low``).
    low: Optional[float] = None
    #: Upper bound of matching groups' ratio (null = the search space's ``high``).
    high: Optional[float] = None
    #: Pruning criteria allowed for matching groups (null = the search space's ``methods``).
    methods: Optional[list[str]] = None
    #: Granularities allowed for matching groups (see SearchSpace.granularities).
    granularities: Optional[list[str]] = None

    @model_validator(mode="after")
    def _range(self) -> "LayerRule":
        _check_range(self.low, self.high)
        _check_methods(self.methods, self.granularities)
        return self


def _check_methods(methods: Optional[list[str]], granularities: Optional[list[str]]) -> None:
    """Unknown criterion or granularity names fail at load time with the allowed values."""

    for m in methods or []:
        if m not in METHODS.names():
            raise ValueError(f"methods: unknown pruning method {m!r}; allowed: {', '.join(METHODS.names())}")
    if methods is not None and not methods:
        raise ValueError(f"methods: empty list; allowed: {', '.join(METHODS.names())}")
    for g in granularities or []:
        parse_granularity(g)
    if granularities is not None and not granularities:
        raise ValueError(f"granularities: empty list; allowed: {GRANULARITY_HELP}")


def _check_range(low: Optional[float], high: Optional[float]) -> None:
    for name, v in (("low", low), ("high", high)):
        if v is not None and not (0.0 <= v < 1.0):
            raise ValueError(f"{name}={v} is outside [0, 1): a ratio is the fraction of channels removed")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low={low} is greater than high={high}")



#: Kept widths are multiples of this with ``round_to: auto`` when no staircases were measured:
#: odd channel counts can be slower than the dense model on vectorised kernels.
DEFAULT_ROUND_TO = 8


class SearchSpace(StrictModel):
    """Per-group sparsity search space.

    ``low``/``high`` bound the fraction of output channels removed from every prunable group;
    ``layers`` refines that per group with glob patterns on module names (first match wins).
    """

    #: Name shown in logs and stored with the study.
    name: str = "default"
    #: Smallest fraction of a group's channels removed (``ratio/<group>`` lower bound), in [0, 1).
    low: float = 0.0
    #: Largest fraction of a group's channels removed, in [0, 1).
    high: float = 0.7
    #: Ratio grid step (null = continuous ratios).
    step: Optional[float] = 0.05
    #: Kept widths are a multiple of this many channels (an integer: exactly that, as always), or
    #: ``auto``/null: the widths learned from latency staircases (``efficiency.staircases: true``,
    #: measure/staircase.py), falling back to DEFAULT_ROUND_TO when staircases are off.
    round_to: Optional[int] = Field(None, ge=1, description="keep a multiple of this many channels; auto/null = learned")
    #: Pruning criteria (importance) to search: l1, l2, random, taylor, grad_norm, hessian, act_mean,
    #: apoz, bn_scale.
    methods: list[str] = Field(default_factory=lambda: ["l1"])
    #: One criterion for the whole model per trial (true) or one per group, ``method/<group>`` (false).
    global_method: bool = True
    #: What a group's ratio removes: structured (channels, physically) | unstructured (weights
    #: zeroed) | nm:N:M | hybrid (channels, then weights). Sampled like methods.
    granularities: list[str] = Field(default_factory=lambda: ["structured"])
    #: One granularity for the whole model per trial (true) or one per group (false).
    global_granularity: bool = True
    #: hybrid: range of ``wratio/<group>``, the fraction of the remaining weights zeroed.
    weight_low: float = 0.0
    #: Upper end of the ``wratio/<group>`` range (hybrid granularity).
    weight_high: float = 0.8
    #: bn_scale: L1 penalty on BN scales for bn_l1_steps steps before ranking (network slimming).
    bn_l1: float = Field(0.0, ge=0)
    #: Steps of the BN-scale L1 fine-tune (bn_scale criterion with bn_l1 > 0).
    bn_l1_steps: int = Field(20, ge=0)
    #: oneshot | iterative (all groups, ratio·k/steps per round) | layerwise (groups in chunks);
    #: rounds are separated by fine-tunes of finetune.steps // schedule_steps steps.
    schedule: Literal["oneshot", "iterative", "layerwise"] = "oneshot"
    #: Rounds of an iterative or layerwise schedule.
    schedule_steps: int = Field(1, ge=1)
    layers: list[LayerRule] = Field(default_factory=list)
    #: Also search a transformer's embedding width (the model width every block, attention and
    #: residual add shares): one group that touches every layer, so off unless asked for.
    embedding: bool = Field(False, json_schema_extra=added(False))
    #: Uniform ratios enqueued as first trials: cheap, strong seeds for the sampler.
    seed_uniform: list[float] = Field(default_factory=lambda: [0.25, 0.5])
    #: With the sensitivity scan on, each uniform seed also gets a non-uniform twin around the
    #: same level: groups that lose least accuracy per FLOP saved pruned up to ``seed_spread``/2
    #: more, the dearest ones that much less (efficiency.allocate_ratios). 0 = uniform seeds only.
    seed_spread: float = Field(0.3, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _auto_round_to(cls, data: Any) -> Any:
        """``round_to: auto`` is spelled null internally (one value for "learned")."""
        if isinstance(data, dict) and isinstance(data.get("round_to"), str) and data["round_to"].strip().lower() == "auto":
            return {**data, "round_to": None}
        return data

    @property
    def round_unit(self) -> int:
        """The rounding unit wherever no learned widths apply: ``round_to``, or 8 for auto."""
        return self.round_to or DEFAULT_ROUND_TO

    @model_validator(mode="after")
    def _range(self) -> "SearchSpace":
        _check_range(self.low, self.high)
        for r in self.seed_uniform:
            _check_range(r, None)
        if self.step is not None and not (0 < self.step < 1):
            raise ValueError(f"step={self.step} must be in (0, 1) or null")
        _check_range(self.weight_low, self.weight_high)
        _check_methods(self.methods, self.granularities)
        return self



__all__ = ["DEFAULT_ROUND_TO", "GRANULARITY_HELP", "GRANULARITY_RE", "Granularity", "LayerRule", "SearchSpace", "parse_granularity"]
