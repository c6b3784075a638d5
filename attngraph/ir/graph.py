"""Graph: nodes in topological order, named inputs/params/consts/outputs and the weights."""

from __future__ import annotations

from typing import Iterable

import networkx as nx
import numpy as np

from ..errors import VerifyError
from .node import Node, Value

__all__ = ["Graph"]


class Graph:
    """The IR container. Nodes are immutable and kept in topological order.

    ``attngraph.Graph`` (in :mod:`attngraph.dsl`) adds the builder methods
    (``input``, ``param``, ``const``, ``output``); passes build new graphs through
    ``empty_like`` and ``add_node``.
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self._nodes: list[Node] = []
        self._node_ids: set[int] = set()
        self.inputs: dict[str, Node] = {}
        self.params: dict[str, Node] = {}
        self.consts: dict[str, Node] = {}
        self.outputs: dict[str, Value] = {}
        # Weights: the initial value of every param and the array of every const, by name.
        self.values: dict[str, np.ndarray] = {}

    # -- storage ---------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        """Every node, in topological order (sources first)."""
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: Node) -> bool:
        return node.id in self._node_ids

    def add_node(self, node: Node) -> Node:
        for v in node.inputs:
            if v.node.id not in self._node_ids:
                raise VerifyError(f"node {node.label} ({node.op}) uses {v.node.label}, which is not in graph {self.name!r}")
        if node.op in ("input", "param", "const"):
            table = {"input": self.inputs, "param": self.params, "const": self.consts}[node.op]
            if node.name in self.inputs or node.name in self.params or node.name in self.consts:
                raise VerifyError(f"name {node.name!r} is already used in graph {self.name!r}")
            table[node.name] = node
        self._nodes.append(node)
        self._node_ids.add(node.id)
        return node

    def set_output(self, name: str, value: Value) -> None:
        if value.node.id not in self._node_ids:
            raise VerifyError(f"output {name!r} refers to a node that is not in graph {self.name!r}")
        self.outputs[name] = value

    def empty_like(self) -> "Graph":
        """A new, empty graph of the same class and name (what a pass fills)."""
        g = type(self).__new__(type(self))
        Graph.__init__(g, self.name)
        return g

    # -- analyses --------------------------------------------------------------------------
    def to_networkx(self) -> nx.MultiDiGraph:
        """A networkx view: node ids as vertices (with the Node in attribute ``node``)."""
        G = nx.MultiDiGraph()
        for n in self._nodes:
            G.add_node(n.id, node=n)
        for n in self._nodes:
            for slot, v in enumerate(n.inputs):
                G.add_edge(v.node.id, n.id, index=v.index, slot=slot)
        return G

    def users(self) -> dict[int, list[Node]]:
        """Node id → the nodes that read any of its outputs."""
        out: dict[int, list[Node]] = {n.id: [] for n in self._nodes}
        for n in self._nodes:
            for v in n.inputs:
                if n not in out[v.node.id]:
                    out[v.node.id].append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def verify(self) -> "Graph":
        from .verify import verify

        verify(self)
        return self

    # -- conveniences that live in other modules -------------------------------------------
    def render(self, path, **kwargs):
        """Draw the graph; see :func:`attngraph.render.render`."""
        from ..render import render

        return render(self, path, **kwargs)

    def save(self, path) -> None:
        """Write ``path`` (JSON structure) and its ``.safetensors`` weights; see :mod:`attngraph.io`."""
        from ..io import save_graph

        save_graph(self, path)

    def structurally_equal(self, other: "Graph") -> bool:
        from .verify import structural_diff

        return structural_diff(self, other) is None

    def __repr__(self) -> str:
        return (f"<Graph {self.name!r}: {len(self._nodes)} nodes, inputs {list(self.inputs)}, "
                f"params {len(self.params)}, outputs {list(self.outputs)}>")

    def summary(self) -> str:
        """One line per node: what a person reads to see the graph as text."""
        lines = [f"graph {self.name}"]
        for n in self._nodes:
            args = ", ".join(repr(v) for v in n.inputs)
            attrs = f" {dict(n.attrs)}" if n.attrs else ""
            types = ", ".join(str(t) for t in n.types)
            lines.append(f"  {n.label} = {n.op}({args}){attrs} : {types}")
        for name, v in self.outputs.items():
            lines.append(f"  output {name} = {v!r}")
        return "\n".join(lines)


def iter_values(nodes: Iterable[Node]) -> Iterable[Value]:
    for n in nodes:
        yield from n.outputs()
