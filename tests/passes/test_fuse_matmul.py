"""fuse_matmul: matmul + elementwise epilogue (bias, activation, residual) → ``matmul_epilogue``;
projections of one input (Q/K/V) → one matmul and a split. Before/Expected, and numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph.dsl import apply
from attngraph.ir import structural_diff
from attngraph.passes import fuse_matmul, random_feeds, rewrite

B, T, K, N = 2, 8, 6, 5
BIAS = ("add", (), ("in", 0), ("in", 1))


@pytest.fixture(autouse=True, scope="module")
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attngraph-kernels"))
        yield


def assert_same(got, expected):
    why = structural_diff(got, expected)
    assert why is None, f"{why}\n--- got\n{got.summary()}\n--- expected\n{expected.summary()}"


def check_numbers(g, backend="numpy", rtol=1e-5, atol=1e-5):
    feeds = random_feeds(g, seed=5)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    got = ag.compile(g, backend=backend, optimize=True).run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol)


def fuse(g):
    return rewrite(g, fuse_matmul.RULES, "fuse_matmul")


def linear_graph(name, rows=("B", T)):
    g = ag.Graph(name)
    x = g.input("x", (*rows, K))
    w = g.param("w", (K, N))
    b = g.param("b", (N,), init="normal")
    return g, x, w, b


def gelu_erf(h):
    return 0.5 * h * (1 + ag.erf(h / math.sqrt(2)))


# -- epilogue -------------------------------------------------------------------------------

def test_bias_and_gelu_become_an_epilogue():
    before, x, w, b = linear_graph("bias_gelu")
    before.output("y", ag.gelu(x @ w + b))

    expected, x, w, b = linear_graph("expected")
    expr = ("gelu", (("approximate", "none"),), BIAS)
    expected.output("y", apply("matmul_epilogue", [x, w, b], expr=expr))
    assert_same(fuse(before), expected)
    check_numbers(before)


def test_bias_and_gelu_in_its_erf_form_is_one_epilogue():
    g, x, w, b = linear_graph("bias_gelu_erf")
    g.output("y", gelu_erf(x @ w + b))
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts() == {"input": 1, "param": 2, "matmul_epilogue": 1}
    check_numbers(g)


def test_residual_and_relu_join_the_epilogue():
    before, x, w, b = linear_graph("residual")
    r = before.input("r", ("B", T, N))
    before.output("y", ag.relu(x @ w + b) + r)

    expected, x, w, b = linear_graph("expected")
    r = expected.input("r", ("B", T, N))
    expr = ("add", (), ("relu", (), BIAS), ("in", 2))
    expected.output("y", apply("matmul_epilogue", [x, w, b, r], expr=expr))
    assert_same(fuse(before), expected)
    check_numbers(before)


def test_product_read_elsewhere_or_enlarged_is_not_an_epilogue():
    g, x, w, b = linear_graph("kept")
    p = x @ w
    g.output("p", p)                                       # the product itself is an output
    g.output("y", ag.tanh(p + b))
    z = g.input("z", (3, "B", T, N))
    g.output("big", (x @ w) + z)                           # broadcasting enlarges the result
    after = fuse(g)
    assert "matmul_epilogue" not in after.op_counts()
    check_numbers(g)


def test_epilogue_runs_on_the_cpu_backend():
    g, x, w, b = linear_graph("cpu")
    r = g.input("r", ("B", T, N))
    g.output("y", gelu_erf(x @ w + b) + r)
    exe = ag.compile(g, backend="cpu")
    assert exe.graph.op_counts().get("matmul_epilogue") == 1
    check_numbers(g, backend="cpu")


# -- shared-input merge (Q/K/V) -----------------------------------------------------------------

def qkv_graph(name, *, bias=True, transposed=False, consts=False, rows=("B", T)):
    g = ag.Graph(name)
    x = g.input("x", (*rows, K))
    rng = np.random.default_rng(0)
    sizes = {"q": 4, "k": 4, "v": 3}
    ws, bs = [], []
    for n, size in sizes.items():
        shape = (size, K) if transposed else (K, size)
        ws.append(g.const(f"w{n}", rng.standard_normal(shape).astype(np.float32)) if consts
                  else g.param(f"w{n}", shape))
        if bias:
            bs.append(g.const(f"b{n}", rng.standard_normal(size).astype(np.float32)) if consts
                      else g.param(f"b{n}", (size,), init="normal"))
    return g, x, ws, bs


def project(x, ws, bs, transposed):
    outs = [x @ (w.T if transposed else w) for w in ws]
    return [o + b for o, b in zip(outs, bs)] if bs else outs


def test_projections_with_bias_merge_into_one_matmul_and_epilogue():
    before, x, ws, bs = qkv_graph("qkv")
    q, k, v = project(x, ws, bs, False)
    before.output("q", q)
    before.output("k", k)
    before.output("v", v)
    after = rewrite(fuse(before), fuse_matmul.RULES, "fuse_matmul")

    expected, x, ws, bs = qkv_graph("expected")
    w = apply("concat", ws, axis=1)
    b = apply("concat", bs, axis=0)
    q, k, v = apply("split", [apply("matmul_epilogue", [x, w, b], expr=BIAS)], sizes=(4, 4, 3), axis=-1)
    expected.output("q", q)
    expected.output("k", k)
    expected.output("v", v)
    assert_same(after, expected)
    check_numbers(before)


def test_linear_layout_weights_merge_by_rows_then_transpose():
    before, x, ws, _ = qkv_graph("qkv_t", bias=False, transposed=True)
    q, k, v = project(x, ws, [], True)
    before.output("o", q[..., :3] * k[..., :3] + v)

    expected, x, ws, _ = qkv_graph("expected", bias=False, transposed=True)
    w = apply("transpose", [apply("concat", ws, axis=0)], axes=(1, 0))
    q, k, v = apply("split", [x @ w], sizes=(4, 4, 3), axis=-1)
    expected.output("o", q[..., :3] * k[..., :3] + v)
    assert_same(fuse(before), expected)
    check_numbers(before)


def test_const_weights_are_concatenated_once():
    g, x, ws, bs = qkv_graph("consts", consts=True, transposed=True)
    outs = project(x, ws, bs, True)
    for n, o in zip("qkv", outs):
        g.output(n, o)
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    counts = exe.graph.op_counts()
    assert counts.get("matmul_epilogue") == 1 and counts.get("split") == 1, exe.graph.summary()
    assert "concat" not in counts and "transpose" not in counts
    assert "merge_shared_input fired" in exe.explain
    check_numbers(g)


def test_few_rows_keep_param_projections_apart_and_explain_says_why():
    g, x, ws, bs = qkv_graph("decode", rows=(1, 2))
    for n, o in zip("qkv", project(x, ws, bs, False)):
        g.output(n, o)
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    assert exe.graph.op_counts().get("matmul_epilogue") == 3
    assert "too few for concatenating the weights" in exe.explain
    check_numbers(g)


def test_different_inputs_or_weights_that_are_activations_do_not_merge():
    g = ag.Graph("apart")
    x, y = g.input("x", ("B", K)), g.input("y", ("B", K))
    w1, w2 = g.param("w1", (K, N)), g.param("w2", (K, N))
    a = g.input("a", (K, N))
    g.output("o", x @ w1 + y @ w2 + x @ a)             # x @ a: the weight is an input, not a param
    assert "split" not in fuse(g).op_counts()


def test_merged_projections_run_on_the_cpu_backend():
    g, x, ws, bs = qkv_graph("qkv_cpu", transposed=True)
    q, k, v = project(x, ws, bs, True)
    g.output("o", ag.sigmoid(q) * k + v[..., :1])
    check_numbers(g, backend="cpu")
