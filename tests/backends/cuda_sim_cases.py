"""The CUDA kernels and the CUDA backend against the numpy reference, at tiny shapes.

Runs on a real GPU as it is, or on the numba-cuda simulator: ``test_cuda_backend.py``
starts ``pytest tests/backends/cuda_sim_cases.py`` in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` (it must be set before numba is imported, so never in the main
test process). Shapes are chosen so that no size is a multiple of a tile: the kernel tests
force the simulator's small tiles (tens of threads per block) on a GPU as well, so every
boundary path runs in both places.
"""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

import attngraph as ag  # noqa: E402
from attngraph.backends.numba_cuda import kernels as K  # noqa: E402
from attngraph.errors import BackendError  # noqa: E402
from attngraph.ir import get_op  # noqa: E402

attention_module = importlib.import_module("attngraph.ops.attention")
SIM = K.SIMULATOR
TILES = K.SIM_TILES          # small tiles everywhere: many blocks, ragged edges
if SIM:
    sys.setswitchinterval(5e-4)    # the simulator's block manager polls its threads: switch often


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(got, want, tol=2e-5):
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want.astype(got.dtype), rtol=tol, atol=tol)


def run_launches(arena, launches):
    arena.finalize()
    for launch in launches:
        launch.bind()()
    cuda.synchronize()


# ----------------------------------------------------------------------------------------
# sgemm
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sa, sb", [((13, 11), (11, 9)),            # ragged tiles
                                    ((2, 1, 5, 7), (3, 7, 6)),      # broadcast batch dims
                                    ((2, 5, 7), (7, 6)),            # batch folded into the rows
                                    ((7,), (2, 7, 5)),              # vector @ matrix
                                    ((2, 5, 7), (7,))])             # matrix @ vector
def test_sgemm_matches_numpy(rng, sa, sb):
    a, b = f32(rng, *sa), f32(rng, *sb)
    close(K.sgemm(a, b, tiles=TILES), a @ b)


def test_sgemm_transposed_operands_by_strides(rng):
    a, b = f32(rng, 9, 13), f32(rng, 3, 10, 9)      # stored transposed: use aᵀ and bᵀ
    arena = K.Arena()
    ra, rb = arena.upload(a), arena.upload(b)
    out = arena.tensor((3, 13, 10), np.float32)
    run_launches(arena, K.prepare_matmul(out, ra.permuted((1, 0)), rb.permuted((0, 2, 1)), arena, tiles=TILES))
    close(out.read(), a.T @ np.swapaxes(b, 1, 2))


# ----------------------------------------------------------------------------------------
# row kernels
# ----------------------------------------------------------------------------------------

def test_softmax_rows_with_inf(rng):
    x = f32(rng, 5, 13)
    x[1] = -np.inf                 # fully masked row: zeros
    x[2, 4:] = -np.inf             # partly masked
    got = K.softmax(x, tiles=TILES)
    close(got, get_op("softmax").reference(x, axis=-1))
    assert np.all(got[1] == 0)


def test_softmax_middle_axis_and_log_softmax(rng):
    x = f32(rng, 3, 5, 4)
    close(K.softmax(x, axis=1, tiles=TILES), get_op("softmax").reference(x, axis=1))
    x[0, 2] = -np.inf
    got = K.softmax(x, log=True, tiles=TILES)
    want = get_op("log_softmax").reference(x, axis=-1)
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    close(np.where(np.isinf(want), 0, got), np.where(np.isinf(want), 0, want))


def test_layernorm(rng):
    x, g, b = f32(rng, 7, 13) * 3 + 1, f32(rng, 13), f32(rng, 13)
    ln = get_op("layernorm").reference
    close(K.layernorm(x, g, b, tiles=TILES), ln(x, g, b, eps=1e-5, has_gamma=True, has_beta=True))
    close(K.layernorm(x, tiles=TILES), ln(x, eps=1e-5, has_gamma=False, has_beta=False))


def test_residual_layernorm_broadcast_operand(rng):
    a, b, g = f32(rng, 2, 3, 13), f32(rng, 13), f32(rng, 13)
    total, normed = K.residual_layernorm(a, b, g, None, 1e-6, tiles=TILES)
    want = get_op("residual_layernorm").reference(a, b, g, eps=1e-6, has_gamma=True, has_beta=False)
    close(total, want[0])
    close(normed, want[1])


