"""layernorm over the last axis, with optional gamma (scale) and beta (shift)."""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, register
from attngraph.ir.rules import require_float, require_same_dtype
from attngraph.ir.shapes import dim_mul, format_shape

__all__ = ["layernorm"]


def _infer(x, *affine, eps, has_gamma, has_beta):
    require_float(x)
    if len(affine) != int(has_gamma) + int(has_beta):
        raise ShapeError(f"layernorm got {len(affine)} affine inputs but has_gamma={has_gamma}, has_beta={has_beta}")
    if x.rank == 0:
        raise ShapeError("layernorm needs a tensor of rank >= 1")
    for what, t in zip([n for n, f in (("gamma", has_gamma), ("beta", has_beta)) if f], affine):
        if t.shape != (x.shape[-1],):
            raise ShapeError(f"{what} has shape {format_shape(t.shape)} but the last axis of x is {x.shape[-1]}",
                             hint=f"{what} must be a vector of the normalized (last) axis")
        require_same_dtype(x, t)
    return x


def _reference(x, *affine, eps, has_gamma, has_beta):
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    y = centered / np.sqrt(var + x.dtype.type(eps))
    rest = list(affine)
    if has_gamma:
        y = y * rest.pop(0)
    if has_beta:
        y = y + rest.pop(0)
    return y.astype(x.dtype)


def _grad(ctx, g):
    """One fused ``layernorm_grad`` node (ops/layernorm_grad.py): dx, and dgamma / dbeta summed
    over the rows."""
    x, *affine = ctx.inputs
    a = ctx.attrs
    gamma = affine[:1] if a["has_gamma"] else []
    outs = apply("layernorm_grad", [x, *gamma, g], eps=a["eps"], has_gamma=a["has_gamma"], has_beta=a["has_beta"])
    return list(outs)


def _examples(rng):
    x = rng.standard_normal((2, 3, 8)).astype(np.float32) * 3 + 1
    g = rng.standard_normal(8).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    common = {"eps": 1e-5}
    return [Example((x, g, b), dict(common, has_gamma=True, has_beta=True), "affine"),
            Example((x,), dict(common, has_gamma=False, has_beta=False), "plain"),
            Example((x.astype(np.float64), g.astype(np.float64)), dict(common, has_gamma=True, has_beta=False),
                    "gamma only, float64")]


register(OpDef(
    "layernorm", infer=_infer, reference=_reference, grad=_grad, fusion=Fusion.REDUCTION, examples=_examples,
    flops=lambda i, o, **a: dim_mul(8, o[0].size),
    bad_cases=(BadCase(((DType.float32, ("B", 8)), (DType.float32, (4,)), (DType.float32, (8,))),
                       {"eps": 1e-5, "has_gamma": True, "has_beta": True}, label="gamma size"),
               BadCase(((DType.int32, (3, 8)),), {"eps": 1e-5, "has_gamma": False, "has_beta": False},
                       error="DTypeError")),
    doc="(x - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance, as torch).",
    family="layernorm"))


def layernorm(x, gamma=None, beta=None, eps: float = 1e-5):
    """Layer normalization over the last axis; ``gamma``/``beta`` may be None."""
    affine = [t for t in (gamma, beta) if t is not None]
    return apply("layernorm", [x, *affine], eps=float(eps), has_gamma=gamma is not None, has_beta=beta is not None)
