"""Shape ops: reshape, transpose, broadcast_to, slice, split (and squeeze/unsqueeze/flatten helpers)."""

from __future__ import annotations

import builtins
import numbers

import numpy as np

from attngraph.autodiff import unbroadcast
from attngraph.dsl import Tensor, apply
from attngraph.errors import ShapeError
from attngraph.ir import (BadCase, DType, Example, Fusion, OpDef, TensorType, normalize_axis, normalize_dim,
                          register)
from attngraph.ir.shapes import broadcast_shapes, dim_add, dim_div, dim_product, dim_sub, format_shape

__all__ = ["reshape", "transpose", "broadcast_to", "narrow", "split", "squeeze", "unsqueeze", "flatten"]


# -- reshape ------------------------------------------------------------------------------
def _reshape_normalize(types, attrs):
    x = types[0]
    target = list(attrs["shape"])
    holes = [i for i, d in enumerate(target) if isinstance(d, numbers.Integral) and d == -1]
    if len(holes) > 1:
        raise ShapeError(f"only one dim can be -1, got {tuple(target)}")
    for i, d in enumerate(target):
        if i not in holes:
            target[i] = normalize_dim(d)
            if isinstance(target[i], int) and target[i] < 0:
                raise ShapeError(f"bad dim {d} in reshape target {tuple(attrs['shape'])}")
    total = x.size
    if holes:
        known = dim_product(d for i, d in enumerate(target) if i not in holes)
        missing = dim_div(total, known) if known != 0 else None
        if missing is None:
            raise ShapeError(f"cannot reshape {format_shape(x.shape)} ({total} elements) into "
                             f"{format_shape(attrs['shape'])}: {total} is not a multiple of {known}")
        target[holes[0]] = missing
    if dim_product(target) != total:
        raise ShapeError(f"cannot reshape {format_shape(x.shape)} ({total} elements) into "
                         f"{format_shape(target)} ({dim_product(target)} elements)",
                         hint="symbolic sizes must match as written: (B, T, D) → (B*T, D) and back")
    attrs["shape"] = tuple(target)
    return attrs


register(OpDef(
    "reshape", infer=lambda x, *, shape: TensorType(x.dtype, shape), normalize=_reshape_normalize,
    grad=lambda ctx, g: [g.reshape(ctx.inputs[0].shape)],
    reference=lambda x, *, shape: np.reshape(x, shape), shape_attrs=("shape",), fusion=Fusion.INJECTIVE,
    examples=lambda rng: [Example((rng.standard_normal((2, 3, 4)).astype(np.float32),), {"shape": (6, -1)}),
                          Example((rng.standard_normal((2, 12)).astype(np.float32),), {"shape": (2, 3, 2, 2)})],
    bad_cases=(BadCase(((DType.float32, ("B", 16, 64)),), {"shape": ("B", 32, 64)}, label="size differs"),
               BadCase(((DType.float32, (2, 3)),), {"shape": (4, -1)}, label="not divisible")),
    doc="Same elements, new shape; one dim may be -1; symbolic dims allowed ((B, T, D) → (B*T, D)).",
    family="shape"))


# -- transpose ----------------------------------------------------------------------------
def _transpose_normalize(types, attrs):
    rank = types[0].rank
    axes = attrs.get("axes")
    if axes is None:
        axes = tuple(reversed(range(rank)))
    axes = tuple(normalize_axis(a, rank) for a in axes)
    if sorted(axes) != list(range(rank)):
        raise ShapeError(f"axes {tuple(attrs.get('axes'))} are not a permutation of the {rank} axes")
    attrs["axes"] = axes
    return attrs


def _transpose_grad(ctx, g):
    inverse = tuple(int(i) for i in np.argsort(ctx.attrs["axes"]))
    return [g.transpose(inverse)]


register(OpDef(
    "transpose", normalize=_transpose_normalize, grad=_transpose_grad,
    infer=lambda x, *, axes: TensorType(x.dtype, tuple(x.shape[a] for a in axes)),
    reference=lambda x, *, axes: np.transpose(x, axes), fusion=Fusion.INJECTIVE,
    examples=lambda rng: [Example((rng.standard_normal((2, 3, 4)).astype(np.float32),), {"axes": (0, 2, 1)}),
                          Example((rng.standard_normal((2, 3)).astype(np.float32),), {"axes": None})],
    bad_cases=(BadCase(((DType.float32, (2, 3, 4)),), {"axes": (0, 1)}, label="not a permutation"),),
    doc="Permute the axes (None reverses them, as ``.T``).", family="shape"))