@pytest.mark.parametrize("axis, mode", [(-1, "sum"), (1, "max"), ((0, 2), "mean"), (None, "sum")])
def test_reductions(rng, axis, mode):
    x = f32(rng, 3, 5, 6)
    want = {"sum": np.sum, "mean": np.mean, "max": np.max}[mode](x, axis=axis)
    close(K.row_reduce(x, axis, mode, tiles=TILES), want)


# ----------------------------------------------------------------------------------------
# elementwise and gather
# ----------------------------------------------------------------------------------------

GELU = ("mul", (), ("mul", (), ("add", (), ("in", 0), ("in", 1)), ("const", 0.5, "float32")),
        ("add", (), ("erf", (), ("mul", (), ("add", (), ("in", 0), ("in", 1)), ("const", 1 / math.sqrt(2), "float32"))),
         ("const", 1.0, "float32")))


@pytest.mark.parametrize("label", ["bias+gelu", "where on int compare", "mask -inf", "cast to int", "tanh gelu"])
def test_elementwise_regions(rng, label):
    from attngraph.ops.fused import evaluate_expression

    x = f32(rng, 3, 5)
    cases = {
        "bias+gelu": (GELU, [x, f32(rng, 5)]),
        "where on int compare": (("where", (), ("greater", (), ("in", 0), ("const", 0, "int64")), ("in", 1),
                                  ("neg", (), ("in", 1))), [rng.integers(-3, 3, (3, 5)), f32(rng, 5)]),
        "mask -inf": (("mask", (("value", -math.inf),), ("sigmoid", (), ("in", 0)), ("in", 1)),
                      [x, rng.random((3, 1)) > 0.5]),
        "cast to int": (("cast", (("dtype", ag.DType.int32),), ("mul", (), ("in", 0), ("const", 10.0, "float32"))),
                        [x]),
        "tanh gelu": (("gelu", (("approximate", "tanh"),), ("in", 0)), [x]),
    }
    expr, inputs = cases[label]
    got = K.elementwise(expr, *inputs, tiles=TILES)
    want = evaluate_expression(expr, inputs)
    assert got.dtype == want.dtype
    close(got, want) if got.dtype.kind == "f" else np.testing.assert_array_equal(got, want)


def test_strided_copy_of_a_transposed_view(rng):
    x = f32(rng, 4, 3, 5)
    arena = K.Arena()
    rx = arena.upload(x)
    out = arena.tensor((5, 4, 3), np.float32)
    run_launches(arena, K.prepare_copy(out, rx.permuted((2, 0, 1)), tiles=TILES))
    close(out.read(), x.transpose(2, 0, 1))


def test_gather(rng):
    table, ids = f32(rng, 10, 4), rng.integers(-10, 10, (2, 3))
    close(K.gather(table, ids, tiles=TILES), np.take(table, ids, axis=0))
    x, idx = f32(rng, 3, 5, 2), np.array([4, -1, 0], np.int32)
    close(K.gather(x, idx, axis=1, tiles=TILES), np.take(x, idx, axis=1))


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------

def attention_reference(q, k, v, *, scale, causal=False, bias=None, mask=None):
    extra = [x for x in (bias, mask) if x is not None]
    return get_op("attention").reference(q, k, v, *extra, scale=scale, causal=causal, has_bias=bias is not None,
                                         has_mask=mask is not None)


def attention_grads(q, k, v, dout, *, scale, causal=False, bias=None, mask=None):
    """float64 gradients from the full softmax (fully masked rows: zero gradients)."""
    extra = [x for x in (bias, mask) if x is not None]
    s = attention_module.reference_scores(q.astype(np.float64), k.astype(np.float64), *extra, scale=scale,
                                          causal=causal, has_bias=bias is not None, has_mask=mask is not None)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isneginf(m), 0, m))
    z = e.sum(-1, keepdims=True)
    p = e / np.where(z == 0, 1, z)
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return ds @ k * scale, np.swapaxes(ds, -1, -2) @ q * scale, np.swapaxes(p, -1, -2) @ dout


