"""ONNX import: ``from_onnx(path)`` turns a torch-exported ONNX model into an attngraph Graph.

The graph keeps the ONNX input and output names. Each ONNX node is either

- *folded*: every input is known at import time (initializers, ``Constant``, ``Shape`` of a
  tensor), so its value is computed now with numpy. Shapes with symbolic dims (ONNX
  ``dim_param``) are known too: a known value is a numpy array, and a shape vector that
  holds symbolic dims is an ``object`` array of dims (ints and strings such as ``"batch"``,
  ``"4*batch"``). That is how ``Shape → Gather → Mul → Concat → Reshape`` becomes a
  ``reshape`` with shape ``("4*batch", "seq", 4)``;
- or *converted*: one entry of ``CONVERTERS`` (op_type → function) builds attngraph nodes.

Initializers are params when they are float weights read by MatMul/Gemm/Conv/
LayerNormalization/Add (trainable, as in torch), consts otherwise. Unsupported op types are
collected before anything is built and reported in one error.
"""

from __future__ import annotations

import keyword
import numbers
import operator
import re
import warnings
from typing import Any, Callable

import numpy as np

from .dsl import Graph, Tensor, apply, promote_pair
from .errors import AttngraphError, ShapeError
from .ir.shapes import (broadcast_shapes, dim_add, dim_div, dim_mul, dim_product, dim_sub, normalize_dim,
                        shape_symbols)

__all__ = ["from_onnx", "CONVERTERS", "OnnxImportError"]


class OnnxImportError(AttngraphError):
    """The ONNX file uses something the importer cannot express."""


# ONNX TensorProto.DataType codes → numpy dtypes (float16/bfloat16 widen to float32).
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
                10: np.float32, 11: np.float64, 12: np.uint32, 13: np.uint64, 16: np.float32}
_INT64_BIG = 2 ** 62          # Slice ends at or above this mean "to the end" (torch writes INT64_MAX)
# A float initializer read by one of these is a trainable weight (a param); scalars, non-finite
# arrays (additive masks) and everything else are consts.
_WEIGHT_READERS = {"MatMul", "Gemm", "Conv", "LayerNormalization", "Add", "Sub", "Mul", "Gather", "Concat",
                   "Expand", "Unsqueeze", "Reshape"}


def _onnx_dtype(code: int):
    try:
        return _ONNX_DTYPES[int(code)]
    except KeyError:
        raise OnnxImportError(f"ONNX data type {code} is not supported") from None


# ----------------------------------------------------------------------------------------
# known values: numpy arrays, symbolic shape vectors as object arrays of dims
# ----------------------------------------------------------------------------------------

def _is_symbolic(arr: np.ndarray) -> bool:
    return arr.dtype == object


def _as_known(value) -> np.ndarray:
    """A folded result as an array; a lone symbolic dim (a str) stays an object array."""
    if isinstance(value, np.ndarray) and value.dtype.kind != "U":
        return _tidy(value)
    if isinstance(value, np.ndarray):
        value = value.astype(object)
    arr = np.empty((), dtype=object) if isinstance(value, str) else np.asarray(value)
    if isinstance(value, str):
        arr[()] = value
    return _tidy(arr) if arr.dtype == object else arr


def _tidy(arr: np.ndarray) -> np.ndarray:
    """An object array whose dims all turned out to be ints becomes int64 again."""
    if arr.dtype == object and all(isinstance(d, numbers.Integral) for d in arr.flat):
        return arr.astype(np.int64)
    return arr


def _sym_array(dims) -> np.ndarray:
    dims = [normalize_dim(d) if not isinstance(d, numbers.Integral) else int(d) for d in dims]
    if all(isinstance(d, int) for d in dims):
        return np.array(dims, dtype=np.int64)
    out = np.empty(len(dims), dtype=object)
    out[:] = dims
    return out


_INT_OPS = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.floordiv,
            "Mod": operator.mod, "Equal": operator.eq, "Less": operator.lt, "Greater": operator.gt,
            "LessOrEqual": operator.le, "GreaterOrEqual": operator.ge, "Max": max, "Min": min}


