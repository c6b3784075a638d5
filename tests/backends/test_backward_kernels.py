"""The fused backward kernels of the cpu backend (backward_kernels.py) against the unfused
gradient graph: the same fused op on the numpy backend, and the gradient autodiff builds from
the primitive decomposition (layernorm and cross-entropy written from mean / rsqrt /
log_softmax ...). Attention's backward is also checked against torch SDPA's autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph.dsl import apply
from attngraph.train import losses

torch = pytest.importorskip("torch")


def _run(g, feeds, backend):
    exe = ag.compile(g, backend=backend)
    return exe.run(feeds), exe


def _close(a, b, dtype, scale=1.0):
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(a, b, rtol=tol * 10, atol=tol * max(1.0, scale))


# -- layernorm ---------------------------------------------------------------------------------
def _layernorm_primitives(x, gamma, beta, eps):
    c = x - ag.mean(x, axis=-1, keepdims=True)
    y = c * apply("rsqrt", [ag.mean(c * c, axis=-1, keepdims=True) + eps])
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def _layernorm_graph(shape, dtype, affine, primitive):
    g = ag.Graph("ln")
    x = g.input("x", shape, dtype)
    r = g.input("r", shape, dtype)
    gamma = g.input("gamma", shape[-1:], dtype) if affine else None
    beta = g.input("beta", shape[-1:], dtype) if affine else None
    y = (_layernorm_primitives(x, gamma, beta, 1e-5) if primitive else ag.layernorm(x, gamma, beta, eps=1e-5))
    loss = ag.sum(y * r)
    wrt = [x] + ([gamma, beta] if affine else [])
    for name, d in zip(["dx", "dgamma", "dbeta"], ag.grad(loss, wrt)):
        g.output(name, d)
    return g


@pytest.mark.parametrize("shape, dtype, affine", [((4, 33, 96), np.float32, True), ((1000, 24), np.float32, True),
                                                  ((3, 7, 40), np.float64, False), ((1, 5), np.float32, True)])
def test_layernorm_grad_kernel_matches_the_unfused_gradient(shape, dtype, affine):
    rng = np.random.default_rng(0)
    feeds = {"x": (rng.standard_normal(shape) * 3 + 1).astype(dtype), "r": rng.standard_normal(shape).astype(dtype)}
    if affine:
        feeds.update(gamma=rng.standard_normal(shape[-1]).astype(dtype), beta=rng.standard_normal(shape[-1]).astype(dtype))
    fused = _layernorm_graph(shape, dtype, affine, primitive=False)
    assert "layernorm_grad" in [n.op for n in fused.nodes]
    got, exe = _run(fused, feeds, "cpu")
    assert exe.kernel_sources[next(k for k in exe.kernel_sources if "layernorm_grad" in k)] == "native"
    numpy_fused, _ = _run(fused, feeds, "numpy")
    primitive, _ = _run(_layernorm_graph(shape, dtype, affine, primitive=True), feeds, "numpy")
    for name in got:
        scale = np.abs(primitive[name]).max()
        _close(got[name], numpy_fused[name], dtype, scale)
        _close(got[name], primitive[name], dtype, scale)


# -- softmax cross-entropy ---------------------------------------------------------------------
def _ce_primitives(logits, targets, eps, ignore_index):
    """The decomposition cross_entropy used before the fused op: log_softmax, one-hot pick, masks."""
    log_p = ag.log_softmax(logits, axis=-1)
    loss = losses.nll_from_log_probs(log_p, targets)
    if eps:
        loss = loss * (1.0 - eps) - ag.mean(log_p, axis=-1) * eps
    if ignore_index is None:
        return ag.mean(loss)
    valid = (targets != ignore_index).astype(logits.dtype)
    return ag.sum(loss * valid) / ag.sum(valid)


def _ce_graph(shape, dtype, eps, ignore_index, primitive):
    g = ag.Graph("ce")
    x = g.input("x", shape, dtype)
    t = g.input("t", shape[:-1], "int64")
    loss = (_ce_primitives(x, t, eps, ignore_index) if primitive
            else losses.cross_entropy(x, t, label_smoothing=eps, ignore_index=ignore_index))
    g.output("loss", loss)
    g.output("dx", ag.grad(loss, x))
    return g


@pytest.mark.parametrize("shape, dtype, eps, ignore_index", [
    ((8, 16, 50), np.float32, 0.0, None), ((64, 10), np.float32, 0.1, -100), ((5, 7), np.float64, 0.2, 3),
    ((300, 1000), np.float32, 0.0, 0)])
def test_softmax_cross_entropy_kernels_match_the_unfused_gradient(shape, dtype, eps, ignore_index):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.integers(0, shape[-1], shape[:-1]).astype(np.int64)
    if ignore_index is not None:
        t.reshape(-1)[::3] = ignore_index
    feeds = {"x": x, "t": t}
    fused = _ce_graph(shape, dtype, eps, ignore_index, primitive=False)
    ops = [n.op for n in fused.nodes]
    assert "softmax_cross_entropy" in ops and "softmax_cross_entropy_grad" in ops and "log_softmax" not in ops
    got, exe = _run(fused, feeds, "cpu")
    assert {v for k, v in exe.kernel_sources.items() if "softmax_cross_entropy" in k} == {"native"}
    numpy_fused, _ = _run(fused, feeds, "numpy")
    primitive, _ = _run(_ce_graph(shape, dtype, eps, ignore_index, primitive=True), feeds, "numpy")
    for name in ("loss", "dx"):
        scale = np.abs(primitive[name]).max()
        _close(got[name], numpy_fused[name], dtype, scale)
        _close(got[name], primitive[name], dtype, scale)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x).reshape(-1, shape[-1]),
                                             torch.from_numpy(t).reshape(-1), label_smoothing=eps,
                                             ignore_index=-100 if ignore_index is None else ignore_index)
    _close(got["loss"], want.numpy(), dtype)


def test_softmax_cross_entropy_masked_and_ignored_rows_are_finite():
    """A row of −inf logits (a fully masked row) whose target is ignored gives loss 0, gradient 0."""
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    x[1] = -np.inf
    x[2, :3] = -np.inf
    t = np.array([0, -1, 4, 5])
    g = ag.Graph("ce_masked")
    xi, ti = g.input("x", x.shape), g.input("t", t.shape, "int64")
    loss = losses.cross_entropy(xi, ti, ignore_index=-1, reduction="sum")
    g.output("loss", loss)
    g.output("dx", ag.grad(loss, xi))
    for backend in ("numpy", "cpu"):
        out, _ = _run(g, {"x": x, "t": t}, backend)
        assert np.isfinite(out["loss"]) and np.isfinite(out["dx"]).all()
        assert np.all(out["dx"][1] == 0) and np.all(out["dx"][2, :3] == 0)
        xt = torch.tensor(x[[0, 2, 3]], requires_grad=True)
        want = torch.nn.functional.cross_entropy(xt, torch.tensor(t[[0, 2, 3]]), reduction="sum")
        want.backward()
        np.testing.assert_allclose(out["loss"], want.item(), rtol=1e-5)
        np.testing.assert_allclose(out["dx"][[0, 2, 3]], xt.grad.numpy(), rtol=1e-5, atol=1e-6)


# -- attention ---------------------------------------------------------------------------------
def _masks(kind, B, H, T, rng):
    if kind == "padding":                                   # key padding, (B, 1, 1, T), True = padded
        lengths = rng.integers(1, T + 1, B)
        lengths[0] = T // 3
        return np.arange(T)[None, None, None, :] >= lengths[:, None, None, None]
    if kind == "fully masked rows":                         # some query rows see no key
        m = rng.random((B, H, T, T)) < 0.3
        m[:, :, ::5, :] = True
        return m
    return None


ATTENTION_CASES = [((2, 3, 40, 16), False, None), ((2, 3, 40, 16), True, None), ((3, 2, 70, 32), False, "padding"),
                   ((3, 2, 70, 32), True, "padding"), ((2, 2, 33, 8), False, "fully masked rows"),
                   ((1, 2, 150, 64), True, "fully masked rows")]


@pytest.mark.parametrize("shape, causal, mask_kind", ATTENTION_CASES)
def test_attention_grad_kernel_matches_the_reference_and_torch_sdpa(shape, causal, mask_kind):
    B, H, T, D = shape
    rng = np.random.default_rng(3)
    q, k, v, do = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    mask = _masks(mask_kind, B, H, T, rng)
    extra = [mask] if mask is not None else []
    attrs = {"scale": 1 / math.sqrt(D), "causal": causal, "has_bias": False, "has_mask": mask is not None}
    g = ag.Graph("attention_grad")
    handles = [g.input(n, a.shape, a.dtype) for n, a in zip("qkvmg", [q, k, v] + extra + [do])]
    for name, t in zip(("dq", "dk", "dv"), apply("attention_grad", handles, graph=g, **attrs)):
        g.output(name, t)
    feeds = {h.node.name: a for h, a in zip(handles, [q, k, v] + extra + [do])}
    got, exe = _run(g, feeds, "cpu")
    assert set(exe.kernel_sources.values()) == {"native"}
    ref, _ = _run(g, feeds, "numpy")
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    allowed = None
    if mask is not None or causal:
        full = np.broadcast_to(mask if mask is not None else False, (B, H, T, T))
        if causal:
            full = full | np.triu(np.ones((T, T), bool), 1)
        allowed = torch.from_numpy(~full)
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed)
    out = torch.nan_to_num(out, nan=0.0)                      # torch: NaN rows where nothing is allowed
    out.backward(torch.from_numpy(do))
    for name, t in zip(("dq", "dk", "dv"), (qt, kt, vt)):
        assert np.isfinite(got[name]).all()
        scale = np.abs(ref[name]).max()
        _close(got[name], ref[name], np.float32, scale)
        want = torch.nan_to_num(t.grad, nan=0.0).numpy()
        np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-4 * max(1.0, scale))
    if mask_kind == "fully masked rows":
        dead = np.broadcast_to(mask, (B, H, T, T)).all(-1)
        assert np.all(got["dq"][dead] == 0)


def test_attention_grad_kernel_broadcasts_batch_dims_bias_and_mask():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 4, 24, 8)).astype(np.float32)
    k = rng.standard_normal((1, 4, 30, 8)).astype(np.float32)      # shared over the batch
    v = rng.standard_normal((2, 1, 30, 8)).astype(np.float32)      # shared over the heads
    bias = rng.standard_normal((4, 24, 30)).astype(np.float32)
    mask = rng.random((2, 1, 1, 30)) < 0.2
    do = rng.standard_normal((2, 4, 24, 8)).astype(np.float32)
    attrs = {"scale": 0.3, "causal": True, "has_bias": True, "has_mask": True}
    arrays = [q, k, v, bias, mask, do]
    g = ag.Graph("attention_grad_bcast")
    handles = [g.input(f"i{i}", a.shape, a.dtype) for i, a in enumerate(arrays)]
    for name, t in zip(("dq", "dk", "dv"), apply("attention_grad", handles, graph=g, **attrs)):
        g.output(name, t)
    feeds = {f"i{i}": a for i, a in enumerate(arrays)}
    got, _ = _run(g, feeds, "cpu")
    ref, _ = _run(g, feeds, "numpy")
    for name in ref:
        assert got[name].shape == ref[name].shape
        _close(got[name], ref[name], np.float32, np.abs(ref[name]).max())


def test_attention_from_primitives_trains_with_the_native_backward():
    """An attention written from primitives: ag.grad emits attention_grad, cpu runs it natively and
    agrees with the numpy backend running the unfused graph."""
    rng = np.random.default_rng(5)
    B, H, T, D = 2, 2, 48, 16
    g = ag.Graph("attn")
    q, k, v = (g.input(n, (B, H, T, D)) for n in "qkv")
    w = g.param("w", (D, D), init=rng.standard_normal((D, D)).astype(np.float32) * 0.3)
    s = (q @ w) @ k.transpose(0, 1, 3, 2) / math.sqrt(D)
    s = ag.mask(s, ag.causal_mask(g, T))
    y = ag.softmax(s, axis=-1) @ v
    loss = ag.mean(y * y)
    g.output("loss", loss)
    for name, d in zip(("dw", "dk", "dv"), ag.grad(loss, [w, k, v])):
        g.output(name, d)
    assert "attention_grad" in [n.op for n in g.nodes]
    feeds = {n: rng.standard_normal((B, H, T, D)).astype(np.float32) for n in "qkv"}
    got, exe = _run(g, feeds, "cpu")
    assert "attention" in [n.op for n in exe.graph.nodes]
    assert any(v == "native" for k_, v in exe.kernel_sources.items() if "attention_grad" in k_)
    ref = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    for name in ref:
        _close(got[name], ref[name], np.float32, np.abs(ref[name]).max())


def test_the_training_suites_attention_rows_run_and_agree_with_torch():
    from attngraph.benchmarks.training import attention_backward_rows

    table, raw = attention_backward_rows(repeats=1, shapes=[((1, 2, 40, 16), True)])
    assert "torch SDPA bwd ms" in table and raw[0]["max_abs_err"] < 1e-4
    assert set(raw[0]["ms"]) == {"attngraph", "kernel", "torch"}
