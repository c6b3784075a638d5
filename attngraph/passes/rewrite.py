"""The rewrite driver: rules ``match(node, rw) → replacement or None`` applied to a fixpoint.

A pass never mutates a graph. One sweep walks the nodes in topological order and
copies them into a new graph, inputs remapped; after copying a node it offers the
copy to each rule. A rule that matches builds replacement nodes through ``rw.make``
(they land in the new graph) and returns the values that replace the node's outputs.
Sweeps repeat until no rule fires; dead nodes are dropped after every sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..ir import SOURCE_OPS, Graph, Node, Value
from ..ir.make import make_node
from ..ir.source import Source

__all__ = ["Rule", "Rewriter", "PassLog", "Event", "rewrite", "eliminate_dead_code"]

MAX_SWEEPS = 50


@dataclass(frozen=True)
class Event:
    """One thing a pass did (a rule fired) or declined to do (a near miss), and where."""

    pass_name: str
    rule: str
    node: str
    source: Source | None
    fired: bool = True
    reason: str = ""

    def __str__(self) -> str:
        where = f" at {self.source.short}" if self.source else ""
        if self.fired:
            return f"[{self.pass_name}] {self.rule} fired on {self.node}{where}"
        return f"[{self.pass_name}] {self.rule} did not fire on {self.node}{where}: {self.reason}"


@dataclass
class PassLog:
    events: list[Event] = field(default_factory=list)

    def fired(self, pass_name: str | None = None) -> list[Event]:
        return [e for e in self.events if e.fired and (pass_name is None or e.pass_name == pass_name)]

    def near_misses(self) -> list[Event]:
        return [e for e in self.events if not e.fired]

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.events) or "(no rule fired)"


@dataclass(frozen=True)
class Rule:
    name: str
    match: Callable[[Node, "Rewriter"], "Value | Sequence[Value] | None"]


class Rewriter:
    """What a rule sees: the graph being built, use counts, and a way to make nodes."""

    def __init__(self, old: Graph, new: Graph, pass_name: str, log: PassLog):
        self.old = old
        self.graph = new
        self.pass_name = pass_name
        self.log = log
        self._uses: dict[tuple[int, int], int] = {}
        for n in old.nodes:
            for v in n.inputs:
                key = (v.node.id, v.index)
                self._uses[key] = self._uses.get(key, 0) + 1
        for v in old.outputs.values():
            key = (v.node.id, v.index)
            self._uses[key] = self._uses.get(key, 0) + 1
        self._origin_key: dict[tuple[int, int], tuple[int, int]] = {}  # new value → the old value it stands for
        self.current: Node | None = None

    # -- looking around ---------------------------------------------------------------------
    def uses(self, v: Value) -> int:
        """How many readers (outputs count as one) the value had in the graph before this sweep."""
        key = (v.node.id, v.index)
        return self._uses.get(self._origin_key.get(key, key), 0)

    def single_use(self, v: Value) -> bool:
        return self.uses(v) == 1

    def const_value(self, v: Value) -> np.ndarray | None:
        """The array of a const (None for anything else)."""
        if v.node.op == "const":
            return self.graph.values.get(v.node.name, self.old.values.get(v.node.name))
        return None

    def scalar_value(self, v: Value) -> float | None:
        """The number held by a const with a single element (None otherwise)."""
        arr = self.const_value(v)
        if arr is not None and arr.size == 1:
            return arr.reshape(()).item()
        return None

    # -- making things ----------------------------------------------------------------------
    def make(self, op: str, inputs: Sequence[Value], attrs: dict | None = None, *,
             fused: Sequence[Node] = ()) -> Value:
        """Add a node to the new graph; it inherits the matched node's source and scope."""
        anchor = self.current
        origin = tuple(dict.fromkeys(
            s for n in fused for s in (n.origin or ((n.source,) if n.source else ()))))
        node = make_node(op, list(inputs), attrs, source=anchor.source if anchor else None,
                         scope=anchor.scope if anchor else (), origin=origin)
        self.graph.add_node(node)
        return node.out

    def make_multi(self, op: str, inputs: Sequence[Value], attrs: dict | None = None, *,
                   fused: Sequence[Node] = ()) -> tuple[Value, ...]:
        out = self.make(op, inputs, attrs, fused=fused)
        return out.node.outputs()

    def const(self, array: np.ndarray, hint: str = "c") -> Value:
        """A new const in the new graph."""
        array = np.array(array, order="C")  # keeps 0-d arrays 0-d
        name = _fresh_name(self.graph, f"_{hint}")
        from ..ir import Attrs, TensorType, as_dtype

        node = Node("const", (), Attrs(), (TensorType(as_dtype(array.dtype), array.shape),), name=name,
                    source=self.current.source if self.current else None)
        self.graph.values[name] = array
        self.graph.add_node(node)
        return node.out

    def miss(self, rule: str, reason: str) -> None:
        """Record why a rule did not fire on the current node (shown by ``explain``)."""
        node = self.current
        self.log.events.append(Event(self.pass_name, rule, node.label if node else "?",
                                     node.source if node else None, fired=False, reason=reason))


