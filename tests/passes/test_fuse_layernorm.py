"""fuse_layernorm: layernorm written out in primitives (three ways, and more) becomes one
``layernorm``; a residual add read by a layernorm becomes ``residual_layernorm``. Before/Expected
per rule, and the numbers of the graph as written (numpy backend, optimize off vs on)."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph.dsl import apply
from attngraph.ir import structural_diff
from attngraph.passes import fuse_layernorm, random_feeds, rewrite

B, T, D = 2, 5, 8
EPS = 1e-5
EPS32 = float(np.float32(EPS))   # the eps the graph really adds: a float32 const


@pytest.fixture(autouse=True, scope="module")
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attngraph-kernels"))
        yield


def assert_same(got, expected):
    why = structural_diff(got, expected)
    assert why is None, f"{why}\n--- got\n{got.summary()}\n--- expected\n{expected.summary()}"


def check_numbers(g, feeds=None, rtol=1e-5, atol=1e-5):
    feeds = feeds if feeds is not None else random_feeds(g, seed=1)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    got = ag.compile(g, backend="numpy", optimize=True).run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol)


def source_graph(name):
    g = ag.Graph(name)
    x = g.input("x", ("B", T, D))
    gamma = g.param("gamma", (D,), init="normal")
    beta = g.param("beta", (D,), init="normal")
    return g, x, gamma, beta


def decomposed(form, x, gamma, beta, eps=EPS):
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    if form == "rsqrt":                            # hand-written
        var = (xc * xc).mean(-1, keepdims=True)
        y = xc * ag.rsqrt(var + eps)
    elif form == "sqrt_div":
        var = (xc * xc).mean(-1, keepdims=True)
        y = xc / ag.sqrt(var + eps)
    elif form == "onnx":                           # ReduceMean, Sub, Pow 2, ReduceMean, Add, Sqrt, Div
        var = (xc ** 2).mean(-1, keepdims=True)
        y = xc / ag.sqrt(var + eps)
    elif form == "pow_half":                       # torch: (var + eps) ** -0.5
        var = (xc ** 2).mean(-1, keepdims=True)
        y = xc * (var + eps) ** -0.5
    else:
        raise AssertionError(form)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


@pytest.mark.parametrize("form", ["rsqrt", "sqrt_div", "onnx", "pow_half"])
def test_decomposition_becomes_layernorm(form):
    before, x, gamma, beta = source_graph(form)
    before.output("y", decomposed(form, x, gamma, beta))
    after = rewrite(before, fuse_layernorm.RULES, "fuse_layernorm")

    expected, x, gamma, beta = source_graph("expected")
    expected.output("y", ag.layernorm(x, gamma, beta, eps=EPS32))
    assert_same(after, expected)
    check_numbers(before)


@pytest.mark.parametrize("affine", ["none", "gamma", "beta"])
def test_scale_and_shift_are_optional(affine):
    before, x, gamma, beta = source_graph(affine)
    g_, b_ = (gamma if affine == "gamma" else None), (beta if affine == "beta" else None)
    before.output("y", decomposed("rsqrt", x, g_, b_))
    after = rewrite(before, fuse_layernorm.RULES, "fuse_layernorm")

    expected, x, gamma, beta = source_graph("expected")
    g_, b_ = (gamma if affine == "gamma" else None), (beta if affine == "beta" else None)
    expected.output("y", ag.layernorm(x, g_, b_, eps=EPS32))
    assert_same(after, expected)
    check_numbers(before)


def test_huggingface_style_with_gamma_on_the_left_and_mean_as_sum_over_d():
    g, x, gamma, beta = source_graph("hf")
    mu = x.sum(-1, keepdims=True) / D                  # canonicalize makes it sum * (1/D)
    xc = x - mu
    var = (xc ** 2).mean(-1, keepdims=True)
    g.output("y", gamma * (xc / ag.sqrt(1e-12 + var)) + beta)
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts() == {"input": 1, "param": 2, "layernorm": 1}
    ln = next(n for n in exe.graph.nodes if n.op == "layernorm")
    assert ln.attrs["has_gamma"] and ln.attrs["has_beta"] and ln.attrs["eps"] == float(np.float32(1e-12))
    assert len(ln.origin) == 4, "the layernorm remembers the four lines it replaced"
    check_numbers(g)


def test_float64_keeps_eps_exact():
    g = ag.Graph("f64")
    x = g.input("x", (3, D), "float64")
    g.output("y", decomposed("sqrt_div", x, None, None, eps=1e-6))
    after = rewrite(g, fuse_layernorm.RULES, "fuse_layernorm")
    ln = next(n for n in after.nodes if n.op == "layernorm")
    assert ln.attrs["eps"] == 1e-6
    check_numbers(g, rtol=1e-12, atol=1e-12)


def test_an_intermediate_read_elsewhere_blocks_fusion_and_explain_says_so():
    g, x, gamma, beta = source_graph("shared")
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    g.output("y", xc * ag.rsqrt(var + EPS))
    g.output("var", var)                                # the variance is wanted too
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    assert "layernorm" not in exe.graph.op_counts()
    assert "also read outside the layernorm" in exe.explain, exe.explain
    check_numbers(g)


def test_not_a_layernorm_is_left_alone():
    g, x, gamma, beta = source_graph("not")
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    g.output("y", xc * ag.rsqrt(var * 2.0))              # no + eps: a different formula
    g.output("z", (x - x.mean(0, keepdims=True)) / ag.sqrt((x * x).mean(-1, keepdims=True) + EPS))
    after = rewrite(g, fuse_layernorm.RULES, "fuse_layernorm")
    assert "layernorm" not in after.op_counts()


# -- residual add + layernorm ---------------------------------------------------------------

def prenorm(g, x, r, gamma, beta):
    """h = x + r; y = layernorm(h); out = h + y * 2 (the sum is read again, as in pre-norm blocks)."""
    h = x + r
    y = ag.layernorm(h, gamma, beta, eps=EPS)
    return h, y


def test_residual_add_and_layernorm_become_one_node_with_two_outputs():
    before, x, gamma, beta = source_graph("residual")
    r = before.input("r", ("B", T, D))
    h, y = prenorm(before, x, r, gamma, beta)
    before.output("out", h + y * 2.0)
    after = rewrite(before, fuse_layernorm.RULES, "fuse_layernorm")

    expected, x, gamma, beta = source_graph("expected")
    r = expected.input("r", ("B", T, D))
    total, normed = apply("residual_layernorm", [x, r, gamma, beta], eps=EPS, has_gamma=True, has_beta=True)
    expected.output("out", total + normed * 2.0)
    assert_same(after, expected)
    check_numbers(before)


def test_decomposed_layernorm_of_a_residual_sum_fuses_all_the_way():
    g, x, gamma, beta = source_graph("both")
    r = g.input("r", ("B", T, D))
    h = x + r
    g.output("y", decomposed("onnx", h, gamma, beta))
    g.output("h", h)
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts() == {"input": 2, "param": 2, "residual_layernorm": 1}
    check_numbers(g)


def test_residual_waits_for_gamma_and_beta_to_fold_in():
    before, x, gamma, beta = source_graph("wait")
    r = before.input("r", ("B", T, D))
    before.output("y", ag.layernorm(x + r, eps=EPS) * gamma + beta)
    after = rewrite(before, fuse_layernorm.RULES, "fuse_layernorm")
    node = next(n for n in after.nodes if n.op == "residual_layernorm")
    assert node.attrs["has_gamma"] and node.attrs["has_beta"]
    assert after.op_counts().get("mul") is None and after.op_counts().get("add") is None
    check_numbers(before)


def test_weights_created_after_the_add_still_fuse():
    g = ag.Graph("late")
    x = g.input("x", ("B", T, D))
    h = x + x * 2.0
    gamma = g.param("gamma", (D,), init="normal")       # made on first use, after the add (as nn modules do)
    g.output("y", ag.layernorm(h, gamma))
    g.output("h", h)
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts().get("residual_layernorm") == 1, exe.graph.summary()
    check_numbers(g)


def test_computed_gamma_is_a_near_miss():
    g, x, gamma, beta = source_graph("computed")
    h = x + x * 2.0
    g.output("y", ag.layernorm(h, gamma * 2.0))
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    assert "residual_layernorm" not in exe.graph.op_counts()
    assert "gamma/beta are computed" in exe.explain
    check_numbers(g)


def test_transformer_encoder_layers_fuse(rng):
    for norm_first in (False, True):
        g = ag.Graph(f"encoder_{norm_first}")
        x = g.input("x", ("B", T, 16))
        layer = ag.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True,
                                              activation="gelu", norm_first=norm_first)
        g.output("y", layer(x))
        exe = ag.compile(g, backend="numpy", optimize=True)
        counts = exe.graph.op_counts()
        assert counts.get("residual_layernorm", 0) == (1 if norm_first else 2), exe.graph.summary()
        assert counts.get("attention") == 1 and counts.get("matmul_epilogue", 0) >= 3, exe.graph.summary()
        check_numbers(g, rtol=1e-4, atol=1e-5)


def test_residual_layernorm_runs_on_the_cpu_backend():
    g, x, gamma, beta = source_graph("cpu")
    r = g.input("r", ("B", T, D))
    h, y = prenorm(g, x, r, gamma, beta)
    g.output("out", h + y * 2.0)
    g.output("y", y)
    feeds = random_feeds(g, seed=3)
    want = ag.compile(g, backend="numpy").run(feeds)
    exe = ag.compile(g, backend="cpu")
    assert "residual_layernorm" in exe.graph.op_counts()
    got = exe.run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