def _dim_binary(op: str, a, b):
    """One entry of shape arithmetic where a dim may be symbolic (``"batch"``, ``"4*batch"``)."""
    a, b = (int(a) if isinstance(a, numbers.Integral) else a), (int(b) if isinstance(b, numbers.Integral) else b)
    if isinstance(a, int) and isinstance(b, int):
        if op not in _INT_OPS or (op in ("Div", "Mod") and b == 0):
            raise _NotFoldable(f"{op} of dims {a} and {b}")
        return _INT_OPS[op](a, b)
    if op == "Add":
        return dim_add(a, b)
    if op == "Sub":
        return dim_sub(a, b)
    if op == "Mul":
        return dim_mul(a, b)
    if op == "Equal":
        if isinstance(a, int) and a < 0 or isinstance(b, int) and b < 0:
            return False                                # a dim never equals the -1 of "infer"
        if a == b:
            return True
        raise _NotFoldable(f"cannot decide {a} == {b} at import")
    if op == "Div":
        q = dim_div(a, b)
        if q is not None:
            return q
    raise _NotFoldable(f"cannot compute {a} {op} {b} with symbolic dims")


class _NotFoldable(Exception):
    pass


def _fold_binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if _is_symbolic(a) or _is_symbolic(b):
        fn = np.frompyfunc(lambda x, y: _dim_binary(op, x, y), 2, 1)
        out = fn(a.astype(object), b.astype(object))
        out = np.asarray(out, dtype=object)
        return _tidy(out) if op != "Equal" else out.astype(bool)
    if op == "Div" and a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return np.asarray(np.trunc(a / b)).astype(np.result_type(a, b))
    if op in ("Mod", "FMod"):
        return np.asarray(np.mod(a, b) if op == "Mod" else np.fmod(a, b))
    fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
          "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
          "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
          "Max": np.maximum, "Min": np.minimum}[op]
    out = np.asarray(fn(a, b))
    if out.dtype.kind == "f" and a.dtype.kind == "f":
        out = out.astype(np.result_type(a, b))
    return out


# ----------------------------------------------------------------------------------------
# the importer
# ----------------------------------------------------------------------------------------

