"""The Numba CPU backend against the numpy oracle: every registry op, whole graphs with a
fused attention node, symbolic shapes, buffer reuse across runs and output safety."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import attngraph as ag
from attngraph.dsl import apply
from attngraph.ir import all_ops, get_op
from attngraph.ir import opdef as opdef_module

OPS = all_ops()
EXAMPLES = [pytest.param(op.name, ex, id=f"{op.name}-{ex.label or i}")
            for op in OPS for i, ex in enumerate(op.examples(np.random.default_rng(0)) if op.examples else [])]


def one_op_graph(name, inputs, attrs):
    g = ag.Graph(f"one_{name}")
    handles = [g.input(f"in{i}", a.shape, a.dtype) for i, a in enumerate(inputs)]
    out = apply(name, handles, graph=g, **attrs)
    for i, t in enumerate(out if isinstance(out, tuple) else (out,)):
        g.output(f"out{i}", t)
    return g, {f"in{i}": a for i, a in enumerate(inputs)}


def assert_close(got, want, tol32=1e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == np.float32:
        np.testing.assert_allclose(got, want, rtol=tol32, atol=tol32 / 10)
    elif got.dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_array_equal(got, want)


def run_both(graph, feeds, **cpu_options):
    cpu = ag.compile(graph, backend="cpu", **cpu_options)
    ref = ag.compile(graph, backend="numpy")
    for name in ref.params:
        ref.params[name] = cpu.params[name]
    return cpu, cpu.run(feeds), ref.run(feeds)


@pytest.mark.parametrize("name, example", EXAMPLES)
def test_every_op_matches_the_numpy_backend(name, example):
    # optimize=False: the op node itself runs through the executor (no folding of creation ops).
    graph, feeds = one_op_graph(name, list(example.inputs), dict(example.attrs))
    _, got, want = run_both(graph, feeds, optimize=False)
    assert sorted(got) == sorted(want)
    for key in want:
        assert_close(got[key], want[key])


def test_kernel_choice():
    g = ag.Graph("choice")
    x = g.input("x", (4, 8))
    w = g.param("w", (8, 8))
    h = ag.layernorm(ag.softmax(x @ w, axis=-1))
    h = ag.softmax(h, axis=0) + ag.sum(h, axis=-1, keepdims=True)
    g.output("y", h.reshape(32))
    exe = ag.compile(g, backend="cpu", optimize=False)
    by_op = {}
    for node in exe.graph.nodes:
        if node.label in exe.kernel_sources:
            by_op.setdefault(node.op, set()).add((node.attrs.get("axis"), exe.kernel_sources[node.label]))
    assert by_op["matmul"] == {(None, "native")}
    assert by_op["layernorm"] == {(None, "native")}
    assert by_op["softmax"] == {(1, "native"), (0, "reference")}   # only the last axis is native
    assert by_op["sum"] == {((1,), "native")}
    assert by_op["add"] == {(None, "reference")}
    assert by_op["reshape"] == {(None, "view")}


def attention_block(d=32, heads=4):
    """Pre-norm causal self-attention with key padding, from primitives (B, T symbolic)."""
    g = ag.Graph("attention_block")
    x = g.input("x", ("B", "T", d))
    pad = g.input("pad", ("B", 1, 1, "T"), "bool")
    B, T = x.shape[0], x.shape[1]
    wq, wk, wv, wo = (g.param(n, (d, d)) for n in ("wq", "wk", "wv", "wo"))

    def split_heads(t):
        return t.reshape(B, T, heads, d // heads).transpose(0, 2, 1, 3)     # (B, H, T, Dh)

    h = ag.layernorm(x)
    q, k, v = split_heads(h @ wq), split_heads(h @ wk), split_heads(h @ wv)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)                 # (B, H, T, T)
    s = ag.mask(ag.mask(s, pad), ag.causal_mask(g, T))
    y = (ag.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, d)  # (B, T, d)
    g.output("y", y @ wo + x)
    return g


def block_feeds(rng, b, t, d=32):
    pad = rng.random((b, 1, 1, t)) > 0.7
    pad[-1] = True                                       # one sequence fully padded: zero rows
    return {"x": rng.standard_normal((b, t, d)).astype(np.float32), "pad": pad}


def test_attention_block_runs_fused_and_matches_numpy(rng):
    g = attention_block()
    feeds = block_feeds(rng, 2, 9)
    exe, got, want = run_both(g, feeds)
    assert exe.graph.op_counts().get("attention") == 1
    assert "softmax" not in exe.graph.op_counts()
    fused = [n for n in exe.graph.nodes if n.op == "attention"]
    assert exe.kernel_sources[fused[0].label] == "native"
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_q, batch_kv, bias_shape, mask_shape", [
    ((), (), (7, 5), None),                        # rank 2
    ((3,), (3,), None, (3, 7, 5)),                 # rank 3
    ((2, 1, 3), (1, 2, 3), (1, 3, 1, 5), (2, 1, 1, 7, 5)),   # rank 5, broadcast batch dims
])
def test_attention_of_any_batch_rank(rng, batch_q, batch_kv, bias_shape, mask_shape):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    g = ag.Graph("sdpa")
    q = g.input("q", batch_q + (7, 4))
    k = g.input("k", batch_kv + (5, 4))
    v = g.input("v", batch_kv + (5, 6))
    feeds = {"q": f(*batch_q, 7, 4), "k": f(*batch_kv, 5, 4), "v": f(*batch_kv, 5, 6)}
    bias = mask = None
    if bias_shape:
        bias = g.input("bias", bias_shape)
        feeds["bias"] = f(*bias_shape)
    if mask_shape:
        mask = g.input("mask", mask_shape, "bool")
        feeds["mask"] = rng.random(mask_shape) > 0.6
    g.output("o", ag.attention(q, k, v, bias=bias, mask=mask, causal=True))
    _, got, want = run_both(g, feeds)
    np.testing.assert_allclose(got["o"], want["o"], rtol=1e-5, atol=1e-5)


def test_symbolic_shapes_with_two_bindings(rng):
    exe = ag.compile(attention_block(), backend="cpu")
    ref = ag.compile(attention_block(), backend="numpy")
    for name in ref.params:
        ref.params[name] = exe.params[name]
    for b, t in [(2, 9), (3, 17)]:
        feeds = block_feeds(rng, b, t)
        got = exe.run(feeds)["y"]
        assert got.shape == (b, t, 32)
        np.testing.assert_allclose(got, ref.run(feeds)["y"], rtol=1e-5, atol=1e-5)
    small, big = exe.memory_plan(B=2, T=9), exe.memory_plan(B=3, T=17)
    assert small is exe.memory_plan(T=9, B=2)                        # cached by bindings
    assert small.peak_bytes < big.peak_bytes


def chain_graph():
    g = ag.Graph("chain")
    x = g.input("x", ("N", 64))
    w = g.param("w", (64, 64))
    h = x
    for _ in range(4):
        h = ag.layernorm(h @ w)
    g.output("y", h)
    g.output("flat", h.reshape(-1))       # a view of an output: returned, not clobbered
    g.output("t", h.T)                    # a strided view: materialized
    g.output("x_again", x)                # a feed: copied out
    return g


def test_repeated_runs_are_identical_and_reuse_buffers(rng):
    exe = ag.compile(chain_graph(), backend="cpu")
    x = rng.standard_normal((16, 64)).astype(np.float32)
    first = exe.run({"x": x})
    program = exe._programs[(("N", 16),)]
    buffers = [id(b) for b in program.buffers]
    second = exe.run({"x": x})
    assert [id(b) for b in program.buffers] == buffers            # the same arrays, reused
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        assert first[key] is not second[key]
    # a warm run allocates its outputs and little else
    plan = exe.memory_plan(N=16)
    assert exe.measure_peak({"x": x}, cold=False) < plan.output_bytes + 16 * 1024


def test_outputs_are_never_clobbered_by_a_later_run(rng):
    exe = ag.compile(chain_graph(), backend="cpu")
    x1, x2 = (rng.standard_normal((16, 64)).astype(np.float32) for _ in range(2))
    held = exe.run({"x": x1})
    saved = {k: v.copy() for k, v in held.items()}
    exe.run({"x": x2})
    exe.run({"x": x2 * 2})
    for key in held:
        np.testing.assert_array_equal(held[key], saved[key])
        assert held[key].flags.c_contiguous and held[key].flags.writeable
    assert not np.shares_memory(held["x_again"], x1)
    np.testing.assert_array_equal(held["flat"], held["y"].reshape(-1))
    np.testing.assert_array_equal(held["t"], held["y"].T)


def test_fully_masked_softmax_row_gives_zeros():
    g = ag.Graph("masked")
    x = g.input("x", (3, 5), "float64")
    g.output("p", ag.softmax(x, axis=-1))
    g.output("p32", ag.softmax(ag.cast(x, "float32"), axis=-1))
    exe = ag.compile(g, backend="cpu")
    data = np.arange(15, dtype=np.float64).reshape(3, 5)
    data[1] = -np.inf
    data[2, 3:] = -np.inf
    out = exe.run({"x": data})
    for key in ("p", "p32"):
        assert not np.isnan(out[key]).any()
        np.testing.assert_array_equal(out[key][1], 0)
        np.testing.assert_array_equal(out[key][2, 3:], 0)
        np.testing.assert_allclose(out[key].sum(-1), [1, 0, 1], rtol=1e-6)


def test_strided_and_read_only_feeds(rng):
    g = ag.Graph("feeds")
    x = g.input("x", (6, 8))
    g.output("y", ag.layernorm(x).reshape(48))
    g.output("s", ag.max(ag.softmax(x, axis=-1), axis=-1))
    base = rng.standard_normal((8, 6)).astype(np.float32)
    ro = np.ascontiguousarray(base.T)
    ro.flags.writeable = False
    for feed in (base.T, ro):
        _, got, want = run_both(g, {"x": feed})
        for key in want:
            assert_close(got[key], want[key])


def test_reshape_of_a_strided_value_copies_into_its_buffer(rng):
    g = ag.Graph("strided")
    x = g.input("x", (4, 6))
    y = (x @ g.param("w", (6, 6))).T.reshape(2, 12)      # transpose → reshape cannot be a view
    g.output("y", ag.softmax(y, axis=-1))
    exe, got, want = run_both(g, {"x": rng.standard_normal((4, 6)).astype(np.float32)})
    reshape = next(n for n in exe.graph.nodes if n.op == "reshape")
    assert exe.memory_plan().placement(reshape.out).kind == "owned"
    assert_close(got["y"], want["y"])


def test_an_ops_own_cpu_builder_wins(monkeypatch, rng):
    calls = []

    def build(node):
        def kernel(inputs, outs, bindings):
            calls.append(dict(bindings))
            np.maximum(inputs[0], 0, out=outs[0])
        return kernel

    op = get_op("relu")
    monkeypatch.setitem(opdef_module._REGISTRY, "relu", dataclasses.replace(op, cpu=build))
    g = ag.Graph("own")
    x = g.input("x", ("N", 3))
    g.output("y", ag.relu(x))
    exe = ag.compile(g, backend="cpu")
    assert set(exe.kernel_sources.values()) == {"op.cpu"}
    data = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(exe.run({"x": data})["y"], np.maximum(data, 0))
    assert calls == [{"N": 5}]
