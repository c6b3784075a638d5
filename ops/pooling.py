"""2-D max and average pooling over the last two axes of (N, C, H, W) or (C, H, W), as torch.

``max_pool2d(x, kernel_size, stride=None, padding=0)`` pads with -inf;
``avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True)`` pads with
zeros and divides by the whole window, or (``count_include_pad=False``) by the number of
real elements in it. ``stride`` defaults to ``kernel_size``. As in torch, padding may be
at most half the kernel. Normalized attrs: ``kernel_size``, ``stride``, ``padding`` as
(h, w) pairs.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from attngraph.dsl import apply
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.rules import require_float, require_rank
from attngraph.ir.shapes import dim_mul

from .conv import as_pair, window_out_dim

__all__ = ["max_pool2d", "avg_pool2d"]

_F32, _F64 = np.float32, np.float64


def _pool_normalize(types, attrs: dict) -> dict:
    out = dict(attrs)
    kernel = as_pair(out["kernel_size"], "kernel_size", minimum=1)
    out["kernel_size"] = kernel
    stride = out.get("stride")
    out["stride"] = kernel if stride is None else as_pair(stride, "stride", minimum=1)
    out["padding"] = as_pair(out.get("padding", 0), "padding")
    if "count_include_pad" in out:
        out["count_include_pad"] = bool(out["count_include_pad"])
    return out


def _pool_infer(x, *, kernel_size, stride=None, padding=0):
    require_rank(x, (3, 4), "input (N, C, H, W) or (C, H, W)")
    require_float(x)
    kernel = as_pair(kernel_size, "kernel_size", minimum=1)
    stride = kernel if stride is None else as_pair(stride, "stride", minimum=1)
    padding = as_pair(padding, "padding")
    for i, what in enumerate(("height", "width")):
        if padding[i] > kernel[i] // 2:
            raise ShapeError(f"padding {padding[i]} in {what} is more than half the kernel {what} {kernel[i]}",
                             hint=f"use padding <= {kernel[i] // 2} (torch's rule)")
    h, w = x.shape[-2:]
    ho = window_out_dim(h, kernel[0], stride[0], padding[0], "height")
    wo = window_out_dim(w, kernel[1], stride[1], padding[1], "width")
    return TensorType(x.dtype, x.shape[:-2] + (ho, wo))


def _avg_pool_infer(x, *, kernel_size, stride=None, padding=0, count_include_pad=True):
    return _pool_infer(x, kernel_size=kernel_size, stride=stride, padding=padding)


def _windows(x, kernel, stride, padding, fill):
    """(..., Ho, Wo, kh, kw) view of the windows of ``x`` padded with ``fill``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        pads = ((0, 0),) * (x.ndim - 2) + ((ph, ph), (pw, pw))
        x = np.pad(x, pads, constant_values=fill)
    return sliding_window_view(x, (kh, kw), axis=(-2, -1))[..., ::sh, ::sw, :, :]


def _pool_args(kernel_size, stride, padding):
    kernel = as_pair(kernel_size, "kernel_size", minimum=1)
    return kernel, kernel if stride is None else as_pair(stride, "stride"), as_pair(padding, "padding")


def _max_pool2d_reference(x, *, kernel_size, stride=None, padding=0):
    win = _windows(x, *_pool_args(kernel_size, stride, padding), fill=-np.inf)
    return np.ascontiguousarray(win.max(axis=(-2, -1)), dtype=x.dtype)


def _avg_pool2d_reference(x, *, kernel_size, stride=None, padding=0, count_include_pad=True):
    kernel, stride, padding = _pool_args(kernel_size, stride, padding)
    total = _windows(x, kernel, stride, padding, fill=0).sum(axis=(-2, -1))
    if count_include_pad or padding == (0, 0):
        count = kernel[0] * kernel[1]
    else:
        ones = np.ones(x.shape[-2:], dtype=x.dtype)
        count = _windows(ones, kernel, stride, padding, fill=0).sum(axis=(-2, -1))   # (Ho, Wo)
    return np.ascontiguousarray(total / count, dtype=x.dtype)