# -- broadcast_to -------------------------------------------------------------------------
def _broadcast_infer(x, *, shape):
    if broadcast_shapes(x.shape, shape) != tuple(shape):
        raise ShapeError(f"cannot broadcast {format_shape(x.shape)} to {format_shape(shape)}")
    return TensorType(x.dtype, shape)


register(OpDef(
    "broadcast_to", infer=_broadcast_infer, shape_attrs=("shape",), fusion=Fusion.INJECTIVE,
    grad=lambda ctx, g: [unbroadcast(g, ctx.inputs[0].shape)],
    normalize=lambda types, attrs: dict(attrs, shape=tuple(normalize_dim(d) for d in attrs["shape"])),
    reference=lambda x, *, shape: np.array(np.broadcast_to(x, shape)),
    examples=lambda rng: [Example((rng.standard_normal((3, 1)).astype(np.float32),), {"shape": (2, 3, 4)})],
    bad_cases=(BadCase(((DType.float32, (3, 2)),), {"shape": (3, 4)}),),
    doc="numpy's broadcast_to (the result is a fresh array).", family="shape"))


# -- slice --------------------------------------------------------------------------------
def _slice_dim(dim, start, stop, step, axis):
    if not isinstance(step, numbers.Integral) or step == 0:
        raise ShapeError(f"slice step on axis {axis} must be a non-zero int, got {step!r}")
    if isinstance(dim, int) and not isinstance(start, str) and not isinstance(stop, str):
        return len(range(*builtins.slice(start, stop, step).indices(dim)))
    if step != 1:
        raise ShapeError(f"slicing the symbolic dim {dim} on axis {axis} needs step 1, got {step}")
    start = 0 if start is None else start
    stop = dim if stop is None else stop
    if isinstance(start, int) and start < 0:
        start = dim_add(dim, start)
    if isinstance(stop, int) and stop < 0:
        stop = dim_add(dim, stop)
    size = dim_sub(stop, start)
    if isinstance(size, int) and size < 0:
        raise ShapeError(f"slice [{start}:{stop}] on axis {axis} is empty or reversed")
    return size


def _slice_normalize(types, attrs):
    rank = types[0].rank
    starts, stops, steps = (tuple(attrs[k]) for k in ("starts", "stops", "steps"))
    if not len(starts) == len(stops) == len(steps) <= rank:
        raise ShapeError(f"slice needs at most one (start, stop, step) per axis; the tensor has rank {rank}")
    pad = rank - len(starts)
    norm = lambda v: v if v is None or isinstance(v, numbers.Integral) else normalize_dim(v)  # noqa: E731
    attrs["starts"] = tuple(norm(s) for s in starts) + (None,) * pad
    attrs["stops"] = tuple(norm(s) for s in stops) + (None,) * pad
    attrs["steps"] = tuple(int(s) for s in steps) + (1,) * pad
    return attrs


def _slice_infer(x, *, starts, stops, steps):
    shape = tuple(_slice_dim(d, a, b, c, i) for i, (d, a, b, c) in enumerate(zip(x.shape, starts, stops, steps)))
    return TensorType(x.dtype, shape)


def _slice_reference(x, *, starts, stops, steps):
    return x[tuple(builtins.slice(a, b, c) for a, b, c in zip(starts, stops, steps))]


