"""``pad``: constant padding, with numpy's ``np.pad(x, pad_width, constant_values=value)`` rules.

``pads`` is one ``(before, after)`` pair per axis, or anything numpy broadcasts to that:
an int (every side of every axis), a single pair ``(before, after)`` (every axis), or
``((before, after),)``. Pads are non-negative ints. A symbolic dim stays symbolic:
``"T"`` padded by (1, 1) becomes ``"T+2"``. The normalized attr ``pads`` holds one pair
per axis.
"""

from __future__ import annotations

import math

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.shapes import dim_add, format_shape

__all__ = ["pad"]


def _pairs(pads, rank: int, shape) -> tuple:
    """numpy's pad_width broadcast to ((before, after),) * rank."""
    try:
        arr = np.asarray(pads)
    except ValueError:
        arr = None
    if arr is None or arr.dtype == object or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ShapeError(f"pads must be ints: an int, a (before, after) pair or one pair per axis, got {pads!r}")
    try:
        table = np.broadcast_to(arr, (rank, 2))
    except ValueError:
        raise ShapeError(f"pads {pads!r} do not fit a tensor of rank {rank} {format_shape(shape)}",
                         hint=f"give one (before, after) pair per axis ({rank} pairs), or one pair for all"
                         ) from None
    if (table < 0).any():
        raise ShapeError(f"pads must be >= 0, got {pads!r}", hint="use a slice to crop")
    return tuple((int(a), int(b)) for a, b in table)


def _check_value(dtype: DType, value) -> None:
    if isinstance(value, (bool, np.bool_)):
        return  # False/True are 0/1 in every dtype
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DTypeError(f"the pad value must be a number, got {value!r}") from None
    if dtype == DType.bool and number not in (0.0, 1.0):
        raise DTypeError(f"cannot pad a bool tensor with {value!r}", hint="use value=False or True")
    if dtype.is_int and not (math.isfinite(number) and number.is_integer()):
        raise DTypeError(f"cannot pad a {dtype} tensor with {value!r}", hint="use an integer value, or cast x first")


def _normalize(types, attrs: dict) -> dict:
    out = dict(attrs)
    out["pads"] = _pairs(out["pads"], types[0].rank, types[0].shape)
    value = out.get("value", 0.0)
    if isinstance(value, np.generic):
        value = value.item()
    out["value"] = value
    return out


def _infer(x, *, pads, value=0.0):
    pairs = _pairs(pads, x.rank, x.shape)
    _check_value(x.dtype, value)
    return TensorType(x.dtype, tuple(dim_add(d, a + b) if a + b else d for d, (a, b) in zip(x.shape, pairs)))


def _reference(x, *, pads, value=0.0):
    pairs = _pairs(pads, x.ndim, x.shape)
    return np.pad(x, pairs, mode="constant", constant_values=np.asarray(value).astype(x.dtype))


def _examples(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    return [
        Example((x,), {"pads": ((0, 0), (1, 2), (3, 0)), "value": 0.0}, "per axis float32"),
        Example((x.astype(np.float64),), {"pads": ((1, 1), (1, 1), (1, 1)), "value": -1.5}, "value -1.5 float64"),
        Example((rng.integers(0, 5, (2, 3)),), {"pads": ((2, 0), (0, 1)), "value": 7}, "int64"),
        Example((rng.random((2, 2)) > 0.5,), {"pads": ((1, 0), (0, 1)), "value": True}, "bool"),
    ]


_F = DType.float32
_BAD = (
    BadCase(((_F, (2, 3)),), {"pads": ((1, 1), (1, 1), (1, 1))}, label="more pairs than axes"),
    BadCase(((_F, (2, 3)),), {"pads": ((1, -1), (0, 0))}, label="negative pad"),
    BadCase(((_F, (2, 3)),), {"pads": ((1.5, 1), (0, 0))}, label="fractional pad"),
    BadCase(((DType.int64, (2, 3)),), {"pads": 1, "value": 0.5}, error="DTypeError", label="fractional value, int"),
)

def _grad(ctx, g):
    pads = ctx.attrs["pads"]
    if not any(b or a for b, a in pads):
        return [g]
    starts = tuple(before or None for before, _ in pads)
    stops = tuple(-after if after else None for _, after in pads)
    return [apply("slice", [g], starts=starts, stops=stops, steps=(1,) * len(pads))]   # the padding's part is dropped


register(OpDef(
    "pad", infer=_infer, reference=_reference, normalize=_normalize, grad=_grad, fusion=Fusion.INJECTIVE,
    examples=_examples, bad_cases=_BAD,
    doc="Constant padding with numpy's pad_width rules: attr pads ((before, after) per axis), value.",
    family="pad"))


def pad(x, pads, value=0.0):
    """``np.pad(x, pads, constant_values=value)``: ``pads`` is an int, one (before, after) pair for
    every axis, or a pair per axis; symbolic dims grow symbolically (``"T"`` → ``"T+2"``)."""
    return apply("pad", [x], pads=pads, value=value)
