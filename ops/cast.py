"""cast: change the element type."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.ir import DType, Example, Fusion, OpDef, as_dtype, register

__all__ = ["cast"]

register(OpDef(
    "cast", infer=lambda x, *, dtype: x.with_dtype(dtype),
    normalize=lambda types, attrs: dict(attrs, dtype=as_dtype(attrs["dtype"])),
    reference=lambda x, *, dtype: x.astype(as_dtype(dtype).numpy), fusion=Fusion.ELEMENTWISE,
    # float → float passes the gradient back in the input's precision; int/bool inputs get none
    grad=lambda ctx, g: [g.astype(ctx.inputs[0].dtype) if ctx.inputs[0].dtype.is_float else None],
    cpu="{0}",  # the generated kernel converts on store
    examples=lambda rng: [Example((rng.standard_normal((3, 4)).astype(np.float32),), {"dtype": DType.float64}),
                          Example((rng.standard_normal((3, 4)) > 0,), {"dtype": DType.float32}),
                          Example((rng.integers(0, 9, (5,)),), {"dtype": DType.int32})],
    doc="Convert to ``dtype`` (numpy's astype: floats truncate toward zero into ints).", family="cast"))


def cast(x, dtype):
    """``x`` converted to ``dtype`` ("float32", "int64", "bool", ...)."""
    return apply("cast", [x], dtype=as_dtype(dtype))
