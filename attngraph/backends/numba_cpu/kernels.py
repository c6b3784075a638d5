"""Native CPU kernels for the hot ops, and the reference fallback every other op uses.

The kernel contract (what ``CpuExecutable`` calls, and what an op's ``cpu`` slot builds)::

    build(node: Node) -> kernel | None
    kernel(inputs: tuple[np.ndarray, ...], outs: tuple[np.ndarray, ...], bindings: dict[str, int]) -> None

``build`` runs once per node when the executable is made; returning None declines the node
(the next builder in line is tried). The kernel writes every output into ``outs`` (preallocated,
C-contiguous, of the concrete shapes and dtypes of this run) and returns nothing. ``inputs``
are numpy arrays that may be strided or read-only views; a kernel never writes them. Attributes
are on ``node``; symbolic ones are evaluated with ``resolve_shape_attrs(node, op.shape_attrs,
bindings)``.

``NATIVE`` maps op name → builder: matmul (numpy's BLAS matmul into ``out``), attention (the
flash kernel of attention_kernels.py), softmax over the last axis, layernorm, and sum / mean /
max over the last axis (float32 and float64; other axes and dtypes decline), and the fused
backward ops of backward_kernels.py. The Numba
functions are module-level ``@njit(cache=True, parallel=True)``, parallel over rows with
``prange``; each is compiled once per dtype (inputs are made C-contiguous and writeable
first, so numba sees one array type per dtype). No BLAS call runs inside a parallel region:
matmul runs outside numba and may use every BLAS thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...errors import BackendError
from ...ir import Node, get_op
from ..arrays import matmul_into
from ..numpy_ref import resolve_shape_attrs

__all__ = ["NATIVE", "reference_kernel", "native_kernel"]


# -- the reference fallback -----------------------------------------------------------------
def _has_symbol(v) -> bool:
    if isinstance(v, str):
        return True
    return isinstance(v, tuple) and any(_has_symbol(x) for x in v)


def reference_kernel(node: Node):
    """A kernel that runs the op's numpy reference and copies the result into ``outs``.

    The reference allocates its result (and any temporaries) before the copy: those are
    allocations outside the memory plan.
    """
    op = get_op(node.op)
    symbolic = any(_has_symbol(node.attrs.get(a)) for a in op.shape_attrs)
    attrs = dict(node.attrs)
    reference = op.reference

    def kernel(inputs, outs, bindings):
        kw = resolve_shape_attrs(node, op.shape_attrs, bindings) if symbolic else attrs
        with np.errstate(all="ignore"):
            result = reference(*inputs, **kw)
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(outs):
            raise BackendError(f"reference of {node.op} returned {len(results)} outputs, expected {len(outs)}")
        for out, res in zip(outs, results):
            res = np.asarray(res)
            if res.shape != out.shape or res.dtype != out.dtype:
                raise BackendError(f"reference of {node.op} returned {res.dtype}{res.shape}, the plan expects "
                                   f"{out.dtype}{out.shape} (a bug in attngraph's op library)")
            np.copyto(out, res)

    kernel.__name__ = f"reference_{node.op}"
    return kernel


# -- helpers --------------------------------------------------------------------------------
def _plain(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous writeable array (a copy only when it is a strided or read-only view)."""
    if x.flags.c_contiguous and x.flags.writeable:
        return x
    return np.array(x, order="C", copy=True)


def _rows(x: np.ndarray) -> np.ndarray:
    """(..., n) → (rows, n), C-contiguous."""
    return _plain(x).reshape(-1, x.shape[-1])


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_ONE: dict = {}


def _one(dtype) -> np.ndarray:
    """A 1-element array standing in for an absent gamma/beta (one numba signature per dtype)."""
    arr = _ONE.get(dtype)
    if arr is None:
        arr = _ONE[dtype] = np.ones(1, dtype=dtype)
    return arr


def _last_axis_float(node: Node, axis) -> bool:
    x = node.inputs[0].type
    return x.rank >= 1 and x.dtype.numpy in _FLOATS and axis == x.rank - 1


