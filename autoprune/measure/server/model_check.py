"""Static checks of an uploaded ONNX model before any runtime sees it (``autoprune serve-latency``).

What a model can make the server do is decided here, so every check walks *every* graph (the
main graph, ``If``/``Loop``/``Scan`` bodies at any depth, functions, training graphs) and every
tensor in it (initializers, sparse initializers, tensors and sparse tensors in attributes):

* no external data: a tensor that names a file would make the runtime read a file of the
  server's, and even the checker's complaint about it tells whether that file exists;
* only standard operator domains: a custom operator would need code on the server;
* no tensor larger than a limit, as far as that is known without running the model: declared
  shapes, shapes from ONNX shape inference (which also folds constant shape computations), and
  the constant shape inputs of operators that allocate from them (``ConstantOfShape``,
  ``Expand``, ``Tile``, ``Resize``, ...). Sizes that depend on input values at run time are the
  job of the measuring process's memory limit (:mod:`autoprune.measure.server.worker`).

Messages name the tensor and the rule, never a path on the server (:func:`redact_paths`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["ALLOWED_DOMAINS", "ModelRejected", "redact_paths", "validate_onnx", "static_input_shape", "check_tensor_sizes",
           "all_graphs", "all_nodes", "all_tensors"]

#: Operator domains a served model may use (standard ONNX, ONNX-ML, onnxruntime contrib ops).
ALLOWED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
#: Constants larger than this are not shape inputs; they are not read for the size checks.
_MAX_SHAPE_CONST = 64
_ABS_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/](?:[^\s\\/'\"<>|:,;]+[\\/])+[^\s\\/'\"<>|:,;)]*")


class ModelRejected(ValueError):
    """The upload is not a model this server runs; the message goes back to the client."""


def redact_paths(message: str, *known: str) -> str:
    """``message`` without server paths: ``known`` ones (temp dirs) first, then anything absolute.

    Runtime and checker errors quote file names ("Load model from /tmp/.../model.onnx failed");
    a client must learn neither the server's directory layout nor which files exist.
    """
    for k in sorted(filter(None, known), key=len, reverse=True):  # whole file paths before their folders
        message = message.replace(k, "<upload>")
    return _ABS_PATH.sub("<path>", message)


def _short(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


# --------------------------------------------------------------------------- walking
def _node_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    # Fields are read whatever attribute.type claims: a lying type must not hide a graph.
    for a in node.attribute:
        if a.HasField("g"):
            yield a.g
        yield from a.graphs


def _top_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    out = [model.graph]
    for ti in model.training_info:
        if ti.HasField("initialization"):
            out.append(ti.initialization)
        if ti.HasField("algorithm"):
            out.append(ti.algorithm)
    return out


def all_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """Every graph of the model: top level, training graphs, and subgraphs at any depth
    (including those inside function bodies). Iterative, so deep nesting cannot overflow."""
    stack = _top_graphs(model) + [g for f in model.functions for n in f.node for g in _node_subgraphs(n)]
    out = []
    while stack:
        g = stack.pop()
        out.append(g)
        for n in g.node:
            stack.extend(_node_subgraphs(n))
    return out


def all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for g in all_graphs(model):
        yield from g.node
    for f in model.functions:
        yield from f.node


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto: initializers, sparse initializers (values and indices), and tensors or
    sparse tensors held in node attributes, in every graph and function."""
    for g in all_graphs(model):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
    for n in all_nodes(model):
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
            for sp in sparse:
                yield sp.values
                yield sp.indices


