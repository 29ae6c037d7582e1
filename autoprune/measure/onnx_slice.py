"""Export a pruned candidate without tracing it: the dense model's ONNX graph with the
candidate's weights and widths put in.

A dynamo export (``measure/onnx.py::export_onnx``) traces the model with ``torch.export``,
decomposes it and translates every node to ONNX before the ONNX optimizer runs; for a small
network at 64 px that costs tens of training steps, more than a short fine-tune. Every
candidate of a run is the dense model with channels removed, so its translated graph is the
dense one with other weight tensors and other channel counts in a few integer constants (a
flatten's ``view`` size, a depthwise convolution's ``group``, a head reshape). This module
translates the dense model once per run (unoptimized), and for each candidate writes the
candidate's parameters and buffers into that graph, sets the width-carrying integers, and
runs the exporter's own optimizer (``torch.onnx.ONNXProgram.optimize``: the constant folding
and BatchNorm fusion a fresh export runs) and save. What comes out is the file a fresh export
writes.

Which integers carry widths is learned, not listed: the dense graph is compared with the
translation of a *probe* (every searched group pruned, each by a different ratio); an integer
that changed is tied to a parameter dimension that changed in proportion (``new = dense ×
width / dense width``). A second probe, with other ratios, is then exported both ways and the
two files compared node by node (operators, attributes, wiring, initializer shapes and values);
any difference, or anything the comparison cannot tie (a float constant that changed, a graph
whose nodes differ), turns slicing off for the run with the reason logged, and every candidate
is exported fresh. A candidate whose parameters are not the dense model's with other sizes
(attention heads replaced by ``SlimAttention``, another input shape) is exported fresh too.
The search still checks each file's outputs against PyTorch (``measure/parity.py``); a sliced
file that fails that check is exported fresh and slicing is turned off.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from autoprune.errors import ExportError
from autoprune.measure.onnx import _quiet, _root_cause, cpu_fp32, export_onnx
from autoprune.outputs import MainOutput
from autoprune.files import temp_sibling

log = logging.getLogger("autoprune")

OPSET = 18  # what export_onnx writes


@dataclass
class _Slot:
    """One width-carrying integer of the translated graph: where it is and what it follows.

    ``where``: ("attr", node index, attribute name, element or -1 for a scalar), ("tensor",
    node index, attribute name, flat element) for a Constant's tensor, ("init", initializer
    index, flat element). Its value for a candidate is ``dense * size(key, dim) / dense size``."""

    where: tuple[Any, ...]
    dense: int
    key: str
    dim: int
    dense_size: int


@dataclass
class SliceStats:
    """How candidates were exported in this process (for logs, benchmarks and tests)."""

    sliced: int = 0
    fresh: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by the names the exporter gives their initializers."""
    out = dict(module.named_buffers())
    out.update(dict(module.named_parameters()))
    return out