def padding_mask(rng, batch, tk):
    mask = rng.random((batch, 1, 1, tk)) > 0.6
    mask[-1] = True            # the last sequence is all padding: its rows are fully masked
    return mask


@pytest.mark.parametrize("case", ["plain", "causal", "causal Tq>Tk", "bias", "padding mask", "all"])
def test_attention_forward(rng, case):
    tq, tk = (11, 9) if case != "causal Tq>Tk" else (13, 6)
    q, k, v = f32(rng, 2, 2, tq, 8), f32(rng, 2, 2, tk, 8), f32(rng, 2, 2, tk, 6)
    kw = {}
    if case.startswith("causal") or case == "all":
        kw["causal"] = True
    if case in ("bias", "all"):
        kw["bias"] = f32(rng, 1, 2, tq, tk)
    if case in ("padding mask", "all"):
        kw["mask"] = padding_mask(rng, 2, tk)
    got, lse = K.attention_forward(q, k, v, scale=0.3, return_lse=True, tiles=TILES, **kw)
    close(got, attention_reference(q, k, v, scale=0.3, **kw))
    if "mask" in kw:
        assert np.all(got[1] == 0) and np.all(np.isneginf(lse[1]))


def test_attention_forward_broadcast_and_strided_operands(rng):
    # q arrives as a transposed view (heads split by reshape + transpose); k, v are shared by the heads
    x = f32(rng, 2, 7, 3, 4)                       # (B, T, H, D)
    k, v = f32(rng, 2, 1, 5, 4), f32(rng, 2, 1, 5, 4)
    arena = K.Arena()
    rq, rk, rv = arena.upload(x), arena.upload(k), arena.upload(v)
    out = arena.tensor((2, 3, 7, 4), np.float32)
    run_launches(arena, K.prepare_attention_forward(out, rq.permuted((0, 2, 1, 3)), rk, rv, None, None, scale=0.5,
                                                    causal=False, scratch=arena, tiles=TILES))
    close(out.read(), attention_reference(x.transpose(0, 2, 1, 3), k, v, scale=0.5))


@pytest.mark.parametrize("case", ["plain", "causal", "bias + padding mask"])
def test_attention_backward(rng, case):
    q, k, v = f32(rng, 2, 1, 7, 4), f32(rng, 2, 1, 6, 4), f32(rng, 2, 1, 6, 3)
    dout = f32(rng, 2, 1, 7, 3)
    kw = {"causal": case == "causal"}
    if case == "bias + padding mask":
        kw["bias"], kw["mask"] = f32(rng, 7, 6), padding_mask(rng, 2, 6)
    out, lse = K.attention_forward(q, k, v, scale=0.4, return_lse=True, tiles=TILES, **kw)
    grads = K.attention_backward(q, k, v, out, lse, dout, scale=0.4, tiles=TILES, **kw)
    for got, want in zip(grads, attention_grads(q, k, v, dout, scale=0.4, **kw)):
        assert np.isfinite(got).all()
        close(got, want, tol=1e-4)
    if "mask" in kw:
        assert np.all(grads[0][1] == 0)


def test_attention_grad_node_in_a_graph(rng):
    # ag.grad of an attention puts an attention_grad node in the graph; k and v are shared by the heads
    g = ag.Graph("attn_grad")
    q = g.input("q", (2, 2, 7, 4))
    k, v = g.input("k", (2, 1, 6, 4)), g.input("v", (2, 1, 6, 3))
    pad = g.input("pad", (2, 1, 1, 6), "bool")
    w = g.input("w", (2, 2, 7, 3))
    out = ag.attention(q, k, v, mask=pad, scale=0.4, causal=True)
    loss = ag.sum(out * w)
    for name, t in zip(("dq", "dk", "dv"), ag.grad(loss, [q, k, v])):
        g.output(name, t)
    exe, ref = both(g)
    assert any(n.op == "attention_grad" for n in exe.graph.nodes)
    feeds = {"q": f32(rng, 2, 2, 7, 4), "k": f32(rng, 2, 1, 6, 4), "v": f32(rng, 2, 1, 6, 3),
             "pad": padding_mask(rng, 2, 6), "w": f32(rng, 2, 2, 7, 3)}
    got, want = exe.run(feeds), ref.run(feeds)
    for name in want:
        assert np.isfinite(got[name]).all()
        close(got[name], want[name], tol=1e-4)