class _Importer:
    def __init__(self, model, graph_name: str, dims: dict | None):
        from onnx import numpy_helper

        self.numpy_helper = numpy_helper
        self.model = model
        self.onnx_graph = model.graph
        self.g = Graph(graph_name)
        self.dims = {k: v for k, v in (dims or {}).items()}
        self.known: dict[str, np.ndarray] = {}     # ONNX value name → array known at import
        self.tensors: dict[str, Tensor] = {}       # ONNX value name → graph tensor
        self.names: set[str] = set()
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    # -- names ---------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        name = base or "v"
        k = 1
        g = self.g
        while name in self.names or name in g.inputs or name in g.params or name in g.consts:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def _symbol(self, text: str) -> str | int:
        if text in self.dims:
            return int(self.dims[text])
        sym = re.sub(r"\W", "_", text)
        if not sym or sym[0].isdigit() or keyword.iskeyword(sym):
            sym = "d_" + sym
        if sym in self.dims:
            return int(self.dims[sym])
        return sym

    # -- values --------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.known or name in self.tensors

    def known_value(self, name: str) -> np.ndarray | None:
        return self.known.get(name)

    def tensor(self, name: str) -> Tensor:
        """The graph tensor of an ONNX value; known arrays become consts on first use."""
        if name in self.tensors:
            return self.tensors[name]
        arr = self.known.get(name)
        if arr is None:
            raise OnnxImportError(f"ONNX value {name!r} is used before it is defined")
        if _is_symbolic(arr):
            raise OnnxImportError(
                f"ONNX value {name!r} holds symbolic dims {tuple(arr.flat)} but is used as data",
                hint="bind the dims to sizes: from_onnx(path, dims={'batch': 2, ...})")
        t = self.g.const(self._unique(name), arr)
        self.tensors[name] = t
        return t

    # -- the model -----------------------------------------------------------------------
    def run(self) -> Graph:
        og = self.onnx_graph
        self._check_supported()
        readers: dict[str, set[str]] = {}
        for node in og.node:
            for i in node.input:
                readers.setdefault(i, set()).add(node.op_type)
        # Identity of an initializer (torch's tied/shared weights) reads it like its readers do.
        for node in og.node:
            if node.op_type == "Identity":
                readers.setdefault(node.input[0], set()).update(readers.get(node.output[0], set()))
        init_names = {init.name for init in og.initializer}
        for init in og.initializer:
            arr = self.numpy_helper.to_array(init)
            if arr.dtype == np.float16:
                arr = arr.astype(np.float32)
            is_weight = (arr.dtype.kind == "f" and arr.size > 1 and bool(np.isfinite(arr).all())
                         and bool(readers.get(init.name, set()) & _WEIGHT_READERS))
            if is_weight:
                t = self.g.param(self._unique(init.name), arr.shape, init="zeros", dtype=arr.dtype)
                self.g.values[t.node.name] = np.array(arr, order="C")
                self.tensors[init.name] = t
            self.known[init.name] = arr
        for inp in og.input:
            if inp.name in init_names:
                continue
            tt = inp.type.tensor_type
            shape = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    shape.append(self._symbol(d.dim_param))
                else:
                    shape.append(self._symbol(f"{inp.name}_dim{i}"))
            self.names.add(inp.name)
            self.tensors[inp.name] = self.g.input(inp.name, tuple(shape), _onnx_dtype(tt.elem_type))
        for node in og.node:
            self._convert(node)
        for out in og.output:
            if not self.has(out.name):
                raise OnnxImportError(f"graph output {out.name!r} is never computed")
            self.g.output(out.name, self.tensor(out.name))
        return self.g

    def _check_supported(self):
        missing = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                          for n in self.onnx_graph.node
                          if n.domain not in ("", "ai.onnx") or n.op_type not in CONVERTERS})
        if missing:
            raise OnnxImportError(
                f"the ONNX model uses {len(missing)} unsupported op type(s): {', '.join(missing)}",
                hint="supported: " + ", ".join(sorted(CONVERTERS)))

    def _convert(self, node):
        attrs = _attrs(node)
        attrs["_n_outputs"] = len(node.output)       # Split needs it when the sizes are implicit
        conv = CONVERTERS[node.op_type]
        ins = list(node.input)
        try:
            params = self.g.params
            if node.op_type in FOLDERS and all(i == "" or (i in self.known and not (
                    i in self.tensors and self.tensors[i].node.name in params)) for i in ins):
                try:
                    outs = FOLDERS[node.op_type](self, [self.known.get(i) if i else None for i in ins], attrs)
                except _NotFoldable:
                    outs = None
                if outs is not None:
                    for name, arr in zip(node.output, outs):
                        self.known[name] = _as_known(arr)
                    return
            outs = conv(self, ins, attrs)
        except _NotFoldable as err:
            raise OnnxImportError(f"{node.op_type} node {node.name!r}: {err}",
                                  hint="bind the dims to sizes: from_onnx(path, dims={'batch': 2, ...})") from None
        except OnnxImportError as err:
            raise OnnxImportError(f"{node.op_type} node {node.name!r}: {err.message}", hint=err.hint) from None
        except AttngraphError as err:
            raise type(err)(f"ONNX {node.op_type} node {node.name!r}: {err.message}", hint=err.hint) from None
        if not isinstance(outs, (tuple, list)):
            outs = (outs,)
        for name, value in zip(node.output, outs):
            if isinstance(value, Tensor):
                self.tensors[name] = value
            else:
                self.known[name] = _as_known(value)


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


# ----------------------------------------------------------------------------------------
# folding: numpy on known values (shape subgraphs, constants)
# ----------------------------------------------------------------------------------------

def _fold_constant(imp, ins, a):
    if "value" in a:
        arr = imp.numpy_helper.to_array(a["value"])
        return [arr.astype(np.float32) if arr.dtype == np.float16 else arr]
    for key, dt in (("value_float", np.float32), ("value_int", np.int64)):
        if key in a:
            return [np.asarray(a[key], dtype=dt)]
    for key, dt in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in a:
            return [np.asarray(a[key], dtype=dt)]
    raise OnnxImportError(f"Constant with attributes {sorted(a)} is not supported")


def _fold_shape(imp, ins, a):
    (x,) = ins
    shape = np.array(x.shape, dtype=np.int64)
    return [_slice_vector(shape, a)]


def _slice_vector(shape, a):
    start, end = a.get("start", 0), a.get("end", None)
    return shape[start:end]


def _fold_cast(imp, ins, a):
    (x,) = ins
    dt = _onnx_dtype(a["to"])
    if _is_symbolic(x):
        if np.dtype(dt).kind in "iu":
            return [x]
        raise _NotFoldable("a symbolic dim cast to a non-integer type")
    return [x.astype(dt)]


