"""fuse_elementwise: a region of elementwise ops becomes one ``fused_elementwise`` node (one kernel).

A region grows upstream from its last node (the *root*). A producer joins when

- it is elementwise with a scalar ``cpu`` template (or is itself a ``fused_elementwise``),
- it has the root's shape (a smaller operand that broadcasts, like a bias, stays an input:
  computing ``exp(bias)`` once per output element would multiply the work), and
- every reader it has is already in the region (so nothing outside needs the intermediate;
  a value read twice inside the region, like ``x`` in ``x * erf(x)``, is fine).

Chains, diamonds and broadcasts all fuse this way, GELU written with ``erf`` included:
``0.5 * x * (1 + erf(x / sqrt(2)))`` is one region. 0-d consts are inlined into the expression
as literals. A node whose only reader would take it into its own region waits for that
reader (the region is built once, from its real root). A lone op stays as it is: fusing
one op saves nothing.

The region's expression (see ``ops/fused.py``) names registry ops only, so its type and
value come from the registry; ``grow_region`` is shared with the matmul-epilogue rule in
``fuse_matmul.py``.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

from ..ir import SOURCE_OPS, Fusion, Graph, Node, Value, get_op, has_op
from .rewrite import Rewriter, Rule

__all__ = ["RULES", "Region", "grow_region", "fusible", "defers_to_reader", "old_users", "old_id", "old_node",
           "sources_first", "MAX_REGION_OPS"]

FUSED = "fused_elementwise"
HEADS = ("matmul", "matmul_epilogue")
MAX_REGION_OPS = 64          # nodes per region
MAX_EXPRESSION_SIZE = 512    # operands counted with repetition (a deep diamond doubles at each level)


# ----------------------------------------------------------------------------------------
# looking ahead: readers in the graph the sweep copies from
# ----------------------------------------------------------------------------------------

_users_cache: "weakref.WeakKeyDictionary[Rewriter, dict[int, list[Node]]]" = weakref.WeakKeyDictionary()
_nodes_cache: "weakref.WeakKeyDictionary[Rewriter, dict[int, Node]]" = weakref.WeakKeyDictionary()


def old_users(rw: Rewriter) -> dict[int, list[Node]]:
    """Node id → the nodes that read it, in the graph this sweep copies (``rw.old``)."""
    users = _users_cache.get(rw)
    if users is None:
        users = _users_cache[rw] = rw.old.users()
    return users


def old_node(rw: Rewriter, node: Node) -> Node:
    """The node of ``rw.old`` that ``node`` (a copy made by this sweep, or the node itself) stands for."""
    wanted = old_id(rw, node)
    if wanted == node.id:
        return node
    table = _nodes_cache.get(rw)
    if table is None:
        table = _nodes_cache[rw] = {n.id: n for n in rw.old.nodes}
    return table[wanted]


def old_id(rw: Rewriter, node: Node) -> int:
    """The id, in ``rw.old``, of the node that ``node`` (a copy made by this sweep) stands for."""
    key = rw._origin_key.get((node.id, 0))  # noqa: SLF001 (the rewriter's own copy → original map)
    return key[0] if key is not None else node.id


def sources_first(graph: Graph) -> Graph:
    """The same graph with its inputs, params and consts moved to the front (still a topological
    order: they read nothing). nn modules create weights on first use, after the values a fused
    node built earlier in the sweep (at a residual add, at the first of several projections)
    needs to read them."""
    nodes = graph.nodes
    first = [n for n in nodes if n.op in SOURCE_OPS]
    if nodes[:len(first)] == first:
        return graph
    new = graph.empty_like()
    new.values.update(graph.values)
    if hasattr(graph, "seed"):
        new.seed = graph.seed
    for n in first + [n for n in nodes if n.op not in SOURCE_OPS]:
        new.add_node(n)
    for name, v in graph.outputs.items():
        new.set_output(name, v)
    return new


def fusible(node: Node) -> bool:
    """Can ``node`` be an interior node of an elementwise region?"""
    if node.op == FUSED:
        return True
    if node.op in SOURCE_OPS or not has_op(node.op) or not node.inputs or len(node.types) != 1:
        return False
    op = get_op(node.op)
    return op.fusion is Fusion.ELEMENTWISE and isinstance(op.cpu, (str, dict))


def defers_to_reader(node: Node, rw: Rewriter) -> bool:
    """True when ``node``'s only reader is fusible with the same shape: that reader's region
    will take ``node`` in, so no region should be rooted here."""
    readers = old_users(rw).get(old_id(rw, node), [])
    if len(readers) != 1:
        return False
    reader = readers[0]
    edges = sum(1 for v in reader.inputs if v.node.id == old_id(rw, node))
    return (edges == rw.uses(node.out) and fusible(reader) and reader.type.shape == node.type.shape)


# ----------------------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------------------

@dataclass
class Region:
    root: Node
    nodes: list[Node]                 # interior nodes, the root first
    leaves: list[Value] = field(default_factory=list)
    expr: tuple = ()
    head: Node | None = None          # a matmul (or matmul_epilogue) whose result is ("in", 0)


def _attrs(node: Node) -> tuple:
    return tuple(sorted(node.attrs.items()))


def _substitute(expr, operands):
    """``expr`` with ``("in", k)`` replaced by ``operands[k]``."""
    if expr[0] == "in":
        return operands[expr[1]]
    if expr[0] == "const":
        return expr
    return expr[:2] + tuple(_substitute(e, operands) for e in expr[2:])


def _scalar_literal(v: Value, rw: Rewriter):
    if v.node.op != "const" or v.type.shape != ():
        return None
    arr = rw.const_value(v)
    if arr is None:
        return None
    return ("const", arr.reshape(()).item(), v.type.dtype.value)


def grow_region(root: Node, rw: Rewriter, *, with_head: bool = False) -> Region | None:
    """The largest region rooted at ``root`` (see the module doc). With ``with_head``, a matmul
    (or matmul_epilogue) of the root's type whose readers are all in the region becomes its head."""
    if not fusible(root):
        return None
    shape = root.type.shape
    members: dict[int, Node] = {root.id: root}
    head: Node | None = None
    changed = True
    while changed and len(members) < MAX_REGION_OPS:
        changed = False
        edges: Counter = Counter()
        values: dict[tuple[int, int], Value] = {}
        for n in members.values():
            for v in n.inputs:
                key = (v.node.id, v.index)
                edges[key] += 1
                values.setdefault(key, v)
        for key, count in edges.items():
            v = values[key]
            p = v.node
            if p.id in members or (head is not None and p.id == head.id) or count != rw.uses(v):
                continue
            if fusible(p) and p.type.shape == shape:
                members[p.id] = p
                changed = True
            elif with_head and head is None and p.op in HEADS and p.type == root.type:
                head = p
                changed = True
            if len(members) >= MAX_REGION_OPS:
                break
    region = Region(root, list(members.values()), head=head)
    leaf_index: dict[tuple[int, int], int] = {}
    offset = 1 if head is not None else 0
    built: dict[tuple[int, int], tuple] = {}

    def leaf(v: Value):
        literal = _scalar_literal(v, rw)
        if literal is not None:
            return literal
        key = (v.node.id, v.index)
        if key not in leaf_index:
            leaf_index[key] = len(region.leaves) + offset
            region.leaves.append(v)
        return ("in", leaf_index[key])

    def build(v: Value):
        key = (v.node.id, v.index)
        if key in built:
            return built[key]
        n = v.node
        if head is not None and n.id == head.id:
            if n.op == "matmul":
                out = ("in", 0)
            else:  # an epilogue already there: its extras become leaves of this region
                out = _substitute(n.attrs["expr"], [("in", 0)] + [leaf(u) for u in n.inputs[2:]])
        elif n.id in members:
            operands = [build(u) for u in n.inputs]
            out = _substitute(n.attrs["expr"], operands) if n.op == FUSED else (n.op, _attrs(n), *operands)
        else:
            out = leaf(v)
        built[key] = out
        return out

    region.expr = build(root.out)
    if _tree_size(region.expr) > MAX_EXPRESSION_SIZE:
        return None
    return region


def _tree_size(expr, memo=None) -> int:
    memo = {} if memo is None else memo
    key = id(expr)
    if key not in memo:
        memo[key] = 1 + (sum(_tree_size(e, memo) for e in expr[2:]) if expr[0] not in ("in", "const") else 0)
    return memo[key]


# ----------------------------------------------------------------------------------------
# the rule
# ----------------------------------------------------------------------------------------

def fuse_region(node: Node, rw: Rewriter):
    if not fusible(node) or defers_to_reader(node, rw):
        return None
    region = grow_region(node, rw)
    if region is None or len(region.nodes) < 2:
        return None
    return rw.make(FUSED, region.leaves, {"expr": region.expr}, fused=region.nodes)


RULES = [Rule("fuse_elementwise", fuse_region)]
