"""fuse_attention: softmax(scores(Q, K)) @ V, however it is written, becomes one ``attention`` node.

The pattern is read from the outside in. Starting at ``matmul(P, V)`` with
``P = softmax(S, last axis)``, the score chain ``S`` is peeled one op at a time:

- ``mask(S, m, -inf)``, ``where(m, -inf, S)``, ``where(m, S, -inf)`` → a boolean mask
- ``S + B`` (B not on the Q·Kᵀ path) → an additive bias (scaled by any scale found
  further out, since ``(QKᵀ + B)·c = QKᵀ·c + B·c``)
- ``S * c`` with a positive scalar const → the scale
- ``matmul(Q, Kᵀ)``: scalar multiplications on either operand join the scale; Kᵀ made by
  a transpose of the last two axes gives K directly (heads split by reshape+transpose fold
  into one transpose); otherwise K is Kᵀ transposed.

Masks that are exactly "above the diagonal" (``trilu(full(True), k=1)``, a const equal to
``np.triu(ones, 1)``, or an additive const of −inf above the diagonal) become ``causal=True``.
Every intermediate must have no other reader; when a softmax-of-matmul does not fuse,
``explain`` says why.

Weights kept: when the probabilities ``P`` are read by something besides ``P @ V`` (a graph
output for attention pictures, MultiheadAttention's mean over heads, a backward pass), the
rule ``fuse_attention_weights`` fires at the softmax instead: it makes
``attention(..., return_weights=True)``, whose second output replaces ``P`` for every
reader, and ``fuse_attention`` then turns ``matmul(weights, V)`` into its first output. This
needs V to exist before the softmax in the graph's order (it does for code written as
``softmax(s) @ v`` with ``v`` computed first); otherwise the pattern stays unfused and
``explain`` says so. When only
``P @ V`` reads ``P``, nothing changes: the default form never materialises the T×T matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..ir import Graph, Node, Value
from .rewrite import Event, PassLog, Rewriter, Rule

__all__ = ["RULES", "analyze", "report_near_misses"]

_WEIGHTS_READ_ELSEWHERE = ("the attention weights are also used elsewhere and the fused op could not return them "
                           "(V must be computed before the softmax, with batch dims no larger than the scores')")


@dataclass
class Match:
    q: Value
    kt: Value
    v: Value
    scale: float = 1.0
    biases: list = field(default_factory=list)   # (value, scale to apply)
    masks: list = field(default_factory=list)    # (value, negate)
    causal: bool = False
    nodes: list = field(default_factory=list)    # everything the fused node replaces


def _is_neg_inf(rw_or_graph, v: Value) -> bool:
    arr = _const(rw_or_graph, v)
    return arr is not None and arr.size >= 1 and bool(np.all(np.isneginf(arr)))


def _const(ctx, v: Value):
    if v.node.op != "const":
        return None
    values = ctx.graph.values if isinstance(ctx, Rewriter) else ctx.values
    arr = values.get(v.node.name)
    if arr is None and isinstance(ctx, Rewriter):
        arr = ctx.old.values.get(v.node.name)
    return arr


def _uses(ctx, v: Value) -> int:
    return ctx.uses(v) if isinstance(ctx, Rewriter) else ctx.__uses__.get((v.node.id, v.index), 0)


def _reaches_matmul(v: Value, depth: int = 8) -> bool:
    """Does the score path lead (through the ops analyze peels) to a matmul?"""
    n = v.node
    if n.op == "matmul":
        return True
    if depth == 0:
        return False
    if n.op in ("mul", "div", "mask"):
        return _reaches_matmul(n.inputs[0], depth - 1)
    if n.op == "add":
        return any(_reaches_matmul(x, depth - 1) for x in n.inputs)
    if n.op == "where":
        return any(_reaches_matmul(x, depth - 1) for x in n.inputs[1:])
    return False


def analyze(ctx, matmul: Node) -> Match | str | None:
    """The attention pattern rooted at ``matmul`` (= P @ V), or a reason it is not one, or None
    when this matmul is not a softmax @ V at all. P must have no other reader (autodiff relies
    on that too: it differentiates a matched pattern as a whole)."""
    p, v = matmul.inputs
    soft = p.node
    if soft.op != "softmax":
        return None
    if soft.attrs["axis"] != soft.inputs[0].type.rank - 1:
        return "the softmax is not over the last axis (the keys)"
    m = _analyze_scores(ctx, soft, v, [matmul, soft])
    if _uses(ctx, p) != 1:                        # fuse_keeping_weights declined it
        return m if isinstance(m, str) else _WEIGHTS_READ_ELSEWHERE
    return m


def _analyze_scores(ctx, soft: Node, v: Value, nodes: list) -> Match | str:
    """The pattern behind ``softmax`` (over the last axis) with values ``v``: peel the score chain."""
    s = soft.inputs[0]
    if s.type.rank < 2:
        return "the scores have rank < 2"
    m = Match(q=None, kt=None, v=v, nodes=list(nodes))  # type: ignore[arg-type]
    scale_outside = 1.0
    for _ in range(32):
        n = s.node
        if _uses(ctx, s) != 1:
            return f"the scores ({n.op} at {n.source.short if n.source else '?'}) are also used elsewhere"
        if n.op == "matmul":
            break
        m.nodes.append(n)
        if n.op == "mask":
            x, where = n.inputs
            if n.attrs["value"] != -math.inf:
                return f"mask fills with {n.attrs['value']}, not -inf"
            m.masks.append((where, False))
            s = x
        elif n.op == "where":
            cond, a, b = n.inputs
            if _is_neg_inf(ctx, a):
                m.masks.append((cond, False))
                s = b
            elif _is_neg_inf(ctx, b):
                m.masks.append((cond, True))
                s = a
            else:
                return "a where() on the scores that is not a −inf mask"
        elif n.op == "mul":
            a, b = n.inputs
            c = _scalar(ctx, b)
            if c is None:
                return "the scores are multiplied by a tensor, not a scalar"
            if c <= 0:
                return f"the scores are scaled by {c}, which is not positive"
            scale_outside *= c
            s = a
        elif n.op == "div":
            a, b = n.inputs
            c = _scalar(ctx, b)
            if c is None or c <= 0:
                return "the scores are divided by something other than a positive scalar"
            scale_outside /= c
            s = a
        elif n.op == "add":
            a, b = n.inputs
            if _reaches_matmul(a):
                s, bias = a, b
            elif _reaches_matmul(b):
                s, bias = b, a
            else:
                return "neither side of an add on the scores leads to Q·Kᵀ"
            if bias.type.dtype != s.type.dtype:
                return "the additive mask has another dtype"
            m.biases.append((bias, scale_outside))
        else:
            return f"the scores pass through {n.op}, which attention fusion does not absorb"
    else:
        return "the score chain is too long"
    qk = s.node
    m.nodes.append(qk)
    q, kt = qk.inputs
    if q.type.rank != kt.type.rank or q.type.rank < 2:
        return "Q·Kᵀ is not a batched matrix product of equal-rank operands"
    scale = scale_outside
    for side in ("q", "kt"):
        val = q if side == "q" else kt
        while val.node.op == "mul" and _uses(ctx, val) == 1:
            c = _scalar(ctx, val.node.inputs[1])
            if c is None or c <= 0:
                break
            m.nodes.append(val.node)
            scale *= c
            val = val.node.inputs[0]
        if side == "q":
            q = val
        else:
            kt = val
    if v.type.rank != q.type.rank:
        return "V has a different rank from Q"
    m.q, m.kt, m.scale = q, kt, scale
    # Causal masks become a flag (the kernel skips the blocks above the diagonal).
    tq, tk = s.type.shape[-2], s.type.shape[-1]
    kept = []
    for where, negate in m.masks:
        if not negate and tq == tk and _is_upper_triangle(ctx, where):
            m.causal = True
        else:
            kept.append((where, negate))
    m.masks = kept
    kept_b = []
    for bias, c in m.biases:
        if tq == tk and bias.type.rank >= 2 and _is_causal(ctx, bias, additive=True):
            m.causal = True
        else:
            kept_b.append((bias, c))
    m.biases = kept_b
    return m


def _scalar(ctx, v: Value):
    arr = _const(ctx, v)
    if arr is not None and arr.size == 1:
        return float(arr.reshape(()))
    return None


def _is_upper_triangle(ctx, where: Value) -> bool:
    """True when ``where`` is bool, True exactly above the diagonal of its last two axes."""
    return _is_causal(ctx, where, additive=False)


def _is_causal(ctx, v: Value, *, additive: bool) -> bool:
    """Is ``v`` a causal mask: bool True above the diagonal (or, ``additive``, −inf there and 0 below)?

    Recognised: ``trilu(full(...), k=1, upper)``, a const with that pattern, and a slice
    ``[..., :T, :T]`` of either (a registered mask buffer cut to the sequence length)."""
    n = v.node
    if n.op == "slice":
        starts, stops, steps = n.attrs["starts"], n.attrs["stops"], n.attrs["steps"]
        square = v.type.shape[-1] == v.type.shape[-2]
        from_origin = all(s in (None, 0) for s in starts[-2:]) and steps[-2:] == (1, 1)
        return square and from_origin and _is_causal(ctx, n.inputs[0], additive=additive)
    if n.op == "trilu" and n.attrs["upper"] and n.attrs["k"] == 1:
        src = n.inputs[0].node
        if src.op == "full":
            value = src.attrs["value"]
            return (value == -math.inf) if additive else (value is True)
        arr = _const(ctx, n.inputs[0])
        if arr is None:
            return False
        return bool(np.all(np.isneginf(arr))) if additive else (arr.dtype == bool and bool(arr.all()))
    arr = _const(ctx, v)
    if arr is None or arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        return False
    if additive:
        return _is_causal_bias(arr)
    t = arr.shape[-1]
    return arr.dtype == bool and bool(np.all(arr == np.triu(np.ones((t, t), bool), 1)))


def _is_causal_bias(arr: np.ndarray) -> bool:
    t = arr.shape[-1]
    if arr.shape[-2] != t:
        return False
    upper = np.triu(np.ones((t, t), bool), 1)
    return bool(np.all(np.isneginf(arr[..., upper])) and np.all(arr[..., ~upper] == 0))


def _k_from_kt(rw: Rewriter, kt: Value) -> Value:
    rank = kt.type.rank
    swap = tuple(range(rank - 2)) + (rank - 1, rank - 2)
    if kt.node.op == "transpose":
        inner = kt.node.attrs["axes"]
        combined = tuple(inner[a] for a in swap)
        source = kt.node.inputs[0]
        if combined == tuple(range(rank)):
            return source
        return rw.make("transpose", [source], {"axes": combined})
    return rw.make("transpose", [kt], {"axes": swap})


def fuse(node: Node, rw: Rewriter):
    if node.op != "matmul":
        return None
    p, v = node.inputs
    kept = p.node
    if kept.op == "attention" and p.index == 1 and kept.inputs[2] == v:
        return kept.outputs()[0]                  # weights @ V of a return_weights attention: its output
    m = analyze(rw, node)
    if m is None:
        return None
    if isinstance(m, str):
        rw.miss("fuse_attention", m)
        return None
    return _make_attention(rw, m)


def fuse_keeping_weights(node: Node, rw: Rewriter):
    """softmax P read by P @ V and by others → the second output of attention(return_weights=True)."""
    if node.op != "softmax" or rw.uses(node.out) < 2:
        return None
    if node.attrs["axis"] != node.type.rank - 1:
        return None
    old_id = rw._origin_key.get((node.id, 0), (node.id, 0))[0]
    users = rw.__dict__.get("_fuse_attention_users")
    if users is None:
        users = rw.__dict__["_fuse_attention_users"] = rw.old.users()
    pv = [u for u in users.get(old_id, []) if u.op == "matmul" and u.inputs[0].node.id == old_id]
    if not pv:
        return None
    v = _current_value(rw, pv[0].inputs[1])
    if v is None:
        return None                               # V comes later: fuse() reports the near miss
    m = _analyze_scores(rw, node, v, [pv[0], node])
    if isinstance(m, str):
        return None                               # fuse() at the P @ V matmul reports why
    out = _make_attention(rw, m, return_weights=True)
    if out is None:
        return None
    weights = out.node.outputs()[1]
    if weights.type != node.type:
        rw.miss("fuse_attention_weights", f"the fused weights would be {weights.type}, not {node.type}")
        return None
    return weights


def _current_value(rw: Rewriter, old: Value) -> Value | None:
    """The value standing for the old graph's ``old`` in the graph being built, if made yet:
    its replacement by a rule, else its copy, else the node itself when it was kept as is."""
    key = (old.node.id, old.index)
    found = None
    for new, origin in rw._origin_key.items():     # copies, then replacements, in the order made
        if origin == key:
            found = new
    if found is not None:
        for n in reversed(rw.graph.nodes):
            if n.id == found[0]:
                return Value(n, found[1])
    return old if old.node in rw.graph else None


def _make_attention(rw: Rewriter, m: Match, *, return_weights: bool = False) -> Value | None:
    k = _k_from_kt(rw, m.kt)
    extra = []
    bias = None
    for b, c in m.biases:
        if c != 1.0:
            b = rw.make("mul", [b, rw.const(np.asarray(c, dtype=b.type.dtype.numpy), "scale")])
        bias = b if bias is None else rw.make("add", [bias, b])
    mask = None
    for where, negate in m.masks:
        if negate:
            where = rw.make("logical_not", [where])
        mask = where if mask is None else rw.make("logical_or", [mask, where])
    if bias is not None:
        extra.append(bias)
    if mask is not None:
        extra.append(mask)
    attrs = {"scale": float(m.scale), "causal": m.causal, "has_bias": bias is not None, "has_mask": mask is not None}
    if return_weights:
        attrs["return_weights"] = True               # absent otherwise: the default form is unchanged
    try:
        return rw.make("attention", [m.q, k, m.v, *extra], attrs, fused=m.nodes)
    except Exception as err:  # shapes the kernel cannot take (e.g. a mask that enlarges the scores)
        rule = "fuse_attention_weights" if return_weights else "fuse_attention"
        rw.miss(rule, f"the fused op refused the shapes: {getattr(err, 'message', err)}")
        return None


RULES = [Rule("fuse_attention", fuse), Rule("fuse_attention_weights", fuse_keeping_weights)]


class _GraphCtx:
    """analyze() on a finished graph (for near-miss reports)."""

    def __init__(self, graph: Graph):
        self.values = graph.values
        self.__uses__: dict = {}
        for n in graph.nodes:
            for v in n.inputs:
                self.__uses__[(v.node.id, v.index)] = self.__uses__.get((v.node.id, v.index), 0) + 1
        for v in graph.outputs.values():
            self.__uses__[(v.node.id, v.index)] = self.__uses__.get((v.node.id, v.index), 0) + 1


def report_near_misses(graph: Graph, log: PassLog, pass_name: str = "fuse_attention") -> None:
    """For each softmax left in the graph whose input comes from a matmul, say why it did not fuse."""
    ctx = _GraphCtx(graph)
    users: dict[int, list[Node]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            users.setdefault(v.node.id, []).append(n)
    already = {(e.node, e.reason) for e in log.near_misses()}
    for n in graph.nodes:
        if n.op != "softmax" or not _reaches_matmul(n.inputs[0]):
            continue
        readers = users.get(n.id, [])
        pv = [u for u in readers if u.op == "matmul" and u.inputs[0].node is n]
        if pv:
            result = analyze(ctx, pv[0])
            reason = result if isinstance(result, str) else None
        elif any(v.node is n for v in graph.outputs.values()):
            reason = "the softmax is a graph output but is not multiplied by V"
        else:
            reason = "the softmax result is not multiplied by V (" + (
                ", ".join(sorted({u.op for u in readers})) or "no readers") + ")"
        if reason and (n.label, reason) not in already:
            log.events.append(Event(pass_name, "fuse_attention", n.label, n.source, fired=False, reason=reason))