def _slice_grad(ctx, g):
    """Put the gradient back where the slice took it from; zeros elsewhere.

    Strided and reversed axes (static sizes) are spread out first: each entry followed by
    step-1 zeros. Then every axis is padded before and after: one ``pad`` node when the
    amounts are ints, a ``concat`` with zeros when they are symbolic (``x[:, 1:]`` of a
    ``T`` axis leaves ``T-1`` behind).
    """
    x = ctx.inputs[0]
    a = ctx.attrs
    pads = []
    for axis, (dim, start, stop, step) in enumerate(zip(x.shape, a["starts"], a["stops"], a["steps"])):
        if isinstance(dim, int) and not isinstance(start, str) and not isinstance(stop, str):
            taken = range(dim)[builtins.slice(start, stop, step)]
            if len(taken) == 0:
                return [ctx.zeros(x.shape, x.dtype)]
            if step < 0:
                g = _reverse(g, axis)
                taken = taken[::-1]
            g = _spread(g, axis, abs(step))
            extent = (len(taken) - 1) * abs(step) + 1
            if g.shape[axis] != extent:
                g = _narrow(g, axis, 0, extent)
            pads.append((taken[0], dim - taken[0] - extent))
        else:  # symbolic: step 1
            first = 0 if start is None else (dim_add(dim, start) if isinstance(start, int) and start < 0 else start)
            end = dim if stop is None else (dim_add(dim, stop) if isinstance(stop, int) and stop < 0 else stop)
            pads.append((first, dim_sub(dim, end)))
    if all(isinstance(p, int) for pair in pads for p in pair):
        return [apply("pad", [g], pads=tuple(pads), value=0.0) if any(b or e for b, e in pads) else g]
    for axis, (before, after) in enumerate(pads):
        parts = [g]
        if before != 0:
            parts.insert(0, ctx.zeros(g.shape[:axis] + (before,) + g.shape[axis + 1:], g.dtype))
        if after != 0:
            parts.append(ctx.zeros(g.shape[:axis] + (after,) + g.shape[axis + 1:], g.dtype))
        if len(parts) > 1:
            g = apply("concat", parts, axis=axis)
    return [g]


def _reverse(t, axis):
    starts, stops, steps = [None] * t.ndim, [None] * t.ndim, [1] * t.ndim
    steps[axis] = -1
    return apply("slice", [t], starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))


def _narrow(t, axis, start, stop):
    starts, stops, steps = [None] * t.ndim, [None] * t.ndim, [1] * t.ndim
    starts[axis], stops[axis] = start, stop
    return apply("slice", [t], starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))


def _spread(t, axis, step):
    """(…, n, …) → (…, n·step, …): every entry followed by step-1 zeros."""
    if step == 1:
        return t
    n = t.shape[axis]
    t = t.reshape(t.shape[:axis + 1] + (1,) + t.shape[axis + 1:])                  # (…, n, 1, …)
    pads = [(0, 0)] * t.ndim
    pads[axis + 1] = (0, step - 1)
    t = apply("pad", [t], pads=tuple(pads), value=0.0)                                # (…, n, step, …)
    return t.reshape(t.shape[:axis] + (n * step,) + t.shape[axis + 2:])


register(OpDef(
    "slice", infer=_slice_infer, grad=_slice_grad, normalize=_slice_normalize, reference=_slice_reference,
    shape_attrs=("starts", "stops"), fusion=Fusion.INJECTIVE,
    examples=lambda rng: [
        Example((rng.standard_normal((4, 6)).astype(np.float32),),
                {"starts": (1, None), "stops": (3, None), "steps": (1, 2)}, "step 2"),
        Example((rng.standard_normal((4, 6)).astype(np.float32),),
                {"starts": (-1, 5), "stops": (None, 1), "steps": (1, -2)}, "negative")],
    bad_cases=(BadCase(((DType.float32, ("T", 4)),), {"starts": (0,), "stops": (None,), "steps": (2,)},
                       label="step on a symbolic dim"),
               BadCase(((DType.float32, (4,)),), {"starts": (0,), "stops": (4,), "steps": (0,)}, label="zero step")),
    doc="Basic slicing x[start:stop:step] per axis (what ``x[...]`` lowers to); symbolic stops allowed.",
    family="shape"))


# -- split --------------------------------------------------------------------------------
def _split_normalize(types, attrs):
    x = types[0]
    axis = normalize_axis(attrs.get("axis", 0), x.rank)
    sizes = attrs["sizes"]
    dim = x.shape[axis]
    if isinstance(sizes, numbers.Integral):
        n = int(sizes)
        if n <= 0:
            raise ShapeError(f"cannot split into {n} parts")
        part = dim_div(dim, n)
        if part is None:
            raise ShapeError(f"axis {axis} of size {dim} does not split into {n} equal parts")
        sizes = (part,) * n
    sizes = tuple(normalize_dim(s) for s in sizes)
    total = 0
    for s in sizes:
        total = dim_add(total, s)
    if total != dim:
        raise ShapeError(f"split sizes {sizes} add up to {total}, but axis {axis} has size {dim}")
    return {"sizes": sizes, "axis": axis}


