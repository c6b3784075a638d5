"""mask: torch's masked_fill (fill x with a value where a boolean mask is True); causal masks."""

from __future__ import annotations

import math

import numpy as np

from attngraph.dsl import apply, as_tensor
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, register
from attngraph.ir.rules import require_dtype
from attngraph.ir.shapes import broadcast_shapes, format_shape

__all__ = ["mask", "causal_mask"]


def _infer(x, where, *, value):
    require_dtype(where, DType.bool, "mask")
    if broadcast_shapes(x.shape, where.shape) != x.shape:
        raise ShapeError(f"the mask {format_shape(where.shape)} must broadcast to the tensor's shape "
                         f"{format_shape(x.shape)} without enlarging it")
    if not x.dtype.is_float and isinstance(value, float) and not float(value).is_integer():
        raise ShapeError(f"cannot fill a {x.dtype} tensor with {value}")
    return x


def _reference(x, where, *, value):
    return np.where(where, np.asarray(value, dtype=x.dtype), x)


def _grad(ctx, g):
    where = ctx.inputs[1]
    return [apply("mask", [g, where], value=0.0), None]       # filled entries do not depend on x


def _examples(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    return [Example((x, rng.random((3, 4)) > 0.5), {"value": -math.inf}, "−inf, broadcast mask"),
            Example((x, rng.random((2, 1, 4)) > 0.5), {"value": 0.0}, "zero fill")]


register(OpDef(
    "mask", infer=_infer, reference=_reference, grad=_grad, fusion=Fusion.ELEMENTWISE,
    cpu="({2} if {1} else {0})", examples=_examples,
    flops=lambda i, o, **a: o[0].size,
    bad_cases=(BadCase(((DType.float32, (3, 4)), (DType.bool, (2, 3, 4))), {"value": 0.0}, label="mask enlarges x"),
               BadCase(((DType.float32, (3, 4)), (DType.float32, (3, 4))), {"value": 0.0}, error="DTypeError")),
    doc="Fill x with value where the boolean mask is True (torch's masked_fill); the mask broadcasts to x.",
    family="mask"))


def mask(x, where, value: float = -math.inf):
    """``x`` with ``value`` wherever ``where`` is True (torch's ``masked_fill``)."""
    return apply("mask", [x, as_tensor(where, x.graph)], value=float(value) if x.dtype.is_float else int(value))


def causal_mask(graph, q_len, k_len=None):
    """Bool (q_len, k_len), True above the diagonal: the look-ahead positions a decoder may not see.

    ``q_len``/``k_len`` may be symbolic dims (``"T"``). Use with ``ag.mask(scores, causal, -inf)``.
    """
    k_len = q_len if k_len is None else k_len
    ones = graph.full((q_len, k_len), True, "bool")
    return apply("trilu", [ones], k=1, upper=True)
