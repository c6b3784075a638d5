"""Reductions with numpy's names and arguments: sum, mean, max (and argmax)."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import DTypeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, normalize_axes, normalize_axis, register
from attngraph.ir.rules import require_float
from attngraph.ir.shapes import dim_product

__all__ = ["sum", "mean", "max", "argmax"]


def _normalize(types, attrs):
    attrs["axis"] = normalize_axes(attrs.get("axis"), types[0].rank)
    attrs["keepdims"] = bool(attrs.get("keepdims", False))
    return attrs


def _reduced_shape(x, axis, keepdims):
    if keepdims:
        return tuple(1 if i in axis else d for i, d in enumerate(x.shape))
    return tuple(d for i, d in enumerate(x.shape) if i not in axis)


def _make_infer(name, float_only):
    def infer(x, *, axis, keepdims):
        if float_only:
            require_float(x)
        elif x.dtype == DType.bool:
            raise DTypeError(f"{name} does not take bool tensors", hint="cast first: x.astype('int64')")
        return TensorType(x.dtype, _reduced_shape(x, axis, keepdims))
    return infer


def _examples(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    return [Example((x,), {"axis": None, "keepdims": False}, "all"),
            Example((x,), {"axis": -1, "keepdims": True}, "last, keepdims"),
            Example((x,), {"axis": (0, 2), "keepdims": False}, "two axes"),
            Example((x.astype(np.float64),), {"axis": 1, "keepdims": False}, "float64")]


def _int_examples(rng):
    return _examples(rng) + [Example((rng.integers(-5, 5, (3, 4)),), {"axis": 0, "keepdims": False}, "int64")]


def _spread_back(ctx, g):
    """The reduced gradient broadcast back over the reduced axes: (B, D) → (B, T, D) for axis=1."""
    x = ctx.inputs[0]
    axis, keepdims = ctx.attrs["axis"], ctx.attrs["keepdims"]
    if not keepdims:
        g = g.reshape(_reduced_shape(x, axis, True))
    return apply("broadcast_to", [g], shape=x.shape)


def _count(ctx, axis):
    """How many entries each output averages: a Python number, or a tensor when a dim is symbolic."""
    x = ctx.inputs[0]
    n = dim_product(x.shape[a] for a in axis)
    if isinstance(n, int):
        return n
    return ctx.graph.full(tuple(x.shape[a] for a in axis), 1.0, x.dtype).sum()


def _max_grad(ctx, g):
    # The gradient goes to the positions of the maximum, split evenly on ties (torch's amax rule).
    (x,), (y,) = ctx.inputs, ctx.outputs
    axis = ctx.attrs["axis"]
    spread = lambda t: _spread_back(ctx, t)  # noqa: E731
    hit = apply("cast", [apply("equal", [x, spread(y)])], dtype=x.dtype)
    ties = hit.sum(axis=axis, keepdims=ctx.attrs["keepdims"])
    return [hit * spread(g / ties)]


_BAD = (BadCase(((DType.float32, (2, 3)),), {"axis": 2, "keepdims": False}, label="axis out of range"),
        BadCase(((DType.float32, (2, 3)),), {"axis": (1, 1), "keepdims": False}, label="repeated axis"))

register(OpDef("sum", infer=_make_infer("sum", False), normalize=_normalize, fusion=Fusion.REDUCTION,
               grad=lambda ctx, g: [_spread_back(ctx, g)],
               reference=lambda x, *, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims, dtype=x.dtype),
               flops=lambda i, o, **a: i[0].size, examples=_int_examples, bad_cases=_BAD,
               doc="Sum over ``axis`` (None: all axes).", family="reductions"))
register(OpDef("mean", infer=_make_infer("mean", True), normalize=_normalize, fusion=Fusion.REDUCTION,
               grad=lambda ctx, g: [_spread_back(ctx, g / _count(ctx, ctx.attrs["axis"]))],
               reference=lambda x, *, axis, keepdims: np.mean(x, axis=axis, keepdims=keepdims, dtype=x.dtype),
               flops=lambda i, o, **a: i[0].size, examples=_examples,
               bad_cases=_BAD + (BadCase(((DType.int64, (2, 3)),), {"axis": 0, "keepdims": False},
                                         error="DTypeError"),),
               doc="Mean over ``axis`` (None: all axes); float only.", family="reductions"))
register(OpDef("max", infer=_make_infer("max", False), normalize=_normalize, fusion=Fusion.REDUCTION,
               grad=_max_grad,
               reference=lambda x, *, axis, keepdims: np.max(x, axis=axis, keepdims=keepdims),
               flops=lambda i, o, **a: i[0].size, examples=_int_examples, bad_cases=_BAD,
               doc="Maximum over ``axis`` (None: all axes); its gradient is split evenly between tied "
                   "maxima (torch's amax).", family="reductions"))


def _argmax_normalize(types, attrs):
    attrs["axis"] = normalize_axis(attrs.get("axis", -1), types[0].rank)
    attrs["keepdims"] = bool(attrs.get("keepdims", False))
    return attrs


def _argmax_infer(x, *, axis, keepdims):
    if x.dtype == DType.bool:
        raise DTypeError("argmax does not take bool tensors")
    return TensorType(DType.int64, _reduced_shape(x, (axis,), keepdims))


register(OpDef("argmax", infer=_argmax_infer, normalize=_argmax_normalize, fusion=Fusion.REDUCTION,
               reference=lambda x, *, axis, keepdims: np.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64),
               differentiable=False,
               examples=lambda rng: [Example((rng.standard_normal((3, 5)).astype(np.float32),),
                                             {"axis": -1, "keepdims": False})],
               bad_cases=(BadCase(((DType.float32, (2, 3)),), {"axis": 2, "keepdims": False}),),
               doc="Index of the maximum along one axis (int64; first one on ties).", family="reductions"))


def sum(x, axis=None, keepdims: bool = False):  # noqa: A001 (numpy's name)
    """Sum over ``axis`` (an int, a tuple, or None for all)."""
    return apply("sum", [x], axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims: bool = False):
    """Mean over ``axis`` (an int, a tuple, or None for all)."""
    return apply("mean", [x], axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims: bool = False):  # noqa: A001
    """Maximum over ``axis`` (an int, a tuple, or None for all)."""
    return apply("max", [x], axis=axis, keepdims=keepdims)


def argmax(x, axis: int = -1, keepdims: bool = False):
    """Index of the largest entry along ``axis`` (int64)."""
    return apply("argmax", [x], axis=axis, keepdims=keepdims)
