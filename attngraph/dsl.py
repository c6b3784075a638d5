"""The Python DSL: Graph builder methods, Tensor handles with operators, and ``apply``.

Every op function (``ag.softmax``, ``ag.matmul`` ...) ends in :func:`apply`, which
runs the op's shape rule while the graph is built. A shape or dtype error is raised
right there, naming the op, the shapes and the user's ``file:line``.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

from . import ir
from .errors import AttngraphError, DTypeError, ShapeError, VerifyError
from .initializers import initialize
from .ir import Attrs, DType, Node, TensorType, Value, as_dtype, capture_source, format_shape, get_op
from .ir.make import make_node
from .ir.dtypes import promote, weak_scalar_dtype

__all__ = ["Graph", "Tensor", "apply", "as_tensor", "binary", "scalar_like"]


class Graph(ir.Graph):
    """A graph you build: ``g.input``, ``g.param``, ``g.const``, ``g.output``.

    >>> g = Graph("toy")
    >>> x = g.input("x", ("B", 16, 64))
    """

    def __init__(self, name: str = "graph", *, seed: int = 0):
        super().__init__(name)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._scope: list[str] = []
        self._auto = itertools.count()

    def _ensure_builder(self):
        # Graphs made by passes (empty_like) skip __init__; give them builder state lazily.
        if not hasattr(self, "_rng"):
            self.seed = 0
            self._rng = np.random.default_rng(0)
            self._scope = []
            self._auto = itertools.count()

    # -- sources ---------------------------------------------------------------------------
    def input(self, name: str, shape, dtype="float32") -> "Tensor":
        """A value fed at run time. Dims may be symbolic: ``("B", "T", 64)``."""
        ttype = _checked_type(shape, dtype, f"input {name!r}")
        return self._source("input", name, ttype)

    def param(self, name: str, shape, init="xavier_uniform", dtype="float32") -> "Tensor":
        """A trainable weight, initialized now (seeded by the graph) and stored in ``graph.values``."""
        self._ensure_builder()
        ttype = _checked_type(shape, dtype, f"param {name!r}")
        if not ir.is_static(ttype.shape):
            raise ShapeError(f"param {name!r} has symbolic shape {format_shape(ttype.shape)}; parameters need fixed sizes",
                             where=_where())
        try:
            value = initialize(init, ttype.shape, ttype.dtype.numpy, self._rng)
        except AttngraphError as err:
            raise err.located(f"param {name!r}", _where()) from None
        tensor = self._source("param", name, ttype)
        self.values[name] = value
        return tensor

    def const(self, name: str, array) -> "Tensor":
        """A constant array; keeps the array's dtype (bool too)."""
        arr = np.asarray(array)
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        ttype = TensorType(as_dtype(arr.dtype), arr.shape)
        tensor = self._source("const", name, ttype)
        self.values[name] = np.array(arr, order="C")  # a copy; keeps 0-d arrays 0-d
        return tensor

    def output(self, name: str, tensor: "Tensor") -> "Tensor":
        """Mark ``tensor`` as an output called ``name``."""
        if not isinstance(tensor, Tensor):
            raise AttngraphError(f"output {name!r} must be a Tensor, got {type(tensor).__name__}", where=_where())
        if tensor.graph is not self:
            raise VerifyError(f"output {name!r} is a tensor of graph {tensor.graph.name!r}, not {self.name!r}",
                              where=_where())
        self.set_output(name, tensor.value)
        return tensor

    def full(self, shape, value, dtype="float32") -> "Tensor":
        """A tensor of ``shape`` (symbolic dims allowed) filled with ``value``."""
        return apply("full", [], graph=self, shape=tuple(shape), value=value, dtype=as_dtype(dtype))

    def arange(self, stop, dtype="int64") -> "Tensor":
        """``0, 1, ..., stop-1``; ``stop`` may be a symbolic dim such as ``"T"``."""
        return apply("arange", [], graph=self, stop=stop, dtype=as_dtype(dtype))

    @contextlib.contextmanager
    def scope(self, name: str):
        """Nodes made inside belong to module ``name`` (nested scopes become clusters in diagrams)."""
        self._ensure_builder()
        self._scope.append(str(name))
        try:
            yield self
        finally:
            self._scope.pop()

    def tensor(self, value: Value) -> "Tensor":
        """A Tensor handle for a value already in this graph."""
        return Tensor(self, value)

    def output_tensor(self, name: str) -> "Tensor":
        return Tensor(self, self.outputs[name])

    def _source(self, op: str, name: str, ttype: TensorType) -> "Tensor":
        self._ensure_builder()
        if not isinstance(name, str) or not name:
            raise AttngraphError(f"a {op} needs a non-empty string name, got {name!r}", where=_where())
        node = Node(op, (), Attrs(), (ttype,), name=name, source=capture_source(), scope=tuple(self._scope))
        try:
            self.add_node(node)
        except VerifyError as err:
            raise err.located(None, _where()) from None
        return Tensor(self, node.out)

    def _auto_const(self, array: np.ndarray) -> "Tensor":
        self._ensure_builder()
        name = f"_c{next(self._auto)}"
        while name in self.values or name in self.inputs:
            name = f"_c{next(self._auto)}"
        return self.const(name, array)