# --------------------------------------------------------------------------- the checks
def validate_onnx(blob: bytes, what: str = "model", max_tensor_bytes: Optional[int] = None,
                  input_shape: Optional[list[int]] = None) -> onnx.ModelProto:
    """Parse and check an uploaded ONNX model; raise :class:`ModelRejected` naming what is wrong.

    Order matters: external data and domains are checked on the parsed protobuf before
    ``onnx.checker`` runs, because the checker itself stats external-data files.
    """
    try:
        model = onnx.load_from_string(bytes(blob))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ModelRejected(f"{what}: not a valid ONNX protobuf ({type(exc).__name__}: {redact_paths(str(exc))[:200]})") from None
    if not model.graph.node:
        raise ModelRejected(f"{what}: the ONNX graph has no nodes (corrupt or empty model)")
    for t in all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise ModelRejected(f"{what}: tensor {_short(t.name)} uses external data; send a self-contained ONNX file "
                                "(onnx.save(model, path, save_as_external_data=False))")
    # Domains of the nodes actually used (tools list unused domains in opset_import; harmless).
    local_fns = {(f.domain, f.name) for f in model.functions}
    bad = sorted({n.domain for n in all_nodes(model) if n.domain not in ALLOWED_DOMAINS and (n.domain, n.op_type) not in local_fns})
    if bad:
        raise ModelRejected(f"{what}: operator domains {[_short(b) for b in bad[:5]]} are not allowed (allowed: "
                            f"{sorted(ALLOWED_DOMAINS)}); custom operators would need code on the server")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise ModelRejected(f"{what}: onnx.checker rejected it: {redact_paths(str(exc))[:300]}") from None
    if max_tensor_bytes is not None:
        check_tensor_sizes(model, max_tensor_bytes, what, input_shape)
    return model


def static_input_shape(model: onnx.ModelProto) -> Optional[list[int]]:
    """The first input's shape if every dimension is a positive number, else None."""
    if not model.graph.input:
        return None
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value for d in dims]
    return shape if shape and all(s > 0 for s in shape) else None


def _itemsize(elem_type: int) -> int:
    try:
        return max(1, int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize))
    except Exception:  # noqa: BLE001 - UNDEFINED or a type numpy lacks: count one byte (a lower bound)
        return 1


@dataclass
class _Scope:
    """What is known by name inside one graph (outer scopes are visible in subgraphs)."""

    consts: dict[str, list[float]] = field(default_factory=dict)
    #: name -> (element type, dims with None where unknown)
    types: dict[str, tuple[int, list[Optional[int]]]] = field(default_factory=dict)

    def child(self) -> "_Scope":
        return _Scope(dict(self.consts), dict(self.types))


def _dims(shape: onnx.TensorShapeProto) -> list[Optional[int]]:
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else None for d in shape.dim]


def _tensor_types(tp: onnx.TypeProto) -> Iterator[tuple[int, list[Optional[int]]]]:
    """(element type, dims) of the tensors a type describes (sequence/optional: their element)."""
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tt = getattr(tp, kind)
        if tt.HasField("shape"):
            yield tt.elem_type, _dims(tt.shape)
    elif kind == "sequence_type":
        yield from _tensor_types(tp.sequence_type.elem_type)
    elif kind == "optional_type":
        yield from _tensor_types(tp.optional_type.elem_type)


def _const_values(t: onnx.TensorProto) -> Optional[list[float]]:
    if math.prod(int(d) for d in t.dims) > _MAX_SHAPE_CONST:
        return None
    try:
        return [float(v) for v in numpy_helper.to_array(t).ravel().tolist()]
    except Exception:  # noqa: BLE001 - malformed or exotic tensor: simply not a known constant
        return None


def check_tensor_sizes(model: onnx.ModelProto, max_bytes: int, what: str = "model",
                       input_shape: Optional[list[int]] = None) -> None:
    """Raise :class:`ModelRejected` if any tensor the model declares, or that shape inference or a
    constant shape input implies, holds more than ``max_bytes``.

    Sizes are lower bounds (an unknown dimension counts as 1), computed with Python integers so
    huge dimensions cannot overflow. With ``input_shape`` the first input gets that shape before
    shape inference, which then knows the real sizes of everything that follows from the input.
    The model is not modified.

    Declared shapes and constant shape inputs are checked first, without shape inference: ONNX's
    data propagation can materialise what a ``ConstantOfShape`` over a constant implies (a
    140-byte model, 2 GB). Inference then runs on a copy whose large initializers are graph
    inputs of the same type (their values are never shape data), so it does not copy the weights
    again. Call this only where memory is capped (the measuring process of ``serve-latency``).
    """
    _check_walk(model, max_bytes, what)
    m = _for_inference(model, input_shape)
    try:
        m = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement: declared shapes and constants still count
        return
    _check_walk(m, max_bytes, what)