# -- matmul ---------------------------------------------------------------------------------
def _build_matmul(node: Node):
    def kernel(inputs, outs, bindings):
        matmul_into(inputs[0], inputs[1], outs[0])
    return kernel


# -- softmax --------------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def _softmax_rows(x, out):
    """Row-wise softmax; a row of all -inf shifts by 0 and gives zeros (as ops/softmax.py)."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        m = x[r, 0]
        for j in range(1, n):
            if x[r, j] > m or x[r, j] != x[r, j]:
                m = x[r, j]
        if m == -np.inf:
            m = x.dtype.type(0)
        s = 0.0
        for j in range(n):
            e = np.exp(x[r, j] - m)
            out[r, j] = e
            s += e
        if s == 0.0:
            s = 1.0
        inv = out.dtype.type(1.0 / s)
        for j in range(n):
            out[r, j] *= inv


def _build_softmax(node: Node):
    if not _last_axis_float(node, node.attrs["axis"]):
        return None

    def kernel(inputs, outs, bindings):
        out = outs[0]
        if out.size:
            _softmax_rows(_rows(inputs[0]), out.reshape(-1, out.shape[-1]))
    return kernel


# -- layernorm ------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _row_mean_rstd(x, r, eps):
    """Mean and 1 / sqrt(var + eps) of row ``r`` of ``x`` (two passes, accumulated in float64);
    shared by the layernorm forward and backward kernels."""
    n = x.shape[1]
    s = 0.0
    for j in range(n):
        s += x[r, j]
    mean = s / n
    v = 0.0
    for j in range(n):
        c = x[r, j] - mean
        v += c * c
    return mean, 1.0 / np.sqrt(v / n + eps)


@njit(cache=True, parallel=True)
def _layernorm_rows(x, gamma, beta, has_gamma, has_beta, eps, out):
    """(x - mean) / sqrt(var + eps) * gamma + beta per row; statistics accumulated in float64."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        mean, inv = _row_mean_rstd(x, r, eps)
        for j in range(n):
            y = (x[r, j] - mean) * inv
            if has_gamma:
                y = y * gamma[j]
            if has_beta:
                y = y + beta[j]
            out[r, j] = y


def _build_layernorm(node: Node):
    if not _last_axis_float(node, node.inputs[0].type.rank - 1):
        return None
    eps = float(node.attrs["eps"])
    has_gamma, has_beta = bool(node.attrs["has_gamma"]), bool(node.attrs["has_beta"])

    def kernel(inputs, outs, bindings):
        out = outs[0]
        if not out.size:
            return
        x = inputs[0]
        rest = list(inputs[1:])
        one = _one(out.dtype)
        gamma = _plain(rest.pop(0)) if has_gamma else one
        beta = _plain(rest.pop(0)) if has_beta else one
        _layernorm_rows(_rows(x), gamma, beta, has_gamma, has_beta, eps, out.reshape(-1, out.shape[-1]))
    return kernel


# -- sum / mean / max over the last axis ------------------------------------------------------
_SUM, _MEAN, _MAX = 0, 1, 2


