"""Before/Expected tests for canonicalize, fold_constants, cse and dce."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph.ir import structural_diff
from attngraph.passes import PassLog, eliminate_dead_code, rewrite
from attngraph.passes import canonicalize, fold_constants
from attngraph.passes.cse import eliminate_common_subexpressions


def assert_same(got, expected):
    why = structural_diff(got, expected)
    assert why is None, f"{why}\n--- got\n{got.summary()}\n--- expected\n{expected.summary()}"


def check_numbers(before, after, feeds):
    want = ag.compile(before).run(feeds)
    got = ag.compile(after).run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)


def test_scalar_division_becomes_multiplication():
    before = ag.Graph("b")
    x = before.input("x", (3,))
    before.output("y", x / 4.0)
    expected = ag.Graph("e")
    x = expected.input("x", (3,))
    expected.output("y", x * np.float32(0.25))
    after = rewrite(before, canonicalize.RULES, "canonicalize")
    assert_same(after, expected)
    check_numbers(before, after, {"x": np.arange(3, dtype=np.float32)})


def test_constants_move_right():
    before = ag.Graph("b")
    x = before.input("x", (3,))
    before.output("y", 2.0 * x + 1.0)
    expected = ag.Graph("e")
    x = expected.input("x", (3,))
    expected.output("y", x * 2.0 + 1.0)
    assert_same(rewrite(before, canonicalize.RULES, "canonicalize"), expected)


def test_transpose_and_reshape_chains_fold():
    before = ag.Graph("b")
    x = before.input("x", (2, 3, 4))
    before.output("t", x.transpose(1, 0, 2).transpose(0, 2, 1))   # one transpose
    before.output("id", x.transpose(2, 1, 0).transpose(2, 1, 0))    # nothing
    before.output("r", x.reshape(6, 4).reshape(24).reshape(4, 6))   # one reshape
    before.output("same", x.reshape(2, 3, 4))                        # nothing
    expected = ag.Graph("e")
    x = expected.input("x", (2, 3, 4))
    expected.output("t", x.transpose(1, 2, 0))
    expected.output("id", x)
    expected.output("r", x.reshape(4, 6))
    expected.output("same", x)
    after = rewrite(before, canonicalize.RULES, "canonicalize")
    assert_same(after, expected)
    check_numbers(before, after, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})


def test_identity_casts_and_double_negation_disappear():
    before = ag.Graph("b")
    x = before.input("x", (3,))
    before.output("y", -(-x.astype("float32")))
    expected = ag.Graph("e")
    expected.output("y", expected.input("x", (3,)))
    assert_same(rewrite(before, canonicalize.RULES, "canonicalize"), expected)


def test_constant_folding():
    before = ag.Graph("b")
    x = before.input("x", (2, 2))
    c = before.const("c", np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    before.output("y", x + ag.exp(c).T * 2.0)
    after = rewrite(before, fold_constants.RULES, "fold_constants")
    assert after.op_counts() == {"input": 1, "const": 1, "add": 1}
    check_numbers(before, after, {"x": np.ones((2, 2), np.float32)})


def test_folding_leaves_params_and_symbolic_shapes_alone():
    g = ag.Graph("b")
    x = g.input("x", ("T", 2))
    w = g.param("w", (2, 2))
    g.output("y", x @ (w * 2.0))
    g.output("m", ag.causal_mask(g, "T"))
    after = rewrite(g, fold_constants.RULES, "fold_constants")
    assert after.op_counts() == g.op_counts()


def test_cse_merges_twins_and_equal_consts():
    before = ag.Graph("b")
    x = before.input("x", (3,))
    before.output("y", ag.exp(x) * 2.0 + ag.exp(x) * 2.0)
    expected = ag.Graph("e")
    x = expected.input("x", (3,))
    e = ag.exp(x) * 2.0
    expected.output("y", e + e)
    after = eliminate_common_subexpressions(before, PassLog())
    assert_same(after, expected)
    assert after.op_counts()["const"] == 1


def test_dce_drops_dead_nodes_but_keeps_the_interface():
    g = ag.Graph("b")
    x = g.input("x", (3,))
    unused = g.param("unused", (3,))
    ag.exp(x * unused)                       # dead
    g.output("y", x + 1.0)
    after = eliminate_dead_code(g)
    assert after.op_counts() == {"input": 1, "param": 1, "const": 1, "add": 1}
    assert "unused" in after.params


def test_passes_never_mutate_their_input():
    g = ag.Graph("b")
    x = g.input("x", (3,))
    g.output("y", (x / 2.0).T.T)
    snapshot = g.summary()
    ag.compile(g, backend="numpy", optimize=True)
    assert g.summary() == snapshot


def test_pipeline_verifies_and_keeps_numbers_on_a_mixed_graph(rng):
    g = ag.Graph("mixed")
    x = g.input("x", ("B", 4, 8))
    w = g.param("w", (8, 8))
    c = g.const("c", rng.standard_normal((8,)).astype(np.float32))
    h = ag.gelu((x @ w) / 2.0 + ag.exp(c * 0.0)) * ag.sigmoid(x)
    g.output("y", ag.layernorm(h.transpose(0, 2, 1).transpose(0, 2, 1) + x))
    exe = ag.compile(g, backend="numpy", optimize=True, debug=True)
    feeds = {"x": rng.standard_normal((2, 4, 8)).astype(np.float32)}
    np.testing.assert_allclose(exe.run(feeds)["y"], ag.compile(g).run(feeds)["y"], rtol=1e-5, atol=1e-5)
