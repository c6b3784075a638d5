"""attention: fused scaled dot-product attention, softmax(q kᵀ · scale + bias, masked) v.

The optimizer introduces it (passes/fuse_attention.py) and users may call it directly as
``ag.attention`` (like torch's scaled_dot_product_attention). A query row whose keys are
all masked gives zeros, as the softmax contract says.

With ``return_weights=True`` (an attr present only when true) the op has a second output,
the probabilities ``(…, Tq, Tk)``: the fuser asks for it when the softmax of an attention
pattern is also read elsewhere (a graph output for pictures, MultiheadAttention's head
average), so the pattern still fuses. That form materialises the T×T matrix; the default
form never does.
"""

from __future__ import annotations

import math

import numpy as np

from attngraph.dsl import apply, as_tensor
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.rules import require_dtype, require_float, require_same_dtype
from attngraph.ir.shapes import broadcast_shapes, dim_mul, dim_product, format_shape

__all__ = ["attention"]


def _infer(q, k, v, *extra, scale, causal, has_bias, has_mask, return_weights=False):
    require_float(q, "q")
    require_same_dtype(q, k, v)
    if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
        raise ShapeError(f"q, k, v need the same rank >= 2; got {format_shape(q.shape)}, {format_shape(k.shape)}, "
                         f"{format_shape(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"k and v have different numbers of keys: {k.shape[-2]} vs {v.shape[-2]}")
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    scores = batch + (q.shape[-2], k.shape[-2])
    if len(extra) != int(has_bias) + int(has_mask):
        raise ShapeError(f"attention got {len(extra)} extra inputs for has_bias={has_bias}, has_mask={has_mask}")
    rest = list(extra)
    if has_bias:
        bias = rest.pop(0)
        require_same_dtype(q, bias)
        if broadcast_shapes(bias.shape, scores) != scores:
            raise ShapeError(f"bias {format_shape(bias.shape)} does not broadcast to the scores {format_shape(scores)}")
    if has_mask:
        mask = rest.pop(0)
        require_dtype(mask, DType.bool, "mask")
        if broadcast_shapes(mask.shape, scores) != scores:
            raise ShapeError(f"mask {format_shape(mask.shape)} does not broadcast to the scores {format_shape(scores)}")
    if not scale > 0:
        raise ShapeError(f"attention scale must be positive, got {scale}")
    out = TensorType(q.dtype, batch + (q.shape[-2], v.shape[-1]))
    if return_weights:
        return out, TensorType(q.dtype, scores)                 # (…, Tq, Dv) and (…, Tq, Tk)
    return out


def reference_scores(q, k, *extra, scale, causal, has_bias, has_mask):
    """The masked, scaled scores (−inf where masked); shared by the reference and the tests."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * q.dtype.type(scale)
    rest = list(extra)
    if has_bias:
        s = s + rest.pop(0)
    if has_mask:
        s = np.where(rest.pop(0), -np.inf, s)
    if causal:
        tq, tk = s.shape[-2], s.shape[-1]
        s = np.where(np.triu(np.ones((tq, tk), bool), 1), -np.inf, s)
    return s.astype(q.dtype)


def reference_probabilities(q, k, *extra, scale, causal, has_bias, has_mask):
    """softmax of the masked, scaled scores; a fully masked row is zeros."""
    s = reference_scores(q, k, *extra, scale=scale, causal=causal, has_bias=has_bias, has_mask=has_mask)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0, m)
    e = np.exp(s - m)
    z = e.sum(axis=-1, keepdims=True)
    return e / np.where(z == 0, 1, z)


def _reference(q, k, v, *extra, scale, causal, has_bias, has_mask, return_weights=False):
    p = reference_probabilities(q, k, *extra, scale=scale, causal=causal, has_bias=has_bias, has_mask=has_mask)
    out = np.matmul(p, v).astype(q.dtype)
    if return_weights:
        batch = out.shape[:-2]
        return out, np.ascontiguousarray(np.broadcast_to(p, batch + p.shape[-2:]), dtype=q.dtype)
    return out


def _flops(in_types, out_types, **attrs):
    q, k, v = in_types[:3]
    batch = dim_product(out_types[0].shape[:-2])
    return dim_mul(dim_mul(2, batch), dim_mul(dim_mul(q.shape[-2], k.shape[-2]), q.shape[-1] + v.shape[-1]))


def _examples(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    plain = {"scale": 0.5, "causal": False, "has_bias": False, "has_mask": False}
    padding = rng.random((2, 1, 1, 6)) > 0.6
    padding[1, ..., :] = True  # a sequence with every key padded: its rows are zeros
    return [
        Example((f(2, 3, 5, 4), f(2, 3, 6, 4), f(2, 3, 6, 3)), plain, "plain"),
        Example((f(2, 3, 6, 4), f(2, 3, 6, 4), f(2, 3, 6, 4)), dict(plain, causal=True), "causal"),
        Example((f(2, 3, 5, 4), f(2, 3, 6, 4), f(2, 3, 6, 3), f(1, 1, 5, 6)), dict(plain, has_bias=True), "bias"),
        Example((f(2, 3, 5, 4), f(2, 3, 6, 4), f(2, 3, 6, 3), padding), dict(plain, has_mask=True),
                "fully masked rows"),
        Example((f(4, 5, 8).astype(np.float64),) * 3, dict(plain, scale=1 / math.sqrt(8), causal=True), "float64"),
    ]


def _grad(ctx, g, g_weights=None):
    """The default form by attention_grad (attention_grad.py); the return_weights form from
    primitives, so a gradient on the returned weights flows too (that form materialises the
    probabilities anyway)."""
    from .attention_grad import attention_vjp  # the backward op and its rule live in attention_grad.py

    if ctx.attrs.get("return_weights", False):
        return _grad_through_weights(ctx, g, g_weights)
    return attention_vjp(ctx, g)


def _grad_through_weights(ctx, g, g_weights):
    """Input gradients when the weights P (second output) get ``g_weights`` and out = P v gets ``g``:
    dP = g_weights + g vᵀ, dS = P (dP − rowsum(dP P)), dq = dS k·scale, dk = dSᵀ q·scale, dv = Pᵀ g."""
    from attngraph.dsl import apply

    q, k, v, *extra = ctx.inputs
    a = ctx.attrs
    swap = lambda t: t.transpose(*range(t.ndim - 2), t.ndim - 1, t.ndim - 2)  # noqa: E731
    s = (q @ swap(k)) * a["scale"]                                         # (…, Tq, Tk)
    rest = list(extra)
    if a["has_bias"]:
        s = s + rest.pop(0)
    if a["has_mask"]:
        s = apply("mask", [s, rest.pop(0)], value=-np.inf)
    if a["causal"]:
        above = apply("trilu", [ctx.graph.full(s.shape[-2:], True, "bool")], k=1, upper=True)
        s = apply("mask", [s, above], value=-np.inf)
    p = apply("softmax", [s], axis=-1)
    dp = g @ swap(v) if g is not None else None                            # (…, Tq, Tk)
    dp = g_weights if dp is None else dp if g_weights is None else dp + g_weights
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))                  # (…, Tq, Tk)
    grads = [ds @ k * a["scale"], swap(ds) @ q * a["scale"], None if g is None else swap(p) @ g]
    if a["has_bias"]:
        grads.append(ds)                                                   # autodiff sums it to bias's shape
    if a["has_mask"]:
        grads.append(None)
    return grads


register(OpDef(
    "attention", infer=_infer, reference=_reference, grad=_grad, fusion=Fusion.OPAQUE, flops=_flops,
    examples=_examples,
    bad_cases=(
        BadCase(((DType.float32, (2, 5, 4)), (DType.float32, (2, 6, 8)), (DType.float32, (2, 6, 4))),
                {"scale": 1.0, "causal": False, "has_bias": False, "has_mask": False}, label="head dims"),
        BadCase(((DType.float32, (2, 5, 4)), (DType.float32, (2, 6, 4)), (DType.float32, (2, 6, 4)),
                 (DType.float32, (2, 5, 6))),
                {"scale": 1.0, "causal": False, "has_bias": False, "has_mask": True}, error="DTypeError",
                label="float mask"),
    ),
    doc="softmax(q kᵀ · scale + bias, −inf where mask or above the diagonal when causal) v; "
        "fully masked rows give zeros. return_weights=True adds a second output, the probabilities "
        "(…, Tq, Tk).", family="attention"))


def attention(q, k, v, bias=None, mask=None, scale: float | None = None, causal: bool = False,
              return_weights: bool = False):
    """Scaled dot-product attention over the last two axes (torch's scaled_dot_product_attention).

    ``bias`` is added to the scores (float, broadcast); ``mask`` is bool, True where a key
    may NOT be attended (as ``ag.mask``); ``causal`` hides keys after the query (top-left aligned).
    ``return_weights=True`` returns ``(out, weights)`` with the probabilities ``(…, Tq, Tk)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    extra = [as_tensor(t, q.graph) for t in (bias, mask) if t is not None]
    flags = {"return_weights": True} if return_weights else {}
    out = apply("attention", [q, k, v, *extra], scale=scale, causal=bool(causal),
                has_bias=bias is not None, has_mask=mask is not None, **flags)
    if return_weights:
        return out, out.graph.tensor(out.value.node.outputs()[1])
    return out
