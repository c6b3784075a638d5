"""``patchify``: cut NCHW images into non-overlapping p x p patches, one row per patch (ViT).

``patchify(images, p)``: (B, C, H, W) → (B, N, C·p·p) with N = (H/p)·(W/p). Patches come
in row-major order (left to right, then top to bottom) and each is flattened in
(C, p, p) order, so that

    patchify(x, p) @ conv.weight.reshape(out, -1).T  ==  conv(x).flatten(2).transpose(1, 2)

for ``conv = torch.nn.Conv2d(C, out, p, stride=p, bias=False)``: the patch embedding of
ViT as one matmul. B and C may be symbolic; H and W must be multiples of p (static, or
symbolic multiples such as ``"16*h"``).
"""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.rules import require_rank
from attngraph.ir.shapes import dim_div, dim_mul, format_shape

from .conv import as_count

__all__ = ["patchify"]


def _grid(size, patch: int, what: str, shape) -> object:
    """How many patches fit along a side of ``size``; it must divide exactly."""
    if isinstance(size, int):
        if size % patch:
            lower, upper = size - size % patch, size - size % patch + patch
            raise ShapeError(f"the image {what} {size} of {format_shape(shape)} is not a multiple of the patch "
                             f"size {patch}",
                             hint=f"resize or crop the images to a {what} of {lower}" +
                                  (f" or pad them to {upper}" if lower else f" (or pad them to {upper})"))
        return size // patch
    count = dim_div(size, patch)
    if count is None:
        raise ShapeError(f"the image {what} {size} of {format_shape(shape)} is symbolic and not a known multiple "
                         f"of the patch size {patch}",
                         hint=f"give the images a fixed {what}, or write it as a multiple: '{patch}*h'")
    return count


def _infer(images, *, patch):
    require_rank(images, 4, "images (B, C, H, W)")
    p = as_count(patch, "patch")
    b, c, h, w = images.shape
    n = dim_mul(_grid(h, p, "height", images.shape), _grid(w, p, "width", images.shape))
    return TensorType(images.dtype, (b, n, dim_mul(c, p * p)))


def _reference(images, *, patch):
    b, c, h, w = images.shape
    p = patch
    x = images.reshape(b, c, h // p, p, w // p, p)            # (B, C, H/p, p, W/p, p)
    x = x.transpose(0, 2, 4, 1, 3, 5)                          # (B, H/p, W/p, C, p, p)
    return np.ascontiguousarray(x.reshape(b, (h // p) * (w // p), c * p * p))


def _examples(rng):
    return [
        Example((rng.standard_normal((2, 3, 8, 12)).astype(np.float32),), {"patch": 4}, "4x4 patches float32"),
        Example((rng.standard_normal((1, 2, 6, 6)),), {"patch": 3}, "3x3 patches float64"),
        Example((rng.integers(0, 9, (1, 1, 4, 2)),), {"patch": 2}, "int64"),
    ]


_F = DType.float32
_BAD = (
    BadCase(((_F, (2, 3, 10, 8)),), {"patch": 4}, label="height not a multiple of the patch"),
    BadCase(((_F, (2, 3, 8, 10)),), {"patch": 4}, label="width not a multiple of the patch"),
    BadCase(((_F, (3, 8, 8)),), {"patch": 4}, label="no batch dim"),
    BadCase(((_F, ("B", 3, "H", 8)),), {"patch": 4}, label="symbolic height"),
    BadCase(((_F, (2, 3, 8, 8)),), {"patch": 0}, label="patch 0"),
)

def _grad(ctx, g):
    (images,) = ctx.inputs
    p = ctx.attrs["patch"]
    b, c, h, w = images.shape
    rows, cols = _grid(h, p, "height", images.shape), _grid(w, p, "width", images.shape)
    g = g.reshape(b, rows, cols, c, p, p)                        # (B, H/p, W/p, C, p, p)
    return [g.transpose(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)]   # (B, C, H/p, p, W/p, p) → images


register(OpDef(
    "patchify", infer=_infer, reference=_reference, grad=_grad, fusion=Fusion.INJECTIVE, examples=_examples,
    bad_cases=_BAD,
    doc="(B, C, H, W) → (B, (H/p)(W/p), C·p·p): p x p patches in row-major order, each flattened in (C, p, p) "
        "order, so patchify(x, p) @ W.reshape(out, -1).T is a stride-p Conv2d patch embedding.",
    family="patchify"))


def patchify(images, patch: int):
    """(B, C, H, W) → (B, N, C·p·p): ViT's patches, row-major, each flattened in (C, p, p) order.

    ``patchify(x, p) @ conv.weight.reshape(out, -1).T`` equals ``Conv2d(C, out, p, stride=p)``
    applied to ``x`` (without bias), flattened to (B, N, out).
    """
    return apply("patchify", [images], patch=patch)
