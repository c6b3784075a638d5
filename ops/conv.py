"""2-D convolution and transposed convolution on NCHW tensors, with torch's semantics.

``conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)`` and
``conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1)``
take the arguments of ``torch.nn.functional.conv2d`` / ``conv_transpose2d``, in the
same order. Each node has two inputs, or three when there is a bias. ``stride``,
``padding``, ``dilation`` and ``output_padding`` may be an int or an ``(h, w)`` pair;
the normalized attrs are always pairs.

The batch dim may be symbolic (``"B"``). A symbolic height or width works where the
output size is a polynomial in it (conv2d with stride 1, conv_transpose2d always);
channel counts and the weight must be static.

The helpers ``as_pair``, ``as_count`` and ``window_out_dim`` are shared with ``pooling.py``
and ``patchify.py``.
"""

from __future__ import annotations

import operator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from attngraph.dsl import Tensor, apply, as_tensor
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.rules import require_float, require_rank
from attngraph.ir.shapes import Dim, dim_add, dim_mul, dim_product, dim_sub, format_shape, is_static

__all__ = ["conv2d", "conv_transpose2d"]

_F32, _F64 = np.float32, np.float64


# -- helpers shared with pooling.py ----------------------------------------------------------
def as_pair(value, name: str, *, minimum: int = 0) -> tuple[int, int]:
    """An int or an (h, w) pair of ints → an (h, w) tuple, each >= ``minimum``."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise ShapeError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    try:
        pair = tuple(operator.index(v) for v in items)
    except TypeError:
        raise ShapeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}") from None
    if any(isinstance(v, bool) for v in items):
        raise ShapeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ShapeError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def as_count(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise ShapeError(f"{name} must be an int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ShapeError(f"{name} must be an int, got {value!r}") from None
    if n < minimum:
        raise ShapeError(f"{name} must be >= {minimum}, got {n}")
    return n


def window_out_dim(size: Dim, extent: int, stride: int, pad: int, what: str, dilated: bool = False) -> Dim:
    """Positions of a window of ``extent`` (dilation included) sliding with ``stride`` over
    ``size`` padded by ``pad`` on both sides: ``(size + 2*pad - extent) // stride + 1``."""
    if isinstance(size, int):
        padded = size + 2 * pad
        if padded < extent:
            kernel = f"{extent} (dilation included)" if dilated else f"{extent}"
            raise ShapeError(f"the kernel {what} {kernel} is larger than the input {what} {size}"
                             + (f" padded to {padded}" if pad else ""),
                             hint="use a smaller kernel, more padding, or a larger input")
        return (padded - extent) // stride + 1
    if stride == 1:
        return dim_add(size, 2 * pad - extent + 1)
    raise ShapeError(f"the input {what} {size} is symbolic, and a stride of {stride} needs it static "
                     f"(the output size would be a floor division)",
                     hint=f"give the input a fixed {what}, or use stride 1")


def _require_static(t: TensorType, what: str) -> None:
    if not is_static(t.shape):
        raise ShapeError(f"{what} must have a static shape, got {format_shape(t.shape)}")


def _require_same_dtype(x: TensorType, others: dict) -> None:
    for what, t in others.items():
        if t.dtype != x.dtype:
            raise DTypeError(f"{what} is {t.dtype} but the input is {x.dtype}",
                             hint=f"cast it: {what}.astype('{x.dtype}')")


def _check_bias(bias: tuple, channels: int, x: TensorType) -> None:
    if len(bias) > 1:
        raise ShapeError(f"expected (input, weight) or (input, weight, bias), got {2 + len(bias)} inputs")
    if bias:
        (b,) = bias
        if b.shape != (channels,):
            raise ShapeError(f"bias has shape {format_shape(b.shape)}, but the conv has {channels} output channels",
                             hint=f"bias must have shape ({channels},)")
        _require_same_dtype(x, {"bias": b})


def _groups_of(x: TensorType, groups) -> tuple[int, int]:
    groups = as_count(groups, "groups")
    channels = x.shape[1]
    if not isinstance(channels, int):
        raise ShapeError(f"the channel dim of input {format_shape(x.shape)} is symbolic ({channels}); "
                         "it must be static")
    if channels % groups:
        raise ShapeError(f"groups={groups} does not divide the {channels} input channels of {format_shape(x.shape)}",
                         hint="groups must divide both the input and the output channel counts")
    return channels, groups


def _conv_normalize(types, attrs: dict) -> dict:
    out = dict(attrs)
    for key in ("stride", "dilation"):
        if key in out:
            out[key] = as_pair(out[key], key, minimum=1)
    for key in ("padding", "output_padding"):
        if key in out:
            out[key] = as_pair(out[key], key, minimum=0)
    if "groups" in out:
        out["groups"] = as_count(out["groups"], "groups")
    return out


