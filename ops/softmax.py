"""softmax and log_softmax along one axis. A row of all −inf gives zeros (softmax)."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, register
from attngraph.ir.rules import require_float
from attngraph.ir.shapes import dim_mul

__all__ = ["softmax", "log_softmax"]


def _normalize(types, attrs):
    from attngraph.ir import normalize_axis

    attrs["axis"] = normalize_axis(attrs.get("axis", -1), types[0].rank)
    return attrs


def _infer(x, *, axis):
    require_float(x)
    return x


def _stable_max(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.where(np.isneginf(m), np.zeros_like(m), m)  # a fully masked row: shift by 0, not by −inf


def _softmax_reference(x, *, axis):
    e = np.exp(x - _stable_max(x, axis))
    s = np.sum(e, axis=axis, keepdims=True)
    return (e / np.where(s == 0, np.ones_like(s), s)).astype(x.dtype)


def _log_softmax_reference(x, *, axis):
    shifted = x - _stable_max(x, axis)
    s = np.sum(np.exp(shifted), axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):
        out = shifted - np.log(s)
    return np.where(s == 0, -np.inf, out).astype(x.dtype)


def _softmax_grad(ctx, g):
    (y,) = ctx.outputs
    axis = ctx.attrs["axis"]
    return [y * (g - (g * y).sum(axis=axis, keepdims=True))]      # a fully masked row (y = 0) gets 0


def _log_softmax_grad(ctx, g):
    (y,) = ctx.outputs
    axis = ctx.attrs["axis"]
    return [g - apply("exp", [y]) * g.sum(axis=axis, keepdims=True)]


def _examples(rng):
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    masked = x.copy()
    masked[0, 1, :] = -np.inf      # a fully masked row
    masked[1, 0, 2:] = -np.inf     # a partly masked row
    return [Example((x,), {"axis": -1}, "last axis"), Example((x,), {"axis": 1}, "middle axis"),
            Example((x.astype(np.float64),), {"axis": -1}, "float64"),
            Example((masked,), {"axis": -1}, "masked rows")]


def _flops(in_types, out_types, **attrs):
    return dim_mul(5, out_types[0].size)


_BAD = (BadCase(((DType.int64, (3, 4)),), {"axis": -1}, error="DTypeError"),
        BadCase(((DType.float32, (3, 4)),), {"axis": 2}, label="axis out of range"))

register(OpDef("softmax", infer=_infer, reference=_softmax_reference, normalize=_normalize, grad=_softmax_grad,
               fusion=Fusion.REDUCTION, flops=_flops, examples=_examples, bad_cases=_BAD,
               doc="exp(x) / sum(exp(x)) along axis; a row of all −inf gives zeros, not NaN.", family="softmax"))
register(OpDef("log_softmax", infer=_infer, reference=_log_softmax_reference, normalize=_normalize,
               grad=_log_softmax_grad,
               fusion=Fusion.REDUCTION, flops=_flops, examples=lambda rng: _examples(rng)[:3], bad_cases=_BAD,
               doc="x - logsumexp(x) along axis; a row of all −inf gives −inf.", family="softmax"))


def softmax(x, axis: int = -1):
    """Softmax along ``axis``. A row whose entries are all −inf gives zeros."""
    return apply("softmax", [x], axis=axis)


def log_softmax(x, axis: int = -1):
    """log(softmax(x)) computed stably along ``axis``."""
    return apply("log_softmax", [x], axis=axis)
