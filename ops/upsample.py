"""Resizing NCHW images: ``upsample``, as ``torch.nn.functional.interpolate``.

``upsample(x, scale_factor=None, size=None, mode="nearest", align_corners=None)`` takes
exactly one of ``scale_factor`` (a number or an (h, w) pair) and ``size`` (an int or an
(h, w) pair). Modes: ``"nearest"``, ``"nearest-exact"`` and ``"bilinear"`` (with
``align_corners`` False, the default, or True). The index arithmetic follows torch's CPU
kernels, in float32 for nearest and in the input's precision for bilinear, so results
agree with torch to the last bit for nearest and to rounding for bilinear.

One op, ``upsample``, whose ``mode`` attr picks the interpolation. Its fusion class is
OPAQUE for every mode: nearest alone would be injective (a gather), but a fusion class
belongs to an op, and bilinear does arithmetic on four neighbours.

Normalized attrs: ``size`` (out_h, out_w), whose dims may be symbolic; ``scales``, the
(h, w) scale factors when the user gave them (torch maps output to input indices with
``1 / scale`` then, not with ``in / out``), else None; ``mode``; ``align_corners``
(None for the nearest modes). A symbolic height or width needs an integer scale factor;
anything else needs them static.
"""

from __future__ import annotations

import math

import numpy as np

from attngraph.dsl import apply, as_tensor
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.rules import require_float, require_rank
from attngraph.ir.shapes import dim_mul, format_shape, is_static, normalize_dim

__all__ = ["upsample"]

_MODES = ("nearest", "nearest-exact", "bilinear")
_F32, _F64 = np.float32, np.float64


def _pair_of(value, name):
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise ShapeError(f"{name} must be a single value or an (h, w) pair, got {value!r}")
    return items


def _out_sizes(in_hw, size, scales) -> tuple:
    """Output (h, w) from the input's (h, w) and either ``size`` or ``scales``."""
    if scales is None:
        return tuple(size)
    out = []
    for dim, scale, what in zip(in_hw, scales, ("height", "width")):
        if isinstance(dim, int):
            out.append(math.floor(float(dim * scale)))  # torch: floor(float(in * scale))
        elif float(scale).is_integer():
            out.append(dim_mul(dim, int(scale)))
        else:
            raise ShapeError(f"the input {what} {dim} is symbolic, so the scale factor {scale} must be an integer",
                             hint=f"give the input a fixed {what}, or use an integer scale_factor")
    return tuple(out)


def _canonical(x_shape, attrs: dict) -> dict:
    """Normalized attrs (see the module doc); accepts raw DSL attrs or already normalized ones."""
    mode = attrs.get("mode", "nearest")
    if mode not in _MODES:
        raise ShapeError(f"unknown mode {mode!r}", hint=f"choose one of {', '.join(_MODES)}")
    align = attrs.get("align_corners")
    if mode == "bilinear":
        align = bool(align) if align is not None else False
    elif align is not None:
        raise ShapeError(f"align_corners only applies to mode 'bilinear', not {mode!r}",
                         hint="leave align_corners=None")
    scale_factor = attrs.get("scale_factor")
    scales = attrs.get("scales")
    size = attrs.get("size")
    if scale_factor is not None:
        if scales is not None:
            raise ShapeError("give scale_factor or scales, not both")
        scales = scale_factor
        if size is not None:
            raise ShapeError("give only one of size and scale_factor")
        size = None
    if scales is not None:
        try:
            scales = tuple(float(s) for s in _pair_of(scales, "scale_factor"))
        except (TypeError, ValueError):
            raise ShapeError(f"scale_factor must be a number or an (h, w) pair of numbers, got {scales!r}") from None
        if min(scales) <= 0 or not all(math.isfinite(s) for s in scales):
            raise ShapeError(f"scale_factor must be positive and finite, got {scales}")
        size = _out_sizes(x_shape[-2:], None, scales)
    elif size is not None:
        size = tuple(normalize_dim(d) for d in _pair_of(size, "size"))
    else:
        raise ShapeError("give one of size and scale_factor")
    for d, what in zip(size, ("height", "width")):
        if isinstance(d, int) and d < 1:
            raise ShapeError(f"the output {what} would be {d}; output sizes must be at least 1 "
                             f"(input {format_shape(x_shape)}, size {size}, scales {scales})")
    return {"mode": mode, "align_corners": align, "size": size, "scales": scales}


def _normalize(types, attrs: dict) -> dict:
    return _canonical(types[0].shape, attrs)


