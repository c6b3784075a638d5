"""scatter_add: add rows into a tensor at integer indices along one axis (the adjoint of gather).

``scatter_add(data, indices, updates, axis)`` is ``data`` plus, for every index position
``i``, ``updates[..., i, ...]`` added into ``data[..., indices[i], ...]``; repeated indices
add up. ``updates`` has exactly the shape ``gather(data, indices, axis)`` has, so the
gradient of an embedding lookup is ``scatter_add(zeros, ids, grad)``. Negative indices
count from the end (numpy).
"""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply, as_tensor
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, normalize_axis, register
from attngraph.ir.rules import require_same_dtype
from attngraph.ir.shapes import format_shape

__all__ = ["scatter_add"]


def _normalize(types, attrs):
    attrs["axis"] = normalize_axis(attrs.get("axis", 0), types[0].rank)
    return attrs


def _infer(data, indices, updates, *, axis):
    if not indices.dtype.is_int:
        raise DTypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if data.dtype == DType.bool:
        raise DTypeError("scatter_add does not take bool tensors")
    require_same_dtype(data, updates)
    want = data.shape[:axis] + indices.shape + data.shape[axis + 1:]
    if updates.shape != want:
        raise ShapeError(f"updates have shape {format_shape(updates.shape)}, but data {format_shape(data.shape)} "
                         f"indexed by {format_shape(indices.shape)} along axis {axis} needs {format_shape(want)}",
                         hint="updates have the shape gather(data, indices, axis) would have")
    return data


def _reference(data, indices, updates, *, axis):
    n = data.shape[axis]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        bad = indices[(indices < -n) | (indices >= n)].flat[0]
        raise ShapeError(f"scatter_add: index {bad} is out of range for axis {axis} of size {n}")
    out = data.copy()
    rows = updates.reshape(data.shape[:axis] + (-1,) + data.shape[axis + 1:])
    np.add.at(np.moveaxis(out, axis, 0), np.where(indices < 0, indices + n, indices).reshape(-1),
              np.moveaxis(rows, axis, 0))
    return out


def _grad(ctx, g):
    _, indices, _ = ctx.inputs
    return [g, None, apply("gather", [g, indices], axis=ctx.attrs["axis"])]


def _examples(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return [
        Example((np.zeros((10, 4), np.float32), rng.integers(0, 10, (2, 3)), f(2, 3, 4)), {"axis": 0},
                "embedding gradient"),
        Example((f(3, 5), np.array([4, -1, 0, 4], np.int32), f(3, 4)), {"axis": 1}, "repeats, negative, axis 1"),
        Example((f(2, 6, 3).astype(np.float64), rng.integers(0, 6, (5,)), f(2, 5, 3).astype(np.float64)),
                {"axis": 1}, "float64"),
    ]


register(OpDef(
    "scatter_add", infer=_infer, reference=_reference, normalize=_normalize, grad=_grad, fusion=Fusion.OPAQUE,
    examples=_examples,
    bad_cases=(BadCase(((DType.float32, (10, 4)), (DType.int64, (2, 3)), (DType.float32, (2, 4))), {"axis": 0},
                       label="updates shape"),
               BadCase(((DType.float32, (10, 4)), (DType.float32, (3,)), (DType.float32, (3, 4))), {"axis": 0},
                       error="DTypeError", label="float indices")),
    doc="data with updates added at indices along axis (repeats add up); the adjoint of gather.",
    family="scatter"))


def scatter_add(data, indices, updates, axis: int = 0):
    """``data`` with ``updates`` added at ``indices`` along ``axis`` (torch's index_add, numpy's add.at);
    ``updates`` has the shape ``ag.take(data, indices, axis)`` has."""
    return apply("scatter_add", [data, as_tensor(indices, data.graph), updates], axis=axis)
