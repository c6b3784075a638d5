"""Tests for the flash-style Numba CPU attention kernels (forward + backward).

Oracle: the numpy reference below (float64), plus torch.nn.functional.scaled_dot_product_attention
(forward and autograd backward) when torch is installed, plus finite differences.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba")


def _load_kernels():
    try:
        from attngraph.backends.numba_cpu import attention_kernels as mod
        return mod
    except Exception:  # package __init__ broken/in flux: load the file on its own
        path = (pathlib.Path(__file__).resolve().parents[2] / "attngraph" / "backends"
                / "numba_cpu" / "attention_kernels.py")
        # the canonical name: numba's disk cache pickles the module name of each entry
        name = "attngraph.backends.numba_cpu.attention_kernels"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod


ak = _load_kernels()
attention_forward = ak.attention_forward
attention_backward = ak.attention_backward

TOL = {np.float64: 1e-10, np.float32: 1e-5}


# ----------------------------------------------------------------------------------------
# numpy reference (the pinned contract)
# ----------------------------------------------------------------------------------------


def ref_attention(q, k, v, dout=None, *, scale=None, causal=False, bias=None, mask=None):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = (q @ k.swapaxes(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    s = np.array(np.broadcast_to(s, (B, H, Tq, Tk)))
    if mask is not None:
        s[np.broadcast_to(mask, s.shape)] = -np.inf
    if causal:
        s[..., np.triu(np.ones((Tq, Tk), dtype=bool), 1)] = -np.inf
    m = s.max(-1, keepdims=True)
    m = np.where(m == -np.inf, 0, m)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    p = e / np.where(z == 0, 1, z)
    out = p @ v
    with np.errstate(divide="ignore"):
        lse = np.log(z[..., 0]) + m[..., 0]
    if dout is None:
        return out, lse
    do = np.asarray(dout, dtype=np.float64)
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return out, lse, scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q, dv


def _rand(rng, shape, dt):
    return rng.standard_normal(shape).astype(dt)


def _close(a, b, dt, what):
    tol = TOL[dt]
    b = np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    err = float(np.max(np.abs(a.astype(np.float64) - b))) if b.size else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol * scale:.1e}"


def _check(q, k, v, dt, *, fwd_kw=None, blocks=None, **kw):
    rng = np.random.default_rng(123)
    B, H, Tq, _ = q.shape
    dout = _rand(rng, (B, H, Tq, v.shape[3]), dt)
    blocks = blocks or {}
    out, lse = ak._forward(q, k, v, return_lse=True, **kw, **blocks)
    assert out.dtype == dt and lse.dtype == dt
    assert out.shape == (B, H, Tq, v.shape[3]) and lse.shape == (B, H, Tq)
    dq, dk, dv = ak._backward(q, k, v, out, lse, dout, **kw, **blocks)
    r_out, r_lse, r_dq, r_dk, r_dv = ref_attention(q, k, v, dout, **kw)
    _close(out, r_out, dt, "out")
    fin = np.isfinite(r_lse)
    assert np.array_equal(np.isfinite(lse), fin), "lse finiteness differs"
    assert np.all(lse[~fin] == -np.inf)
    _close(lse[fin], r_lse[fin], dt, "lse")
    for g, r, n in ((dq, r_dq, "dq"), (dk, r_dk, "dk"), (dv, r_dv, "dv")):
        assert g.shape == r.shape and g.dtype == dt
        assert np.all(np.isfinite(g)), f"{n} not finite"
        _close(g, r, dt, n)
    return out, lse, dq, dk, dv


DTYPES = [np.float64, np.float32]

# (B, H, Tq, Tk, D, Dv): odd lengths (not multiples of any block), Tq != Tk, Dv != D,
# head dims that are and are not multiples of the vector width, both backward work splits
# (B*H = 6 -> whole heads per thread, B*H = 3 -> per key block with 2 threads).
SHAPES = [
    (2, 3, 37, 53, 16, 24),
    (3, 1, 53, 37, 64, 64),
    (1, 2, 1, 7, 8, 5),
    (2, 1, 130, 70, 32, 64),
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_against_reference(dt, shape, causal):
    B, H, Tq, Tk, D, Dv = shape
    rng = np.random.default_rng(0)
    q, k, v = _rand(rng, (B, H, Tq, D), dt), _rand(rng, (B, H, Tk, D), dt), _rand(rng, (B, H, Tk, Dv), dt)
    _check(q, k, v, dt, causal=causal)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("blocks", [dict(block_q=8, block_k=12), dict(block_q=5, block_k=3),
                                    dict(block_q=64, block_k=9)])
def test_small_blocks_online_softmax(dt, blocks):
    """Many key blocks per query block: exercises the running max / rescaling and the
    causal block skipping with lengths that are not multiples of the block sizes."""
    rng = np.random.default_rng(1)
    B, H, Tq, Tk, D, Dv = 2, 3, 37, 53, 16, 24
    q, k, v = _rand(rng, (B, H, Tq, D), dt), _rand(rng, (B, H, Tk, D), dt), _rand(rng, (B, H, Tk, Dv), dt)
    q[0, 0] *= 6.0  # large score range -> the running max changes across blocks
    bias = _rand(rng, (1, 1, Tq, Tk), dt)
    for causal in (False, True):
        _check(q, k, v, dt, causal=causal, blocks=blocks)
        _check(q, k, v, dt, causal=causal, bias=bias, blocks=blocks)


@pytest.mark.parametrize("dt", DTYPES)
def test_bias_broadcasts_and_mask(dt):
    rng = np.random.default_rng(2)
    B, H, Tq, Tk, D, Dv = 2, 3, 37, 53, 16, 16
    q, k, v = _rand(rng, (B, H, Tq, D), dt), _rand(rng, (B, H, Tk, D), dt), _rand(rng, (B, H, Tk, Dv), dt)
    full_bias = _rand(rng, (1, 1, Tq, Tk), dt)
    pad_bias = np.zeros((B, 1, 1, Tk), dt)
    pad_bias[0, ..., 40:] = -np.inf
    pad_bias[1, ..., 50:] = -np.inf
    head_bias = _rand(rng, (H, 1, Tk), dt)  # 3-D, broadcast from the right
    bool_mask = rng.random((B, H, Tq, Tk)) < 0.3
    key_mask = np.zeros((B, 1, 1, Tk), bool)
    key_mask[1, ..., :5] = True
    for kw in (dict(bias=full_bias), dict(bias=pad_bias), dict(bias=head_bias),
               dict(mask=bool_mask), dict(mask=key_mask), dict(mask=bool_mask, bias=full_bias),
               dict(mask=key_mask, bias=pad_bias, causal=True), dict(bias=full_bias, scale=0.37)):
        _check(q, k, v, dt, **kw)
    # a float64 bias with float32 inputs is cast, not rejected
    if dt == np.float32:
        _check(q, k, v, dt, bias=full_bias.astype(np.float64))


@pytest.mark.parametrize("dt", DTYPES)
def test_fully_masked_rows(dt):
    rng = np.random.default_rng(3)
    B, H, Tq, Tk, D, Dv = 2, 2, 37, 53, 16, 24
    q, k, v = _rand(rng, (B, H, Tq, D), dt), _rand(rng, (B, H, Tk, D), dt), _rand(rng, (B, H, Tk, Dv), dt)
    mask = rng.random((B, H, Tq, Tk)) < 0.2
    rows = [(0, 0, 0), (0, 1, 17), (1, 0, 36), (1, 1, 5)]
    for b, h, i in rows:
        mask[b, h, i, :] = True
    bias = np.zeros((B, 1, Tq, Tk), dt)
    bias[1, 0, 20, :] = -np.inf  # fully masked through an -inf bias row
    for blocks in ({}, dict(block_q=8, block_k=7)):
        out, lse, dq, dk, dv = _check(q, k, v, dt, mask=mask, bias=bias, blocks=blocks)
        for b, h, i in rows + [(1, 0, 20), (1, 1, 20)]:
            assert np.all(out[b, h, i] == 0)
            assert lse[b, h, i] == -np.inf
            assert np.all(dq[b, h, i] == 0)
    # everything masked: zeros everywhere, finite zero gradients
    allm = np.ones((1, 1, 1, 1), bool)
    out, lse = attention_forward(q, k, v, mask=allm, return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    grads = attention_backward(q, k, v, out, lse, np.ones_like(out), mask=allm)
    for g in grads:
        assert np.all(g == 0)
    # causal with Tq > Tk leaves no row empty; a bias of -inf on the only visible key does
    bias = np.zeros((1, 1, 1, Tk), dt)
    bias[..., 0] = -np.inf
    out, lse = attention_forward(q, k, v, causal=True, bias=bias, return_lse=True)
    assert np.all(out[:, :, 0] == 0) and np.all(lse[:, :, 0] == -np.inf)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("dt", DTYPES)
def test_very_negative_scores_with_partial_tiles(dt):
    """All scores far below the exp underflow threshold (~ -100 float32, -2000 float64):
    exp(s - m) underflows to 0 unless the running max ignores the zero padding rows/columns
    of partial tiles (Tk % 4 != 0, Tq % lanes != 0)."""
    rng = np.random.default_rng(9)
    B, H, Tq, Tk, D = 2, 1, 5, 7, 16
    a, scale, lim = (5.0, 0.25, -90) if dt == np.float32 else (8.0, 2.0, -1000)
    q = (a + 0.1 * rng.standard_normal((B, H, Tq, D))).astype(dt)
    k = (-a + 0.1 * rng.standard_normal((B, H, Tk, D))).astype(dt)
    v = _rand(rng, (B, H, Tk, 3), dt)
    for causal in (False, True):
        out, lse, *_ = _check(q, k, v, dt, causal=causal, scale=scale)
        assert np.all(lse < lim) and np.all(np.abs(out).sum(-1) > 0)


def test_empty_key_sequence_and_batch():
    q = np.ones((1, 2, 3, 4), np.float32)
    k = np.ones((1, 2, 0, 4), np.float32)
    v = np.ones((1, 2, 0, 5), np.float32)
    out, lse = attention_forward(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 3, 5) and np.all(out == 0) and np.all(lse == -np.inf)
    dq, dk, dv = attention_backward(q, k, v, out, lse, np.ones_like(out))
    assert dq.shape == q.shape and np.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    z = np.ones((0, 2, 3, 4), np.float64)
    assert attention_forward(z, z, z).shape == (0, 2, 3, 4)


def test_fastmath_keeps_inf_semantics_and_noncontiguous_inputs():
    rng = np.random.default_rng(4)
    base = _rand(rng, (2, 40, 3, 32), np.float64)  # (B, T, H, D) layout, transposed view
    q = base.transpose(0, 2, 1, 3)
    k = base[:, ::-1].transpose(0, 2, 1, 3)
    v = base.transpose(0, 2, 1, 3)[..., :24]
    assert not q.flags.c_contiguous
    _check(q, k, v, np.float64, causal=True)
    # huge scores: the max subtraction must keep everything finite
    out = attention_forward(q * 1e3, k, v)
    assert np.all(np.isfinite(out))
    # unaligned and read-only buffers are accepted (copied as needed)
    n = 2 * 3 * 9 * 16
    raw = np.frombuffer(bytearray(n * 4 + 1), dtype=np.float32, offset=1, count=n)
    raw[:] = rng.standard_normal(n)
    qu = raw.reshape(2, 3, 9, 16)
    assert not qu.flags.aligned
    ro = qu.copy()
    ro.flags.writeable = False
    _check(qu, ro, qu, np.float32, bias=np.frombuffer(bytearray(9 * 4 + 1), np.float32, 9, 1))


def test_finite_differences_float64():
    rng = np.random.default_rng(5)
    B, H, Tq, Tk, D, Dv = 1, 2, 3, 5, 4, 3
    q, k, v = _rand(rng, (B, H, Tq, D), np.float64), _rand(rng, (B, H, Tk, D), np.float64), \
        _rand(rng, (B, H, Tk, Dv), np.float64)
    w = _rand(rng, (B, H, Tq, Dv), np.float64)
    bias = _rand(rng, (1, H, Tq, Tk), np.float64)
    mask = np.zeros((1, 1, Tq, Tk), bool)
    mask[0, 0, 1, 3] = True
    kw = dict(causal=False, bias=bias, mask=mask, scale=0.7)
    for causal in (False, True):
        kw["causal"] = causal
        out, lse = attention_forward(q, k, v, return_lse=True, **kw)
        grads = attention_backward(q, k, v, out, lse, w, **kw)
        eps = 1e-6
        for idx, (x, g) in enumerate(zip((q, k, v), grads)):
            num = np.zeros_like(x)
            for pos in np.ndindex(x.shape):
                xs = [q.copy(), k.copy(), v.copy()]
                xs[idx][pos] += eps
                fp = np.sum(attention_forward(*xs, **kw) * w)
                xs[idx][pos] -= 2 * eps
                fm = np.sum(attention_forward(*xs, **kw) * w)
                num[pos] = (fp - fm) / (2 * eps)
            np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dt", DTYPES)
def test_against_torch_sdpa(dt):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(6)
    tol = TOL[dt]
    cases = [
        ((2, 3, 37, 53, 16, 24), dict(causal=False)),
        ((2, 3, 53, 37, 16, 24), dict(causal=True)),
        ((1, 4, 65, 65, 64, 64), dict(causal=True)),
        ((2, 2, 37, 53, 32, 32), dict(bias=True)),
        ((2, 2, 37, 53, 32, 32), dict(mask=True)),
    ]
    for (B, H, Tq, Tk, D, Dv), opts in cases:
        q, k, v = _rand(rng, (B, H, Tq, D), dt), _rand(rng, (B, H, Tk, D), dt), _rand(rng, (B, H, Tk, Dv), dt)
        dout = _rand(rng, (B, H, Tq, Dv), dt)
        kw, tkw = {}, {}
        if opts.get("causal"):
            kw["causal"] = tkw["is_causal"] = True
        if opts.get("bias"):
            bias = _rand(rng, (B, 1, Tq, Tk), dt)
            bias[:, :, :, -3:] = -np.inf
            kw["bias"], tkw["attn_mask"] = bias, torch.from_numpy(bias)
        if opts.get("mask"):
            mask = rng.random((B, H, Tq, Tk)) < 0.3
            mask[..., 0] = False  # no fully masked rows: torch returns NaN for those
            kw["mask"], tkw["attn_mask"] = mask, torch.from_numpy(~mask)  # torch: True = keep
        out, lse = attention_forward(q, k, v, return_lse=True, **kw)
        grads = attention_backward(q, k, v, out, lse, dout, **kw)
        tq, tk, tv = (torch.from_numpy(x.copy()).requires_grad_(True) for x in (q, k, v))
        tout = F.scaled_dot_product_attention(tq, tk, tv, **tkw)
        tout.backward(torch.from_numpy(dout))
        np.testing.assert_allclose(out, tout.detach().numpy(), rtol=tol, atol=tol)
        for g, t in zip(grads, (tq, tk, tv)):
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=tol, atol=tol)


def test_thread_counts_agree():
    rng = np.random.default_rng(7)
    q, k, v = (_rand(rng, (3, 1, 45, 32), np.float64) for _ in range(3))
    dout = _rand(rng, (3, 1, 45, 32), np.float64)
    old = numba.get_num_threads()
    res = []
    try:
        for nt in sorted({1, old}):
            numba.set_num_threads(nt)
            out, lse = attention_forward(q, k, v, causal=True, return_lse=True)
            res.append((out, lse) + attention_backward(q, k, v, out, lse, dout, causal=True))
    finally:
        numba.set_num_threads(old)
    for a, b in zip(res[0], res[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_one_specialisation_per_dtype():
    rng = np.random.default_rng(8)
    q, k, v = (_rand(rng, (1, 2, 9, 16), np.float32) for _ in range(3))
    full = _rand(rng, (1, 2, 9, 9), np.float32)  # contiguous, writable
    ro = np.broadcast_to(full[:, :1], (1, 2, 9, 9))  # read-only, stride 0
    for kw in (dict(), dict(bias=full), dict(bias=ro), dict(mask=full > 0),
               dict(mask=np.broadcast_to(full[:1, :1, :1] > 0, (1, 1, 9, 9)))):
        out, lse = attention_forward(q, k, v, return_lse=True, **kw)
        attention_backward(q, k, v, out, lse, out, **kw)
    assert len(ak._kernel("fwd", np.float32).signatures) == 1
    assert len(ak._kernel("bwd", np.float32).signatures) == 1


def test_validation_errors():
    q = np.zeros((1, 2, 3, 4), np.float32)
    k = np.zeros((1, 2, 5, 4), np.float32)
    v = np.zeros((1, 2, 5, 6), np.float32)
    bad = [
        (dict(q=q[0]), "dimensions"),
        (dict(q=q.astype(np.float64)), "dtype"),
        (dict(q=q.astype(np.int32)), "float32 or float64"),
        (dict(k=np.zeros((1, 2, 5, 3), np.float32)), "head dims"),
        (dict(v=np.zeros((1, 2, 4, 6), np.float32)), "sequence lengths"),
        (dict(k=np.zeros((1, 3, 5, 4), np.float32)), "batch/head"),
        (dict(bias=np.zeros((2, 1, 1, 5), np.float32)), "broadcastable"),
        (dict(bias=np.zeros((1, 1, 1, 5), np.int64)), "float"),
        (dict(mask=np.zeros((1, 1, 1, 5), np.float32)), "boolean"),
        (dict(mask=np.zeros((1, 1, 4, 5), bool)), "broadcastable"),
        (dict(scale=float("nan")), "finite"),
        (dict(scale="x"), "real number"),
        (dict(q=[[1.0]]), "numpy.ndarray"),
    ]
    for over, msg in bad:
        args = dict(q=q, k=k, v=v)
        kw = {n: over[n] for n in over if n not in args}
        args.update({n: over[n] for n in over if n in args})
        with pytest.raises(ValueError, match=msg):
            attention_forward(args["q"], args["k"], args["v"], **kw)
    out, lse = attention_forward(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="out must have shape"):
        attention_backward(q, k, v, out[:, :1], lse, out)
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_backward(q, k, v, out, lse[..., :2], out)
    with pytest.raises(ValueError, match="dout must have dtype"):
        attention_backward(q, k, v, out, lse, out.astype(np.float64))


def test_out_buffer_is_written_in_place_and_checked():
    rng = np.random.default_rng(3)
    q, k, v = (_rand(rng, (2, 3, 9, 8), np.float32) for _ in range(3))
    expected = ak.attention_forward(q, k, v, causal=True)
    out = np.full((2, 3, 9, 8), np.nan, np.float32)
    got = ak.attention_forward(q, k, v, causal=True, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    for bad in (np.empty((2, 3, 9, 7), np.float32), np.empty((2, 3, 9, 8), np.float64),
                np.empty((2, 3, 8, 9), np.float32).transpose(0, 1, 3, 2)):
        with pytest.raises(ValueError, match="out must be"):
            ak.attention_forward(q, k, v, out=bad)