# ----------------------------------------------------------------------------------------
# every registry op the backend runs on the device, on the registry's own examples
# ----------------------------------------------------------------------------------------

def _device_examples():
    from attngraph.backends.numba_cuda.executable import _kernel_kind
    from attngraph.dsl import apply
    from attngraph.ir import all_ops

    params = []
    for op in all_ops():
        for i, ex in enumerate(op.examples(np.random.default_rng(0)) if op.examples else []):
            g = ag.Graph(f"one_{op.name}")
            handles = [g.input(f"in{j}", a.shape, a.dtype) for j, a in enumerate(ex.inputs)]
            apply(op.name, handles, graph=g, **ex.attrs)
            node = next(n for n in g.nodes if n.op == op.name)
            if _kernel_kind(node) is not None:
                params.append(pytest.param(op.name, ex, id=f"{op.name}-{ex.label or i}"))
    return params


@pytest.mark.parametrize("name, example", _device_examples())
def test_every_device_op_matches_numpy(name, example):
    from attngraph.dsl import apply

    g = ag.Graph(f"one_{name}")
    handles = [g.input(f"in{i}", a.shape, a.dtype) for i, a in enumerate(example.inputs)]
    out = apply(name, handles, graph=g, **dict(example.attrs))
    for i, t in enumerate(out if isinstance(out, tuple) else (out,)):
        g.output(f"out{i}", t)
    feeds = {f"in{i}": a for i, a in enumerate(example.inputs)}
    exe, ref = both(g, optimize=False)
    assert all(src.startswith("cuda:") or src == "view" for src in exe.kernel_sources.values())
    got, want = exe.run(feeds), ref.run(feeds)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
        if want[key].dtype.kind == "f":
            close(got[key], want[key], tol=1e-4 if want[key].dtype == np.float32 else 1e-9)
        else:
            np.testing.assert_array_equal(got[key], want[key])


# ----------------------------------------------------------------------------------------
# the backend: whole graphs
# ----------------------------------------------------------------------------------------

def attention_block(causal=False):
    """Self-attention from primitives (heads split by reshape + transpose, a key-padding mask),
    then a residual, a GELU and a layernorm."""
    g = ag.Graph("block")
    x = g.input("x", ("B", "T", 16))
    pad = g.input("pad", ("B", "T"), "bool")
    B, T = x.shape[0], x.shape[1]
    wqkv = g.param("wqkv", (48, 16))
    bqkv = g.param("bqkv", (48,), init="zeros")
    q, k, v = (t.reshape(B, T, 2, 8).transpose(0, 2, 1, 3) for t in ag.split(x @ wqkv.T + bqkv, 3, axis=-1))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(8)
    s = ag.mask(s, pad.reshape(B, 1, 1, T), -math.inf)
    if causal:
        s = ag.mask(s, ag.causal_mask(g, T), -math.inf)
    y = (ag.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, 16)
    gamma, beta = g.param("gamma", (16,), init="ones"), g.param("beta", (16,), init="zeros")
    y = ag.layernorm(x + ag.gelu(y), gamma, beta)
    g.output("y", y)
    g.output("pooled", ag.mean(y, axis=1))
    return g


def both(graph, **options):
    exe = ag.compile(graph, backend="cuda", **options)
    ref = ag.compile(graph, backend="numpy")
    for name in ref.params:
        ref.params[name] = exe.params[name]
    return exe, ref


def feeds_for(rng, b, t):
    pad = rng.random((b, t)) > 0.7
    pad[-1] = True       # a fully padded sequence
    return {"x": f32(rng, b, t, 16), "pad": pad}


@pytest.mark.parametrize("causal", [False, True])
def test_attention_block_equals_numpy(rng, causal):
    exe, ref = both(attention_block(causal))
    assert "attention" in [n.op for n in exe.graph.nodes]            # the optimizer fused it
    assert exe.kernel_sources[next(n.label for n in exe.graph.nodes if n.op == "attention")] == "cuda:attention"
    for b, t in ((2, 5), (1, 7)):                                     # two sets of bindings, two plans
        feeds = feeds_for(rng, b, t)
        got, want = exe.run(feeds), ref.run(feeds)
        for name in want:
            close(got[name], want[name], tol=1e-4)
    assert exe.memory_plan(B=2, T=5).peak_bytes > 0
    assert exe.device_bytes(B=2, T=5) >= exe.memory_plan(B=2, T=5).peak_bytes