def _pool_flops(in_types, out_types, *, kernel_size, **_):
    kh, kw = as_pair(kernel_size, "kernel_size")
    return dim_mul(out_types[0].size, kh * kw)


def _examples(*extra_attrs):
    def examples(rng):
        x32 = rng.standard_normal((2, 3, 7, 6)).astype(_F32)
        x64 = rng.standard_normal((3, 9, 8)).astype(_F64)
        out = []
        for extra in extra_attrs or ({},):
            suffix = "".join(f", {k}={v}" for k, v in extra.items())
            out.append(Example((x32,), {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0), **extra},
                               "2x2 float32" + suffix))
            out.append(Example((x64,), {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 1), **extra},
                               "3x2 stride (2, 1) pad 1, no batch dim, float64" + suffix))
        return out
    return examples


def _max_pool2d_grad(ctx, g):
    (x,), a = ctx.inputs, ctx.attrs
    return [apply("max_pool2d_grad", [x, g], kernel_size=a["kernel_size"], stride=a["stride"], padding=a["padding"])]


def _avg_pool2d_grad(ctx, g):
    (x,), a = ctx.inputs, ctx.attrs
    return [apply("avg_pool2d_grad", [g], size=x.shape[-2:], kernel_size=a["kernel_size"], stride=a["stride"],
                  padding=a["padding"], count_include_pad=a.get("count_include_pad", True))]


_F = DType.float32
_POOL_BAD = (
    BadCase(((_F, (1, 3, 2, 2)),), {"kernel_size": (3, 3)}, label="kernel larger than input"),
    BadCase(((_F, (1, 3, 8, 8)),), {"kernel_size": (2, 2), "padding": (2, 2)}, label="padding over half the kernel"),
    BadCase(((_F, (8, 8)),), {"kernel_size": (2, 2)}, label="rank 2 input"),
    BadCase(((_F, ("B", 3, "H", 8)),), {"kernel_size": (2, 2), "stride": (2, 2)}, label="symbolic height"),
    BadCase(((DType.int64, (1, 3, 8, 8)),), {"kernel_size": (2, 2)}, error="DTypeError", label="int input"),
)

register(OpDef(
    "max_pool2d", infer=_pool_infer, reference=_max_pool2d_reference, normalize=_pool_normalize,
    grad=_max_pool2d_grad,  # the backward ops are in pooling_grad.py
    fusion=Fusion.REDUCTION, flops=_pool_flops, examples=_examples(), bad_cases=_POOL_BAD,
    doc="Max over kernel_size windows of the last two axes, padded with -inf, as "
        "torch.nn.functional.max_pool2d; attrs kernel_size, stride, padding (pairs).",
    family="pooling"))

register(OpDef(
    "avg_pool2d", infer=_avg_pool_infer, reference=_avg_pool2d_reference, normalize=_pool_normalize,
    grad=_avg_pool2d_grad,
    fusion=Fusion.REDUCTION, flops=_pool_flops,
    examples=_examples({"count_include_pad": True}, {"count_include_pad": False}),
    bad_cases=_POOL_BAD,
    doc="Mean over kernel_size windows of the last two axes, zero-padded, as "
        "torch.nn.functional.avg_pool2d; attrs kernel_size, stride, padding (pairs), count_include_pad.",
    family="pooling"))


# -- the DSL functions ------------------------------------------------------------------------
def max_pool2d(x, kernel_size, stride=None, padding=0):
    """``torch.nn.functional.max_pool2d``: windows padded with -inf; stride defaults to kernel_size."""
    return apply("max_pool2d", [x], kernel_size=kernel_size, stride=stride, padding=padding)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """``torch.nn.functional.avg_pool2d``; with ``count_include_pad=False`` padding is left out of the mean."""
    return apply("avg_pool2d", [x], kernel_size=kernel_size, stride=stride, padding=padding,
                 count_include_pad=count_include_pad)