def _where() -> str | None:
    src = capture_source()
    return str(src) if src else None


def _checked_type(shape, dtype, what: str) -> TensorType:
    try:
        return TensorType(as_dtype(dtype), shape)
    except AttngraphError as err:
        raise err.located(what, _where()) from None


class Tensor:
    """A handle on one value of a graph, with numpy-like operators."""

    __slots__ = ("graph", "value")
    __array_priority__ = 1000
    __array_ufunc__ = None  # numpy scalars and arrays defer to our reflected operators

    def __init__(self, graph: Graph, value: Value):
        self.graph = graph
        self.value = value

    # -- what it is ------------------------------------------------------------------------
    @property
    def node(self) -> Node:
        return self.value.node

    @property
    def type(self) -> TensorType:
        return self.value.type

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return self.type.rank

    @property
    def name(self) -> str:
        return self.node.name or self.node.label

    def __repr__(self) -> str:
        where = f" from {self.node.source.short}" if self.node.source else ""
        return f"<Tensor {self.value!r}: {self.node.op} -> {self.type}{where}>"

    def __bool__(self):
        raise AttngraphError("a graph Tensor has no truth value while the graph is built",
                             hint="use ag.where(cond, a, b) for a data-dependent choice", where=_where())

    def __iter__(self):
        raise AttngraphError("a graph Tensor cannot be iterated", hint="use ag.split or slicing", where=_where())

    def __array__(self, *args, **kwargs):
        raise AttngraphError("a graph Tensor has no value until the compiled graph runs",
                             hint="compile the graph and call exe.run(feeds)", where=_where())

    __hash__ = object.__hash__

    # -- arithmetic ------------------------------------------------------------------------
    def __add__(self, other): return binary("add", self, other)
    def __radd__(self, other): return binary("add", other, self)
    def __sub__(self, other): return binary("sub", self, other)
    def __rsub__(self, other): return binary("sub", other, self)
    def __mul__(self, other): return binary("mul", self, other)
    def __rmul__(self, other): return binary("mul", other, self)
    def __truediv__(self, other): return binary("div", self, other)
    def __rtruediv__(self, other): return binary("div", other, self)
    def __pow__(self, other): return binary("pow", self, other)
    def __rpow__(self, other): return binary("pow", other, self)
    def __matmul__(self, other): return binary("matmul", self, other, promote_scalars=False)
    def __rmatmul__(self, other): return binary("matmul", other, self, promote_scalars=False)
    def __neg__(self): return apply("neg", [self])
    def __pos__(self): return self
    def __abs__(self): return apply("abs", [self])

    def __lt__(self, other): return binary("less", self, other)
    def __le__(self, other): return binary("less_equal", self, other)
    def __gt__(self, other): return binary("greater", self, other)
    def __ge__(self, other): return binary("greater_equal", self, other)
    def __eq__(self, other): return binary("equal", self, other)  # type: ignore[override]
    def __ne__(self, other): return binary("not_equal", self, other)  # type: ignore[override]
    def __and__(self, other): return binary("logical_and", self, other)
    def __rand__(self, other): return binary("logical_and", other, self)
    def __or__(self, other): return binary("logical_or", self, other)
    def __ror__(self, other): return binary("logical_or", other, self)
    def __invert__(self): return apply("logical_not", [self])

    # -- shape -----------------------------------------------------------------------------
    @property
    def T(self) -> "Tensor":
        """The axes reversed, as in numpy."""
        return self.transpose()

    def transpose(self, *axes) -> "Tensor":
        """``x.transpose(0, 2, 1)`` or ``x.transpose((0, 2, 1))``; no axes reverses them."""
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
            axes = axes[0]
        return apply("transpose", [self], axes=tuple(axes) if axes else None)

    def reshape(self, *shape) -> "Tensor":
        """``x.reshape(2, -1)`` or ``x.reshape((2, -1))``; symbolic dims allowed."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        return apply("reshape", [self], shape=tuple(shape))

    def astype(self, dtype) -> "Tensor":
        return apply("cast", [self], dtype=as_dtype(dtype))

    def sum(self, axis=None, keepdims=False) -> "Tensor":
        return apply("sum", [self], axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False) -> "Tensor":
        return apply("mean", [self], axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False) -> "Tensor":
        return apply("max", [self], axis=axis, keepdims=keepdims)

    def __getitem__(self, index) -> "Tensor":
        return _getitem(self, index)


# ----------------------------------------------------------------------------------------
# apply: the one place where nodes are made
# ----------------------------------------------------------------------------------------

def apply(op_name: str, inputs: Sequence["Tensor"], *, graph: Graph | None = None, **attrs):
    """Add one ``op_name`` node reading ``inputs``; returns its Tensor (a tuple when it has several outputs).

    The op's shape rule runs now: a ShapeError or DTypeError names the op, the input
    shapes and the line of user code that called it.
    """
    op = get_op(op_name)
    for t in inputs:
        if not isinstance(t, Tensor):
            raise AttngraphError(f"{op_name}: expected Tensor inputs, got {type(t).__name__}", where=_where())
    graphs = {id(t.graph): t.graph for t in inputs}
    if graph is not None:
        graphs.setdefault(id(graph), graph)
    if len(graphs) != 1:
        if not graphs:
            raise AttngraphError(f"{op_name} has no tensor inputs; pass graph=", where=_where())
        names = ", ".join(repr(g.name) for g in graphs.values())
        raise VerifyError(f"{op_name} mixes tensors of different graphs ({names})", where=_where())
    (g,) = graphs.values()
    try:
        node = make_node(op_name, [t.value for t in inputs], attrs, source=capture_source(),
                         scope=tuple(getattr(g, "_scope", ())))
    except AttngraphError as err:
        shapes = " and ".join(format_shape(t.shape) for t in inputs)
        prefix = f"{op_name} of {shapes}" if inputs else op_name
        raise err.located(prefix, _where()) from None
    g.add_node(node)
    if op.multiple_outputs:
        return tuple(Tensor(g, v) for v in node.outputs())
    return Tensor(g, node.out)


def _is_scalar(x) -> bool:
    return isinstance(x, (numbers.Number, np.number, np.bool_)) or (isinstance(x, np.ndarray) and x.ndim == 0)


def scalar_like(graph: Graph, value, like: DType) -> Tensor:
    """A weakly typed scalar: a 0-d const that takes ``like``'s kind (``x_f32 * 0.5`` stays float32)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    dtype = weak_scalar_dtype(like, value)
    return graph._auto_const(np.asarray(value, dtype=dtype.numpy))


