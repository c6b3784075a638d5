"""concat: join tensors along an existing axis."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import Tensor, apply, promote_pair
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, normalize_axis, register
from attngraph.ir.rules import require_same_dtype
from attngraph.ir.shapes import dim_add, format_shape

__all__ = ["concat"]


def _normalize(types, attrs):
    if not types:
        raise ShapeError("concat needs at least one tensor")
    attrs["axis"] = normalize_axis(attrs.get("axis", 0), types[0].rank)
    return attrs


def _infer(*types, axis):
    dtype = require_same_dtype(*types)
    first = types[0]
    total = 0
    for t in types:
        if t.rank != first.rank:
            raise ShapeError(f"all tensors need the same rank; got {', '.join(format_shape(t.shape) for t in types)}")
        for i, (d0, d) in enumerate(zip(first.shape, t.shape)):
            if i != axis and d0 != d:
                raise ShapeError(f"dim {i} differs ({d0} vs {d}); only the concat axis {axis} may differ")
        total = dim_add(total, t.shape[axis])
    shape = first.shape[:axis] + (total,) + first.shape[axis + 1:]
    return TensorType(dtype, shape)


def _reference(*arrays, axis):
    return np.concatenate(arrays, axis=axis)


def _grad(ctx, g):
    axis = ctx.attrs["axis"]
    return list(apply("split", [g], sizes=tuple(x.shape[axis] for x in ctx.inputs), axis=axis))


def _examples(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return [Example((f(2, 1, 4), f(2, 3, 4)), {"axis": 1}, "class token"),
            Example((f(2, 3), f(2, 3), f(2, 3)), {"axis": 0}, "three")]


register(OpDef(
    "concat", infer=_infer, reference=_reference, normalize=_normalize, grad=_grad, fusion=Fusion.INJECTIVE,
    examples=_examples,
    bad_cases=(BadCase(((DType.float32, (2, 3)), (DType.float32, (4, 5))), {"axis": 0}, label="other dim differs"),
               BadCase(((DType.float32, (2, 3)), (DType.float32, (2, 3, 1))), {"axis": 0}, label="rank differs")),
    doc="Join tensors along ``axis``; every other dim must match.", family="concat"))


def concat(tensors, axis: int = 0):
    """Join ``tensors`` along ``axis`` (numpy's concatenate)."""
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise ShapeError("concat takes a non-empty list of Tensors")
    common = tensors[0]
    for t in tensors[1:]:
        common, _ = promote_pair(common, t)
    tensors = [t if t.dtype == common.dtype else t.astype(common.dtype) for t in tensors]
    return apply("concat", tensors, axis=axis)