def _fresh_name(graph: Graph, base: str) -> str:
    k = len(graph.values)
    while f"{base}{k}" in graph.values or f"{base}{k}" in graph.inputs:
        k += 1
    return f"{base}{k}"


def _copy_sources(old: Graph, new: Graph) -> None:
    new.values.update(old.values)
    if hasattr(old, "seed"):
        new.seed = old.seed


def _sweep(graph: Graph, rules: Sequence[Rule], pass_name: str, log: PassLog) -> tuple[Graph, int]:
    new = graph.empty_like()
    _copy_sources(graph, new)
    rw = Rewriter(graph, new, pass_name, log)
    remap: dict[tuple[int, int], Value] = {}
    fired = 0
    for node in graph.nodes:
        inputs = tuple(remap.get((v.node.id, v.index), v) for v in node.inputs)
        copy = node if inputs == node.inputs else Node(
            node.op, inputs, node.attrs, node.types, name=node.name, source=node.source, scope=node.scope,
            origin=node.origin)
        new.add_node(copy)
        if copy is not node:
            for i in range(len(node.types)):
                rw._origin_key[(copy.id, i)] = (node.id, i)
                remap[(node.id, i)] = Value(copy, i)
        if node.op in SOURCE_OPS:
            continue
        rw.current = copy
        for rule in rules:
            result = rule.match(copy, rw)
            if result is None:
                continue
            values = (result,) if isinstance(result, Value) else tuple(result)
            if len(values) != len(node.types):
                raise AssertionError(f"rule {rule.name} replaced {len(node.types)} outputs with {len(values)}")
            for i, v in enumerate(values):
                if v.type != node.types[i]:
                    raise AssertionError(f"rule {rule.name} changed the type of {node.label}: "
                                         f"{node.types[i]} → {v.type}")
                remap[(node.id, i)] = v
                rw._origin_key[(v.node.id, v.index)] = (node.id, i)
            log.events.append(Event(pass_name, rule.name, node.label, node.source))
            fired += 1
            break
    for name, v in graph.outputs.items():
        new.set_output(name, remap.get((v.node.id, v.index), v))
    return eliminate_dead_code(new), fired


def rewrite(graph: Graph, rules: Sequence[Rule], pass_name: str, log: PassLog | None = None) -> Graph:
    """Apply ``rules`` until none fires; returns a new graph (the input is untouched)."""
    log = log if log is not None else PassLog()
    for _ in range(MAX_SWEEPS):
        graph, fired = _sweep(graph, rules, pass_name, log)
        if not fired:
            return graph
    raise RuntimeError(f"pass {pass_name} did not reach a fixpoint in {MAX_SWEEPS} sweeps")


def eliminate_dead_code(graph: Graph) -> Graph:
    """Drop nodes no output depends on. Inputs and params always stay (they are the graph's interface)."""
    live: set[int] = set()
    stack = [v.node for v in graph.outputs.values()]
    while stack:
        n = stack.pop()
        if n.id in live:
            continue
        live.add(n.id)
        stack.extend(v.node for v in n.inputs)
    if all(n.id in live or n.op in ("input", "param") for n in graph.nodes):
        return graph
    new = graph.empty_like()
    for n in graph.nodes:
        if n.id in live or n.op in ("input", "param"):
            new.add_node(n)
    new.values.update({k: v for k, v in graph.values.items() if k in new.params or k in new.consts})
    if hasattr(graph, "seed"):
        new.seed = graph.seed
    for name, v in graph.outputs.items():
        new.set_output(name, v)
    return new
