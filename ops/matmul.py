"""matmul: batched matrix product with numpy's broadcasting of the batch dims."""

from __future__ import annotations

import numpy as np

from attngraph.autodiff import unbroadcast
from attngraph.dsl import binary
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.rules import require_same_dtype
from attngraph.ir.shapes import broadcast_shapes, dim_mul, dim_product

__all__ = ["matmul"]


def _infer(a: TensorType, b: TensorType) -> TensorType:
    if a.rank == 0 or b.rank == 0:
        raise ShapeError("matmul needs tensors of rank >= 1", hint="use * to multiply by a scalar")
    dtype = require_same_dtype(a, b)
    if dtype == DType.bool:
        raise DTypeError("matmul does not take bool tensors")
    sa = (1,) + a.shape if a.rank == 1 else a.shape   # (…, n, k)
    sb = b.shape + (1,) if b.rank == 1 else b.shape   # (…, k, m)
    k_a, k_b = sa[-1], sb[-2]
    if k_a != k_b:
        hint = None
        if b.rank >= 2 and sb[-1] == k_a:
            hint = "did you mean to transpose the right operand (w.T)?"
        elif a.rank >= 2 and sa[-2] == k_b:
            hint = "did you mean to transpose the left operand?"
        raise ShapeError(f"inner dims {k_a} and {k_b} differ", hint=hint)
    try:
        batch = broadcast_shapes(sa[:-2], sb[:-2])
    except ShapeError as err:
        raise ShapeError(f"batch dims do not broadcast ({err.message})") from None
    shape = batch + ((sa[-2],) if a.rank > 1 else ()) + ((sb[-1],) if b.rank > 1 else ())
    return TensorType(dtype, shape)


def _flops(in_types, out_types, **attrs):
    a = in_types[0]
    return dim_mul(2, dim_mul(dim_product(out_types[0].shape), a.shape[-1]))


def _swap(t):
    """The last two axes exchanged."""
    r = t.ndim
    return t.transpose(*range(r - 2), r - 1, r - 2)


def _grad(ctx, g):
    a, b = ctx.inputs
    # 1-D operands as numpy promotes them: a (k,) → (1, k), b (k,) → (k, 1)
    a2 = a.reshape(1, a.shape[0]) if a.ndim == 1 else a            # (…, n, k)
    b2 = b.reshape(b.shape[0], 1) if b.ndim == 1 else b            # (…, k, m)
    batch = broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    g2 = g.reshape(batch + (a2.shape[-2], b2.shape[-1]))           # (…, n, m)
    da = db = None
    if ctx.needs[0]:
        da = unbroadcast(g2 @ _swap(b2), a2.shape).reshape(a.shape)
    if ctx.needs[1]:
        if b2.ndim == 2 and a2.ndim > 2:
            # a weight shared by the whole batch: one (k, B·n) @ (B·n, m) product
            k, m = b2.shape
            db = a2.reshape(-1, k).T @ g2.reshape(-1, m)
        else:
            db = unbroadcast(_swap(a2) @ g2, b2.shape)
        db = db.reshape(b.shape)
    return [da, db]


def _examples(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return [
        Example((f(4, 3), f(3, 5)), label="2-D"),
        Example((f(2, 1, 4, 3), f(3, 3, 2)), label="broadcast batch"),
        Example((f(2, 4, 3), f(3)), label="matrix-vector"),
        Example((f(3), f(2, 3, 4)), label="vector-matrix"),
        Example((f(2, 4, 3).astype(np.float64), f(2, 3, 5).astype(np.float64)), label="float64"),
    ]


register(OpDef(
    "matmul", infer=_infer, reference=np.matmul, grad=_grad, fusion=Fusion.OPAQUE, flops=_flops, examples=_examples,
    bad_cases=(
        BadCase(((DType.float32, ("B", 16, 64)), (DType.float32, (32, 64))), label="inner dims differ"),
        BadCase(((DType.float32, (2, 4, 3)), (DType.float32, (3, 3, 2))), label="batch dims"),
        BadCase(((DType.float32, (4, 3)), (DType.float64, (3, 2))), error="DTypeError", label="dtypes differ"),
    ),
    doc="Matrix product a @ b; leading dims broadcast as in numpy.matmul.", family="matmul"))


def matmul(a, b):
    """``a @ b`` with numpy's rules (batched, broadcasting, 1-D operands)."""
    return binary("matmul", a, b, promote_scalars=False)
