"""Ops that make tensors from sizes: full, arange, and trilu (triangles, for causal masks)."""

from __future__ import annotations

import numbers

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import (BadCase, DType, Example, Fusion, OpDef, TensorType, as_dtype, normalize_dim,
                          normalize_shape, register)

__all__ = ["trilu"]


def _full_normalize(types, attrs):
    attrs["shape"] = normalize_shape(attrs["shape"])
    attrs["dtype"] = as_dtype(attrs.get("dtype", "float32"))
    value = attrs["value"]
    if not isinstance(value, (numbers.Number, np.generic)):
        raise DTypeError(f"fill value must be a number, got {value!r}")
    attrs["value"] = bool(value) if attrs["dtype"] == DType.bool else (
        float(value) if attrs["dtype"].is_float else int(value))
    return attrs


register(OpDef(
    "full", infer=lambda *, shape, value, dtype: TensorType(dtype, shape), normalize=_full_normalize,
    reference=lambda *, shape, value, dtype: np.full(shape, value, dtype=as_dtype(dtype).numpy),
    shape_attrs=("shape",), fusion=Fusion.ELEMENTWISE, differentiable=False,
    examples=lambda rng: [Example((), {"shape": (2, 3), "value": 1.5, "dtype": DType.float32}),
                          Example((), {"shape": (3, 3), "value": True, "dtype": DType.bool})],
    bad_cases=(BadCase((), {"shape": (2, -3), "value": 0.0, "dtype": DType.float32}),),
    doc="A tensor of ``shape`` filled with ``value`` (ONNX ConstantOfShape); symbolic dims allowed.",
    family="creation"))


def _arange_normalize(types, attrs):
    attrs["stop"] = normalize_dim(attrs["stop"])
    attrs["dtype"] = as_dtype(attrs.get("dtype", "int64"))
    if isinstance(attrs["stop"], int) and attrs["stop"] < 0:
        raise ShapeError(f"arange stop must be >= 0, got {attrs['stop']}")
    return attrs


register(OpDef(
    "arange", infer=lambda *, stop, dtype: TensorType(dtype, (stop,)), normalize=_arange_normalize,
    reference=lambda *, stop, dtype: np.arange(stop, dtype=as_dtype(dtype).numpy), shape_attrs=("stop",),
    fusion=Fusion.ELEMENTWISE, differentiable=False,
    examples=lambda rng: [Example((), {"stop": 5, "dtype": DType.int64}),
                          Example((), {"stop": 4, "dtype": DType.float32})],
    bad_cases=(BadCase((), {"stop": -2, "dtype": DType.int64}),),
    doc="0, 1, ..., stop-1 (positions); ``stop`` may be symbolic.", family="creation"))


def _trilu_infer(x, *, k, upper):
    if x.rank < 2:
        raise ShapeError("trilu needs a tensor of rank >= 2")
    return x


def _trilu_reference(x, *, k, upper):
    rows, cols = x.shape[-2], x.shape[-1]
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = (j - i >= k) if upper else (j - i <= k)
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


register(OpDef(
    "trilu", infer=_trilu_infer, reference=_trilu_reference, fusion=Fusion.ELEMENTWISE,
    grad=lambda ctx, g: [apply("trilu", [g], **ctx.attrs)],   # linear: the kept triangle passes the gradient
    examples=lambda rng: [Example((rng.standard_normal((2, 4, 5)).astype(np.float32),), {"k": 1, "upper": True}),
                          Example((rng.standard_normal((4, 4)).astype(np.float32),), {"k": 0, "upper": False}),
                          Example((np.ones((3, 3), bool),), {"k": 1, "upper": True}, "bool")],
    bad_cases=(BadCase(((DType.float32, (4,)),), {"k": 0, "upper": True}),),
    doc="Keep the upper (j - i >= k) or lower (j - i <= k) triangle of the last two axes, zero elsewhere "
        "(ONNX Trilu; numpy's triu/tril).", family="creation"))


def trilu(x, k: int = 0, upper: bool = True):
    """``np.triu(x, k)`` (upper) or ``np.tril(x, k)`` over the last two axes."""
    return apply("trilu", [x], k=int(k), upper=bool(upper))