def _fold_binary_op(op):
    def fold(imp, ins, a):
        if op == "Mod" and a.get("fmod", 0):
            if _is_symbolic(ins[0]) or _is_symbolic(ins[1]):
                raise _NotFoldable("fmod of symbolic dims")
            return [_fold_binary("FMod", ins[0], ins[1])]
        return [_fold_binary(op, ins[0], ins[1])]
    return fold


def _fold_unary(fn):
    def fold(imp, ins, a):
        if _is_symbolic(ins[0]):
            raise _NotFoldable("math on symbolic dims")
        return [np.asarray(fn(ins[0])).astype(ins[0].dtype) if ins[0].dtype.kind == "f" else np.asarray(fn(ins[0]))]
    return fold


def _axes_of(imp, ins, a, index=1):
    if len(ins) > index and ins[index] is not None:
        return [int(v) for v in np.asarray(ins[index]).reshape(-1)]
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    return None


def _fold_unsqueeze(imp, ins, a):
    x = ins[0]
    axes = _axes_of(imp, ins, a)
    rank = x.ndim + len(axes)
    out = x
    for ax in sorted(v % rank for v in axes):
        out = np.expand_dims(out, ax)
    return [out]


def _fold_squeeze(imp, ins, a):
    x = ins[0]
    axes = _axes_of(imp, ins, a)
    if axes is None:
        return [np.squeeze(x)]
    return [np.squeeze(x, axis=tuple(v % x.ndim for v in axes))]


def _fold_concat(imp, ins, a):
    arrs = [v for v in ins if v is not None]
    if any(_is_symbolic(v) for v in arrs):
        arrs = [v.astype(object) for v in arrs]
        return [_tidy(np.concatenate(arrs, axis=a["axis"]))]
    return [np.concatenate(arrs, axis=a["axis"])]


def _fold_gather(imp, ins, a):
    data, idx = ins
    return [np.take(data, idx.astype(np.int64), axis=a.get("axis", 0))]


def _slice_params(ins, a, rank):
    if len(ins) > 1:
        starts = [int(v) for v in ins[1].reshape(-1)] if not _is_symbolic(ins[1]) else list(ins[1].flat)
        ends = [int(v) for v in ins[2].reshape(-1)] if not _is_symbolic(ins[2]) else list(ins[2].flat)
        axes = [int(v) for v in ins[3].reshape(-1)] if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = [int(v) for v in ins[4].reshape(-1)] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    return starts, ends, [v % rank for v in axes], steps


def _py_slice(start, end, step):
    if isinstance(end, int) and (end >= _INT64_BIG or end <= -_INT64_BIG):
        end = None
    return slice(start, end, step)


def _fold_slice(imp, ins, a):
    x = ins[0]
    if any(v is not None and _is_symbolic(v) for v in ins[1:]):
        raise _NotFoldable("a slice of known values with symbolic bounds")
    starts, ends, axes, steps = _slice_params(ins, a, x.ndim)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[ax] = _py_slice(s, e, st)
    return [x[tuple(index)]]


def _fold_reshape(imp, ins, a):
    x, shape = ins
    if _is_symbolic(shape):
        raise _NotFoldable("reshape of a known value to a symbolic shape")
    target = [int(v) for v in shape]
    if not a.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return [x.reshape(target)]


def _fold_constant_of_shape(imp, ins, a):
    (shape,) = ins
    value = imp.numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    if _is_symbolic(shape):
        raise _NotFoldable("symbolic shape")
    return [np.full(tuple(int(v) for v in shape), value.reshape(-1)[0], dtype=value.dtype)]


def _fold_expand(imp, ins, a):
    x, shape = ins
    if _is_symbolic(shape) or _is_symbolic(x):
        raise _NotFoldable("symbolic shape")
    target = np.broadcast_shapes(x.shape, tuple(int(v) for v in shape))
    return [np.array(np.broadcast_to(x, target))]


def _fold_where(imp, ins, a):
    c, x, y = ins
    if _is_symbolic(x) or _is_symbolic(y):
        return [_tidy(np.where(c, x.astype(object), y.astype(object)))]
    return [np.where(c, x, y)]


def _fold_range(imp, ins, a):
    if any(_is_symbolic(v) for v in ins):
        raise _NotFoldable("symbolic range")
    start, limit, delta = (v.reshape(()) for v in ins)
    return [np.arange(start, limit, delta, dtype=np.result_type(start, limit, delta))]


