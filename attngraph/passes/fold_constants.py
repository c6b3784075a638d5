"""fold_constants: a node whose inputs are all consts becomes a const (evaluated by its reference)."""

from __future__ import annotations

import numpy as np

from ..ir import Node, get_op, is_static
from .rewrite import Rewriter, Rule

__all__ = ["RULES", "MAX_FOLDED_ELEMENTS"]

# Folding must not turn a cheap broadcast into a huge constant.
MAX_FOLDED_ELEMENTS = 1 << 20


def fold(node: Node, rw: Rewriter):
    if not all(v.node.op == "const" for v in node.inputs):
        return None
    if not all(is_static(t.shape) for t in node.types):
        return None
    if any(int(np.prod(t.shape, dtype=np.int64)) > MAX_FOLDED_ELEMENTS for t in node.types):
        return None
    op = get_op(node.op)
    args = [rw.const_value(v) for v in node.inputs]
    with np.errstate(all="ignore"):
        out = op.reference(*args, **node.attrs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(rw.const(np.asarray(o, dtype=t.dtype.numpy), node.op) for o, t in zip(outs, node.types))


RULES = [Rule("fold", fold)]
