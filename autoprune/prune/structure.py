"""Prunable structure: coupled channel groups found by torch-pruning's dependency graph.

A *group* is a set of channels that must be removed together (a conv's filters, the BN after
it, the next conv's input channels, every layer joined to it by a residual add or a concat).
Each channel group is named after its root module, the first conv/linear whose output channels
it prunes; that name is what search spaces match with glob patterns and what trials record.
Transformers add ``<attention module> (heads)`` groups (whole heads, ``prune/attention.py``) and
one ``<first member> (embedding)`` group for the width every block shares (searched only when
the space asks). :func:`analyse` never raises on a construct torch-pruning cannot trace: that
part is left unpruned with the reason; :func:`probe_structure` bounds its memory and time.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import multiprocessing
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

from autoprune.config import LayerRule
from autoprune.errors import ConfigError
from autoprune.prune.attention import CUSTOM_PRUNERS, HEAD_TYPES, SlimAttention, num_heads

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
    #: ``channels`` | ``embedding`` (a transformer's model width) | ``heads`` (whole attention heads).
    kind: str = "channels"


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
    # torch-pruning traces the autograd graph: under a caller's torch.no_grad() (loading a model
    # file in an inference block) it would find no groups at all.
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, customized_pruners=dict(CUSTOM_PRUNERS))


def _channel_groups(DG: tp.DependencyGraph, group: tp.Group) -> int:
    """The unit a group's width must stay a multiple of, and the number of blocks that drop the
    same pattern: grouped convs (not depthwise), GroupNorm, and ``nn.MultiheadAttention``
    (its embedding width must stay divisible by ``num_heads``)."""
    g = 1
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups != m.out_channels:
            g = math.lcm(g, m.groups)
        elif isinstance(m, nn.GroupNorm):
            g = math.lcm(g, m.num_groups)
        elif isinstance(m, nn.MultiheadAttention):
            g = math.lcm(g, m.num_heads)
    return g


def _graph_names(DG: tp.DependencyGraph) -> dict[int, str]:
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
    names = _graph_names(DG)
    for group in DG.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        yield names[id(root)], group


# --------------------------------------------------------------------------- the live structure
@dataclass
class LiveGroup:
    """A group as it is on the model right now, with what prunes it.

    ``kind``: ``channels`` (a torch-pruning group), ``embedding`` (a torch-pruning group that
    holds a transformer's embedding width: every block's attention and residual stream; searched
    only when the search space says ``embedding: true``), or ``heads`` (the whole heads of one
    attention module, pruned by :mod:`autoprune.prune.attention`; ``group``/``DG`` are None).
    """

    name: str
    kind: str
    channels: int
    ch_groups: int
    module: str  # qualified name of the root (channels) or attention module (heads)
    DG: Optional[tp.DependencyGraph] = None
    group: Optional[tp.Group] = None
    members: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)

    @property
    def root(self) -> Optional[nn.Module]:
        return self.group[0].dep.target.module if self.group is not None else None


@dataclass
class Structure:
    """Every group of a model, and the parts left unpruned with the reason (name → reason)."""

    groups: list[LiveGroup]
    unprunable: dict[str, str] = field(default_factory=dict)

    def by_name(self) -> dict[str, LiveGroup]:
        return {g.name: g for g in self.groups}


def analyse(model: nn.Module, example: torch.Tensor, num_classes: Optional[int] = None) -> Structure:
    """The model's groups: torch-pruning's dependency groups, plus one heads group per attention
    module. Where torch-pruning cannot trace the model (e.g. ShuffleNetV2's channel shuffle: a
    ZeroDivisionError in its reshape index mapping), the model is split into the largest
    sub-modules it can trace; their inner groups stay prunable, the widths that cross their
    borders are left unpruned and reported in ``unprunable`` (never an exception)."""
    model.eval()
    outputs = output_layers(model, num_classes)
    regions, unprunable = _regions(model, example)
    groups: list[LiveGroup] = []
    seen: set[str] = set()
    for prefix, region, DG, _ in regions:
        names = _graph_names(DG)
        for local, group in iter_groups(DG, [m for m in outputs if any(m is r for r in region.modules())]):
            root = group[0].dep.target.module
            name = prefix + local
            if prefix and not _inner(DG, group):
                continue
            members, consumers, kind = set(), set(), "channels"
            for dep, _ in group:
                mod = dep.target.module
                mod_name = names.get(id(mod))
                if isinstance(mod, (nn.MultiheadAttention, SlimAttention)) and DG.is_out_channel_pruning_fn(dep.handler):
                    kind = "embedding"
                if mod_name is None:
                    continue
                (members if DG.is_out_channel_pruning_fn(dep.handler) else consumers).add(prefix + mod_name)
            if kind == "embedding":
                order = {n: i for i, (n, _) in enumerate(model.named_modules())}
                first = min((m for m in members if m in order), key=order.__getitem__, default=name)
                name = f"{first} (embedding)"
            if name in seen:
                continue
            seen.add(name)
            groups.append(LiveGroup(name, kind, int(DG.get_out_channels(root)), _channel_groups(DG, group), prefix + local, DG, group,
                                    sorted(members), sorted(consumers - members)))
    for name, m in model.named_modules():
        if isinstance(m, SlimAttention) or (isinstance(m, HEAD_TYPES) and _heads_supported(m)):
            if num_heads(m) > 1:
                groups.append(LiveGroup(f"{name} (heads)", "heads", num_heads(m), 1, name, members=[name]))
        elif isinstance(m, HEAD_TYPES):
            unprunable[f"{name} (heads)"] = "only self-attention with one in_proj_weight and no bias_k/add_zero_attn has its heads pruned"
    return Structure(groups, unprunable)


def _heads_supported(m: nn.MultiheadAttention) -> bool:
    return bool(m._qkv_same_embed_dim) and m.bias_k is None and not m.add_zero_attn


def _regions(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, nn.Module, tp.DependencyGraph, torch.Tensor]], dict[str, str]]:
    """(name prefix, module, dependency graph, its input) of the largest traceable parts."""
    key = (repr(model), tuple(example.shape))
    whole = _UNTRACEABLE.get(key)
    if whole is None:
        try:
            return [("", model, build_graph(model, example), example)], {}
        except Exception as exc:  # noqa: BLE001 - torch-pruning raises whatever its tracing hits
            if _out_of_memory(exc):
                raise  # the bound of probe_structure, not a construct to work around
            whole = _UNTRACEABLE[key] = _why(exc)
    inputs = _module_inputs(model, example)
    regions: list[tuple[str, nn.Module, tp.DependencyGraph, torch.Tensor]] = []
    unprunable: dict[str, str] = {}

    def visit(prefix: str, module: nn.Module, reason: str) -> None:
        failed = []
        for cname, child in module.named_children():
            full = prefix + cname
            if isinstance(child, ROOT_TYPES) or not any(isinstance(m, ROOT_TYPES) for m in child.modules()):
                continue
            x = inputs.get(full)
            if x is None:
                failed.append(full)
                continue
            try:
                regions.append((full + ".", child, build_graph(child, x), x))
            except Exception as exc:  # noqa: BLE001
                if _out_of_memory(exc):
                    raise
                visit(full + ".", child, _why(exc))
        unprunable[prefix.rstrip(".") or "(model)"] = (
            f"widths between its parts left unpruned: torch-pruning cannot trace it ({reason})"
            + (f"; not traced either (called more than once or not with one tensor): {', '.join(failed)}" if failed else ""))

    visit("", model, whole)
    model.eval()
    return regions, unprunable


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


#: (model repr, input shape) → why torch-pruning cannot trace that architecture: every trial
#: prunes a copy of the same dense model, so the failing whole-model trace is tried once.
_UNTRACEABLE: dict[tuple[str, tuple[int, ...]], str] = {}


def _why(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" in {Path(where.filename).name}:{where.name}" if where else ""
    return f"{type(exc).__name__}{at}: {exc}"[:300]


def _module_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each sub-module got in one forward, for those called once with one tensor."""
    seen: dict[str, Optional[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
            one = len(args) == 1 and isinstance(args[0], torch.Tensor)
            seen[name] = args[0].detach() if one and name not in seen else None
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return {k: v for k, v in seen.items() if v is not None}


def _inner(DG: tp.DependencyGraph, group: tp.Group) -> bool:
    """Whether ``group`` stays inside its region: it must not reach the region's output, nor
    narrow what the region reads (layers outside the region, which torch-pruning could not
    trace, produce and read those widths). A layer that reads the region's input has no input
    node; its input width shrinks when the group prunes its in-channels, or its out-channels
    where both are one (depthwise convs, norms)."""
    for dep, _ in group:
        node = dep.target
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return False
        if not node.inputs and not isinstance(node.module, nn.Parameter):
            pruner = DG.get_pruner_of_module(node.module)
            if pruner is not None and (DG.is_in_channel_pruning_fn(dep.handler) or pruner.prune_in_channels == pruner.prune_out_channels):
                return False
    return True


def find_groups(model: nn.Module, example: torch.Tensor, num_classes: Optional[int] = None, embedding: bool = False,
                structure: Optional[Structure] = None) -> list[PrunableGroup]:
    """List every prunable group of ``model`` (the output layer excluded); a transformer's
    embedding width only with ``embedding`` (it touches every block). ``structure``: the
    model's analysis when the caller already has it."""
    st = structure if structure is not None else analyse(model, example, num_classes)
    return [_to_prunable(g) for g in st.groups if embedding or g.kind != "embedding"]


def _to_prunable(g: LiveGroup) -> PrunableGroup:
    return PrunableGroup(g.name, g.channels, g.ch_groups, list(g.members), list(g.consumers), kind=g.kind)


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


# --------------------------------------------------------------------------- bounded analysis
#: What the structure analysis of one model may take before it is refused: torch-pruning's
#: tracing can grow without bound on some constructs (Swin's shifted windows: all memory of a
#: 23 GB machine, upstream Torch-Pruning #525).
PROBE_MEMORY_MB = 4096
PROBE_TIMEOUT_S = 120.0
#: prctl(2) option: the signal this process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def probe_structure(model: nn.Module, example: torch.Tensor, num_classes: Optional[int] = None,
                    memory_mb: float = PROBE_MEMORY_MB, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Run :func:`analyse` once in a forked child under an address-space limit (``RLIMIT_AS``:
    a hard bound, the kernel refuses the allocation) and a wall-clock timeout; raise a
    ConfigError naming the model's unusual constructs when it runs out of either.

    The dependency graph holds live references into the model, so it cannot come back from a
    child; the parent builds its own once the probe proved the analysis fits. Where ``fork``
    or ``RLIMIT_AS`` do not exist (Windows, macOS), the analysis runs unbounded.
    """
    if not hasattr(os, "fork") or resource is None or sys.platform != "linux":
        return
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(send, model, example, num_classes, memory_mb, os.getpid()), daemon=True)
    proc.start()
    send.close()
    verdict: Optional[tuple[str, str]] = None
    if recv.poll(timeout_s):
        with contextlib.suppress(EOFError):
            verdict = recv.recv()
    if proc.is_alive():
        proc.kill()
    proc.join()
    if verdict is not None and verdict[0] == "ok":
        return
    what = type(model).__name__
    special = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()
                      and not isinstance(m, (nn.MultiheadAttention, SlimAttention))})
    construct = f" (its {', '.join(special)} layers)" if special else ""
    if verdict is None:
        why = (f"took more than {timeout_s:.0f} s" if proc.exitcode in (None, -9) else
               f"ran out of its {memory_mb:.0f} MB memory bound (exit code {proc.exitcode})")
    elif verdict[1].startswith("ran out"):
        why = verdict[1]
    else:
        why = f"failed: {verdict[1]}"
    raise ConfigError(f"model {what}: torch-pruning's structure analysis {why}{construct}; this architecture is not supported "
                      f"(torch-pruning's tracing of its reshapes explodes, upstream Torch-Pruning #525)")


def _probe_child(send: Any, model: nn.Module, example: torch.Tensor, num_classes: Optional[int], memory_mb: float,
                 parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)  # the parent's thread pool does not survive fork
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + int(memory_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        analyse(model, example, num_classes)
        send.send(("ok", ""))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        send.send(("error", f"ran out of its {memory_mb:.0f} MB memory bound" if _out_of_memory(exc) else _why(exc)))


def _die_with_parent(parent: int) -> None:
    """The probe must not outlive the process that waits for it. A ``--workers`` child stopped
    while it probes (SIGTERM at the default disposition, SIGKILL after the grace period) runs no
    finalizer that would kill the probe, and the orphan went on analysing, holding the
    multiprocessing resource tracker's pipe open. ``PR_SET_PDEATHSIG`` makes the kernel send
    SIGKILL when the parent dies; the ``getppid`` check covers a parent that died before it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL
    if os.getppid() != parent:
        os._exit(1)