# -- conv2d -----------------------------------------------------------------------------------
def _conv2d_infer(x, w, *bias, stride=1, padding=0, dilation=1, groups=1):
    require_rank(x, 4, "input (N, C, H, W)")
    require_rank(w, 4, "weight (out_channels, in_channels/groups, kh, kw)")
    require_float(x)
    _require_same_dtype(x, {"weight": w})
    _require_static(w, "weight")
    stride, padding = as_pair(stride, "stride", minimum=1), as_pair(padding, "padding")
    dilation = as_pair(dilation, "dilation", minimum=1)
    channels, groups = _groups_of(x, groups)
    out_ch, per_group, kh, kw = w.shape
    if out_ch % groups:
        raise ShapeError(f"groups={groups} does not divide the {out_ch} output channels of weight "
                         f"{format_shape(w.shape)}")
    if per_group * groups != channels:
        hint = (f"the weight's dim 1 must be in_channels/groups = {channels // groups}"
                if groups > 1 else f"the weight's dim 1 must equal the input's {channels} channels")
        raise ShapeError(f"weight {format_shape(w.shape)} expects {per_group * groups} input channels "
                         f"({per_group} per group x groups={groups}), but input {format_shape(x.shape)} has {channels}",
                         hint=hint)
    if kh < 1 or kw < 1:
        raise ShapeError(f"weight {format_shape(w.shape)} has an empty kernel")
    _check_bias(bias, out_ch, x)
    n, _, h, wd = x.shape
    ho = window_out_dim(h, dilation[0] * (kh - 1) + 1, stride[0], padding[0], "height", dilation[0] > 1)
    wo = window_out_dim(wd, dilation[1] * (kw - 1) + 1, stride[1], padding[1], "width", dilation[1] > 1)
    return TensorType(x.dtype, (n, out_ch, ho, wo))


def _conv2d_reference(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    (sh, sw), (ph, pw), (dh, dw) = as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation")
    out_ch, per_group, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    # every window, dilation included, then keep the strided positions and dilated taps
    win = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]                       # (N, C, Ho, Wo, kh, kw)
    n, _, ho, wo = win.shape[:4]
    if groups == 1:
        y = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))      # (N, Ho, Wo, O)
        y = y.transpose(0, 3, 1, 2)
    else:
        win = win.reshape(n, groups, per_group, ho, wo, kh, kw)    # (N, G, C/G, Ho, Wo, kh, kw)
        wg = w.reshape(groups, out_ch // groups, per_group, kh, kw)
        y = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True).reshape(n, out_ch, ho, wo)
    if b is not None:
        y = y + b.reshape(1, out_ch, 1, 1)
    return np.ascontiguousarray(y, dtype=x.dtype)


def _conv2d_flops(in_types, out_types, **attrs):
    x, w = in_types[0], in_types[1]
    out = out_types[0]
    macs = dim_product((out.size, w.shape[1], w.shape[2], w.shape[3]))
    flops = dim_mul(2, macs)
    if len(in_types) > 2:
        flops = dim_add(flops, out.size)
    return flops


def _conv2d_examples(rng):
    def arr(shape, dt):
        return rng.standard_normal(shape).astype(dt)

    return [
        Example((arr((2, 3, 7, 7), _F32), arr((4, 3, 3, 3), _F32)), {"padding": (1, 1)}, "3x3 pad 1 float32"),
        Example((arr((1, 4, 9, 8), _F64), arr((6, 2, 3, 2), _F64), arr((6,), _F64)),
                {"stride": (2, 1), "dilation": (1, 2), "groups": 2}, "groups, stride, dilation, bias float64"),
        Example((arr((2, 3, 8, 8), _F32), arr((5, 3, 4, 4), _F32), arr((5,), _F32)), {"stride": (4, 4)},
                "patch embedding"),
    ]


# -- gradients -------------------------------------------------------------------------------
# conv2d and conv_transpose2d are each other's adjoints w.r.t. the input. The weight gradient
# correlates the output gradient with the windows of the (padded) input: the windows are cut
# out once (one gather of a constant index table, or one slice per tap when a size is
# symbolic) and contracted with a single batched matmul over the groups.

def _conv_args(attrs):
    return (as_pair(attrs.get("stride", 1), "stride"), as_pair(attrs.get("padding", 0), "padding"),
            as_pair(attrs.get("dilation", 1), "dilation"), int(attrs.get("groups", 1)))


