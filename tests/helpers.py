"""Small helpers the tests share: run one op through the numpy backend."""

from __future__ import annotations

import numpy as np

import attngraph as ag
from attngraph.dsl import apply


def run_op(op_name: str, inputs, attrs: dict, backend: str = "numpy"):
    """Build a one-op graph whose inputs are fed ``inputs`` and return its output(s) as arrays."""
    g = ag.Graph(f"one_{op_name}")
    handles = [g.input(f"in{i}", a.shape, a.dtype) for i, a in enumerate(inputs)]
    out = apply(op_name, handles, graph=g, **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    for i, t in enumerate(outs):
        g.output(f"out{i}", t)
    result = ag.compile(g, backend=backend).run({f"in{i}": a for i, a in enumerate(inputs)})
    values = [result[f"out{i}"] for i in range(len(outs))]
    return values if isinstance(out, tuple) else values[0]
