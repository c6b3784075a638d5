"""Generated CPU kernels for fused elementwise regions (and matmul epilogues).

A region's expression (see ``ops/fused.py``) becomes a small, readable Python file: one
statement per op, built from the op's ``cpu`` template in the registry (``"math.exp({0})"``),
each result converted to the op's output dtype (so float32 stays float32 and casts happen
where the graph has them), inside a 2-D loop whose rows run in parallel (``prange``)::

    @numba.njit("void(float32[:, ::1], Array(float32, 2, 'C', readonly=True), "
                "Array(float32, 1, 'C', readonly=True))", parallel=True, cache=True, ...)
    def kernel(out, in0, in1):
        rows, cols = out.shape
        for i in prange(rows):
            for j in range(cols):
                x0 = in0[i, j]                                # (rows, cols)
                x1 = in1[j]                                   # one row, the same for every i
                t0 = np.float32((x0 + x1))                    # add
                ...
                out[i, j] = t4

Broadcasting happens outside the kernel: ``run_elementwise`` views every input broadcast to
the output's shape (stride 0 along broadcast axes, never a copy), merges adjacent axes where
every operand allows it, and hands the kernel 2-D views. Most regions collapse to
(rows, last dim) or to one flat axis (cut into rows of ``CHUNK`` so every core gets work);
shapes that keep more axes loop over the leading ones in Python.

Each input then reaches the kernel in the form that lets LLVM vectorize the inner loop,
its *access kind*: ``full`` (a C-contiguous (rows, cols) array), ``row`` (one contiguous row
broadcast down the rows: a bias), ``col`` (one value per row: read once per row), ``scalar``,
or ``strided`` (anything else, e.g. a transposed view: a 2-D array of any layout). The
kinds are part of the kernel's source and of its explicit signature, so each (expression,
dtypes, kinds) is one file compiled exactly once; the kinds the node's static shapes predict
are compiled when the graph is compiled, any other (a strided view met at run time) on
first use. numba caches the machine code next to the file (``kernel_cache.load_kernel``).
With ``NUMBA_DISABLE_JIT=1`` the same file runs as plain Python, for debugging.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...ir import DType, Node, TensorType, as_dtype, get_op
from ...ir.source import Source
from .kernel_cache import cache_dir, kernel_path, load_kernel
from ..arrays import matmul_into
from ..expression import literal as _literal, scalar_template as _template

__all__ = ["node_expression", "elementwise_source", "elementwise_header", "elementwise_kernel", "ElementwiseKernel",
           "run_elementwise", "access_kind", "predicted_kinds", "KINDS", "CHUNK", "matmul_epilogue_kernel",
           "residual_layernorm_kernel", "residual_layernorm_source"]

CHUNK = 2048   # a flat axis longer than 2 * CHUNK is cut into rows of CHUNK elements

_NUMBA_TYPE = {DType.float32: "float32", DType.float64: "float64", DType.int32: "int32", DType.int64: "int64",
               DType.bool: "boolean"}
_CONVERT = {DType.float32: "np.float32", DType.float64: "np.float64", DType.int32: "np.int32",
            DType.int64: "np.int64", DType.bool: "bool"}


# ----------------------------------------------------------------------------------------
# source
# ----------------------------------------------------------------------------------------

def node_expression(node: Node) -> tuple:
    """The expression of one elementwise node over its own inputs (``("in", k)`` for input k)."""
    if node.op == "fused_elementwise":
        return node.attrs["expr"]
    return (node.op, tuple(sorted(node.attrs.items()))) + tuple(("in", k) for k in range(len(node.inputs)))


def _describe(op_name: str, attrs: dict) -> str:
    if not attrs:
        return op_name
    return f"{op_name}(" + ", ".join(f"{k}={_literal(v) if not isinstance(v, DType) else v.value}"
                                      for k, v in attrs.items()) + ")"


def _op_order(expr) -> list[str]:
    """The op names of ``expr``, operands first, each distinct subtree once."""
    from attngraph.ops.fused import expression_ops

    return expression_ops(expr)


KINDS = ("full", "row", "col", "scalar", "strided")
_LOAD = {"full": "in{k}[i, j]", "strided": "in{k}[i, j]", "row": "in{k}[j]", "col": "in{k}[i]", "scalar": "in{k}[0]"}
_LOAD_NOTE = {"full": "(rows, cols)", "strided": "(rows, cols), any strides", "row": "one row, the same for every i",
              "col": "one value per row", "scalar": "one value"}
_ARRAY_TYPE = {"full": "Array({t}, 2, 'C', readonly=True)", "strided": "Array({t}, 2, 'A', readonly=True)",
               "row": "Array({t}, 1, 'C', readonly=True)", "col": "Array({t}, 1, 'A', readonly=True)",
               "scalar": "Array({t}, 1, 'A', readonly=True)"}


def _statements(expr, in_dtypes: Sequence[DType]) -> tuple[list[str], list[int], str, DType]:
    """Loop-body statements for ``expr``: (lines, inputs read, the result's name, its dtype).

    Each distinct subtree becomes one statement (a value the region reads twice is computed
    once); each op's result is converted to the dtype its shape rule gives."""
    lines: list[str] = []
    used: list[int] = []
    done: dict = {}
    temps = iter(range(1 << 30))

    def walk(e) -> tuple[str, DType]:
        if e in done:
            return done[e]
        tag = e[0]
        if tag == "in":
            k = e[1]
            name, dtype = f"x{k}", in_dtypes[k]
            used.append(k)
        elif tag == "const":
            dtype = as_dtype(e[2])
            name = f"{_CONVERT[dtype]}({_literal(e[1])})"
        else:
            attrs = dict(e[1])
            operands = [walk(c) for c in e[2:]]
            op = get_op(tag)
            dtype = op.infer(*(TensorType(d, ()) for _, d in operands), **attrs).dtype
            text = _template(tag, attrs).format(*(n for n, _ in operands), *(_literal(v) for _, v in e[1]))
            name = f"t{next(temps)}"
            lines.append(f"{name} = {_CONVERT[dtype]}({text})".ljust(56) + f"  # {_describe(tag, attrs)}")
        done[e] = (name, dtype)
        return name, dtype

    result, dtype = walk(expr)
    return lines, sorted(used), result, dtype


def elementwise_source(expr, in_dtypes: Sequence[DType], out_dtype: DType,
                       kinds: Sequence[str] | None = None) -> str:
    """The code of the kernel computing ``expr`` (no header; its hash names the file).

    ``kinds[k]`` is how input k is read (see the module doc); all ``strided`` by default."""
    in_dtypes = [as_dtype(d) for d in in_dtypes]
    out_dtype = as_dtype(out_dtype)
    kinds = tuple(kinds) if kinds is not None else ("strided",) * len(in_dtypes)
    if len(kinds) != len(in_dtypes) or not set(kinds) <= set(KINDS):
        raise ValueError(f"bad access kinds {kinds} for {len(in_dtypes)} inputs")
    body, used, result, dtype = _statements(expr, in_dtypes)
    if expr[0] in ("in", "const") or dtype != out_dtype:
        body.append(f"r = {_CONVERT[out_dtype]}({result})")
        result = "r"
    per_row = [k for k in used if kinds[k] in ("col", "scalar")]
    per_element = [k for k in used if kinds[k] not in ("col", "scalar")]

    def load(k, indent):
        text = indent + f"x{k} = " + _LOAD[kinds[k]].format(k=k)
        return text.ljust(68) + f"  # {_LOAD_NOTE[kinds[k]]}"

    params = ["out"] + [f"in{k}" for k in range(len(in_dtypes))]
    sig = ", ".join([f"{_NUMBA_TYPE[out_dtype]}[:, ::1]"] +
                    [_ARRAY_TYPE[kind].format(t=_NUMBA_TYPE[d]) for kind, d in zip(kinds, in_dtypes)])
    lines = [
        "import math",
        "",
        "import numba",
        "import numpy as np",
        "from numba import prange",
        "",
        "",
        f'@numba.njit("void({sig})",',
        '            parallel=True, cache=True, fastmath=False, error_model="numpy")',
        f"def kernel({', '.join(params)}):",
        "    rows, cols = out.shape",
        "    for i in prange(rows):",
        *(load(k, " " * 8) for k in per_row),
        "        for j in range(cols):",
        *(load(k, " " * 12) for k in per_element),
        *(" " * 12 + line for line in body),
        " " * 12 + f"out[i, j] = {result}",
        "",
    ]
    return "\n".join(lines)


def _header_lines(title: str, ops: Sequence[str], signature: str, origin: Sequence[Source]) -> str:
    lines = [f"# attngraph generated kernel: {title}",
             f"# ops: {', '.join(ops) if ops else '(none)'}",
             f"# types: {signature}"]
    if origin:
        lines.append("# fused from these lines (of the first region that generated this code):")
        for src in origin:
            code = f"   {src.code}" if src.code else ""
            lines.append(f"#   {src.short}{code}")
    lines += ["# The file name is the hash of the code below the header; numba caches the compiled",
              "# code in __pycache__. NUMBA_DISABLE_JIT=1 runs it as plain Python.", "", ""]
    return "\n".join(lines)


def elementwise_header(expr, in_dtypes: Sequence[DType], out_dtype: DType, origin: Sequence[Source] = (),
                       title: str = "fused elementwise region", kinds: Sequence[str] | None = None) -> str:
    """Comment lines naming the fused ops and the user's lines they came from."""
    kinds = kinds or ("strided",) * len(in_dtypes)
    signature = ", ".join(f"in{k} {as_dtype(d).value} {kind}" for k, (d, kind) in enumerate(zip(in_dtypes, kinds))) \
        + f" -> out {as_dtype(out_dtype).value}"
    return _header_lines(title, _op_order(expr), signature, origin)


# ----------------------------------------------------------------------------------------
# running a 2-D kernel over broadcast operands
# ----------------------------------------------------------------------------------------

def _collapsed(shape, operands):
    """Merge adjacent axes of ``shape`` wherever every operand (same shape, any strides) allows.

    Returns a list of (size, [stride per operand]) from the outermost axis in."""
    merged: list[tuple[int, list[int]]] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        strides = [op.strides[d] for op in operands]
        if merged:
            outer_size, outer = merged[-1]
            if all(o == s * size for o, s in zip(outer, strides)):
                merged[-1] = (outer_size * size, strides)
                continue
        merged.append((size, strides))
    return merged


def _threads() -> int:
    try:
        import numba

        return numba.get_num_threads()
    except Exception:  # pragma: no cover (numba missing)
        return 1


def access_kind(view: np.ndarray) -> str:
    """How a 2-D (rows, cols) input view is best read (see the module doc)."""
    rows, cols = view.shape
    s0 = 0 if rows == 1 else view.strides[0]
    s1 = 0 if cols == 1 else view.strides[1]
    item = view.itemsize
    if s1 == 0:
        return "scalar" if s0 == 0 else "col"
    if s1 == item:
        if s0 == 0:
            return "row"
        if s0 == cols * item:
            return "full"
    return "strided"


def _as_kind(view: np.ndarray, kind: str) -> np.ndarray:
    if kind == "row":
        return view[0]
    if kind == "col":
        return view[:, 0]
    if kind == "scalar":
        return view[0, :1]
    return view


def run_elementwise(select: Callable, out: np.ndarray, inputs: Sequence[np.ndarray]) -> None:
    """Fill ``out`` (C-contiguous) from ``inputs`` broadcast to its shape with 2-D kernel calls:
    ``select(kinds)`` gives the kernel for the inputs' access kinds, ``fn(out2d, *inputs)``."""
    if out.size == 0:
        return
    operands = [out] + [np.broadcast_to(np.asarray(a), out.shape) for a in inputs]
    dims = _collapsed(out.shape, operands) or [(1, [0] * len(operands))]
    sizes = tuple(size for size, _ in dims)
    views = [as_strided(op, shape=sizes, strides=tuple(st[k] for _, st in dims), writeable=(k == 0))
             for k, op in enumerate(operands)]
    if len(sizes) == 1:
        n = sizes[0]
        if n <= 2 * CHUNK:
            blocks = [[v[None, :] for v in views]]
        else:                        # one flat axis: rows of CHUNK elements, then the rest
            rows = n // CHUNK
            blocks = [[v[:rows * CHUNK].reshape(rows, CHUNK) for v in views]]
            if n > rows * CHUNK:
                blocks.append([v[None, rows * CHUNK:] for v in views])
    else:
        rows, cols = sizes[-2:]
        if len(sizes) == 2 and rows < 2 * _threads() and cols > 4 * CHUNK and cols % CHUNK == 0:
            # A few long rows: cut each into rows of CHUNK so that every core gets work.
            views = [v.reshape(rows, cols // CHUNK, CHUNK) for v in views]
            sizes = views[0].shape
        if len(sizes) == 2:
            blocks = [views]
        else:
            blocks = ([v[index] for v in views] for index in np.ndindex(*sizes[:-2]))
    kinds = fn = None
    for block in blocks:
        if fn is None:               # every block has the strides of the first: one kernel serves all
            kinds = tuple(access_kind(v) for v in block[1:])
            fn = select(kinds)
        fn(block[0], *(_as_kind(v, kind) for v, kind in zip(block[1:], kinds)))


def predicted_kinds(out_shape, in_shapes, itemsizes) -> tuple[str, ...]:
    """The access kinds C-contiguous inputs of these (possibly symbolic) shapes will have."""
    def concrete(shape):
        return tuple(d if isinstance(d, int) else 2 for d in shape)

    def fake(shape, itemsize):  # strides of a C-contiguous array, over a buffer nobody reads
        strides, step = [], itemsize
        for d in reversed(shape):
            strides.append(step)
            step *= max(d, 1)
        return as_strided(np.zeros(1, np.dtype(f"V{itemsize}")), shape=shape, strides=tuple(reversed(strides)),
                          writeable=False)

    out = fake(concrete(out_shape), 1)
    if out.size == 0:
        return ("strided",) * len(in_shapes)
    seen: list[tuple[str, ...]] = []
    run_elementwise(lambda kinds: seen.append(kinds) or (lambda *a: None), out,
                    [fake(concrete(s), i) for s, i in zip(in_shapes, itemsizes)])
    return seen[0]


# ----------------------------------------------------------------------------------------
# kernels the fused ops' cpu slots return
# ----------------------------------------------------------------------------------------

class ElementwiseKernel:
    """``kernel(inputs, outs, bindings)``: writes ``expr`` of ``inputs`` into ``outs[0]``.

    One generated function per set of access kinds met (usually one, compiled when the
    graph is compiled)."""

    def __init__(self, expr, in_dtypes, out_dtype, origin: Sequence[Source] = (),
                 title: str = "fused elementwise region"):
        self.expr = expr
        self.in_dtypes = tuple(as_dtype(d) for d in in_dtypes)
        self.out_dtype = as_dtype(out_dtype)
        self.origin = tuple(origin)
        self.title = title
        self.variants: dict[tuple[str, ...], Callable] = {}
        self.paths: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()

    def variant(self, kinds: Sequence[str]) -> Callable:
        """The compiled 2-D function for inputs read as ``kinds``."""
        kinds = tuple(kinds)
        fn = self.variants.get(kinds)
        if fn is None:
            with self._lock:
                source = elementwise_source(self.expr, self.in_dtypes, self.out_dtype, kinds)
                header = elementwise_header(self.expr, self.in_dtypes, self.out_dtype, self.origin, self.title, kinds)
                fn = load_kernel(source, "kernel", header=header)
                self.paths[kinds] = str(kernel_path(source))
                self.variants[kinds] = fn
        return fn

    def __call__(self, inputs, outs, bindings=None) -> None:
        run_elementwise(self.variant, outs[0], inputs)


_kernels: dict[tuple, ElementwiseKernel] = {}
_kernels_lock = threading.Lock()


def elementwise_kernel(expr, in_dtypes, out_dtype, *, origin: Sequence[Source] = (),
                       title: str = "fused elementwise region", out_shape=None,
                       in_shapes=None) -> ElementwiseKernel:
    """The generated kernel for ``expr`` over inputs of ``in_dtypes``. With the node's shapes
    (``out_shape``, ``in_shapes``), the variant they predict is compiled (or loaded) now."""
    in_dtypes = tuple(as_dtype(d) for d in in_dtypes)
    out_dtype = as_dtype(out_dtype)
    key = (str(cache_dir()), expr, in_dtypes, out_dtype, title)
    with _kernels_lock:
        kernel = _kernels.get(key)
        if kernel is None:
            kernel = _kernels[key] = ElementwiseKernel(expr, in_dtypes, out_dtype, origin, title)
    if out_shape is not None and in_shapes is not None:
        kernel.variant(predicted_kinds(out_shape, in_shapes, [d.itemsize for d in in_dtypes]))
    return kernel


@dataclass
class MatmulEpilogueKernel:
    """``out = a @ b`` (numpy's BLAS), then the generated epilogue over ``out`` in place."""

    epilogue: ElementwiseKernel

    def __call__(self, inputs, outs, bindings=None) -> None:
        a, b, *extra = inputs
        out = outs[0]
        matmul_into(a, b, out)
        run_elementwise(self.epilogue.variant, out, (out, *extra))


def matmul_epilogue_kernel(expr, in_dtypes, out_dtype, *, origin: Sequence[Source] = (), out_shape=None,
                           extra_shapes=None) -> MatmulEpilogueKernel:
    """``in_dtypes[0]`` is the matmul result's dtype, the rest the extra inputs'."""
    in_shapes = None if out_shape is None or extra_shapes is None else [out_shape, *extra_shapes]
    return MatmulEpilogueKernel(elementwise_kernel(expr, in_dtypes, out_dtype, origin=origin, out_shape=out_shape,
                                                   in_shapes=in_shapes,
                                                   title="matmul epilogue (in0 is the matmul result)"))


def residual_layernorm_source(dtype: DType) -> str:
    """s = a + b and layernorm(s) over the last axis, one row per ``prange`` iteration.

    Statistics accumulate in float64; stored values keep ``dtype``."""
    t = _NUMBA_TYPE[as_dtype(dtype)]
    ro2, ro1 = f"Array({t}, 2, 'C', readonly=True)", f"Array({t}, 1, 'C', readonly=True)"
    return "\n".join([
        "import math",
        "",
        "import numba",
        "from numba import prange",
        "",
        "",
        f'@numba.njit("void({ro2}, {ro2}, {ro1}, {ro1}, float64, boolean, boolean, {t}[:, ::1], {t}[:, ::1])",',
        '            parallel=True, cache=True, fastmath=False, error_model="numpy")',
        "def kernel(a, b, gamma, beta, eps, has_gamma, has_beta, total, normed):",
        "    rows, n = total.shape",
        "    for i in prange(rows):",
        "        acc = 0.0",
        "        for j in range(n):",
        "            s = a[i, j] + b[i, j]",
        "            total[i, j] = s",
        "            acc += s",
        "        mean = acc / n",
        "        sq = 0.0",
        "        for j in range(n):",
        "            d = total[i, j] - mean",
        "            sq += d * d",
        "        inv = 1.0 / math.sqrt(sq / n + eps)",
        "        for j in range(n):",
        "            y = (total[i, j] - mean) * inv",
        "            if has_gamma:",
        "                y = y * gamma[j]",
        "            if has_beta:",
        "                y = y + beta[j]",
        "            normed[i, j] = y",
        "",
    ])


@dataclass
class ResidualLayernormKernel:
    """Writes ``outs = (a + b, layernorm(a + b))`` with one generated row kernel."""

    fn: Callable
    eps: float
    has_gamma: bool
    has_beta: bool

    def __call__(self, inputs, outs, bindings=None) -> None:
        a, b, *affine = inputs
        total, normed = outs
        if total.size == 0:
            return
        n = total.shape[-1]
        rows = total.size // n
        # (rows, n) C-contiguous operands: a view when they already are (the usual case), else a copy.
        a2 = np.ascontiguousarray(np.broadcast_to(a, total.shape).reshape(rows, n))
        b2 = np.ascontiguousarray(np.broadcast_to(b, total.shape).reshape(rows, n))
        rest = list(affine)
        unused = np.zeros(n, total.dtype)
        gamma = np.ascontiguousarray(rest.pop(0)) if self.has_gamma else unused
        beta = np.ascontiguousarray(rest.pop(0)) if self.has_beta else unused
        self.fn(a2, b2, gamma, beta, self.eps, self.has_gamma, self.has_beta,
                total.reshape(rows, n), normed.reshape(rows, n))


def residual_layernorm_kernel(dtype, *, eps: float, has_gamma: bool, has_beta: bool,
                              origin: Sequence[Source] = ()) -> ResidualLayernormKernel:
    source = residual_layernorm_source(dtype)
    header = _header_lines("residual add + layernorm", ["add", "layernorm"],
                           f"a, b, gamma, beta {as_dtype(dtype).value} -> (a + b, layernorm(a + b))", origin)
    fn = load_kernel(source, "kernel", header=header)
    return ResidualLayernormKernel(fn, float(eps), bool(has_gamma), bool(has_beta))