def _pad_hw(t, padding):
    ph, pw = padding
    return apply("pad", [t], pads=((0, 0), (0, 0), (ph, ph), (pw, pw)), value=0.0) if ph or pw else t


def _windows_of(xp, kernel, stride, dilation, out_hw):
    """(N, C, Hp, Wp) → (N, C, kh·kw, Ho·Wo): the input under each kernel tap at each output position."""
    n, c, hp, wp = xp.shape
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    if is_static((hp, wp, ho, wo)):
        rows = np.arange(kh)[:, None, None, None] * dh + np.arange(ho)[None, None, :, None] * sh
        cols = np.arange(kw)[None, :, None, None] * dw + np.arange(wo)[None, None, None, :] * sw
        index = (rows * wp + cols).reshape(kh * kw, ho * wo).astype(np.int64)   # (taps, positions)
        flat = xp.reshape(n, c, dim_mul(hp, wp))
        return apply("gather", [flat, as_tensor(index, xp.graph)], axis=2)
    taps = []  # a symbolic size: stride 1, one slice per tap
    for i in range(kh):
        for j in range(kw):
            tap = apply("slice", [xp], starts=(None, None, i * dh, j * dw),
                        stops=(None, None, dim_add(ho, i * dh), dim_add(wo, j * dw)), steps=(1, 1, 1, 1))
            taps.append(tap.reshape(n, c, 1, dim_mul(ho, wo)))
    return apply("concat", taps, axis=2) if len(taps) > 1 else taps[0]


