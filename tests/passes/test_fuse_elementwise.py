"""fuse_elementwise: chains, diamonds and broadcasts of elementwise ops become one
``fused_elementwise`` node. Before/Expected, and the numbers of the graph as written."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph.dsl import apply
from attngraph.ir import structural_diff
from attngraph.passes import fuse_elementwise, random_feeds, rewrite

B, T, D = 2, 3, 4
F32 = "float32"


@pytest.fixture(autouse=True, scope="module")
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attngraph-kernels"))
        yield


def assert_same(got, expected):
    why = structural_diff(got, expected)
    assert why is None, f"{why}\n--- got\n{got.summary()}\n--- expected\n{expected.summary()}"


def check_numbers(g, feeds=None):
    feeds = feeds if feeds is not None else random_feeds(g, seed=2)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    got = ag.compile(g, backend="numpy", optimize=True).run(feeds)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


def fuse(g):
    return rewrite(g, fuse_elementwise.RULES, "fuse_elementwise")


def fused_nodes(g):
    return [n for n in g.nodes if n.op == "fused_elementwise"]


def test_a_chain_becomes_one_node():
    before = ag.Graph("chain")
    x, y = before.input("x", (B, T, D)), before.input("y", (B, T, D))
    before.output("z", ag.tanh(ag.exp(x - y) * y))

    expected = ag.Graph("expected")
    x, y = expected.input("x", (B, T, D)), expected.input("y", (B, T, D))
    expr = ("tanh", (), ("mul", (), ("exp", (), ("sub", (), ("in", 0), ("in", 1))), ("in", 1)))
    expected.output("z", apply("fused_elementwise", [x, y], expr=expr))
    assert_same(fuse(before), expected)
    check_numbers(before)


def test_gelu_written_with_erf_is_one_region():
    g = ag.Graph("gelu_erf")
    x = g.input("x", ("B", T, D))
    g.output("y", 0.5 * x * (1 + ag.erf(x / math.sqrt(2))))
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts() == {"input": 1, "fused_elementwise": 1}   # scalars are inlined
    (node,) = fused_nodes(exe.graph)
    assert node.attrs["expr"][0] == "mul" and len(node.inputs) == 1
    assert {s.line for s in node.origin} == {g.outputs["y"].node.source.line}
    check_numbers(g)


def test_scalars_are_inlined_with_the_tensor_dtype():
    before = ag.Graph("scalars")
    x = before.input("x", (D,), "float64")
    before.output("y", ag.exp(x * 2.0) + 1)

    expected = ag.Graph("expected")
    x = expected.input("x", (D,), "float64")
    expr = ("add", (), ("exp", (), ("mul", (), ("in", 0), ("const", 2.0, "float64"))), ("const", 1.0, "float64"))
    expected.output("y", apply("fused_elementwise", [x], expr=expr))
    assert_same(fuse(before), expected)


def test_broadcast_operands_stay_inputs_and_are_not_recomputed_per_element():
    before = ag.Graph("bias")
    x, b = before.input("x", ("B", T, D)), before.input("b", (D,))
    before.output("y", ag.tanh(x + ag.exp(b)))          # exp(b) is (D,): it stays a node of its own

    expected = ag.Graph("expected")
    x, b = expected.input("x", ("B", T, D)), expected.input("b", (D,))
    expected.output("y", apply("fused_elementwise", [x, ag.exp(b)],
                               expr=("tanh", (), ("add", (), ("in", 0), ("in", 1)))))
    assert_same(fuse(before), expected)
    check_numbers(before)


def test_a_value_read_outside_the_region_is_an_input_of_it():
    before = ag.Graph("shared")
    x, y = before.input("x", (B, D)), before.input("y", (B, D))
    t = x * y
    before.output("t", t)                                # t is wanted: the region starts after it
    before.output("u", ag.sigmoid(t) - ag.tanh(t))

    expected = ag.Graph("expected")
    x, y = expected.input("x", (B, D)), expected.input("y", (B, D))
    t = x * y
    expected.output("t", t)
    expr = ("sub", (), ("sigmoid", (), ("in", 0)), ("tanh", (), ("in", 0)))
    expected.output("u", apply("fused_elementwise", [t], expr=expr))
    assert_same(fuse(before), expected)
    check_numbers(before)


def test_a_lone_op_stays_as_it_is():
    g = ag.Graph("lone")
    x = g.input("x", (B, D))
    g.output("y", ag.exp(x))
    g.output("z", x.sum(-1, keepdims=True) * x)
    after = fuse(g)
    assert not fused_nodes(after)
    assert after.op_counts() == g.op_counts()


def test_int_and_bool_regions_comparisons_feeding_where():
    g = ag.Graph("ints")
    ids = g.input("ids", (B, T), "int64")
    x = g.input("x", (B, T, D))
    keep = ((ids > 0) & (ids != 2)).reshape(B, T, 1)     # an int → bool region, then a reshape
    scaled = (ids * 3 + 1).astype("float32").reshape(B, T, 1)
    g.output("y", ag.where(keep, x * scaled, -x))
    exe = ag.compile(g, backend="numpy", optimize=True)
    counts = exe.graph.op_counts()
    assert counts["fused_elementwise"] == 3, exe.graph.summary()
    bool_region = next(n for n in fused_nodes(exe.graph) if n.type.dtype == ag.bool_)
    assert bool_region.inputs[0].type.dtype == ag.int64
    feeds = {"ids": np.array([[0, 1, 2], [3, 2, 0]]), "x": random_feeds(g)["x"]}
    check_numbers(g, feeds)


def test_casts_and_masks_fuse():
    g = ag.Graph("mask")
    x = g.input("x", (B, T, D))
    pad = g.input("pad", (B, 1, D), "bool")
    y = ag.mask(ag.relu(x) * 2.0, pad, value=-math.inf)
    g.output("y", ag.exp(y.astype("float64")))
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts() == {"input": 2, "fused_elementwise": 1}
    check_numbers(g)


def test_regions_merge_across_a_value_read_twice_inside():
    g = ag.Graph("diamond")
    x, y = g.input("x", (B, D)), g.input("y", (B, D))
    s = x + y                                             # read by two ops of the same region
    g.output("z", ag.sin(s) * ag.cos(s) + s)
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts() == {"input": 2, "fused_elementwise": 1}
    check_numbers(g)


def test_disable_by_name():
    g = ag.Graph("off")
    x = g.input("x", (B, D))
    g.output("y", ag.exp(x) * 2.0)
    exe = ag.compile(g, backend="numpy", optimize=True, disable=["fuse_elementwise"])
    assert not fused_nodes(exe.graph)


def test_fused_regions_run_on_the_cpu_backend():
    g = ag.Graph("cpu")
    x = g.input("x", ("B", T, D))
    b = g.param("b", (D,), init="normal")
    m = g.input("m", ("B", 1, D), "bool")
    h = x + b
    g.output("y", ag.mask(0.5 * h * (1 + ag.erf(h / math.sqrt(2))), m, value=0.0))
    feeds = random_feeds(g, seed=4)
    want = ag.compile(g, backend="numpy").run(feeds)["y"]
    exe = ag.compile(g, backend="cpu")
    assert exe.graph.op_counts()["fused_elementwise"] == 1
    np.testing.assert_allclose(exe.run(feeds)["y"], want, rtol=1e-6, atol=1e-6)
