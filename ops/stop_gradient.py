"""stop_gradient: the identity whose gradient is zero (JAX's lax.stop_gradient, torch's detach).

Used where a value must be read without being trained through it, e.g. the ``padding_idx``
row of ``nn.Embedding``, which torch keeps out of the gradient."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.ir import Example, Fusion, OpDef, register

__all__ = ["stop_gradient"]

register(OpDef(
    "stop_gradient", infer=lambda x: x, reference=lambda x: x.copy(), fusion=Fusion.ELEMENTWISE,
    grad=lambda ctx, g: [None],      # no gradient flows back through it
    cpu="{0}",
    examples=lambda rng: [Example((rng.standard_normal((3, 4)).astype(np.float32),), {})],
    doc="The identity in the forward pass; passes no gradient back (torch's detach).", family="stop_gradient"))


def stop_gradient(x):
    """``x``, with no gradient flowing back through it."""
    return apply("stop_gradient", [x])
