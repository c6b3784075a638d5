"""canonicalize: one spelling for each computation, so later patterns match fewer forms.

- x / c (a scalar const) → x * (1/c)
- a const on the left of a commutative op moves to the right: c + x → x + c
- transpose∘transpose folds into one transpose (or disappears); an identity transpose disappears
- reshape∘reshape folds into one reshape; a reshape to the same shape disappears
- a cast to the same dtype disappears; neg(neg(x)) → x
"""

from __future__ import annotations

import numpy as np

from ..ir import Node
from .rewrite import Rewriter, Rule

__all__ = ["RULES"]

COMMUTATIVE = ("add", "mul", "maximum", "minimum", "equal", "not_equal", "logical_and", "logical_or")


def scalar_division_to_multiplication(node: Node, rw: Rewriter):
    if node.op != "div":
        return None
    x, c = node.inputs
    value = rw.scalar_value(c)
    if value is None or value == 0 or c.type.shape != () or not c.type.dtype.is_float:
        return None
    reciprocal = rw.const(np.asarray(1.0 / value, dtype=c.type.dtype.numpy), "recip")
    return rw.make("mul", [x, reciprocal], fused=[node])


def constant_to_the_right(node: Node, rw: Rewriter):
    if node.op not in COMMUTATIVE:
        return None
    a, b = node.inputs
    if a.node.op == "const" and b.node.op != "const":
        return rw.make(node.op, [b, a], dict(node.attrs), fused=[node])
    return None


def fold_transposes(node: Node, rw: Rewriter):
    if node.op != "transpose":
        return None
    (x,) = node.inputs
    axes = node.attrs["axes"]
    if axes == tuple(range(len(axes))):
        return x
    if x.node.op == "transpose":
        inner = x.node.attrs["axes"]
        combined = tuple(inner[a] for a in axes)
        if combined == tuple(range(len(combined))):
            return x.node.inputs[0]
        return rw.make("transpose", [x.node.inputs[0]], {"axes": combined}, fused=[x.node, node])
    return None


def fold_reshapes(node: Node, rw: Rewriter):
    if node.op != "reshape":
        return None
    (x,) = node.inputs
    if x.type.shape == node.type.shape:
        return x
    if x.node.op == "reshape":
        return rw.make("reshape", [x.node.inputs[0]], {"shape": node.attrs["shape"]}, fused=[x.node, node])
    return None


def drop_identities(node: Node, rw: Rewriter):
    if node.op == "cast" and node.inputs[0].type.dtype == node.type.dtype:
        return node.inputs[0]
    if node.op == "neg" and node.inputs[0].node.op == "neg":
        return node.inputs[0].node.inputs[0]
    return None


RULES = [
    Rule("scalar_division_to_multiplication", scalar_division_to_multiplication),
    Rule("constant_to_the_right", constant_to_the_right),
    Rule("fold_transposes", fold_transposes),
    Rule("fold_reshapes", fold_reshapes),
    Rule("drop_identities", drop_identities),
]