def _fold_transpose(imp, ins, a):
    return [np.transpose(ins[0], a.get("perm"))]


def _fold_identity(imp, ins, a):
    return [ins[0]]


def _fold_not(imp, ins, a):
    return [np.logical_not(ins[0])]


FOLDERS: dict[str, Callable] = {
    "Constant": _fold_constant, "Shape": _fold_shape, "Cast": _fold_cast, "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze,
    "Concat": _fold_concat, "Gather": _fold_gather, "Slice": _fold_slice, "Reshape": _fold_reshape,
    "ConstantOfShape": _fold_constant_of_shape, "Expand": _fold_expand, "Where": _fold_where,
    "Range": _fold_range, "Transpose": _fold_transpose, "Identity": _fold_identity, "Not": _fold_not,
    "Sqrt": _fold_unary(np.sqrt), "Neg": _fold_unary(np.negative), "Floor": _fold_unary(np.floor),
    "Ceil": _fold_unary(np.ceil), "Abs": _fold_unary(np.abs),
}
for _op in ("Add", "Sub", "Mul", "Div", "Mod", "Pow", "Equal", "Less", "Greater", "LessOrEqual",
            "GreaterOrEqual", "And", "Or", "Max", "Min"):
    FOLDERS[_op] = _fold_binary_op(_op)


# ----------------------------------------------------------------------------------------
# converting: attngraph nodes for values known only at run time
# ----------------------------------------------------------------------------------------

def _cv_shape(imp, ins, a):
    x = imp.tensor(ins[0])
    return _slice_vector(_sym_array(x.shape), a)


def _binary(op_name):
    def convert(imp, ins, a):
        x, y = promote_pair(imp.tensor(ins[0]), imp.tensor(ins[1]))
        return apply(op_name, [x, y])
    return convert


def _unary(op_name):
    def convert(imp, ins, a):
        return apply(op_name, [imp.tensor(ins[0])])
    return convert


def _cv_mod(imp, ins, a):
    raise OnnxImportError("Mod is supported on values known at import (shape arithmetic), not on run-time data")


def _cv_isnan(imp, ins, a):
    x = imp.tensor(ins[0])
    return apply("not_equal", [x, x])


def _cv_identity(imp, ins, a):
    return imp.tensor(ins[0])


def _cv_cast(imp, ins, a):
    from .ir import as_dtype

    x = imp.tensor(ins[0])
    dt = as_dtype(_onnx_dtype(a["to"]))
    return x if x.dtype == dt else apply("cast", [x], dtype=dt)


def _cv_matmul(imp, ins, a):
    return apply("matmul", [imp.tensor(ins[0]), imp.tensor(ins[1])])


def _cv_gemm(imp, ins, a):
    x, w = imp.tensor(ins[0]), imp.tensor(ins[1])
    if a.get("transA", 0):
        x = x.transpose(1, 0)
    if a.get("transB", 0):
        w = w.transpose(1, 0)
    y = apply("matmul", [x, w])
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if len(ins) > 2 and ins[2]:
        c = imp.tensor(ins[2])
        if beta != 1.0:
            c = c * beta
        y = y + c
    return y


def _cv_softmax(imp, ins, a):
    x = imp.tensor(ins[0])
    axis = int(a.get("axis", -1 if imp.opset >= 13 else 1))
    if imp.opset < 13 and axis % x.ndim != x.ndim - 1:
        raise OnnxImportError("Softmax before opset 13 over more than the last axis is not supported")
    return apply("softmax", [x], axis=axis)


def _cv_layernorm(imp, ins, a):
    x = imp.tensor(ins[0])
    axis = int(a.get("axis", -1))
    if axis % x.ndim != x.ndim - 1:
        raise OnnxImportError(f"LayerNormalization over axis {axis} (not the last) is not supported")
    gamma = imp.tensor(ins[1]) if len(ins) > 1 and ins[1] else None
    beta = imp.tensor(ins[2]) if len(ins) > 2 and ins[2] else None
    affine = [t for t in (gamma, beta) if t is not None]
    return apply("layernorm", [x, *affine], eps=float(a.get("epsilon", 1e-5)), has_gamma=gamma is not None,
                 has_beta=beta is not None)


