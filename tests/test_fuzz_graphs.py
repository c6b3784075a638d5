"""A hypothesis fuzzer: random small graphs of registry ops, optimized and run on the cpu
backend, must equal the numpy backend running the graph as written."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attngraph as ag

UNARY = ["neg", "abs", "exp", "tanh", "erf", "sigmoid", "relu", "gelu", "gelu_tanh", "sin", "cos", "sqrt_abs",
         "log_abs"]
BINARY = ["add", "sub", "mul", "div_safe", "maximum", "minimum", "where_gt"]
SHAPES = [(2, 3, 4), (1, 3, 4), (3, 4), (4,), (2, 1, 4), (2, 3, 1)]


def apply_unary(name, x):
    if name == "gelu_tanh":
        return ag.gelu(x, approximate="tanh")
    if name == "sqrt_abs":
        return ag.sqrt(ag.abs(x) + 0.5)
    if name == "log_abs":
        return ag.log(ag.abs(x) + 0.5)
    return getattr(ag, name)(x)


def apply_binary(name, a, b):
    if name == "div_safe":
        return a / (ag.abs(b) + 1.0)
    if name == "where_gt":
        return ag.where(a > b, a, b * 0.5)
    return getattr(ag, name)(a, b)


@st.composite
def graphs(draw):
    g = ag.Graph("fuzz")
    n_inputs = draw(st.integers(1, 3))
    pool = [g.input(f"x{i}", draw(st.sampled_from(SHAPES))) for i in range(n_inputs)]
    steps = draw(st.integers(1, 10))
    for _ in range(steps):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "reduce", "softmax", "layernorm", "transpose",
                                     "matmul", "scalar"]))
        x = draw(st.sampled_from(pool))
        try:
            if kind == "unary":
                y = apply_unary(draw(st.sampled_from(UNARY)), x)
            elif kind == "binary":
                y = apply_binary(draw(st.sampled_from(BINARY)), x, draw(st.sampled_from(pool)))
            elif kind == "scalar":
                y = x * draw(st.floats(-2, 2, allow_nan=False, width=32)) + 1.0
            elif kind == "reduce":
                op = draw(st.sampled_from([ag.sum, ag.mean, ag.max]))
                y = op(x, axis=-1, keepdims=True)
            elif kind == "softmax":
                y = ag.softmax(x, axis=-1)
            elif kind == "layernorm":
                y = ag.layernorm(x)
            elif kind == "transpose":
                y = x.T if x.ndim > 1 else -x
            else:
                y = x @ draw(st.sampled_from(pool)).T if x.ndim >= 2 else x
        except ag.errors.ShapeError:
            continue
        pool.append(y)
    outs = draw(st.lists(st.sampled_from(pool[n_inputs:] or pool), min_size=1, max_size=2, unique_by=id))
    for i, t in enumerate(outs):
        g.output(f"y{i}", t)
    return g


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.integers(0, 2**31 - 1))
def test_cpu_backend_equals_numpy_on_random_graphs(g, seed):
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(tuple(node.type.shape)).astype(np.float32) for name, node in g.inputs.items()}
    want = ag.compile(g, backend="numpy").run(feeds)
    got = ag.compile(g, backend="cpu").run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=2e-5, err_msg=g.summary())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.integers(0, 2**31 - 1))
def test_optimizer_preserves_numbers_on_random_graphs(g, seed):
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(tuple(node.type.shape)).astype(np.float32) for name, node in g.inputs.items()}
    want = ag.compile(g, backend="numpy").run(feeds)
    got = ag.compile(g, backend="numpy", optimize=True).run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=2e-5, err_msg=g.summary())