def _wrapped(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """What export_onnx exports: the model, or its main output when it returns a dict/tuple."""
    with torch.no_grad():
        return model if isinstance(model(example), torch.Tensor) else MainOutput(model).eval()


def _translate(model: nn.Module, example: torch.Tensor) -> Any:
    """The dynamo exporter's unoptimized ``torch.onnx.ONNXProgram`` of ``model`` (already a CPU
    fp32 eval module), named as :func:`export_onnx` names inputs and outputs."""
    with _quiet(), torch.no_grad():
        return torch.onnx.export(model, (example,), input_names=["input"], output_names=["logits"], opset_version=OPSET,
                                 dynamo=True, optimize=False)


def _int_values(attr: Any) -> Optional[np.ndarray]:
    """An attribute's integers (INT, INTS, or an integer TENSOR), else None."""
    import onnx

    if attr.type == onnx.AttributeProto.INT:
        return np.array([attr.i], dtype=np.int64)
    if attr.type == onnx.AttributeProto.INTS:
        return np.array(list(attr.ints), dtype=np.int64)
    if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _INT_TYPES:
        return onnx.numpy_helper.to_array(attr.t).reshape(-1)
    return None


_INT_TYPES = (6, 7)  # onnx.TensorProto.INT32, INT64


class OnnxSlicer:
    """Exports candidates of one dense model by slicing its translated graph (module doc).

    ``probes(k)`` returns the k-th probe (k = 0, 1): a copy of the dense model with every
    searched group pruned, each by a different ratio, as candidates are pruned. Built on the
    first :meth:`export`; ``enabled`` is False (with ``reason``) once slicing is off."""

    def __init__(self, dense: nn.Module, example: torch.Tensor, exporter: str,
                 probes: Callable[[int], nn.Module]) -> None:
        self.example = example.detach().to("cpu", torch.float32)
        self.exporter = exporter
        self._dense = dense
        self._probes = probes
        self._template: Any = None  # onnx.ModelProto of the unoptimized dense translation, weights left out
        self._slots: list[_Slot] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._params: dict[str, int] = {}  # initializer name -> index in the template's initializer list
        self._uses: dict[str, list[int]] = {}  # tensor name -> indices of the nodes reading it
        self._main_output = False  # the model returns a dict/tuple: its main output is exported (MainOutput)
        self.enabled = exporter == "dynamo"
        self.reason = "" if self.enabled else f"exporter {exporter}: only dynamo exports are sliced"
        self.stats = SliceStats()

    # ------------------------------------------------------------------ public
    def export(self, model: nn.Module, path: Path, example: Optional[torch.Tensor] = None) -> bool:
        """Write ``model`` (a pruned copy of the dense model) as ONNX at ``path``: sliced when
        this run's graph allows it (True), else by a fresh :func:`export_onnx` (False).
        ``example``: the input to export at, when it may differ from the slicer's."""
        model = cpu_fp32(model).eval()
        x = self.example if example is None else example.detach().to("cpu", torch.float32)
        why = (f"input shape {list(x.shape)}, the dense graph's is {list(self.example.shape)}"
               if tuple(x.shape) != tuple(self.example.shape) else self._ready() or self._fits(model))
        if why is None:
            try:
                self._write(model, Path(path))
                self.stats.sliced += 1
                return True
            except Exception as exc:  # noqa: BLE001 - a slicing failure must never cost the trial
                why = f"slicing failed: {type(exc).__name__}: {exc}"[:300]
                self.disable(why)
        self.stats.fresh += 1
        self.stats.reasons[why] = self.stats.reasons.get(why, 0) + 1
        log.debug("fresh ONNX export: %s", why)
        export_onnx(model, x, path, self.exporter)
        return False

    def prepare(self) -> bool:
        """Build and check the template now (else the first :meth:`export` does): True when
        candidates will be sliced."""
        return self._ready() is None

    def disable(self, reason: str) -> None:
        """Export every later candidate fresh (said once in the run log)."""
        if self.enabled:
            log.warning("ONNX slicing off for this run, candidates are exported fresh: %s", reason)
        self.enabled, self.reason = False, reason

    # ------------------------------------------------------------------ build
    def _ready(self) -> Optional[str]:
        """None when the template is built and checked; else why candidates are exported fresh."""
        if not self.enabled:
            return self.reason
        if self._template is None:
            try:
                why = self._build()
            except Exception as exc:  # noqa: BLE001 - the exporter raises many types
                root = _root_cause(exc)
                why = f"the dense model's translation failed: {type(root).__name__}: {str(root)[:200]}"
            if why is not None:
                self._template = None
                self.disable(why)
                return why
        return None

    def _build(self) -> Optional[str]:
        import onnx

        dense = _wrapped(cpu_fp32(self._dense).eval(), self.example)
        self._main_output = isinstance(dense, MainOutput)
        tensors = _tensors(dense)
        self._shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        proto = _translate(dense, self.example).model_proto
        probe = self._wrap(cpu_fp32(self._probes(0)).eval())
        pshapes = {k: tuple(v.shape) for k, v in _tensors(probe).items()}
        if set(pshapes) != set(self._shapes):
            return "a pruned model's parameters are not the dense model's (modules replaced)"
        pproto = _translate(probe, self.example).model_proto
        g, pg = proto.graph, pproto.graph
        if len(g.node) != len(pg.node) or len(g.initializer) != len(pg.initializer):
            return "the translated graph changes with the widths (node count)"
        # Where each tensor is used: a width-carrying integer follows the nearest tensor that
        # changed in proportion (a depthwise Conv's group its own weight, a flatten size the
        # next Gemm's), not some other layer that happens to share its widths in the probe.
        self._uses = {}
        for ni, n in enumerate(g.node):
            for name in n.input:
                self._uses.setdefault(name, []).append(ni)
        slots: list[_Slot] = []
        for ni, (n, pn) in enumerate(zip(g.node, pg.node)):
            if (n.op_type, n.domain, list(n.input), list(n.output)) != (pn.op_type, pn.domain, list(pn.input), list(pn.output)):
                return f"the translated graph changes with the widths (node {n.name or ni}: {n.op_type})"
            if len(n.attribute) != len(pn.attribute):
                return f"node {n.name} ({n.op_type}) has other attributes when pruned"
            for a, pa in zip(n.attribute, pn.attribute):
                if a.name != pa.name or a.type != pa.type:
                    return f"node {n.name} ({n.op_type}) has other attributes when pruned"
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    return f"node {n.name} ({n.op_type}) has a subgraph"
                ints, pints = _int_values(a), _int_values(pa)
                if ints is None:
                    if a.SerializeToString() != pa.SerializeToString():
                        return f"attribute {a.name} of {n.name} ({n.op_type}) changes with the widths and is not an integer"
                    continue
                kind = "tensor" if a.type == onnx.AttributeProto.TENSOR else "attr"
                scalar = a.type == onnx.AttributeProto.INT
                why = self._tie(ints, pints, pshapes, lambda e: (kind, ni, a.name, -1 if scalar else e), slots, f"{n.op_type} {n.name}", ni)
                if why:
                    return why
        self._params = {}
        for ii, (t, pt) in enumerate(zip(g.initializer, pg.initializer)):
            if t.name != pt.name or t.data_type != pt.data_type:
                return f"initializer {t.name} differs when pruned"
            if t.name in self._shapes:
                self._params[t.name] = ii
                continue
            if t.data_type in _INT_TYPES:
                a, b = onnx.numpy_helper.to_array(t).reshape(-1), onnx.numpy_helper.to_array(pt).reshape(-1)
                why = self._tie(a, b, pshapes, lambda e: ("init", ii, e), slots, f"initializer {t.name}",
                                min(self._uses.get(t.name, [0])))
                if why:
                    return why
            elif t.SerializeToString() != pt.SerializeToString():
                return f"constant {t.name} changes with the widths and is not an integer"
        self._slots = slots
        # The weights are written per candidate: keep the template small.
        for ii in self._params.values():
            t = g.initializer[ii]
            t.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)
        del g.value_info[:]
        self._template = proto
        return self._verify()

    def _tie(self, dense: np.ndarray, probe: Optional[np.ndarray], pshapes: dict[str, tuple[int, ...]],
             where: Callable[[int], tuple[Any, ...]], slots: list[_Slot], what: str, at: int) -> Optional[str]:
        """Add a slot for each element of ``dense`` that the probe changed; None, or why not."""
        if probe is None or probe.shape != dense.shape:
            return f"{what} changes size with the widths"
        for e in np.nonzero(dense != probe)[0]:
            v0, v1 = int(dense[e]), int(probe[e])
            # A parameter dimension that changed in the same proportion, multiples first.
            found = [(k, d, s[d]) for k, s in self._shapes.items() for d in range(len(s))
                     if s[d] != pshapes[k][d] and v0 * pshapes[k][d] == v1 * s[d]]
            if not found:
                return f"{what}: {v0} becomes {v1} when pruned, in proportion to no parameter's width"
            found.sort(key=lambda f: (min((abs(u - at) for u in self._uses.get(f[0], [])), default=1 << 30), v0 % f[2] != 0))
            k, d, n = found[0]
            slots.append(_Slot(where(int(e)), v0, k, d, n))
        return None

    def _verify(self) -> Optional[str]:
        """Export the second probe both ways and compare the files: None when they are the same graph."""
        import tempfile

        import onnx

        probe = cpu_fp32(self._probes(1)).eval()
        why = self._fits(probe)
        if why:
            return f"second probe: {why}"
        with tempfile.TemporaryDirectory(prefix="autoprune-slice-") as d:
            sliced, fresh = Path(d) / "sliced.onnx", Path(d) / "fresh.onnx"
            self._write(probe, sliced)
            export_onnx(probe, self.example, fresh, self.exporter)
            diff = graph_difference(onnx.load(str(sliced)), onnx.load(str(fresh)))
        return f"a sliced export differs from a fresh one: {diff}" if diff else None

    # ------------------------------------------------------------------ per candidate
    def _wrap(self, model: nn.Module) -> nn.Module:
        """``model`` as the dense model was exported (its main output alone, when it had to be)."""
        return MainOutput(model).eval() if self._main_output else model

    def _fits(self, model: nn.Module) -> Optional[str]:
        """None when ``model``'s tensors are the dense model's with other sizes."""
        shapes = {k: tuple(v.shape) for k, v in _tensors(self._wrap(model)).items()}
        if set(shapes) != set(self._shapes) or any(len(s) != len(self._shapes[k]) for k, s in shapes.items()):
            return "its parameters are not the dense model's (modules replaced, e.g. attention heads)"
        return None

    def _write(self, model: nn.Module, path: Path) -> None:
        import onnx
        import onnx_ir as ir

        proto = onnx.ModelProto()
        proto.CopyFrom(self._template)
        g = proto.graph
        tensors = _tensors(self._wrap(model))
        for name, ii in self._params.items():
            arr = tensors[name].detach().cpu().numpy()
            t = g.initializer[ii]
            if onnx.helper.tensor_dtype_to_np_dtype(t.data_type) != arr.dtype:
                raise ExportError(f"{name} is {arr.dtype} in the candidate")
            del t.dims[:]
            t.dims.extend(arr.shape)
            t.raw_data = np.ascontiguousarray(arr).tobytes()
        for s in self._slots:
            size = tensors[s.key].shape[s.dim]
            num = s.dense * size
            if num % s.dense_size:
                raise ExportError(f"{s.key} dim {s.dim}: width {size} gives a fractional constant")
            self._set(g, s.where, num // s.dense_size)
        prog = torch.onnx.ONNXProgram(ir.serde.deserialize_model(proto), None)
        with _quiet():
            prog.optimize()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path)
        try:
            prog.save(tmp, external_data=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _set(g: Any, where: tuple[Any, ...], value: int) -> None:
        import onnx

        if where[0] == "init":
            t = g.initializer[where[1]]
            a = onnx.numpy_helper.to_array(t).copy()
            a.reshape(-1)[where[2]] = value
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
            return
        kind, ni, name, e = where
        attr = next(a for a in g.node[ni].attribute if a.name == name)
        if kind == "tensor":
            a = onnx.numpy_helper.to_array(attr.t).copy()
            a.reshape(-1)[e] = value
            attr.t.CopyFrom(onnx.numpy_helper.from_array(a, attr.t.name))
        elif e < 0:
            attr.i = value
        else:
            attr.ints[e] = value


def graph_difference(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> Optional[str]:
    """The first difference between two ONNX models' graphs (nodes, attributes, wiring,
    initializer shapes and values, input and output types), or None when they are the same
    graph. Names of intermediate values count (both come from the same translation); node
    metadata and doc strings do not."""
    import onnx

    ga, gb = a.graph, b.graph
    if len(ga.node) != len(gb.node):
        return f"{len(ga.node)} nodes vs {len(gb.node)}"
    for i, (x, y) in enumerate(zip(ga.node, gb.node)):
        if (x.op_type, x.domain, list(x.input), list(x.output)) != (y.op_type, y.domain, list(y.input), list(y.output)):
            return f"node {i}: {x.op_type}{list(x.input)} vs {y.op_type}{list(y.input)}"
        ax = {t.name: t for t in x.attribute}
        ay = {t.name: t for t in y.attribute}
        if set(ax) != set(ay):
            return f"node {i} ({x.op_type}): attributes {sorted(ax)} vs {sorted(ay)}"
        for k in ax:
            if ax[k].SerializeToString() != ay[k].SerializeToString():
                return f"node {i} ({x.op_type}): attribute {k}"
    ia = {t.name: t for t in ga.initializer}
    ib = {t.name: t for t in gb.initializer}
    if set(ia) != set(ib):
        return f"initializers {sorted(set(ia) ^ set(ib))[:5]}"
    for k, t in ia.items():
        u = ib[k]
        if list(t.dims) != list(u.dims) or t.data_type != u.data_type:
            return f"initializer {k}: {list(t.dims)} vs {list(u.dims)}"
        x, y = onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u)
        if not np.allclose(x, y, rtol=rtol, atol=atol):
            return f"initializer {k}: values differ by {float(np.abs(x.astype(np.float64) - y).max()):.3g}"
    for what, xs, ys in (("input", ga.input, gb.input), ("output", ga.output, gb.output)):
        if [(v.name, v.type.SerializeToString()) for v in xs] != [(v.name, v.type.SerializeToString()) for v in ys]:
            return f"graph {what}s"
    return None


def _probe_plans(groups: Sequence[Any], k: int) -> dict[str, float]:
    """Ratios of probe ``k``: every group pruned, neighbouring groups by different ratios, and
    the two probes differently (so a width-carrying constant is tied to the right group)."""
    steps = (0.25, 0.5, 0.375, 0.625, 0.3125, 0.5625, 0.4375)
    return {g.name: min(steps[(i * (k + 2) + 3 * k) % len(steps)], float(getattr(g, "high", 0.9) or 0.9))
            for i, g in enumerate(groups)}


def slicer_for(dense: nn.Module, example: torch.Tensor, exporter: str, groups: Sequence[Any],
               cut: Callable[[nn.Module, dict[str, float]], Any]) -> OnnxSlicer:
    """An :class:`OnnxSlicer` whose probes are ``dense`` copies cut by ``cut(copy, ratios)`` with
    :func:`_probe_plans` over ``groups``."""

    def probes(k: int) -> nn.Module:
        m = copy.deepcopy(dense)
        cut(m, _probe_plans(groups, k))
        return m.eval()

    return OnnxSlicer(dense, example, exporter, probes)
