"""Train-mode dropout: a graph rewrite that turns each ``dropout`` into a product with a fed mask.

The ``dropout`` op is the identity (what a graph computes at inference). For training,
:func:`with_dropout` returns a copy of the graph in which every ``dropout(x, p)`` with
p > 0 is replaced by

    x * __dropout_k          (__dropout_k: a new float input of x's shape and dtype)

and the trainer feeds, at every step, ``keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)``
drawn from a seeded ``numpy.random.Generator`` (:func:`dropout_mask_feeds`). The scale is
folded into the fed mask, so the graph gains one ``mul`` per dropout and nothing else.

Why masks as inputs rather than a random op: the graph stays a pure function of its
inputs, so the numpy oracle, every backend and every pass agree bit for bit on a given
mask; the randomness lives in one Generator whose state a checkpoint saves, so a resumed
run draws the same masks; and the backward needs no special rule (the gradient of
``x * mask`` is ``g * mask``). Eval mode is the original graph, where dropout is the
identity; feeding masks of ones to the training graph gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import FeedError
from ..ir import Attrs, Graph, Node, Value, eval_shape
from ..ir.make import make_node

__all__ = ["DropoutSite", "with_dropout", "dropout_mask_feeds", "symbol_bindings", "MASK_PREFIX"]

MASK_PREFIX = "__dropout_"


@dataclass(frozen=True)
class DropoutSite:
    """One rewritten dropout: the mask input's name, the drop probability, and the mask's type."""

    input: str
    p: float
    shape: tuple
    dtype: np.dtype
    source: str | None = None


def with_dropout(graph: Graph) -> tuple[Graph, list[DropoutSite]]:
    """A copy of ``graph`` with every ``dropout`` (p > 0) replaced by ``x * __dropout_k``.

    Returns the new graph (the input is untouched) and its dropout sites, k = 0, 1, ...
    in graph order. A graph without dropout comes back as a plain copy, so the trainer
    can append the backward to it.
    """
    new = graph.empty_like()
    new.values.update(graph.values)
    if hasattr(graph, "seed"):
        new.seed = graph.seed
    remap: dict[tuple[int, int], Value] = {}
    sites: list[DropoutSite] = []
    for node in graph.nodes:
        inputs = tuple(remap.get((v.node.id, v.index), v) for v in node.inputs)
        if node.op == "dropout" and node.attrs["p"] > 0.0:
            (x,) = inputs
            name = _fresh(new, graph, f"{MASK_PREFIX}{len(sites)}")
            mask = Node("input", (), Attrs(), (x.type,), name=name, source=node.source, scope=node.scope)
            new.add_node(mask)
            mul = make_node("mul", [x, mask.out], source=node.source, scope=node.scope)
            new.add_node(mul)
            remap[(node.id, 0)] = mul.out
            sites.append(DropoutSite(name, float(node.attrs["p"]), tuple(x.type.shape), x.type.dtype.numpy,
                                     str(node.source) if node.source else None))
            continue
        copy = node if inputs == node.inputs else Node(
            node.op, inputs, node.attrs, node.types, name=node.name, source=node.source, scope=node.scope,
            origin=node.origin)
        new.add_node(copy)
        for i in range(len(node.types)):
            if copy is not node:
                remap[(node.id, i)] = Value(copy, i)
    for name, v in graph.outputs.items():
        new.set_output(name, remap.get((v.node.id, v.index), v))
    return new, sites


def _fresh(new: Graph, old: Graph, name: str) -> str:
    taken = set(old.inputs) | set(old.params) | set(old.consts) | set(new.inputs)
    base, k = name, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def symbol_bindings(graph: Graph, feeds: Mapping[str, np.ndarray], skip=()) -> dict[str, int]:
    """Sizes of the symbolic dims, read off the fed arrays of ``graph``'s inputs (those not in ``skip``)."""
    bindings: dict[str, int] = {}
    for name, node in graph.inputs.items():
        if name in skip or name not in feeds:
            continue
        shape = np.shape(feeds[name])
        for dim, size in zip(node.type.shape, shape):
            if isinstance(dim, str) and dim.isidentifier():
                bindings.setdefault(dim, int(size))
    return bindings


def dropout_mask_feeds(sites, bindings: Mapping[str, int], rng: np.random.Generator | None,
                       train: bool = True) -> dict[str, np.ndarray]:
    """The mask feeds for one run: ``keep / (1-p)`` drawn from ``rng`` in train mode, ones in eval mode.

    Masks are drawn in site order, one ``rng.random`` call each, so a Generator in the same
    state gives the same masks.
    """
    feeds: dict[str, np.ndarray] = {}
    for site in sites:
        try:
            shape = eval_shape(site.shape, bindings)
        except Exception:
            where = f" (dropout at {site.source})" if site.source else ""
            raise FeedError(f"cannot size the dropout mask {site.input}{where}: shape {site.shape} with the "
                            f"fed sizes {dict(bindings)}") from None
        if not train:
            feeds[site.input] = np.ones(shape, dtype=site.dtype)
            continue
        keep = rng.random(shape, dtype=site.dtype) >= site.p
        feeds[site.input] = keep.astype(site.dtype) * site.dtype.type(1.0 / (1.0 - site.p))
    return feeds
