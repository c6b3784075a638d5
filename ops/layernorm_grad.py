"""layernorm_grad: the input gradients of ``layernorm`` in one op (what layernorm's grad rule emits).

Inputs ``x, [gamma], out_grad`` and layernorm's attrs (``eps``, ``has_gamma``, ``has_beta``);
outputs ``dx`` (x's shape), then ``dgamma`` and ``dbeta`` (shape (C,), summed over every row)
when the forward has them. With x̂ = (x − mean)·rstd and gx = g·gamma (g without gamma):

    dx = rstd · (gx − mean(gx) − x̂ · mean(gx · x̂)),   dgamma = Σ_rows g·x̂,   dbeta = Σ_rows g

Not differentiable itself (no second derivatives of layernorm).
"""

from __future__ import annotations

import numpy as np

from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, register
from attngraph.ir.shapes import dim_mul, format_shape

from .layernorm import _infer as _layernorm_infer

__all__: list[str] = []


def _infer(x, *rest, eps, has_gamma, has_beta):
    if len(rest) != int(has_gamma) + 1:
        raise ShapeError(f"layernorm_grad takes x, {'gamma, ' if has_gamma else ''}out_grad; got {1 + len(rest)} "
                         f"inputs")
    *affine, g = rest
    out = _layernorm_infer(x, *affine, eps=eps, has_gamma=has_gamma, has_beta=False)
    if g != out:
        raise ShapeError(f"the output gradient is {g.dtype}{format_shape(g.shape)}, but layernorm's output is "
                         f"{out.dtype}{format_shape(out.shape)}")
    vec = x.with_shape((x.shape[-1],))
    return (x,) + ((vec,) if has_gamma else ()) + ((vec,) if has_beta else ())


def _reference(x, *rest, eps, has_gamma, has_beta):
    *affine, g = rest
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + x.dtype.type(eps))
    xhat = centered * rstd
    gx = g * affine[0] if has_gamma else g
    dx = rstd * (gx - gx.mean(axis=-1, keepdims=True) - xhat * (gx * xhat).mean(axis=-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    outs = [dx]
    if has_gamma:
        outs.append((g * xhat).sum(axis=rows))
    if has_beta:
        outs.append(g.sum(axis=rows))
    return tuple(np.ascontiguousarray(o, dtype=x.dtype) for o in outs)


def _examples(rng):
    out = []
    for ex in _layernorm_examples(rng):
        x = ex.inputs[0]
        g = rng.standard_normal(x.shape).astype(x.dtype)
        gamma = ex.inputs[1:2] if ex.attrs["has_gamma"] else ()
        out.append(Example((x, *gamma, g), ex.attrs, ex.label))
    return out


def _layernorm_examples(rng):
    from .layernorm import _examples

    return _examples(rng)


_F = DType.float32
_ALL = {"eps": 1e-5, "has_gamma": True, "has_beta": True}

register(OpDef(
    "layernorm_grad", infer=_infer, reference=_reference, fusion=Fusion.OPAQUE, multiple_outputs=True,
    differentiable=False, examples=_examples, flops=lambda i, o, **a: dim_mul(12, o[0].size),
    bad_cases=(BadCase(((_F, (3, 8)), (_F, (8,)), (_F, (3, 7))), _ALL, label="out_grad shape"),
               BadCase(((_F, (3, 8)), (_F, (4,)), (_F, (3, 8))), _ALL, label="gamma size")),
    doc="(dx, [dgamma], [dbeta]) of layernorm for inputs x, [gamma], out_grad, in one pass over the rows. "
        "Not differentiable itself.",
    family="layernorm"))
