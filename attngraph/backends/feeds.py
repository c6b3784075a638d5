"""Checking feeds against a graph's inputs and binding its symbolic dims."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import FeedError
from ..ir import Graph, eval_dim, format_shape

__all__ = ["bind_feeds"]


def bind_feeds(graph: Graph, feeds) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Validate ``feeds`` (name → array) and return (arrays by input name, symbol bindings).

    Raises FeedError for a missing or unknown feed, a wrong dtype or rank, a size that
    differs from a fixed dim, or a symbol bound to two different sizes.
    """
    if not isinstance(feeds, Mapping):
        raise FeedError(f"feeds must be a dict of input name → array, got {type(feeds).__name__}")
    unknown = [k for k in feeds if k not in graph.inputs]
    if unknown:
        name = unknown[0]
        hint = None
        if name in graph.params:
            hint = f"{name!r} is a parameter: set it with exe.params[{name!r}] = array"
        raise FeedError(f"unknown feed {name!r}; the graph's inputs are {', '.join(graph.inputs) or '(none)'}",
                        hint=hint)
    missing = [k for k in graph.inputs if k not in feeds]
    if missing:
        want = ", ".join(f"{k}: {graph.inputs[k].type}" for k in missing)
        raise FeedError(f"missing feed{'s' if len(missing) > 1 else ''} {want}")

    arrays: dict[str, np.ndarray] = {}
    bindings: dict[str, int] = {}
    bound_by: dict[str, str] = {}
    for name, node in graph.inputs.items():
        ttype = node.type
        value = feeds[name]
        want_dtype = ttype.dtype.numpy
        if isinstance(value, np.ndarray):
            if value.dtype != want_dtype:
                raise FeedError(f"input {name!r} expects {ttype.dtype}, got {value.dtype}",
                                hint=f"pass {name}.astype(np.{ttype.dtype.value})")
        else:
            try:
                value = np.asarray(value, dtype=want_dtype)
            except (TypeError, ValueError) as err:
                raise FeedError(f"input {name!r} expects {ttype}, got {type(value).__name__}: {err}") from None
        if value.ndim != ttype.rank:
            raise FeedError(f"input {name!r} expects rank {ttype.rank} {format_shape(ttype.shape)}, "
                            f"got shape {value.shape}")
        for axis, (dim, size) in enumerate(zip(ttype.shape, value.shape)):
            if isinstance(dim, int):
                if dim != size:
                    raise FeedError(f"input {name!r} expects shape {format_shape(ttype.shape)}, got {value.shape}: "
                                    f"dim {axis} is {size}, not {dim}")
            elif dim.isidentifier():
                if dim in bindings and bindings[dim] != size:
                    raise FeedError(f"input {name!r} dim {axis} is {dim}={size}, but {bound_by[dim]} "
                                    f"already bound {dim}={bindings[dim]}")
                bindings[dim] = size
                bound_by[dim] = f"input {name!r}"
        arrays[name] = value
    # Dims written as expressions ("T+1") are checked once every plain symbol is bound.
    for name, node in graph.inputs.items():
        for axis, dim in enumerate(node.type.shape):
            if isinstance(dim, str) and not dim.isidentifier():
                try:
                    want = eval_dim(dim, bindings)
                except Exception:
                    raise FeedError(f"input {name!r} dim {axis} is {dim}, but its symbols are not bound "
                                    f"by any input's plain dims") from None
                if want != arrays[name].shape[axis]:
                    raise FeedError(f"input {name!r} dim {axis} should be {dim}={want} "
                                    f"(with {bindings}), got {arrays[name].shape[axis]}")
    return arrays, bindings
