"""fuse_layernorm: layernorm written out in primitives becomes one ``layernorm``; a residual add
feeding a layernorm becomes ``residual_layernorm``.

The decomposition, as hand-written code and ONNX exports spell it (``D`` the last axis)::

    mu  = mean(x, -1, keepdims)            or  sum(x, -1, keepdims) * (1/D)
    xc  = x - mu
    var = mean(xc * xc, -1, keepdims)      or  mean(xc ** 2, ...)             (pow by the const 2)
    y   = xc * rsqrt(var + eps)            or  xc / sqrt(var + eps)            (ONNX: Sqrt, Div)
                                           or  xc * (var + eps) ** -0.5    or  xc * (1 / sqrt(var + eps))
    y   = y * gamma + beta                 gamma, beta: vectors of the last axis (either side of * and +)

Every intermediate must have no reader outside the pattern (``explain`` says which one
does). The scale and shift fold in one at a time (``layernorm(x) * g`` → ``layernorm(x, g)``,
then ``+ b``), each on the layernorm's only reader.

Residual: ``s = a + b`` read by a layernorm becomes ``residual_layernorm(a, b, ...)`` with two
outputs, the sum (every other reader of ``s`` reads it: a pre-norm Transformer adds it
again later) and the normalized value. The fused node is built where the add was, so gamma
and beta must be params or consts (the pass moves them to the front of the graph first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import SOURCE_OPS, Node, Value
from .fuse_elementwise import old_id, old_users, sources_first
from .rewrite import PassLog, Rewriter, Rule, rewrite

__all__ = ["RULES", "run"]


@dataclass
class _Match:
    x: Value
    eps: float
    nodes: list[Node] = field(default_factory=list)


def _scalar(rw: Rewriter, v: Value):
    value = rw.scalar_value(v)
    return None if value is None or isinstance(value, bool) else float(value)


def _operands(node: Node, op: str):
    """Both orderings of a binary ``op`` node's inputs (``[]`` for another op)."""
    if node.op != op:
        return []
    a, b = node.inputs
    return [(a, b), (b, a)]


def _mean_last(v: Value, rw: Rewriter, nodes: list[Node]) -> Value | None:
    """x when ``v`` is the mean of x over the last axis with keepdims."""
    n, rank = v.node, v.type.rank
    last = (rank - 1,)
    if n.op == "mean" and n.attrs["axis"] == last and n.attrs["keepdims"]:
        nodes.append(n)
        return n.inputs[0]
    candidates = _operands(n, "mul") + ([tuple(n.inputs)] if n.op == "div" else [])
    for s, c in candidates:
        if s.node.op != "sum" or s.node.attrs["axis"] != last or not s.node.attrs["keepdims"]:
            continue
        d, value = s.node.inputs[0].type.shape[-1], _scalar(rw, c)
        if not isinstance(d, int) or not value or c.type.rank > rank or rw.uses(s) != 1:
            continue
        if abs((value * d if n.op == "mul" else d / value) - 1.0) < 1e-6:
            nodes += [n, s.node]
            return s.node.inputs[0]
    return None


def _square_of(v: Value, rw: Rewriter) -> Value | None:
    """xc when ``v`` is xc * xc or xc ** 2."""
    n = v.node
    if n.op == "mul" and n.inputs[0] == n.inputs[1]:
        return n.inputs[0]
    if n.op == "pow" and _scalar(rw, n.inputs[1]) == 2.0 and n.type == n.inputs[0].type:
        return n.inputs[0]
    return None


def _inverse_std(node: Node, rw: Rewriter) -> list[tuple[Value, Value, list[Node]]]:
    """(xc, var + eps, nodes) for each way ``node`` may be xc / sqrt(var + eps)."""
    found = []
    for xc, r in _operands(node, "mul"):
        rn = r.node
        if rn.op == "rsqrt":
            found.append((xc, rn.inputs[0], [rn]))
        elif rn.op == "pow" and _scalar(rw, rn.inputs[1]) == -0.5:
            found.append((xc, rn.inputs[0], [rn]))
        elif rn.op == "div" and _scalar(rw, rn.inputs[0]) == 1.0 and rn.inputs[1].node.op == "sqrt":
            found.append((xc, rn.inputs[1].node.inputs[0], [rn, rn.inputs[1].node]))
    if node.op == "div":
        xc, s = node.inputs
        if s.node.op == "sqrt":
            found.append((xc, s.node.inputs[0], [s.node]))
        elif s.node.op == "pow" and _scalar(rw, s.node.inputs[1]) == 0.5:
            found.append((xc, s.node.inputs[0], [s.node]))
    return found


