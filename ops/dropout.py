"""dropout: identity at inference (what this op computes); training mode comes with the trainer."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, register
from attngraph.ir.rules import require_float

__all__ = ["dropout"]


def _infer(x, *, p):
    require_float(x)
    if not 0.0 <= p < 1.0:
        raise ShapeError(f"dropout probability must be in [0, 1), got {p}")
    return x


register(OpDef(
    "dropout", infer=_infer, reference=lambda x, *, p: x.copy(), fusion=Fusion.ELEMENTWISE, cpu="{0}",
    grad=lambda ctx, g: [g],                                  # the inference identity
    examples=lambda rng: [Example((rng.standard_normal((3, 4)).astype(np.float32),), {"p": 0.1})],
    bad_cases=(BadCase(((DType.float32, (3,)),), {"p": 1.5}),),
    doc="Randomly zeroes entries during training; at inference (the only mode compiled so far) the identity.",
    family="dropout"))


def dropout(x, p: float = 0.5):
    """Dropout with drop probability ``p``; the identity when the graph runs for inference."""
    return apply("dropout", [x], p=float(p))
