"""The numpy backend: a direct interpreter of the graph, calling each op's reference.

Slow and obviously right: it is the oracle every other backend and pass is checked
against. After every node it checks the result against the node's inferred type.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError, ShapeError
from ..ir import SOURCE_OPS, Graph, Node, eval_dim, eval_shape, format_shape, get_op
from .executable import Executable

__all__ = ["NumpyExecutable", "resolve_shape_attrs"]


def resolve_shape_attrs(node: Node, shape_attrs, bindings) -> dict:
    """The node's attrs with symbolic dims in ``shape_attrs`` evaluated under ``bindings``."""
    attrs = dict(node.attrs)

    def resolve(v):
        if isinstance(v, str):
            return eval_dim(v, bindings)
        if isinstance(v, tuple):
            return tuple(resolve(x) for x in v)
        return v

    for name in shape_attrs:
        if name in attrs:
            attrs[name] = resolve(attrs[name])
    return attrs


class NumpyExecutable(Executable):
    backend = "numpy"

    def __init__(self, graph: Graph, *, check_types: bool = True):
        super().__init__(graph)
        self.check_types = check_types
        self._ops = {n.id: get_op(n.op) for n in graph.nodes if n.op not in SOURCE_OPS}
        # Free each value after its last reader, so peak memory stays close to a real plan.
        last_use: dict[int, int] = {}
        for step, node in enumerate(graph.nodes):
            for v in node.inputs:
                last_use[v.node.id] = step
        for v in graph.outputs.values():
            last_use[v.node.id] = len(graph.nodes)
        self._frees: dict[int, list[int]] = {}
        for node_id, step in last_use.items():
            self._frees.setdefault(step, []).append(node_id)

    def _execute(self, feeds, bindings):
        env: dict[int, tuple] = {}
        graph = self.graph
        for step, node in enumerate(graph.nodes):
            if node.op == "input":
                result = (feeds[node.name],)
            elif node.op == "param":
                result = (self.params[node.name],)
            elif node.op == "const":
                result = (graph.values[node.name],)
            else:
                op = self._ops[node.id]
                args = [env[v.node.id][v.index] for v in node.inputs]
                attrs = resolve_shape_attrs(node, op.shape_attrs, bindings) if op.shape_attrs else node.attrs
                with np.errstate(all="ignore"):
                    out = op.reference(*args, **attrs)
                result = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                if self.check_types:
                    self._check(node, result, bindings)
            env[node.id] = result
            for dead in self._frees.get(step, ()):
                env.pop(dead, None)
        outputs = {}
        for name, v in graph.outputs.items():
            arr = env[v.node.id][v.index]
            if v.node.op in SOURCE_OPS:
                arr = arr.copy()
            outputs[name] = np.asarray(arr)
        return outputs

    @staticmethod
    def _check(node: Node, result: tuple, bindings) -> None:
        if len(result) != len(node.types):
            raise BackendError(f"{node.op} returned {len(result)} outputs, expected {len(node.types)}")
        for arr, ttype in zip(result, node.types):
            arr = np.asarray(arr)
            if arr.dtype != ttype.dtype.numpy:
                raise BackendError(f"reference of {node.op} returned {arr.dtype}, expected {ttype.dtype} "
                                   f"(a bug in attngraph's op library)")
            want = eval_shape(ttype.shape, bindings)
            if arr.shape != want:
                where = f" (from {node.source})" if node.source else ""
                raise ShapeError(f"{node.op}{where} produced shape {arr.shape}, but the graph expects "
                                 f"{format_shape(ttype.shape)} = {want} with {bindings}")
