"""verify(graph): the well-formedness check run after building and after every pass."""

from __future__ import annotations

import networkx as nx
import numpy as np

from ..errors import AttngraphError, VerifyError
from .graph import Graph
from .node import SOURCE_OPS, Node
from .opdef import get_op
from .types import TensorType

__all__ = ["verify", "structural_diff", "infer_types"]


def infer_types(op_name: str, input_types, attrs) -> tuple[TensorType, ...]:
    """Run an op's shape rule; always returns a tuple of output types."""
    out = get_op(op_name).infer(*input_types, **attrs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def verify(graph: Graph) -> None:
    """Raise VerifyError unless the graph is a well-typed DAG whose nodes match their ops' rules."""
    seen: set[int] = set()
    for node in graph.nodes:
        for v in node.inputs:
            if v.node.id not in seen:
                raise VerifyError(f"{_where(node)} uses {v.node.label} before it is defined (or it is not in the graph)")
            if not 0 <= v.index < len(v.node.types):
                raise VerifyError(f"{_where(node)} reads output {v.index} of {v.node.label}, which has {len(v.node.types)}")
        if node.op in SOURCE_OPS:
            if node.inputs:
                raise VerifyError(f"{_where(node)}: a {node.op} node takes no inputs")
            if node.op != "input" and node.name not in graph.values:
                raise VerifyError(f"{_where(node)}: {node.op} {node.name!r} has no value")
        else:
            try:
                expected = infer_types(node.op, [v.type for v in node.inputs], node.attrs)
            except AttngraphError as err:
                raise VerifyError(f"{_where(node)} no longer type-checks: {err.message}") from None
            if expected != node.types:
                got = ", ".join(map(str, node.types))
                want = ", ".join(map(str, expected))
                raise VerifyError(f"{_where(node)} is typed {got} but its op infers {want}")
        seen.add(node.id)
    for name, value in graph.outputs.items():
        if value.node.id not in seen:
            raise VerifyError(f"output {name!r} refers to a node outside the graph")
    for kind, table in (("param", graph.params), ("const", graph.consts)):
        for name, node in table.items():
            arr = graph.values.get(name)
            if arr is not None and (arr.shape != node.type.shape or arr.dtype != node.type.dtype.numpy):
                raise VerifyError(f"{kind} {name!r} is declared {node.type} but holds {arr.dtype}{arr.shape}")
    if not nx.is_directed_acyclic_graph(graph.to_networkx()):
        raise VerifyError(f"graph {graph.name!r} has a cycle")


def _where(node: Node) -> str:
    loc = f" (from {node.source.short})" if node.source else ""
    return f"node {node.label} ({node.op}){loc}"


def structural_diff(a: Graph, b: Graph) -> str | None:
    """None when the graphs compute the same thing the same way (ids and source lines aside),
    else a sentence naming the first difference. Only nodes reachable from the outputs count."""
    if sorted(a.outputs) != sorted(b.outputs):
        return f"outputs differ: {sorted(a.outputs)} vs {sorted(b.outputs)}"
    pairs: dict[int, int] = {}

    def match(x: Node, y: Node) -> str | None:
        if x.id in pairs:
            return None if pairs[x.id] == y.id else f"{x.label} is matched to two different nodes"
        if x.op != y.op:
            return f"{x.label} is {x.op} but {y.label} is {y.op}"
        if x.types != y.types:
            return f"{x.label} has types {x.types} but {y.label} has {y.types}"
        if dict(x.attrs) != dict(y.attrs):
            return f"{x.label} ({x.op}) has attrs {dict(x.attrs)} but {y.label} has {dict(y.attrs)}"
        if x.op in SOURCE_OPS:
            if x.op in ("param", "const"):
                va, vb = a.values.get(x.name), b.values.get(y.name)
                if va is None or vb is None or va.dtype != vb.dtype or not np.array_equal(va, vb, equal_nan=True):
                    return f"{x.op} {x.name!r} holds different values from {y.name!r}"
            if x.op == "input" and x.name != y.name:
                return f"input {x.name!r} vs {y.name!r}"
        if len(x.inputs) != len(y.inputs):
            return f"{x.label} ({x.op}) has {len(x.inputs)} inputs but {y.label} has {len(y.inputs)}"
        pairs[x.id] = y.id
        for i, (u, w) in enumerate(zip(x.inputs, y.inputs)):
            if u.index != w.index:
                return f"input {i} of {x.label} reads output {u.index}, the other reads {w.index}"
            why = match(u.node, w.node)
            if why:
                return why
        return None

    for name in sorted(a.outputs):
        u, w = a.outputs[name], b.outputs[name]
        if u.index != w.index:
            return f"output {name!r} reads different outputs of its node"
        why = match(u.node, w.node)
        if why:
            return f"output {name!r}: {why}"
    return None