def test_runs_repeat_and_params_follow(rng):
    exe, ref = both(attention_block())
    feeds = feeds_for(rng, 2, 5)
    first = exe.run(feeds)
    again = exe.run(feeds)
    np.testing.assert_array_equal(first["y"], again["y"])
    assert first["y"] is not again["y"]                               # fresh arrays every run
    new_w = f32(rng, 48, 16)
    exe.params["wqkv"] = new_w
    ref.params["wqkv"] = new_w
    close(exe.run(feeds)["y"], ref.run(feeds)["y"], tol=1e-4)


def test_kernels_reused_at_other_shapes(rng):
    # the same SGEMM / softmax kernels launched with different grids in one run
    g = ag.Graph("mlp")
    x = g.input("x", ("B", 13))
    h = ag.relu(x @ g.param("w1", (13, 24)) + g.param("b1", (24,), init="zeros"))
    y = h @ g.param("w2", (24, 5))
    g.output("p", ag.softmax(y, axis=-1))
    g.output("q", ag.softmax(h, axis=-1))
    exe, ref = both(g)
    feeds = {"x": f32(rng, 11, 13)}
    got, want = exe.run(feeds), ref.run(feeds)
    for name in want:
        close(got[name], want[name])


def test_views_copies_and_outputs(rng):
    g = ag.Graph("shapes")
    x = g.input("x", (4, 6))
    w = g.param("w", (6, 3))
    g.output("t", x.T)                                                # a view output: materialized
    g.output("rev", x[::-1, 1::2])                                    # negative step slice
    g.output("cat", ag.concat([x, x * 2.0], axis=1))
    g.output("w", w)                                                  # a param as an output
    parts = ag.split(x, (2, 4), axis=1)
    g.output("flat", (parts[1] + 1.0).reshape(16))                    # a reshape of a strided view: a copy
    g.output("padded", ag.pad(x, ((1, 0), (0, 2)), 3.0))
    exe, ref = both(g, optimize=False)
    feeds = {"x": f32(rng, 4, 6)}
    got, want = exe.run(feeds), ref.run(feeds)
    for name in want:
        close(got[name], want[name])
        assert got[name].flags.c_contiguous


def test_patchify_and_embedding(rng):
    g = ag.Graph("vitish")
    images = g.input("images", ("B", 3, 8, 8))
    ids = g.input("ids", ("B", 5), "int64")
    table = g.param("table", (11, 12))
    g.output("patches", ag.patchify(images, 4))
    g.output("emb", ag.embedding(ids, table))
    exe, ref = both(g)
    feeds = {"images": f32(rng, 2, 3, 8, 8), "ids": rng.integers(0, 11, (2, 5))}
    got, want = exe.run(feeds), ref.run(feeds)
    for name in want:
        close(got[name], want[name])


def test_an_op_without_a_kernel_is_a_clear_error(rng):
    g = ag.Graph("conv")
    x = g.input("x", (1, 2, 5, 5))
    w = g.param("w", (3, 2, 3, 3))
    g.output("y", ag.conv2d(x, w))            # the line the error must point at
    with pytest.raises(BackendError) as info:
        ag.compile(g, backend="cuda")
    text = str(info.value)
    assert "conv2d" in text and "cuda_sim_cases.py" in text and "host_fallback" in text
    exe, ref = both(g, host_fallback=True)
    assert exe.kernel_sources[next(n.label for n in exe.graph.nodes if n.op == "conv2d")] == "host"
    feeds = {"x": f32(rng, 1, 2, 5, 5)}
    close(exe.run(feeds)["y"], ref.run(feeds)["y"])


def test_float64_matmul_is_refused():
    g = ag.Graph("f64")
    a = g.input("a", (3, 4), "float64")
    g.output("y", a @ g.param("w", (4, 2), dtype="float64"))
    with pytest.raises(BackendError, match="float32"):
        ag.compile(g, backend="cuda")
