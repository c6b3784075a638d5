"""cse: common subexpression elimination. Two nodes with the same op, attrs and inputs are one;
two small consts with the same dtype, shape and bytes are one."""

from __future__ import annotations

from ..ir import Graph, Node, Value
from .rewrite import Event, PassLog, eliminate_dead_code

__all__ = ["eliminate_common_subexpressions"]

MAX_CONST_BYTES = 1 << 16  # larger consts are compared by name only


def eliminate_common_subexpressions(graph: Graph, log: PassLog, pass_name: str = "cse") -> Graph:
    new = graph.empty_like()
    new.values.update(graph.values)
    if hasattr(graph, "seed"):
        new.seed = graph.seed
    seen: dict[tuple, Node] = {}
    remap: dict[tuple[int, int], Value] = {}
    for node in graph.nodes:
        inputs = tuple(remap.get((v.node.id, v.index), v) for v in node.inputs)
        if node.op == "const":
            arr = graph.values[node.name]
            key = ("const", arr.dtype.str, arr.shape, arr.tobytes()) if arr.nbytes <= MAX_CONST_BYTES else None
        elif node.op in ("input", "param"):
            key = None
        else:
            key = (node.op, node.attrs, tuple((v.node.id, v.index) for v in inputs))
        if key is not None and key in seen:
            twin = seen[key]
            for i in range(len(node.types)):
                remap[(node.id, i)] = Value(twin, i)
            log.events.append(Event(pass_name, "merge_twins", node.label, node.source))
            continue
        copy = node if inputs == node.inputs else Node(
            node.op, inputs, node.attrs, node.types, name=node.name, source=node.source, scope=node.scope,
            origin=node.origin)
        new.add_node(copy)
        if copy is not node:
            for i in range(len(node.types)):
                remap[(node.id, i)] = Value(copy, i)
        if key is not None:
            seen[key] = copy
    for name, v in graph.outputs.items():
        new.set_output(name, remap.get((v.node.id, v.index), v))
    return eliminate_dead_code(new)