@njit(cache=True, parallel=True)
def _reduce_rows(x, mode, out):
    """out[r] = sum / mean / max of row r (sums accumulated in float64; max propagates NaN)."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        if mode == 2:
            m = x[r, 0]
            for j in range(1, n):
                if x[r, j] > m or x[r, j] != x[r, j]:
                    m = x[r, j]
                    if m != m:
                        break
            out[r] = m
        else:
            s = 0.0
            for j in range(n):
                s += x[r, j]
            if mode == 1:
                s = s / n
            out[r] = s


def _build_reduction(mode):
    def build(node: Node):
        axis = node.attrs["axis"]
        if len(axis) != 1 or not _last_axis_float(node, axis[0]):
            return None
        fallback = reference_kernel(node)

        def kernel(inputs, outs, bindings):
            x = inputs[0]
            if x.shape[-1] == 0 or x.size == 0:
                fallback(inputs, outs, bindings)   # numpy's rules for empty rows
                return
            _reduce_rows(_rows(x), mode, outs[0].reshape(-1))
        return kernel
    return build


# -- attention ------------------------------------------------------------------------------
def _qkv_4d(x: np.ndarray, batch: tuple) -> np.ndarray:
    """(...batch', T, E) → (B, H, T, E): batch dims broadcast to ``batch``, then merged or padded."""
    if x.shape[:-2] != batch:
        x = np.broadcast_to(x, batch + x.shape[-2:])
    r = len(batch)
    if r <= 2:
        return x.reshape((1,) * (2 - r) + x.shape)
    return x.reshape((-1, batch[-1]) + x.shape[-2:])   # copies only a broadcast operand


def _scores_4d(x: np.ndarray, batch: tuple, tq: int, tk: int) -> np.ndarray:
    """A bias or mask broadcastable to batch + (Tq, Tk), as a 4-D array the kernel broadcasts."""
    if len(batch) <= 2:
        return x.reshape((1,) * (4 - x.ndim) + x.shape)
    return np.broadcast_to(x, batch + (tq, tk)).reshape(-1, batch[-1], tq, tk)


def _build_attention(node: Node):
    """The flash kernel; declines the return_weights form (two outputs, the T×T probabilities
    materialised), which then runs the numpy reference."""
    from .attention_kernels import attention_forward

    if node.attrs.get("return_weights", False):
        return None
    scale, causal = float(node.attrs["scale"]), bool(node.attrs["causal"])
    has_bias, has_mask = bool(node.attrs["has_bias"]), bool(node.attrs["has_mask"])

    def kernel(inputs, outs, bindings):
        q, k, v = inputs[:3]
        out = outs[0]
        batch, tq, tk = out.shape[:-2], q.shape[-2], k.shape[-2]
        if out.size == 0:
            return
        if tk == 0:              # no keys: every row is fully masked
            out[...] = 0
            return
        rest = list(inputs[3:])
        bias = _scores_4d(rest.pop(0), batch, tq, tk) if has_bias else None
        mask = _scores_4d(rest.pop(0), batch, tq, tk) if has_mask else None
        q4, k4, v4 = _qkv_4d(q, batch), _qkv_4d(k, batch), _qkv_4d(v, batch)
        if out.flags.c_contiguous and not any(np.may_share_memory(out, x) for x in (q, k, v)):
            # write straight into the planned buffer (a view: out is contiguous)
            attention_forward(q4, k4, v4, scale=scale, causal=causal, bias=bias, mask=mask,
                              out=_qkv_4d(out, batch))
            return
        result = attention_forward(q4, k4, v4, scale=scale, causal=causal, bias=bias, mask=mask)
        np.copyto(out, result.reshape(out.shape))
    return kernel


NATIVE = {
    "matmul": _build_matmul,
    "attention": _build_attention,
    "softmax": _build_softmax,
    "layernorm": _build_layernorm,
    "sum": _build_reduction(_SUM),
    "mean": _build_reduction(_MEAN),
    "max": _build_reduction(_MAX),
}

# the fused backward ops (attention_grad, layernorm_grad, softmax_cross_entropy[_grad])
from .backward_kernels import BACKWARD_NATIVE  # noqa: E402  (it imports the helpers above)

NATIVE.update(BACKWARD_NATIVE)


def native_kernel(node: Node):
    """The kernel for ``node``: the op's own ``cpu`` builder if it is callable, then ``NATIVE``,
    then None (the caller falls back to ``reference_kernel``). Returns (kernel, source)."""
    op = get_op(node.op)
    if callable(op.cpu):
        kernel = op.cpu(node)
        if kernel is not None:
            return kernel, "op.cpu"
    build = NATIVE.get(node.op)
    if build is not None:
        kernel = build(node)
        if kernel is not None:
            return kernel, "native"
    return None, None
