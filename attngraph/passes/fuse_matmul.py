"""fuse_matmul: matmul epilogues, and projections of one input merged into one matmul.

- **Epilogue.** ``act(x @ w + b)`` and the like: the elementwise region that reads a matmul
  result (grown as in ``fuse_elementwise``: same shape as the result, every intermediate
  read only inside the region) joins the matmul as ``matmul_epilogue(x, w, *extra, expr)``.
  The CPU kernel runs the epilogue over the product in place, while it is still in cache.
  Bias + GELU in its erf form is one epilogue.

- **Shared-input merge (Q/K/V).** Several ``x @ w_i`` with the same ``x`` and 2-D weights
  ``w_i`` (params or consts, each ``(K, N_i)``, or each ``w_iᵀ`` of an ``(N_i, K)`` source as
  ``nn.Linear`` stores it) become ``split(x @ concat(w_i), N_i)``; when every product has a
  bias add ``+ b_i`` (``b_i`` a param or const of shape ``(N_i,)``) the biases are merged too,
  ``split(x @ W + concat(b_i))``, which the epilogue rule then fuses. Const weights are
  concatenated now; params are concatenated by a ``concat`` node each run (so training still
  updates them), which only pays when ``x`` has enough rows: a static row count below
  ``MIN_ROWS_FOR_PARAM_CONCAT`` keeps the matmuls apart. The merged matmul is built where the
  first of them was; the pass moves params and consts to the front of the graph first, so
  weights that a module creates on first use are there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from ..ir import Node, Value, is_static
from .fuse_elementwise import defers_to_reader, fusible, grow_region, old_node, old_users, sources_first
from .rewrite import PassLog, Rewriter, Rule, rewrite

__all__ = ["RULES", "MIN_ROWS_FOR_PARAM_CONCAT", "run"]

MIN_ROWS_FOR_PARAM_CONCAT = 16


# ----------------------------------------------------------------------------------------
# epilogue
# ----------------------------------------------------------------------------------------

def fuse_epilogue(node: Node, rw: Rewriter):
    if not fusible(node) or defers_to_reader(node, rw):
        return None
    region = grow_region(node, rw, with_head=True)
    if region is None or region.head is None:
        return None
    a, b = region.head.inputs[:2]
    return rw.make("matmul_epilogue", [a, b, *region.leaves], {"expr": region.expr},
                   fused=[region.head, *region.nodes])


# ----------------------------------------------------------------------------------------
# shared-input merge
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Weight:
    source: Node          # the param/const holding the weight
    transposed: bool      # the matmul reads sourceᵀ
    k: int
    n: int


def _weight(v: Value) -> _Weight | None:
    node, transposed = v.node, False
    if node.op == "transpose" and node.attrs["axes"] == (1, 0):
        node, transposed = node.inputs[0].node, True
    if node.op not in ("param", "const") or len(node.type.shape) != 2 or not is_static(node.type.shape):
        return None
    rows, cols = node.type.shape
    return _Weight(node, transposed, cols if transposed else rows, rows if transposed else cols)


def _bias(add: Node, product_id: int, n: int, dtype) -> Node | None:
    """The (n,) param/const that ``add`` adds to the product, if it is one."""
    if add.op != "add":
        return None
    sides = [v for v in add.inputs if v.node.id != product_id]
    if len(sides) != 1:
        return None
    b = sides[0].node
    if b.op in ("param", "const") and b.type.shape == (n,) and b.type.dtype == dtype:
        return b
    return None


_pending: "weakref.WeakKeyDictionary[Rewriter, dict]" = weakref.WeakKeyDictionary()


def _key(*values: Value) -> tuple:
    return tuple((v.node.id, v.index) for v in values)


def _available(source: Node, rw: Rewriter) -> bool:
    """Can the merged node (built where the first matmul is) use this weight? A const always can:
    its value is copied into the merged const."""
    return (source.op == "const" and rw.const_value(source.out) is not None) or source in rw.graph


def _concat(rw: Rewriter, sources: list[Node], axis: int, hint: str) -> Value:
    arrays = [rw.const_value(s.out) for s in sources]
    if all(s.op == "const" for s in sources) and all(a is not None for a in arrays):
        return rw.const(np.concatenate(arrays, axis=axis), hint)
    return rw.make("concat", [s.out for s in sources], {"axis": axis})


def use_merged_part(node: Node, rw: Rewriter):
    """A matmul (or its bias add) that ``merge_shared_input`` merged earlier in this sweep → its part."""
    if node.op not in ("matmul", "add"):
        return None
    return _pending.setdefault(rw, {}).get((node.op,) + _key(*node.inputs))


def merge_shared_input(node: Node, rw: Rewriter):
    if node.op != "matmul":
        return None
    pending = _pending.setdefault(rw, {})
    x = node.inputs[0]
    mine = _weight(node.inputs[1])
    if mine is None or x.type.rank < 1:
        return None
    users = old_users(rw)
    me = old_node(rw, node)
    old_x = me.inputs[0]
    group: list[tuple[Node, _Weight]] = []
    readers = users.get(old_x.node.id, [])
    # Only the matmuls from this one on: the earlier ones are already copied (they declined).
    for u in readers[next(i for i, u in enumerate(readers) if u is me):]:
        if u.op != "matmul" or u.inputs[0] != old_x:
            continue
        w = _weight(u.inputs[1])
        if (w is None or w.transposed != mine.transposed or w.k != mine.k or u.type.dtype != node.type.dtype
                or any(w.source is other.source for _, other in group)):
            continue
        group.append((u, w))
    if len(group) < 2:
        return None
    if not all(_available(w.source, rw) for _, w in group):
        rw.miss("merge_shared_input", "a weight is not in the graph yet where the first matmul is")
        return None
    consts = all(w.source.op == "const" for _, w in group)
    rows = x.type.shape[:-1]
    if not consts and is_static(rows) and int(np.prod(rows, dtype=np.int64)) < MIN_ROWS_FOR_PARAM_CONCAT:
        rw.miss("merge_shared_input", f"x has {int(np.prod(rows, dtype=np.int64))} rows: too few for "
                                      "concatenating the weights each run to pay off")
        return None
    # Bias adds, when every product has one.
    biases = []
    for u, w in group:
        readers = users.get(u.id, [])
        b = _bias(readers[0], u.id, w.n, u.type.dtype) if len(readers) == 1 and rw.uses(u.out) == 1 else None
        biases.append((readers[0] if b is not None else None, b))
    with_bias = all(b is not None and _available(b, rw) for _, b in biases)

    sources = [w.source for _, w in group]
    if mine.transposed and consts:           # (N_i, K) consts: stack the rows now
        arrays = [rw.const_value(s.out) for s in sources]
        weight = rw.const(np.ascontiguousarray(np.concatenate(arrays, axis=0).T), "w_merged")
    elif mine.transposed:                    # (N_i, K) params: stack the rows each run, then transpose
        weight = rw.make("transpose", [_concat(rw, sources, 0, "w_merged")], {"axes": (1, 0)})
    else:
        weight = _concat(rw, sources, 1, "w_merged")
    sizes = tuple(w.n for _, w in group)
    product = rw.make("matmul", [x, weight], fused=[u for u, _ in group])
    parts = rw.make_multi("split", [product], {"sizes": sizes, "axis": -1})
    for (u, _), part in zip(group, parts):
        pending[("matmul",) + _key(x, u.inputs[1])] = part
    if with_bias:
        bias = _concat(rw, [b for _, b in biases], 0, "b_merged")
        biased = rw.make("add", [product, bias], fused=[add for add, _ in biases])
        biased_parts = rw.make_multi("split", [biased], {"sizes": sizes, "axis": -1})
        for (add, b), part, biased_part in zip(biases, parts, biased_parts):
            side = 0 if add.inputs[0].node.id != b.id else 1      # where the product sits in the add
            inputs = [None, None]
            inputs[side], inputs[1 - side] = part, b.out
            pending[("add",) + _key(*inputs)] = biased_part
    return pending.get(("matmul",) + _key(x, node.inputs[1]))


RULES = [Rule("use_merged_part", use_merged_part), Rule("merge_shared_input", merge_shared_input),
         Rule("fuse_epilogue", fuse_epilogue)]


def run(graph, log: PassLog):
    """The pass: the rules to a fixpoint, weights first (the merged matmul reads them early)."""
    return rewrite(sources_first(graph), RULES, "fuse_matmul", log)
