"""The backward ops of 2-D pooling: ``max_pool2d_grad`` and ``avg_pool2d_grad``.

- ``max_pool2d_grad(x, g)``: each output gradient goes to the position of its window's
  maximum in ``x`` (the first one in row-major window order on ties, as torch's CPU
  kernel); overlapping windows add up. Not differentiable itself.
- ``avg_pool2d_grad(g)``: each output gradient spread evenly over its window (divided by
  the count ``avg_pool2d`` divided by), clipped to the input of size ``size`` (attr, the
  input's (H, W), symbolic dims allowed). It is the adjoint of ``avg_pool2d``, so its own
  gradient is ``avg_pool2d``.

Attrs as the forward ops: ``kernel_size``, ``stride``, ``padding`` (pairs), and for the
average ``count_include_pad``.
"""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, normalize_dim, register
from attngraph.ir.rules import require_float, require_rank
from attngraph.ir.shapes import dim_mul, format_shape

from .pooling import _avg_pool_infer, _pool_args, _pool_infer, _pool_normalize, _windows

__all__: list[str] = []

_F32, _F64 = np.float32, np.float64


def _check_grad(g, pooled: TensorType) -> None:
    if g != pooled:
        raise ShapeError(f"the output gradient is {g.dtype}{format_shape(g.shape)}, but the pooling's output is "
                         f"{pooled.dtype}{format_shape(pooled.shape)}")


# -- max ---------------------------------------------------------------------------------------
def _max_infer(x, g, *, kernel_size, stride=None, padding=0):
    _check_grad(g, _pool_infer(x, kernel_size=kernel_size, stride=stride, padding=padding))
    return x


def _max_reference(x, g, *, kernel_size, stride=None, padding=0):
    (kh, kw), (sh, sw), (ph, pw) = _pool_args(kernel_size, stride, padding)
    win = _windows(x, (kh, kw), (sh, sw), (ph, pw), fill=-np.inf)          # (..., Ho, Wo, kh, kw)
    first = win.reshape(win.shape[:-2] + (kh * kw,)).argmax(axis=-1)       # the first maximum
    ho, wo = g.shape[-2:]
    h, w = x.shape[-2:]
    wp = w + 2 * pw
    rows = np.arange(ho)[:, None] * sh + first // kw                       # in the padded input
    cols = np.arange(wo)[None, :] * sw + first % kw
    lead = int(np.prod(x.shape[:-2], dtype=np.int64))
    out = np.zeros((lead, (h + 2 * ph) * wp), dtype=x.dtype)
    np.add.at(out, (np.arange(lead)[:, None], (rows * wp + cols).reshape(lead, -1)), g.reshape(lead, -1))
    out = out.reshape(x.shape[:-2] + (h + 2 * ph, wp))
    return np.ascontiguousarray(out[..., ph:ph + h, pw:pw + w])


# -- average -----------------------------------------------------------------------------------
def _avg_normalize(types, attrs: dict) -> dict:
    out = _pool_normalize(types, attrs)
    out["size"] = tuple(normalize_dim(d) for d in out["size"])
    out["count_include_pad"] = bool(out.get("count_include_pad", True))
    return out


def _avg_infer(g, *, size, kernel_size, stride=None, padding=0, count_include_pad=True):
    require_rank(g, (3, 4), "gradient (N, C, Ho, Wo) or (C, Ho, Wo)")
    require_float(g)
    if len(size) != 2:
        raise ShapeError(f"size must be the input's (H, W), got {size!r}")
    x = TensorType(g.dtype, g.shape[:-2] + tuple(size))
    _check_grad(g, _avg_pool_infer(x, kernel_size=kernel_size, stride=stride, padding=padding))
    return x


def _avg_reference(g, *, size, kernel_size, stride=None, padding=0, count_include_pad=True):
    (kh, kw), (sh, sw), (ph, pw) = _pool_args(kernel_size, stride, padding)
    h, w = size
    ho, wo = g.shape[-2:]
    if count_include_pad or (ph, pw) == (0, 0):
        count = kh * kw
    else:
        ones = np.ones((h, w), dtype=g.dtype)
        count = _windows(ones, (kh, kw), (sh, sw), (ph, pw), fill=0).sum(axis=(-2, -1))   # (Ho, Wo)
    share = g / count
    out = np.zeros(g.shape[:-2] + (h + 2 * ph, w + 2 * pw), dtype=g.dtype)
    for i in range(kh):
        for j in range(kw):
            out[..., i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw] += share
    return np.ascontiguousarray(out[..., ph:ph + h, pw:pw + w], dtype=g.dtype)


def _avg_grad(ctx, gg):
    a = ctx.attrs
    return [apply("avg_pool2d", [gg], kernel_size=a["kernel_size"], stride=a["stride"], padding=a["padding"],
                  count_include_pad=a["count_include_pad"])]


# -- examples ----------------------------------------------------------------------------------
def _cases(rng):
    x32 = rng.standard_normal((2, 3, 7, 6)).astype(_F32)
    x64 = rng.standard_normal((3, 9, 8)).astype(_F64)
    return [(x32, {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)}, "2x2 float32"),
            (x64, {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 1)}, "3x2 stride (2, 1) pad 1 float64"),
            (x64, {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1)}, "overlapping windows float64")]


def _pooled_grad(rng, x, attrs):
    from .pooling import _max_pool2d_reference

    return rng.standard_normal(_max_pool2d_reference(x, **attrs).shape).astype(x.dtype)


def _max_examples(rng):
    return [Example((x, _pooled_grad(rng, x, attrs)), attrs, label) for x, attrs, label in _cases(rng)]


def _avg_examples(rng):
    out = []
    for x, attrs, label in _cases(rng):
        g = _pooled_grad(rng, x, attrs)
        for include in (True, False):
            out.append(Example((g,), dict(attrs, size=x.shape[-2:], count_include_pad=include),
                               f"{label}, count_include_pad={include}"))
    return out


_F = DType.float32
_POOL = {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)}

register(OpDef(
    "max_pool2d_grad", infer=_max_infer, reference=_max_reference, normalize=_pool_normalize,
    fusion=Fusion.OPAQUE, differentiable=False, examples=_max_examples,
    flops=lambda i, o, **a: o[0].size,
    bad_cases=(BadCase(((_F, (1, 3, 8, 8)), (_F, (1, 3, 3, 4))), _POOL, label="gradient shape"),),
    doc="Gradient of max_pool2d w.r.t. its input x, for the output gradient g: each g goes to its window's "
        "first maximum; inputs (x, g). Not differentiable itself.",
    family="pooling"))

register(OpDef(
    "avg_pool2d_grad", infer=_avg_infer, reference=_avg_reference, normalize=_avg_normalize,
    shape_attrs=("size",), fusion=Fusion.OPAQUE, grad=_avg_grad, examples=_avg_examples,
    flops=lambda i, o, *, kernel_size, **a: dim_mul(i[0].size, kernel_size[0] * kernel_size[1]),
    bad_cases=(BadCase(((_F, (1, 3, 3, 4)),), dict(_POOL, size=(8, 8), count_include_pad=True),
                       label="gradient shape"),),
    doc="Gradient of avg_pool2d w.r.t. its input, for the output gradient g (the adjoint of avg_pool2d); "
        "attr size is the input's (H, W).",
    family="pooling"))
