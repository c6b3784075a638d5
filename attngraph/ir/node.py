"""Node and Value: the immutable vertices and edges of the graph IR."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping

from .source import Source
from .types import TensorType

__all__ = ["Attrs", "Node", "Value", "SOURCE_OPS"]

# Ops that bring values into the graph; every other op is in the registry.
SOURCE_OPS = ("input", "param", "const")

_ids = itertools.count()


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return Attrs(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()  # numpy scalar → Python scalar
    return value


class Attrs(dict):
    """An immutable, hashable mapping of attribute name → value."""

    def __init__(self, items: Mapping[str, Any] | None = None, **kw):
        merged = dict(items or {}, **kw)
        super().__init__({k: _freeze(v) for k, v in sorted(merged.items())})

    def _blocked(self, *args, **kwargs):
        raise TypeError("node attributes are immutable; build a new node instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _blocked

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k}={v!r}" for k, v in self.items()) + "}"


@dataclass(frozen=True, eq=False)
class Node:
    """One op application. Identity is the node itself; compare structure with ``same_as``."""

    op: str
    inputs: tuple["Value", ...]
    attrs: Attrs
    types: tuple[TensorType, ...]
    name: str | None = None
    source: Source | None = None
    scope: tuple[str, ...] = ()
    # For nodes a pass made: the user's lines of the nodes it replaced (kernel headers, explain).
    origin: tuple[Source, ...] = ()
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def type(self) -> TensorType:
        """The output type of a single-output node."""
        return self.types[0]

    @property
    def out(self) -> "Value":
        return Value(self, 0)

    def outputs(self) -> tuple["Value", ...]:
        return tuple(Value(self, i) for i in range(len(self.types)))

    @property
    def label(self) -> str:
        return self.name or f"{self.op}_{self.id}"

    def __repr__(self) -> str:
        types = ", ".join(str(t) for t in self.types)
        where = f" @ {self.source.short}" if self.source else ""
        return f"<Node {self.label}: {self.op}{dict(self.attrs) or ''} -> {types}{where}>"


@dataclass(frozen=True)
class Value:
    """The ``index``-th output of ``node``: the edges of the graph."""

    node: Node
    index: int = 0

    @property
    def type(self) -> TensorType:
        return self.node.types[self.index]

    def __repr__(self) -> str:
        suffix = f"[{self.index}]" if len(self.node.types) > 1 else ""
        return f"{self.node.label}{suffix}"
