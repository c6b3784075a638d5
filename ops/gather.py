"""gather: pick entries along one axis by integer indices (embedding lookups, numpy's take)."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply, as_tensor
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, normalize_axis, register

__all__ = ["embedding", "take"]


def _normalize(types, attrs):
    attrs["axis"] = normalize_axis(attrs.get("axis", 0), types[0].rank)
    return attrs


def _infer(data, indices, *, axis):
    if not indices.dtype.is_int:
        raise DTypeError(f"indices must be int32 or int64, got {indices.dtype}",
                         hint="token ids are integers: feed them as int64")
    return TensorType(data.dtype, data.shape[:axis] + indices.shape + data.shape[axis + 1:])


def _reference(data, indices, *, axis):
    n = data.shape[axis]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        bad = indices[(indices < -n) | (indices >= n)].flat[0]
        raise ShapeError(f"gather: index {bad} is out of range for axis {axis} of size {n}")
    return np.take(data, indices, axis=axis)


def _grad(ctx, g):
    data, indices = ctx.inputs
    zeros = ctx.zeros(data.shape, data.dtype)
    return [apply("scatter_add", [zeros, indices, g], axis=ctx.attrs["axis"]), None]   # rows picked twice add up


register(OpDef(
    "gather", infer=_infer, reference=_reference, normalize=_normalize, grad=_grad, fusion=Fusion.INJECTIVE,
    examples=lambda rng: [
        Example((rng.standard_normal((10, 4)).astype(np.float32), rng.integers(0, 10, (2, 3))), {"axis": 0},
                "embedding"),
        Example((rng.standard_normal((3, 5)).astype(np.float32), rng.integers(-5, 5, (4,)).astype(np.int32)),
                {"axis": 1}, "take axis 1")],
    bad_cases=(BadCase(((DType.float32, (10, 4)), (DType.float32, (3,))), {"axis": 0}, error="DTypeError"),
               BadCase(((DType.float32, (10, 4)), (DType.int64, (3,))), {"axis": 2}, label="axis out of range")),
    doc="out = data.take(indices, axis); negative indices count from the end (numpy).", family="gather"))


def embedding(ids, weight):
    """``weight[ids]``: rows of the (vocab, dim) table (torch's argument order)."""
    return apply("gather", [weight, as_tensor(ids, weight.graph)], axis=0)


def take(x, indices, axis: int = 0):
    """numpy's ``take``: entries of ``x`` at ``indices`` along ``axis``."""
    return apply("gather", [x, as_tensor(indices, x.graph)], axis=axis)