def _infer(x, **attrs):
    require_rank(x, 4, "input (N, C, H, W)")
    attrs = _canonical(x.shape, attrs)
    if attrs["mode"] == "bilinear":
        require_float(x)
    return TensorType(x.dtype, x.shape[:2] + attrs["size"])


# -- the reference: torch's CPU index arithmetic ----------------------------------------------
def _nearest_index(in_size: int, out_size: int, scale, exact: bool) -> np.ndarray:
    # torch: ratio = 1/scale_factor when given, else in/out, as a float32; then
    # nearest: src = floor(dst * ratio) in float32 (out == in and out == 2*in are special-cased);
    # nearest-exact: src = floor((dst + 0.5) * ratio), the product in double rounded to float32.
    dst = np.arange(out_size)
    if not exact and out_size == in_size:
        return dst
    if not exact and out_size == 2 * in_size:
        return dst >> 1
    ratio = np.float32(1.0 / scale) if scale is not None else np.float32(in_size) / np.float32(out_size)
    if exact:
        src = np.floor(((dst + 0.5) * np.float64(ratio)).astype(np.float32))
    else:
        src = np.floor(dst.astype(np.float32) * ratio)
    return np.minimum(src.astype(np.int64), in_size - 1)


def _linear_weights(in_size: int, out_size: int, scale, align_corners: bool, dtype):
    """Left index, right index and right weight of each output position (torch's linear rule)."""
    if out_size == in_size:
        index = np.arange(out_size)
        return index, index, np.zeros(out_size, dtype=dtype)
    if align_corners:
        ratio = dtype(in_size - 1) / dtype(out_size - 1) if out_size > 1 else dtype(0)
        src = np.arange(out_size, dtype=dtype) * ratio
    else:
        ratio = dtype(1.0 / scale) if scale is not None else dtype(in_size) / dtype(out_size)
        src = ratio * (np.arange(out_size, dtype=dtype) + dtype(0.5)) - dtype(0.5)
        src = np.maximum(src, dtype(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    return i0, i1, lam


def _reference(x, **attrs):
    a = _canonical(x.shape, attrs)
    (h, w), scales = x.shape[-2:], a["scales"] or (None, None)
    oh, ow = _out_sizes((h, w), a["size"], a["scales"])
    if a["mode"] != "bilinear":
        exact = a["mode"] == "nearest-exact"
        rows = _nearest_index(h, oh, scales[0], exact)
        cols = _nearest_index(w, ow, scales[1], exact)
        return np.ascontiguousarray(x[:, :, rows][:, :, :, cols])
    dt = x.dtype.type
    r0, r1, lr = _linear_weights(h, oh, scales[0], a["align_corners"], dt)
    c0, c1, lc = _linear_weights(w, ow, scales[1], a["align_corners"], dt)
    lr, lc = lr[:, None], lc[None, :]
    top, bottom = x[:, :, r0], x[:, :, r1]                                          # (N, C, oh, W)
    y = ((1 - lr) * ((1 - lc) * top[..., c0] + lc * top[..., c1])
         + lr * ((1 - lc) * bottom[..., c0] + lc * bottom[..., c1]))
    return np.ascontiguousarray(y, dtype=x.dtype)


# -- the gradient -----------------------------------------------------------------------------
# Nearest with an integer factor repeats each pixel in a block: the gradient sums the blocks
# (reshape + sum, symbolic sizes allowed). Every other case (fractional nearest, bilinear) is
# separable, y = R x Cᵀ over the last two axes with constant interpolation matrices R (out_h, H)
# and C (out_w, W) built from the same index arithmetic as the reference, so dx = Rᵀ g C
# (static sizes).

def _block_factor(size, out, scale, exact: bool):
    """s when nearest maps output i to input i // s along this axis, else None."""
    if isinstance(size, int) and isinstance(out, int):
        if out % size:
            return None
        s = out // size
        return s if np.array_equal(_nearest_index(size, out, scale, exact), np.arange(out) // s) else None
    if scale is None or not float(scale).is_integer() or out != dim_mul(size, int(scale)):
        return None
    s, probe = int(scale), 4096  # a symbolic size: check the float32 index arithmetic on a large one
    return s if np.array_equal(_nearest_index(probe, probe * s, scale, exact), np.arange(probe * s) // s) else None


def _interpolation_matrix(size: int, out: int, scale, mode: str, align_corners, dtype) -> np.ndarray:
    """M (out, size) with y = M x along one axis."""
    m = np.zeros((out, size), dtype=dtype)
    rows = np.arange(out)
    if mode == "bilinear":
        i0, i1, lam = _linear_weights(size, out, scale, align_corners, dtype.type)
        np.add.at(m, (rows, i0), 1 - lam)
        np.add.at(m, (rows, i1), lam)
    else:
        m[rows, _nearest_index(size, out, scale, mode == "nearest-exact")] = 1
    return m


def _grad(ctx, g):
    (x,) = ctx.inputs
    a = ctx.attrs
    n, c, h, w = x.shape
    oh, ow = a["size"]
    sh_, sw_ = a["scales"] or (None, None)
    if a["mode"] != "bilinear":
        exact = a["mode"] == "nearest-exact"
        fh, fw = _block_factor(h, oh, sh_, exact), _block_factor(w, ow, sw_, exact)
        if fh is not None and fw is not None:
            return [g.reshape(n, c, h, fh, w, fw).sum(axis=(3, 5))]   # (N, C, H, fh, W, fw) → blocks summed
    if not is_static((h, w, oh, ow)):
        raise ShapeError(f"the gradient of {a['mode']} upsampling from {h}x{w} to {oh}x{ow} needs static sizes",
                         hint="integer nearest scale factors work with symbolic sizes")
    dt = x.dtype.numpy
    rows = _interpolation_matrix(h, oh, sh_, a["mode"], a["align_corners"], dt)       # (oh, H)
    cols = _interpolation_matrix(w, ow, sw_, a["mode"], a["align_corners"], dt)       # (ow, W)
    return [as_tensor(np.ascontiguousarray(rows.T), g.graph) @ (g @ as_tensor(cols, g.graph))]


def _flops(in_types, out_types, *, mode="nearest", **_):
    return dim_mul(out_types[0].size, 8) if mode == "bilinear" else 0


def _examples(rng):
    x32 = rng.standard_normal((2, 3, 4, 5)).astype(_F32)
    x64 = rng.standard_normal((1, 2, 5, 3)).astype(_F64)
    return [
        Example((x32,), {"mode": "nearest", "scales": (2.0, 2.0), "size": (8, 10), "align_corners": None},
                "nearest x2 float32"),
        Example((x64,), {"mode": "nearest", "scales": None, "size": (7, 4), "align_corners": None},
                "nearest to a size, float64"),
        Example((x32,), {"mode": "bilinear", "scales": (1.5, 2.0), "size": (6, 10), "align_corners": False},
                "bilinear x(1.5, 2) float32"),
        Example((x64,), {"mode": "bilinear", "scales": None, "size": (9, 6), "align_corners": True},
                "bilinear align_corners float64"),
    ]


_F = DType.float32
_BAD = (
    BadCase(((_F, (2, 3, 4)),), {"scale_factor": 2}, label="rank 3 input"),
    BadCase(((_F, (1, 3, 4, 4)),), {"mode": "bicubic", "scale_factor": 2}, label="unsupported mode"),
    BadCase(((_F, (1, 3, 4, 4)),), {}, label="neither size nor scale_factor"),
    BadCase(((_F, (1, 3, 4, 4)),), {"scale_factor": 2, "size": (8, 8)}, label="both size and scale_factor"),
    BadCase(((_F, (1, 3, "H", 4)),), {"scale_factor": 1.5}, label="fractional scale of a symbolic height"),
    BadCase(((_F, (1, 3, 4, 4)),), {"scale_factor": 0.1}, label="output size 0"),
    BadCase(((DType.int64, (1, 3, 4, 4)),), {"scale_factor": 2, "mode": "bilinear"}, error="DTypeError",
            label="bilinear on ints"),
)

register(OpDef(
    "upsample", infer=_infer, reference=_reference, normalize=_normalize, shape_attrs=("size",), grad=_grad,
    fusion=Fusion.OPAQUE, flops=_flops, examples=_examples, bad_cases=_BAD,
    doc="Resize (N, C, H, W) to size (out_h, out_w) by nearest, nearest-exact or bilinear interpolation, as "
        "torch.nn.functional.interpolate. Fusion class OPAQUE for every mode (one op; bilinear is not injective).",
    family="upsample"))


# -- the DSL function -------------------------------------------------------------------------
def upsample(x, scale_factor=None, size=None, mode: str = "nearest", align_corners=None):
    """``torch.nn.functional.interpolate`` on NCHW: give ``scale_factor`` or ``size``.

    >>> y = upsample(x, scale_factor=2)                                  # (N, C, 2H, 2W)
    >>> y = upsample(x, size=(32, 48), mode="bilinear", align_corners=False)
    """
    return apply("upsample", [x], scale_factor=scale_factor, size=size, mode=mode, align_corners=align_corners)
