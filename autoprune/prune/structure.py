"""Prunable structure: coupled channel groups found by torch-pruning's dependency graph.

A *group* is a set of channels that must be removed together (a conv's filters, the BN after
it, the next conv's input channels, every layer joined to it by a residual add or a concat).
Each group is named after its root module, the first conv/linear whose output channels it
prunes; that name is what search spaces match with glob patterns and what trials record.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from autoprune.config import LayerRule
from autoprune.errors import ConfigError

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class PrunableGroup:
    """One independently prunable set of coupled channels."""

    name: str
    channels: int
    ch_groups: int = 1
    #: Modules whose *output* channels this group removes (convs, BNs, linears); patterns match these.
    members: list[str] = field(default_factory=list)
    #: Modules whose *input* channels follow (the layers that read this group's channels).
    consumers: list[str] = field(default_factory=list)
    #: Search range after applying the space's layer rules (filled by :func:`apply_rules`).
    low: float = 0.0
    high: float = 0.0
    methods: list[str] = field(default_factory=list)


def output_layers(model: nn.Module, num_classes: Optional[int] = None) -> list[nn.Module]:
    """The classifier layer(s): never pruned, or the model would change what it predicts."""
    convlin = [m for m in model.modules() if isinstance(m, ROOT_TYPES)]
    if not convlin:
        return []
    hits = []
    if num_classes is not None:
        hits = [m for m in convlin if (getattr(m, "out_features", None) or getattr(m, "out_channels", None)) == num_classes]
    return hits or [convlin[-1]]


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    model.eval()
    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def channel_groups(DG: tp.DependencyGraph, group: tp.Group) -> int:
    """Grouped convs (not depthwise) force the same removal pattern in each of their groups."""
    g = 1
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups != m.out_channels:
            g = max(g, m.groups)
        elif isinstance(m, nn.GroupNorm):
            g = max(g, m.num_groups)
    return g


def graph_names(DG: tp.DependencyGraph) -> dict[int, str]:
    """Qualified name of every module and parameter of the graph's model, keyed by ``id``.

    Built from ``DG.model`` with ``named_modules``/``named_parameters`` (public torch API)
    instead of torch-pruning's private module-to-name map on the graph. Graph nodes can be modules or
    parameters that no module wraps (e.g. a ViT's ``cls_token``); those get their parameter
    name rather than torch-pruning's ``UnwrappedParameter_<i> (<shape>)``. Keyed by ``id``
    because a tensor cannot be compared with a module as a dict key.
    """
    names = {id(p): n for n, p in DG.model.named_parameters()}
    names.update({id(m): n for n, m in DG.model.named_modules()})
    return names


def iter_groups(DG: tp.DependencyGraph, ignored: Sequence[nn.Module]) -> Iterator[tuple[str, tp.Group]]:
    """Yield (root module name, live tp group). Groups reflect the model's current widths."""
    names = graph_names(DG)
    for group in DG.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        yield names[id(root)], group


def find_groups(model: nn.Module, example: torch.Tensor, num_classes: Optional[int] = None) -> list[PrunableGroup]:
    """List every prunable group of ``model`` (the output layer excluded)."""
    DG = build_graph(model, example)
    out = []
    names = graph_names(DG)
    for name, group in iter_groups(DG, output_layers(model, num_classes)):
        root = group[0].dep.target.module
        members, consumers = set(), set()
        for dep, _ in group:
            mod_name = names.get(id(dep.target.module))
            if mod_name is None:
                continue
            (members if DG.is_out_channel_pruning_fn(dep.handler) else consumers).add(mod_name)
        out.append(
            PrunableGroup(name, int(DG.get_out_channels(root)), channel_groups(DG, group), sorted(members), sorted(consumers - members))
        )
    return out


def apply_rules(groups: list[PrunableGroup], low: float, high: float, methods: list[str], rules: list[LayerRule], source: str = "search space") -> list[PrunableGroup]:
    """Resolve each group's range and method set; first matching rule wins; ``skip`` removes a group.

    A rule matches a group when its glob matches the group's root name or the name of any module
    whose output channels the group removes (not the layers that merely read them).
    A rule that matches nothing is almost always a typo, so it is an error listing the groups.
    """
    used = [False] * len(rules)
    kept = []
    for g in groups:
        g.low, g.high, g.methods = low, high, list(methods)
        skip = False
        first = True
        for i, rule in enumerate(rules):
            if not any(fnmatch.fnmatchcase(n, rule.pattern) for n in [g.name, *g.members]):
                continue
            used[i] = True
            if first:
                first = False
                skip = rule.skip
                g.low = rule.low if rule.low is not None else g.low
                g.high = rule.high if rule.high is not None else g.high
                if g.low > g.high:
                    g.high = g.low
                if rule.methods is not None:
                    g.methods = list(rule.methods)
        if not skip:
            kept.append(g)
    unused = [r.pattern for r, u in zip(rules, used) if not u]
    if unused:
        names = ", ".join(g.name for g in groups)
        raise ConfigError(f"{source}: key 'layers.pattern': {unused} match no prunable group; groups are: {names}")
    return kept