def as_tensor(x, graph: Graph, like: DType | None = None) -> Tensor:
    """A Tensor from a Tensor, a scalar (weakly typed next to ``like``) or an array (strongly typed)."""
    if isinstance(x, Tensor):
        return x
    if _is_scalar(x):
        return scalar_like(graph, x, like or DType.float32)
    if isinstance(x, (np.ndarray, list, tuple)):
        return graph._auto_const(np.asarray(x))
    raise AttngraphError(f"cannot use {type(x).__name__} as a tensor", where=_where())


def binary(op_name: str, a, b, *, promote_scalars: bool = True) -> Tensor:
    """Apply a two-input op after turning scalars/arrays into consts and promoting dtypes."""
    ta = a if isinstance(a, Tensor) else None
    tb = b if isinstance(b, Tensor) else None
    anchor = ta if ta is not None else tb
    if anchor is None:
        raise AttngraphError(f"{op_name} needs at least one Tensor operand", where=_where())
    if ta is None:
        ta = as_tensor(a, anchor.graph, like=tb.dtype)
    if tb is None:
        tb = as_tensor(b, anchor.graph, like=ta.dtype)
    ta, tb = promote_pair(ta, tb)
    return apply(op_name, [ta, tb])


def promote_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Cast the narrower of two tensors to the common dtype (torch's rule)."""
    if a.dtype == b.dtype:
        return a, b
    common = promote(a.dtype, b.dtype)
    if a.dtype != common:
        a = apply("cast", [a], dtype=common)
    if b.dtype != common:
        b = apply("cast", [b], dtype=common)
    return a, b


# ----------------------------------------------------------------------------------------
# indexing: basic numpy indexing lowered to slice + reshape, integer tensors to take
# ----------------------------------------------------------------------------------------

def _getitem(x: Tensor, index) -> Tensor:
    if isinstance(index, Tensor):
        return apply("gather", [x, index], axis=0)
    if not isinstance(index, tuple):
        index = (index,)
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise ShapeError("an index can only have a single ellipsis ('...')", where=_where())
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if consumed > x.ndim:
        raise ShapeError(f"too many indices for a tensor of shape {format_shape(x.shape)}: {consumed} given",
                         where=_where())
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - consumed))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (x.ndim - sum(1 for i in expanded if i is not None)))

    starts, stops, steps, out_shape_plan = [], [], [], []
    axis = 0
    for item in expanded:
        if item is None:
            out_shape_plan.append(("new", None))
            continue
        if isinstance(item, Tensor):
            raise ShapeError("indexing with a Tensor mixed with other indices is not supported",
                             hint="use ag.take(x, indices, axis=...)", where=_where())
        if isinstance(item, slice):
            starts.append(item.start)
            stops.append(item.stop)
            steps.append(1 if item.step is None else item.step)
            out_shape_plan.append(("keep", axis))
        elif isinstance(item, (numbers.Integral, np.integer)):
            i = int(item)
            dim = x.shape[axis]
            if isinstance(dim, int) and not -dim <= i < dim:
                raise ShapeError(f"index {i} is out of range for axis {axis} of size {dim}", where=_where())
            starts.append(i)
            stops.append(i + 1 if i != -1 else None)
            steps.append(1)
            out_shape_plan.append(("drop", axis))
        else:
            raise ShapeError(f"unsupported index {item!r}", hint="use ints, slices, None, ... or an int Tensor",
                             where=_where())
        axis += 1
    y = x
    trivial = all(s in (None, 0) for s in starts) and all(s is None for s in stops) and all(s == 1 for s in steps)
    if not trivial:
        y = apply("slice", [x], starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))
    if any(kind != "keep" for kind, _ in out_shape_plan):
        shape = []
        for kind, ax in out_shape_plan:
            if kind == "new":
                shape.append(1)
            elif kind == "keep":
                shape.append(y.shape[ax])
        y = apply("reshape", [y], shape=tuple(shape))
    return y


def tensors_of(items: Iterable, graph: Graph) -> list[Tensor]:
    return [as_tensor(t, graph) for t in items]