def _cv_conv(imp, ins, a):
    x, w = imp.tensor(ins[0]), imp.tensor(ins[1])
    if x.ndim != 4:
        raise OnnxImportError(f"only 2-D Conv is supported (input of rank {x.ndim})")
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise OnnxImportError(f"Conv auto_pad={a['auto_pad']} is not supported")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        x = apply("pad", [x], pads=((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), value=0.0)
        pads = [0, 0, 0, 0]
    bias = [imp.tensor(ins[2])] if len(ins) > 2 and ins[2] else []
    return apply("conv2d", [x, w, *bias], stride=tuple(a.get("strides", (1, 1))), padding=tuple(pads[:2]),
                 dilation=tuple(a.get("dilations", (1, 1))), groups=int(a.get("group", 1)))


def _cv_where(imp, ins, a):
    c, x, y = imp.tensor(ins[0]), imp.tensor(ins[1]), imp.tensor(ins[2])
    x, y = promote_pair(x, y)
    return apply("where", [c, x, y])


def _cv_trilu(imp, ins, a):
    x = imp.tensor(ins[0])
    k = 0
    if len(ins) > 1 and ins[1]:
        kv = imp.known_value(ins[1])
        if kv is None or _is_symbolic(kv):
            raise OnnxImportError("Trilu with a k computed at run time is not supported")
        k = int(kv.reshape(()))
    return apply("trilu", [x], k=k, upper=bool(a.get("upper", 1)))


def _known_ints(imp, name: str, what: str) -> list:
    arr = imp.known_value(name)
    if arr is None:
        raise OnnxImportError(f"the {what} must be known at import (it is computed from run-time data)")
    return list(arr.reshape(-1).tolist()) if not _is_symbolic(arr) else list(arr.reshape(-1))


def _cv_reshape(imp, ins, a):
    x = imp.tensor(ins[0])
    target = _known_ints(imp, ins[1], "Reshape target shape")
    if not a.get("allowzero", 0):
        target = [x.shape[i] if isinstance(d, numbers.Integral) and d == 0 else d for i, d in enumerate(target)]
    target = [int(d) if isinstance(d, numbers.Integral) else d for d in target]
    if tuple(target) == tuple(x.shape):
        return x
    try:
        return apply("reshape", [x], shape=tuple(target))
    except ShapeError:
        baked = _baked_dim(x.shape, target)
        if baked is None:
            raise
        raise _BakedDim(*baked) from None


class _BakedDim(Exception):
    """The exporter wrote a traced size where the model has a symbolic dim (torch's MultiheadAttention
    does this for the sequence length): the import starts again with that dim bound."""

    def __init__(self, symbol: str, size: int):
        super().__init__(symbol, size)
        self.symbol, self.size = symbol, size


def _baked_dim(shape, target) -> tuple[str, int] | None:
    """The one binding ``symbol = size`` that makes ``target`` hold as many elements as ``shape``."""
    if any(isinstance(d, int) and d == -1 for d in target):
        return None
    total, want = dim_product(shape), dim_product(target)
    for sym in sorted(shape_symbols(shape)):
        rest = dim_div(total, sym)
        if rest is None or rest == 0:
            continue
        size = dim_div(want, rest)
        if isinstance(size, int) and size > 0 and dim_mul(rest, size) == want:
            return sym, size
    return None


def _cv_unsqueeze(imp, ins, a):
    x = imp.tensor(ins[0])
    axes = [int(v) for v in _known_ints(imp, ins[1], "Unsqueeze axes")] if len(ins) > 1 else list(a["axes"])
    rank = x.ndim + len(axes)
    shape = list(x.shape)
    for ax in sorted(v % rank for v in axes):
        shape.insert(ax, 1)
    return apply("reshape", [x], shape=tuple(shape))


def _cv_squeeze(imp, ins, a):
    x = imp.tensor(ins[0])
    if len(ins) > 1 and ins[1]:
        axes = [int(v) for v in _known_ints(imp, ins[1], "Squeeze axes")]
    else:
        axes = list(a.get("axes", [i for i, d in enumerate(x.shape) if d == 1]))
    axes = {v % x.ndim for v in axes}
    for ax in axes:
        if x.shape[ax] != 1:
            raise ShapeError(f"cannot squeeze axis {ax} of size {x.shape[ax]}")
    return apply("reshape", [x], shape=tuple(d for i, d in enumerate(x.shape) if i not in axes))


def _cv_flatten(imp, ins, a):
    x = imp.tensor(ins[0])
    axis = int(a.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return apply("reshape", [x], shape=(dim_product(x.shape[:axis]), dim_product(x.shape[axis:])))


def _cv_transpose(imp, ins, a):
    x = imp.tensor(ins[0])
    perm = a.get("perm")
    return apply("transpose", [x], axes=tuple(perm) if perm is not None else None)


def _cv_concat(imp, ins, a):
    parts = [imp.tensor(i) for i in ins if i]
    dt = parts[0].dtype
    for p in parts[1:]:
        if p.dtype != dt:
            raise OnnxImportError("Concat of tensors with different dtypes")
    return apply("concat", parts, axis=int(a["axis"]))


def _cv_gather(imp, ins, a):
    x = imp.tensor(ins[0])
    axis = int(a.get("axis", 0)) % x.ndim
    idx = imp.known_value(ins[1])
    if idx is not None and idx.ndim == 0 and not _is_symbolic(idx):
        # One known index: a slice and a reshape (drops the axis), cheaper than a gather.
        i = int(idx)
        starts, stops = [None] * x.ndim, [None] * x.ndim
        starts[axis], stops[axis] = i, (i + 1 if i != -1 else None)
        y = apply("slice", [x], starts=tuple(starts), stops=tuple(stops), steps=(1,) * x.ndim)
        return apply("reshape", [y], shape=tuple(d for k, d in enumerate(y.shape) if k != axis))
    return apply("gather", [x, imp.tensor(ins[1])], axis=axis)


def _cv_slice(imp, ins, a):
    x = imp.tensor(ins[0])
    if len(ins) > 1:
        vals = [imp.known_value(i) if i else None for i in ins[1:]]
        if any(i and v is None for i, v in zip(ins[1:], vals)):
            raise OnnxImportError("Slice bounds must be known at import")
        starts, ends, axes, steps = _slice_params([None, *vals], a, x.ndim)
    else:
        starts, ends, axes, steps = _slice_params([None], a, x.ndim)
    s_all, e_all, st_all = [None] * x.ndim, [None] * x.ndim, [1] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        sl = _py_slice(s if not isinstance(s, numbers.Integral) else int(s),
                       e if not isinstance(e, numbers.Integral) else int(e), int(st))
        dim = x.shape[ax]
        start, stop = sl.start, sl.stop
        if isinstance(dim, int) and isinstance(stop, int) and stop >= dim and sl.step > 0:
            stop = None
        if start == 0 and sl.step > 0:
            start = None
        if stop is not None and stop == dim:
            stop = None
        s_all[ax], e_all[ax], st_all[ax] = start, stop, sl.step
    if all(v is None for v in s_all + e_all) and all(v == 1 for v in st_all):
        return x
    return apply("slice", [x], starts=tuple(s_all), stops=tuple(e_all), steps=tuple(st_all))


def _target_shape(imp, name: str, what: str):
    return [int(d) if isinstance(d, numbers.Integral) else d for d in _known_ints(imp, name, what)]


def _cv_expand(imp, ins, a):
    x = imp.tensor(ins[0])
    target = _target_shape(imp, ins[1], "Expand shape")
    rank = max(len(target), x.ndim)
    xs = (1,) * (rank - x.ndim) + tuple(x.shape)
    ts = (1,) * (rank - len(target)) + tuple(target)
    out = []
    for dx, dt in zip(xs, ts):
        if dt == 1 or dt == dx:
            out.append(dx)
        elif dx == 1:
            out.append(dt)
        else:
            raise ShapeError(f"cannot expand {tuple(x.shape)} to {tuple(target)}")
    if tuple(out) == tuple(x.shape):
        return x
    broadcast_shapes(xs, tuple(out))
    return apply("broadcast_to", [x], shape=tuple(out))


def _cv_constant_of_shape(imp, ins, a):
    shape = _target_shape(imp, ins[0], "ConstantOfShape shape")
    value = imp.numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    v = value.reshape(-1)[0].item()
    return imp.g.full(tuple(shape), v, dtype=value.dtype if value.dtype != np.float16 else np.float32)


def _cv_split(imp, ins, a):
    x = imp.tensor(ins[0])
    axis = int(a.get("axis", 0)) % x.ndim
    if len(ins) > 1 and ins[1]:
        sizes = tuple(int(v) for v in _known_ints(imp, ins[1], "Split sizes"))
    elif "split" in a:
        sizes = tuple(int(v) for v in a["split"])
    elif "num_outputs" in a:
        sizes = int(a["num_outputs"])
    else:
        sizes = a["_n_outputs"]
    return tuple(apply("split", [x], sizes=sizes, axis=axis))


def _cv_reduce_mean(imp, ins, a):
    x = imp.tensor(ins[0])
    axes = _axes_of(imp, [None, *[imp.known_value(i) if i else None for i in ins[1:]]], a)
    keep = bool(a.get("keepdims", 1))
    if axes is None and a.get("noop_with_empty_axes", 0):
        return x
    return apply("mean", [x], axis=tuple(axes) if axes is not None else None, keepdims=keep)


def _cv_not_folded(op):
    def convert(imp, ins, a):
        raise OnnxImportError(f"{op} is supported only on values known at import")
    return convert


CONVERTERS: dict[str, Callable] = {
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "Pow": _binary("pow"), "Equal": _binary("equal"), "Greater": _binary("greater"), "Less": _binary("less"),
    "GreaterOrEqual": _binary("greater_equal"), "LessOrEqual": _binary("less_equal"),
    "And": _binary("logical_and"), "Or": _binary("logical_or"), "Max": _binary("maximum"),
    "Min": _binary("minimum"), "Not": _unary("logical_not"), "Mod": _cv_mod, "IsNaN": _cv_isnan,
    "Erf": _unary("erf"), "Sqrt": _unary("sqrt"), "Tanh": _unary("tanh"), "Sigmoid": _unary("sigmoid"),
    "Relu": _unary("relu"), "Exp": _unary("exp"), "Log": _unary("log"), "Neg": _unary("neg"),
    "Abs": _unary("abs"), "Sin": _unary("sin"), "Cos": _unary("cos"),
    "Identity": _cv_identity, "Cast": _cv_cast, "Constant": _cv_not_folded("Constant"),
    "Shape": _cv_shape, "MatMul": _cv_matmul, "Gemm": _cv_gemm, "Softmax": _cv_softmax,
    "LayerNormalization": _cv_layernorm, "Conv": _cv_conv, "Where": _cv_where, "Trilu": _cv_trilu,
    "Reshape": _cv_reshape, "Unsqueeze": _cv_unsqueeze, "Squeeze": _cv_squeeze, "Flatten": _cv_flatten,
    "Transpose": _cv_transpose, "Concat": _cv_concat, "Gather": _cv_gather, "Slice": _cv_slice,
    "Expand": _cv_expand, "ConstantOfShape": _cv_constant_of_shape, "ReduceMean": _cv_reduce_mean,
    "Range": _cv_not_folded("Range"), "Split": _cv_split,
}


def from_onnx(path, *, dims: dict | None = None, name: str | None = None) -> Graph:
    """Import an ONNX model (a path or a ``ModelProto``) as a Graph with the same input and output names.

    Dynamic axes (ONNX ``dim_param``) become symbolic dims, names made into identifiers
    (``"batch size"`` → ``batch_size``). ``dims`` binds some of them to sizes, e.g.
    ``{"seq": 6}``. When the file fixes a dim the input declares dynamic (torch's
    MultiheadAttention export writes the traced sequence length into its reshapes, so
    onnxruntime fails on other lengths too), the dim is bound to that size with a warning.

    >>> g = from_onnx("model.onnx")                     # doctest: +SKIP
    >>> exe = ag.compile(g, backend="cpu")              # doctest: +SKIP
    """
    try:
        import onnx
    except ImportError:
        raise AttngraphError("ONNX import needs the onnx package",
                             hint="pip install 'attngraph[onnx]'") from None
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    graph_name = name or model.graph.name or "onnx"
    dims = dict(dims or {})
    for _ in range(16):
        try:
            return _Importer(model, graph_name, dims).run()
        except _BakedDim as baked:
            warnings.warn(f"from_onnx: the ONNX file fixes the dynamic dim {baked.symbol!r} to {baked.size} "
                          f"(a size traced by the exporter); importing with {baked.symbol}={baked.size}",
                          stacklevel=2)
            dims[baked.symbol] = baked.size
    raise OnnxImportError("too many dims fixed by the file")