def _for_inference(model: onnx.ModelProto, input_shape: Optional[list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: the first input fixed to ``input_shape``, and
    main-graph initializers over :data:`_MAX_SHAPE_CONST` elements turned into typed inputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if input_shape and g.input and len(g.input[0].type.tensor_type.shape.dim) == len(input_shape):
        for d, v in zip(g.input[0].type.tensor_type.shape.dim, input_shape):
            d.Clear()
            d.dim_value = int(v)
    names = {i.name for i in g.input}
    kept, moved = [], []
    for t in g.initializer:
        (moved if math.prod(int(d) for d in t.dims) > _MAX_SHAPE_CONST else kept).append(t)
    if moved:
        moved_info = [onnx.helper.make_tensor_value_info(t.name, t.data_type, [int(d) for d in t.dims])
                      for t in moved if t.name not in names]
        kept_copy = [onnx.TensorProto.FromString(t.SerializeToString()) for t in kept]
        del g.initializer[:]
        g.initializer.extend(kept_copy)
        g.input.extend(moved_info)
    return m


def _check_walk(m: onnx.ModelProto, max_bytes: int, what: str) -> None:
    """One pass of the size rules over every graph and function of ``m``."""

    def over(desc: str, elems: float, elem_type: int) -> None:
        size = elems * _itemsize(elem_type)
        if size > max_bytes:
            raise ModelRejected(f"{what}: {desc} would hold {size / 2**20:,.0f} MB, over this server's limit of "
                                f"{max_bytes / 2**20:g} MB per tensor (--max-tensor-mb)")

    def bound(dims: list[Optional[int]]) -> int:
        return math.prod(d if d is not None else 1 for d in dims)

    stack: list[tuple[onnx.GraphProto, _Scope]] = [(g, _Scope()) for g in _top_graphs(m)]
    stack += [(g, _Scope()) for f in m.functions for n in f.node for g in _node_subgraphs(n)]
    while stack:
        g, scope = stack.pop()
        for t in g.initializer:
            dims = [int(d) for d in t.dims]
            over(f"initializer {_short(t.name)} (shape {dims})", math.prod(dims), t.data_type)
            scope.types[t.name] = (t.data_type, dims)
            vals = _const_values(t)
            if vals is not None:
                scope.consts[t.name] = vals
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            for elem_type, dims in _tensor_types(vi.type):
                over(f"tensor {_short(vi.name)} (shape {dims})", bound(dims), elem_type)
                scope.types.setdefault(vi.name, (elem_type, dims))
        for n in g.node:
            _check_node(n, scope, over, bound)
            for sub in _node_subgraphs(n):
                stack.append((sub, scope.child()))
    for f in m.functions:
        scope = _Scope()
        for n in f.node:
            _check_node(n, scope, over, bound)


def _attr(node: onnx.NodeProto, name: str) -> Optional[onnx.AttributeProto]:
    return next((a for a in node.attribute if a.name == name), None)


def _check_node(n: onnx.NodeProto, scope: _Scope, over: Any, bound: Any) -> None:
    """Size checks for operators that allocate from constant shape inputs; records Constant values."""
    if n.domain not in ("", "ai.onnx"):
        return
    op, ins = n.op_type, list(n.input)

    def const(i: int) -> Optional[list[float]]:
        return scope.consts.get(ins[i]) if i < len(ins) and ins[i] else None

    def in_type(i: int) -> tuple[int, list[Optional[int]]]:
        return scope.types.get(ins[i], (0, [])) if i < len(ins) else (0, [])

    def ints(vals: list[float]) -> list[int]:
        return [int(v) for v in vals if math.isfinite(v)]

    out = _short(n.output[0]) if n.output else "output"
    if op == "Constant" and n.output:
        a = _attr(n, "value")
        if a is not None and a.HasField("t"):
            vals = _const_values(a.t)
        elif _attr(n, "value_ints") is not None:
            vals = [float(v) for v in _attr(n, "value_ints").ints][:_MAX_SHAPE_CONST]
        elif _attr(n, "value_int") is not None:
            vals = [float(_attr(n, "value_int").i)]
        else:
            vals = None
        if vals is not None:
            scope.consts[n.output[0]] = vals
    elif op == "ConstantOfShape" and (s := const(0)) is not None:
        a = _attr(n, "value")
        over(f"ConstantOfShape output {out} (shape {ints(s)})", math.prod(max(0, v) for v in ints(s)),
             a.t.data_type if a is not None and a.HasField("t") else onnx.TensorProto.FLOAT)
    elif op == "Expand" and (s := const(1)) is not None:
        over(f"Expand output {out} (shape {ints(s)})", math.prod(max(0, v) for v in ints(s)), in_type(0)[0])
    elif op == "Tile" and (r := const(1)) is not None:
        elem_type, dims = in_type(0)
        dims = dims if len(dims) == len(r) else [None] * len(r)
        over(f"Tile output {out} (repeats {ints(r)})", math.prod(max(0, v) * (d if d is not None else 1) for v, d in zip(ints(r), dims)), elem_type)
    elif op in ("Resize", "Upsample"):
        elem_type, dims = in_type(0)
        sizes = const(3) if op == "Resize" else None
        if sizes is not None and sizes:
            over(f"{op} output {out} (sizes {ints(sizes)})", math.prod(max(0, v) for v in ints(sizes)), elem_type)
            return
        a = _attr(n, "scales")
        scales = const(2) if op == "Resize" and len(ins) > 2 else const(1)
        if scales is None and a is not None:
            scales = list(a.floats)
        if scales:
            if not all(math.isfinite(s) for s in scales):
                raise ModelRejected(f"{op} {out}: scales must be finite numbers")
            dims = dims if len(dims) == len(scales) else [None] * len(scales)
            total = 1.0
            for s, d in zip(scales, dims):
                total *= max(0.0, math.floor((d if d is not None else 1) * s)) if s >= 1 else 1.0
            over(f"{op} output {out} (scales {scales})", total, elem_type)
    elif op in ("RandomNormal", "RandomUniform") and (a := _attr(n, "shape")) is not None:
        dt = _attr(n, "dtype")
        over(f"{op} output {out} (shape {list(a.ints)})", math.prod(max(0, int(v)) for v in a.ints),
             dt.i if dt is not None else onnx.TensorProto.FLOAT)
    elif op == "Range" and all(const(i) is not None and len(const(i)) == 1 for i in range(3)):
        start, limit, delta = (const(i)[0] for i in range(3))  # type: ignore[index]
        if delta != 0 and all(math.isfinite(v) for v in (start, limit, delta)):
            over(f"Range output {out}", max(0, math.ceil((limit - start) / delta)), in_type(0)[0])
    elif op == "OneHot" and (depth := const(1)) is not None and len(depth) == 1 and math.isfinite(depth[0]):
        over(f"OneHot output {out} (depth {int(depth[0])})", max(0, int(depth[0])) * bound(in_type(0)[1]), in_type(2)[0])
    elif op == "Pad":
        pads = const(1)
        if pads is None and (a := _attr(n, "pads")) is not None:
            pads = [float(v) for v in a.ints]
        elem_type, dims = in_type(0)
        if pads and len(pads) % 2 == 0:
            p, rank = ints(pads), len(pads) // 2
            dims = dims if len(dims) == rank else [None] * rank
            over(f"Pad output {out} (pads {p})", math.prod(max(1, (d or 0) + p[i] + p[i + rank]) for i, d in enumerate(dims)), elem_type)