def _split_infer(x, *, sizes, axis):
    return tuple(TensorType(x.dtype, x.shape[:axis] + (s,) + x.shape[axis + 1:]) for s in sizes)


def _split_reference(x, *, sizes, axis):
    bounds = np.cumsum(sizes)[:-1]
    return tuple(np.split(x, bounds, axis=axis))


def _split_grad(ctx, *gs):
    return [apply("concat", list(gs), axis=ctx.attrs["axis"])]     # unused parts come as zeros


register(OpDef(
    "split", infer=_split_infer, grad=_split_grad, normalize=_split_normalize, reference=_split_reference,
    shape_attrs=("sizes",),
    fusion=Fusion.INJECTIVE, multiple_outputs=True,
    examples=lambda rng: [Example((rng.standard_normal((2, 9)).astype(np.float32),), {"sizes": 3, "axis": 1}),
                          Example((rng.standard_normal((5, 2)).astype(np.float32),), {"sizes": (1, 4), "axis": 0})],
    bad_cases=(BadCase(((DType.float32, (2, 9)),), {"sizes": 2, "axis": 1}, label="not divisible"),
               BadCase(((DType.float32, (2, 9)),), {"sizes": (3, 3), "axis": 1}, label="sizes do not add up")),
    doc="Cut along ``axis`` into equal parts (an int) or parts of the given sizes; several outputs.",
    family="shape"))


# -- the DSL functions --------------------------------------------------------------------
def reshape(x, *shape):
    """``ag.reshape(x, (B, -1))`` or ``ag.reshape(x, B, -1)``."""
    return x.reshape(*shape)


def transpose(x, *axes):
    """``ag.transpose(x, (0, 2, 1))`` or varargs; no axes reverses them."""
    return x.transpose(*axes)


def broadcast_to(x, shape):
    return apply("broadcast_to", [x], shape=tuple(shape))


def narrow(x, axis: int, start, length):
    """``x`` restricted to ``start : start+length`` along ``axis`` (torch's narrow)."""
    axis = normalize_axis(axis, x.ndim)
    starts, stops, steps = [None] * x.ndim, [None] * x.ndim, [1] * x.ndim
    starts[axis], stops[axis] = start, dim_add(start, length)
    return apply("slice", [x], starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))


def split(x, sizes, axis: int = 0) -> list[Tensor]:
    """``n`` equal parts or parts of the given ``sizes`` along ``axis`` (a list of Tensors)."""
    return list(apply("split", [x], sizes=sizes, axis=axis))


def squeeze(x, axis=None):
    """Drop size-1 axes (all of them, or the given ones)."""
    axes = range(x.ndim) if axis is None else [normalize_axis(a, x.ndim) for a in np.atleast_1d(axis)]
    for a in axes:
        if axis is not None and x.shape[a] != 1:
            raise ShapeError(f"cannot squeeze axis {a} of size {x.shape[a]} in {format_shape(x.shape)}")
    keep = [d for i, d in enumerate(x.shape) if not (i in axes and d == 1)]
    return x.reshape(tuple(keep))


def unsqueeze(x, axis: int):
    """Insert a size-1 axis at ``axis`` (numpy's expand_dims)."""
    axis = normalize_axis(axis, x.ndim + 1)
    shape = list(x.shape)
    shape.insert(axis, 1)
    return x.reshape(tuple(shape))


def flatten(x, start_axis: int = 1, end_axis: int = -1):
    """Merge axes ``start_axis..end_axis`` into one (torch's flatten; default keeps the batch axis)."""
    s, e = normalize_axis(start_axis, x.ndim), normalize_axis(end_axis, x.ndim)
    merged = dim_product(x.shape[s:e + 1])
    return x.reshape(x.shape[:s] + (merged,) + x.shape[e + 1:])
