"""attention_grad: the gradients (dq, dk, dv) of ``attention`` for an output gradient.

Inputs ``q, k, v, [bias], [mask], out_grad`` and the attrs of ``attention`` (``scale``,
``causal``, ``has_bias``, ``has_mask``); three outputs with the shapes of q, k and v
(summed over batch dims that broadcasting stretched). The reference recomputes the
probabilities from q and k (nothing of the forward is saved), as the flash-style kernels
do from the log-sum-exp:

    P = softmax(s), s = q kᵀ · scale + bias, −inf where masked
    dv = Pᵀ g,  dP = g vᵀ,  dS = P (dP − rowsum(dP P)),  dq = dS k · scale,  dk = dSᵀ q · scale

A query row whose keys are all masked has P = 0, so it contributes zero (finite) gradients.
The gradient w.r.t. ``bias`` is not an output (it would be the T×T matrix dS): the grad
rule of ``attention`` builds it from primitives when a bias needs one.
"""

from __future__ import annotations

import numpy as np

from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, register
from attngraph.ir.shapes import dim_mul, format_shape

from .attention import _examples as _attention_examples
from .attention import _flops as _attention_flops
from .attention import _infer as _attention_infer
from .attention import reference_scores

__all__: list[str] = []


def _infer(q, k, v, *rest, scale, causal, has_bias, has_mask):
    if not rest:
        raise ShapeError("attention_grad needs the output gradient as its last input")
    *extra, g = rest
    out = _attention_infer(q, k, v, *extra, scale=scale, causal=causal, has_bias=has_bias, has_mask=has_mask)
    if g != out:
        raise ShapeError(f"the output gradient is {g.dtype}{format_shape(g.shape)}, but attention's output is "
                         f"{out.dtype}{format_shape(out.shape)}")
    return q, k, v


def _sum_to(x, shape):
    """Sum the broadcast batch dims of ``x`` back to ``shape``."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)
    return x.sum(axis=axes).reshape(shape) if axes else x


def _reference(q, k, v, *rest, scale, causal, has_bias, has_mask):
    *extra, g = rest
    s = reference_scores(q, k, *extra, scale=scale, causal=causal, has_bias=has_bias, has_mask=has_mask)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isneginf(m), 0, m))
    z = e.sum(axis=-1, keepdims=True)
    p = e / np.where(z == 0, 1, z)                                       # fully masked rows: 0
    dv = np.matmul(np.swapaxes(p, -1, -2), g)
    dp = np.matmul(g, np.swapaxes(v, -1, -2))
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = np.matmul(ds, k) * q.dtype.type(scale)
    dk = np.matmul(np.swapaxes(ds, -1, -2), q) * q.dtype.type(scale)
    return tuple(np.ascontiguousarray(_sum_to(d, x.shape), dtype=q.dtype) for d, x in ((dq, q), (dk, k), (dv, v)))


def _examples(rng):
    out = []
    for ex in _attention_examples(rng):
        q, k, v, *extra = ex.inputs
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        g = rng.standard_normal(batch + (q.shape[-2], v.shape[-1])).astype(q.dtype)
        out.append(Example((*ex.inputs, g), ex.attrs, ex.label))
    return out


def _flops(in_types, out_types, **attrs):
    return dim_mul(2, _attention_flops(in_types[:-1], (in_types[-1],), **attrs))   # ~2x the forward


_F = DType.float32
_PLAIN = {"scale": 1.0, "causal": False, "has_bias": False, "has_mask": False}

register(OpDef(
    "attention_grad", infer=_infer, reference=_reference, fusion=Fusion.OPAQUE, multiple_outputs=True,
    differentiable=False, flops=_flops, examples=_examples,
    bad_cases=(
        BadCase(((_F, (2, 5, 4)), (_F, (2, 6, 4)), (_F, (2, 6, 3)), (_F, (2, 5, 4))), _PLAIN,
                label="out_grad shape"),
        BadCase(((_F, (2, 5, 4)), (_F, (2, 6, 8)), (_F, (2, 6, 4)), (_F, (2, 5, 4))), _PLAIN, label="head dims"),
    ),
    doc="(dq, dk, dv) of attention for inputs q, k, v, [bias], [mask], out_grad; recomputes the probabilities; "
        "fully masked rows give zero gradients. Not differentiable itself (no second derivatives).",
    family="attention"))


# -- the grad rule of attention (ops/attention.py points here) --------------------------------
def attention_vjp(ctx, g):
    """Input gradients of an ``attention`` node: q, k, v by one attention_grad node; a bias
    that needs one gets dS, built from primitives; the mask gets none."""
    from attngraph.dsl import apply

    q, k, v, *extra = ctx.inputs
    a = ctx.attrs
    dq, dk, dv = apply("attention_grad", [q, k, v, *extra, g], **a)
    grads = [dq, dk, dv]
    if a["has_bias"]:
        grads.append(_bias_grad(ctx, g) if ctx.needs[3] else None)
    if a["has_mask"]:
        grads.append(None)
    return grads


def _bias_grad(ctx, g):
    from attngraph.dsl import apply

    q, k, v, *extra = ctx.inputs
    a = ctx.attrs
    swap = lambda t: t.transpose(*range(t.ndim - 2), t.ndim - 1, t.ndim - 2)  # noqa: E731
    s = (q @ swap(k)) * a["scale"] + extra[0]                             # (…, Tq, Tk)
    if a["has_mask"]:
        s = apply("mask", [s, extra[1]], value=-np.inf)
    if a["causal"]:
        above = apply("trilu", [ctx.graph.full(s.shape[-2:], True, "bool")], k=1, upper=True)
        s = apply("mask", [s, above], value=-np.inf)
    p = apply("softmax", [s], axis=-1)
    dp = g @ swap(v)
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))              # dS; autodiff sums it to bias's shape
