"""make_node: the one way to create an op node (normalize attrs, run the shape rule)."""

from __future__ import annotations

from typing import Sequence

from .node import Attrs, Node, Value
from .opdef import get_op
from .source import Source

__all__ = ["make_node"]


def make_node(op_name: str, inputs: Sequence[Value], attrs: dict | None = None, *, source: Source | None = None,
              scope: tuple[str, ...] = (), origin: tuple[Source, ...] = (), name: str | None = None) -> Node:
    """A new node of ``op_name`` reading ``inputs``; raises the op's ShapeError/DTypeError unchanged."""
    op = get_op(op_name)
    types = [v.type for v in inputs]
    attrs = dict(attrs or {})
    if op.normalize is not None:
        attrs = op.normalize(types, attrs)
    frozen = Attrs(attrs)
    out = op.infer(*types, **frozen)
    out_types = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return Node(op_name, tuple(inputs), frozen, out_types, name=name, source=source, scope=scope, origin=origin)