def _correlate(a, cols, groups: int):
    """a (N, A, P) with windows (N, B, K, P) → (G, A/G, B/G·K), summed over N and the positions P."""
    n, ach, p = a.shape
    _, bch, k, _ = cols.shape
    a = a.reshape(n, groups, ach // groups, p).transpose(1, 2, 0, 3).reshape(groups, ach // groups, -1)
    cols = cols.reshape(n, groups, bch // groups * k, p).transpose(1, 0, 3, 2).reshape(groups, -1, bch // groups * k)
    return a @ cols


def _leftover(size, out, k, stride, pad, dilation):
    """What a transposed conv must add (output_padding) to give back ``size`` from ``out``."""
    extra = dim_sub(dim_add(size, 2 * pad - dilation * (k - 1) - 1), dim_mul(dim_sub(out, 1), stride))
    if not isinstance(extra, int):
        raise ShapeError(f"the input size {size} is symbolic and the gradient needs it static (stride {stride})")
    return extra


def _conv2d_grad(ctx, g):
    x, w, *bias = ctx.inputs
    stride, padding, dilation, groups = _conv_args(ctx.attrs)
    n, _, h, wd = x.shape
    _, _, kh, kw = w.shape
    ho, wo = g.shape[-2:]
    dx = dw = db = None
    if ctx.needs[0]:
        output_padding = (_leftover(h, ho, kh, stride[0], padding[0], dilation[0]),
                          _leftover(wd, wo, kw, stride[1], padding[1], dilation[1]))
        dx = apply("conv_transpose2d", [g, w], stride=stride, padding=padding, output_padding=output_padding,
                   groups=groups, dilation=dilation)
    if ctx.needs[1]:
        cols = _windows_of(_pad_hw(x, padding), (kh, kw), stride, dilation, (ho, wo))   # (N, C, K, Ho·Wo)
        dw = _correlate(g.reshape(n, w.shape[0], dim_mul(ho, wo)), cols, groups).reshape(w.shape)
    if bias and ctx.needs[2]:
        db = g.sum(axis=(0, 2, 3))
    return [dx, dw] + ([db] if bias else [])


def _conv_transpose2d_grad(ctx, g):
    x, w, *bias = ctx.inputs
    stride, padding, dilation, groups = _conv_args(ctx.attrs)
    n, cin, h, wd = x.shape
    _, _, kh, kw = w.shape
    dx = dw = db = None
    if ctx.needs[0]:
        dx = apply("conv2d", [g, w], stride=stride, padding=padding, dilation=dilation, groups=groups)
        if dx.shape != x.shape:  # output_padding >= stride (possible when dilation > stride)
            dx = apply("slice", [dx], starts=(None,) * 4, stops=(None, None, h, wd), steps=(1,) * 4)
    if ctx.needs[1]:
        cols = _windows_of(_pad_hw(g, padding), (kh, kw), stride, dilation, (h, wd))     # (N, Cout, K, H·W)
        dw = _correlate(x.reshape(n, cin, dim_mul(h, wd)), cols, groups).reshape(w.shape)
    if bias and ctx.needs[2]:
        db = g.sum(axis=(0, 2, 3))
    return [dx, dw] + ([db] if bias else [])


_F = DType.float32
_CONV2D_BAD = (
    BadCase(((_F, (1, 3, 8, 8)), (_F, (4, 2, 3, 3))), label="wrong input channel count for weight"),
    BadCase(((_F, (1, 6, 8, 8)), (_F, (4, 3, 3, 3))), {"groups": 4}, label="groups does not divide channels"),
    BadCase(((_F, (1, 3, 4, 4)), (_F, (4, 3, 5, 5))), label="kernel larger than input"),
    BadCase(((_F, (1, 3, 8, 8)), (_F, (4, 3, 3, 3)), (_F, (3,))), label="bias of the wrong length"),
    BadCase(((_F, (3, 8, 8)), (_F, (4, 3, 3, 3))), label="input without a batch dim"),
    BadCase(((_F, ("B", 3, "H", 8)), (_F, (4, 3, 3, 3))), {"stride": (2, 2)}, label="stride 2 on a symbolic height"),
    BadCase(((_F, (1, 3, 8, 8)), (DType.float64, (4, 3, 3, 3))), error="DTypeError", label="weight dtype differs"),
    BadCase(((DType.int64, (1, 3, 8, 8)), (DType.int64, (4, 3, 3, 3))), error="DTypeError", label="int input"),
)

register(OpDef(
    "conv2d", infer=_conv2d_infer, reference=_conv2d_reference, normalize=_conv_normalize, grad=_conv2d_grad,
    fusion=Fusion.OPAQUE, flops=_conv2d_flops, examples=_conv2d_examples, bad_cases=_CONV2D_BAD,
    doc="2-D convolution (cross-correlation) of x (N, C, H, W) with weight (O, C/groups, kh, kw) and an "
        "optional bias (O,), as torch.nn.functional.conv2d; attrs stride, padding, dilation (pairs), groups.",
    family="conv"))


# -- conv_transpose2d -------------------------------------------------------------------------
def _conv_transpose2d_infer(x, w, *bias, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    require_rank(x, 4, "input (N, C_in, H, W)")
    require_rank(w, 4, "weight (in_channels, out_channels/groups, kh, kw)")
    require_float(x)
    _require_same_dtype(x, {"weight": w})
    _require_static(w, "weight")
    stride, padding = as_pair(stride, "stride", minimum=1), as_pair(padding, "padding")
    dilation = as_pair(dilation, "dilation", minimum=1)
    output_padding = as_pair(output_padding, "output_padding")
    channels, groups = _groups_of(x, groups)
    in_ch, per_group_out, kh, kw = w.shape
    if in_ch != channels:
        raise ShapeError(f"weight {format_shape(w.shape)} expects {in_ch} input channels, but input "
                         f"{format_shape(x.shape)} has {channels}",
                         hint="a transposed conv's weight is (in_channels, out_channels/groups, kh, kw)")
    if kh < 1 or kw < 1:
        raise ShapeError(f"weight {format_shape(w.shape)} has an empty kernel")
    for i, what in enumerate(("height", "width")):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ShapeError(f"output_padding {output_padding[i]} in {what} must be smaller than the stride "
                             f"({stride[i]}) or the dilation ({dilation[i]})")
    out_ch = per_group_out * groups
    _check_bias(bias, out_ch, x)
    n, _, h, wd = x.shape
    sizes = []
    for i, (size, k, what) in enumerate(((h, kh, "height"), (wd, kw, "width"))):
        # (size - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1
        extra = -2 * padding[i] + dilation[i] * (k - 1) + output_padding[i] + 1
        out = dim_add(dim_mul(dim_sub(size, 1), stride[i]), extra)
        if isinstance(out, int) and out < 1:
            raise ShapeError(f"the output {what} would be {out}: padding {padding[i]} is too large for input "
                             f"{what} {size} and kernel {what} {k}")
        sizes.append(out)
    return TensorType(x.dtype, (n, out_ch, sizes[0], sizes[1]))


def _conv_transpose2d_reference(x, w, b=None, *, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    (sh, sw), (ph, pw) = as_pair(stride, "stride"), as_pair(padding, "padding")
    (dh, dw), (oph, opw) = as_pair(dilation, "dilation"), as_pair(output_padding, "output_padding")
    n, in_ch, h, wd = x.shape
    _, per_group_out, kh, kw = w.shape
    out_ch = per_group_out * groups
    # every tap's contribution at once: (N, O, kh, kw, H, W), then scatter-add tap by tap
    xg = x.reshape(n, groups, in_ch // groups, h, wd)
    wg = w.reshape(groups, in_ch // groups, per_group_out, kh, kw)
    cols = np.einsum("ngchw,gcoij->ngoijhw", xg, wg, optimize=True).reshape(n, out_ch, kh, kw, h, wd)
    full_h = (h - 1) * sh + dh * (kh - 1) + 1 + oph
    full_w = (wd - 1) * sw + dw * (kw - 1) + 1 + opw
    full = np.zeros((n, out_ch, full_h, full_w), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + (h - 1) * sh + 1, sh)
            columns = slice(j * dw, j * dw + (wd - 1) * sw + 1, sw)
            full[:, :, rows, columns] += cols[:, :, i, j]
    y = full[:, :, ph:full_h - ph, pw:full_w - pw]
    if b is not None:
        y = y + b.reshape(1, out_ch, 1, 1)
    return np.ascontiguousarray(y, dtype=x.dtype)


def _conv_transpose2d_flops(in_types, out_types, **attrs):
    x, w = in_types[0], in_types[1]
    macs = dim_product((x.size, w.shape[1], w.shape[2], w.shape[3]))
    flops = dim_mul(2, macs)
    if len(in_types) > 2:
        flops = dim_add(flops, out_types[0].size)
    return flops


def _conv_transpose2d_examples(rng):
    def arr(shape, dt):
        return rng.standard_normal(shape).astype(dt)

    return [
        Example((arr((2, 3, 4, 5), _F32), arr((3, 2, 3, 3), _F32)), {"stride": (2, 2), "padding": (1, 1)},
                "stride 2 pad 1 float32"),
        Example((arr((1, 4, 3, 3), _F64), arr((4, 3, 2, 3), _F64), arr((6,), _F64)),
                {"stride": (2, 3), "output_padding": (1, 2), "groups": 2, "dilation": (1, 2)},
                "groups, output_padding, dilation, bias float64"),
    ]


_CONV_T_BAD = (
    BadCase(((_F, (1, 3, 8, 8)), (_F, (4, 2, 3, 3))), label="wrong input channel count for weight"),
    BadCase(((_F, (1, 6, 8, 8)), (_F, (6, 2, 3, 3))), {"groups": 4}, label="groups does not divide channels"),
    BadCase(((_F, (1, 3, 4, 4)), (_F, (3, 2, 3, 3))), {"output_padding": (2, 2), "stride": (2, 2)},
            label="output_padding not smaller than stride"),
    BadCase(((_F, (1, 3, 2, 2)), (_F, (3, 2, 3, 3))), {"padding": (3, 3)}, label="padding larger than the output"),
    BadCase(((_F, (1, 3, 8, 8)), (DType.float64, (3, 2, 3, 3))), error="DTypeError", label="weight dtype differs"),
)

register(OpDef(
    "conv_transpose2d", infer=_conv_transpose2d_infer, reference=_conv_transpose2d_reference,
    grad=_conv_transpose2d_grad,
    normalize=_conv_normalize, fusion=Fusion.OPAQUE, flops=_conv_transpose2d_flops,
    examples=_conv_transpose2d_examples, bad_cases=_CONV_T_BAD,
    doc="2-D transposed convolution of x (N, C_in, H, W) with weight (C_in, C_out/groups, kh, kw) and an "
        "optional bias (C_out,), as torch.nn.functional.conv_transpose2d; attrs stride, padding, "
        "output_padding, dilation (pairs), groups.",
    family="conv"))


# -- the DSL functions ------------------------------------------------------------------------
def _inputs(x, weight, bias) -> list:
    """The node's inputs; a numpy weight or bias next to a graph Tensor becomes a const."""
    anchor = next((t for t in (x, weight, bias) if isinstance(t, Tensor)), None)
    items = [x, weight] + ([] if bias is None else [bias])
    if anchor is None:
        return items  # apply says that it needs Tensors
    return [as_tensor(t, anchor.graph) for t in items]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.nn.functional.conv2d``: x (N, C, H, W), weight (O, C/groups, kh, kw), bias (O,) or None.

    ``stride``, ``padding`` and ``dilation`` are an int or an (h, w) pair.
    """
    return apply("conv2d", _inputs(x, weight, bias), stride=stride, padding=padding, dilation=dilation,
                 groups=groups)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``torch.nn.functional.conv_transpose2d``: x (N, C_in, H, W), weight (C_in, C_out/groups, kh, kw).

    Output size: ``(H - 1) * stride - 2 * padding + dilation * (kh - 1) + output_padding + 1``.
    """
    return apply("conv_transpose2d", _inputs(x, weight, bias), stride=stride, padding=padding,
                 output_padding=output_padding, groups=groups, dilation=dilation)