def match_layernorm(node: Node, rw: Rewriter) -> _Match | str | None:
    """The decomposition ending at ``node`` (a match, a reason it almost matched, or None)."""
    for xc, ve, inner in _inverse_std(node, rw):
        if not xc.type.dtype.is_float or xc.type != node.type or xc.node.op != "sub":
            continue
        eps = var = None
        for v, c in _operands(ve.node, "add"):
            value = _scalar(rw, c)
            if value is not None and value >= 0 and c.type.rank <= ve.type.rank and v.type == ve.type:
                eps, var = value, v
                break
        if var is None:
            continue
        nodes = [node, *inner, ve.node]
        sq = _mean_last(var, rw, nodes)
        if sq is None or _square_of(sq, rw) != xc:
            continue
        nodes.append(sq.node)
        x, mu = xc.node.inputs
        if _mean_last(mu, rw, nodes) != x:
            continue
        nodes.append(xc.node)
        # Readers: xc is read by the square (once or twice) and by ``node``; the rest once.
        for n in nodes:
            if n is node or n is xc.node:
                continue
            if rw.uses(n.out) != 1:
                return f"the {n.op} at {n.source.short if n.source else '?'} is also read outside the layernorm"
        if rw.uses(xc) != 1 + sum(1 for u in sq.node.inputs if u == xc):
            return "x - mean(x) is also read outside the layernorm"
        return _Match(x=x, eps=eps, nodes=nodes)
    return None


def fuse_decomposition(node: Node, rw: Rewriter):
    if node.op not in ("mul", "div"):
        return None
    m = match_layernorm(node, rw)
    if m is None:
        return None
    if isinstance(m, str):
        rw.miss("fuse_layernorm", m)
        return None
    return rw.make("layernorm", [m.x], {"eps": m.eps, "has_gamma": False, "has_beta": False}, fused=m.nodes)


def _affine_vector(v: Value, ln: Value) -> bool:
    return v.type.shape == (ln.type.shape[-1],) and v.type.dtype == ln.type.dtype


def fold_scale(node: Node, rw: Rewriter):
    """layernorm(x) * gamma → layernorm(x, gamma)."""
    for ln, g in _operands(node, "mul"):
        n = ln.node
        if (n.op == "layernorm" and not n.attrs["has_gamma"] and not n.attrs["has_beta"]
                and rw.uses(ln) == 1 and _affine_vector(g, ln) and node.type == ln.type):
            return rw.make("layernorm", [n.inputs[0], g], dict(n.attrs, has_gamma=True), fused=[n, node])
    return None


def fold_shift(node: Node, rw: Rewriter):
    """layernorm(x[, gamma]) + beta → layernorm(x[, gamma], beta)."""
    for ln, b in _operands(node, "add"):
        n = ln.node
        if (n.op == "layernorm" and not n.attrs["has_beta"] and rw.uses(ln) == 1 and _affine_vector(b, ln)
                and node.type == ln.type):
            return rw.make("layernorm", [*n.inputs, b], dict(n.attrs, has_beta=True), fused=[n, node])
    return None


def _will_fold(ln: Node, rw: Rewriter) -> bool:
    """Is a scale or shift about to fold into this (old-graph) layernorm?"""
    readers = old_users(rw).get(ln.id, [])
    if len(readers) != 1 or rw.uses(ln.out) != 1:
        return False
    reader = readers[0]
    others = [v for v in reader.inputs if v.node.id != ln.id]
    if len(others) != 1 or not _affine_vector(others[0], ln.out):
        return False
    attrs = ln.attrs
    return ((reader.op == "mul" and not attrs["has_gamma"] and not attrs["has_beta"])
            or (reader.op == "add" and not attrs["has_beta"]))


def fuse_residual(node: Node, rw: Rewriter):
    """a + b read by a layernorm → residual_layernorm(a, b, ...); the add's readers read output 0."""
    if node.op != "add" or not node.type.dtype.is_float or node.type.rank == 0:
        return None
    me = old_id(rw, node)
    norms = [u for u in old_users(rw).get(me, []) if u.op == "layernorm" and u.inputs[0].node.id == me]
    if not norms:
        return None
    ln = norms[0]
    if _will_fold(ln, rw):
        return None  # wait until gamma and beta are in
    affine = list(ln.inputs[1:])
    if not all(v.node.op in SOURCE_OPS and v.node in rw.graph for v in affine):
        rw.miss("fuse_residual", "gamma/beta are computed, not params or consts")
        return None
    a, b = node.inputs
    if a.type.dtype != b.type.dtype:
        return None
    total, _ = rw.make_multi("residual_layernorm", [a, b, *affine], dict(ln.attrs), fused=[node, ln])
    return total


def residual_output(node: Node, rw: Rewriter):
    """layernorm(residual_layernorm(...)[0]) with the same gamma, beta, eps → its output 1."""
    if node.op != "layernorm":
        return None
    x = node.inputs[0]
    fused = x.node
    if (fused.op == "residual_layernorm" and x.index == 0 and tuple(fused.inputs[2:]) == tuple(node.inputs[1:])
            and dict(fused.attrs) == dict(node.attrs)):
        return Value(fused, 1)
    return None


RULES = [
    Rule("fuse_layernorm", fuse_decomposition),
    Rule("fold_layernorm_scale", fold_scale),
    Rule("fold_layernorm_shift", fold_shift),
    Rule("fuse_residual_layernorm", fuse_residual),
    Rule("residual_layernorm_output", residual_output),
]


def run(graph, log: PassLog):
    """The pass: the rules to a fixpoint, weights first (so the fused node may read them early)."""
    return rewrite(sources_first(graph), RULES, "fuse_layernorm", log)
