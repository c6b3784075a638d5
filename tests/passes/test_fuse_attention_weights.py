"""Attention weights kept by the fuser: when the softmax of an attention pattern is read besides
``P @ V`` (a graph output, MultiheadAttention's mean over heads, a gradient), the pattern still
fuses, into ``attention(..., return_weights=True)`` whose second output is the weights.
Structure (Before / Expected), numbers against the unfused graph and torch, gradients, and the
default form left exactly as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
import attngraph.nn as nn
from attngraph.passes import fuse_attention, random_feeds
from attngraph.passes.rewrite import rewrite

torch = pytest.importorskip("torch")

B, H, T, D = 2, 3, 5, 4


def kt(k):
    return k.transpose(0, 1, 3, 2)


def fused_only(g):
    """Just the attention fusion, as the pipeline runs it."""
    return rewrite(g, fuse_attention.RULES, "fuse_attention")


def assert_same(got, want):
    from attngraph.ir.verify import structural_diff

    diff = structural_diff(got, want)
    assert diff is None, diff


# -- structure ----------------------------------------------------------------------------------
def test_weights_output_fuses_with_return_weights():
    before = ag.Graph("before")
    q, k, v = (before.input(n, (B, H, T, D)) for n in "qkv")
    p = ag.softmax(q @ kt(k) * 0.5, axis=-1)
    before.output("weights", p)
    before.output("o", p @ v)

    expected = ag.Graph("expected")
    q, k, v = (expected.input(n, (B, H, T, D)) for n in "qkv")
    o, w = ag.attention(q, k, v, scale=0.5, return_weights=True)
    expected.output("weights", w)
    expected.output("o", o)

    assert_same(fused_only(before), expected)


def test_masked_causal_weights_read_by_a_mean_fuse():
    """MultiheadAttention's form: the mean over heads reads the weights after P @ V is made."""
    before = ag.Graph("before")
    q, k, v = (before.input(n, (B, H, T, D)) for n in "qkv")
    pad = before.input("pad", (B, 1, 1, T), "bool")
    s = ag.mask(ag.mask(q @ kt(k) / math.sqrt(D), ag.causal_mask(before, T)), pad)
    p = ag.softmax(s, axis=-1)
    before.output("o", p @ v)
    before.output("avg", p.mean(axis=1))

    expected = ag.Graph("expected")
    q, k, v = (expected.input(n, (B, H, T, D)) for n in "qkv")
    pad = expected.input("pad", (B, 1, 1, T), "bool")
    o, w = ag.attention(q, k, v, mask=pad, scale=1 / math.sqrt(D), causal=True, return_weights=True)
    expected.output("o", o)
    expected.output("avg", w.mean(axis=1))

    assert_same(fused_only(before), expected)


def test_default_form_is_unchanged():
    """P read only by P @ V: no return_weights attr, the flash kernel on the cpu backend."""
    g = ag.Graph("plain")
    q, k, v = (g.input(n, (B, H, T, D)) for n in "qkv")
    g.output("o", ag.softmax(q @ kt(k) * 0.5, axis=-1) @ v)
    expected = ag.Graph("expected")
    q, k, v = (expected.input(n, (B, H, T, D)) for n in "qkv")
    expected.output("o", ag.attention(q, k, v, scale=0.5))
    assert_same(fused_only(g), expected)
    exe = ag.compile(g, backend="cpu")
    (att,) = [n for n in exe.graph.nodes if n.op == "attention"]
    assert "return_weights" not in att.attrs and len(att.types) == 1
    assert exe.kernel_sources[att.label] == "native"


# -- numbers ------------------------------------------------------------------------------------
def weights_graph(form: str):
    g = ag.Graph(form)
    if form == "heads_split":
        x = g.input("x", (B, T, H * D))
        wq, wk, wv = (g.param(n, (H * D, H * D)) for n in ("wq", "wk", "wv"))
        split = lambda t: t.reshape(B, T, H, D).transpose(0, 2, 1, 3)   # noqa: E731  (B, H, T, D)
        v = split(x @ wv)
        q, k = split(x @ wq), split(x @ wk)
        s = q @ kt(k) / math.sqrt(D)
    else:
        q, k, v = (g.input(n, (B, H, T, D)) for n in "qkv")
        s = q @ kt(k) * (1 / math.sqrt(D))
        if form == "additive_padding":
            s = s + g.input("pad", (B, 1, 1, T))
        elif form == "bool_mask":
            s = ag.mask(s, g.input("m", (B, 1, 1, T), "bool"))
        elif form == "causal":
            s = ag.mask(s, ag.causal_mask(g, T))
    p = ag.softmax(s, axis=-1)
    g.output("weights", p)
    g.output("o", p @ v)
    return g


def feeds_for(g, rng):
    feeds = random_feeds(g, seed=int(rng.integers(1 << 30)))
    if "pad" in feeds:
        pad = np.where(rng.random((B, 1, 1, T)) < 0.3, -np.inf, 0).astype(np.float32)
        pad[0] = -np.inf                                  # a fully padded sequence: rows of zeros
        feeds["pad"] = pad
    if "m" in feeds:
        m = rng.random((B, 1, 1, T)) < 0.3
        m[1] = True
        feeds["m"] = m
    return feeds


@pytest.mark.parametrize("form", ["plain", "additive_padding", "bool_mask", "causal", "heads_split"])
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_numbers_match_the_unfused_graph(form, backend, rng):
    g = weights_graph(form)
    exe = ag.compile(g, backend=backend, optimize=True, explain=True)
    counts = exe.graph.op_counts()
    assert counts.get("attention") == 1 and "softmax" not in counts, exe.explain
    feeds = feeds_for(g, rng)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    got = exe.run(feeds)
    for name in ("o", "weights"):
        assert np.isfinite(got[name]).all()
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_explain_reports_the_fusion_not_a_near_miss():
    exe = ag.compile(weights_graph("plain"), backend="numpy", optimize=True, explain=True)
    assert "fuse_attention_weights fired on" in exe.explain
    assert "attention weights" not in exe.explain          # the old near miss is gone
    assert "test_fuse_attention_weights.py:" in exe.explain


def test_v_made_after_the_softmax_is_explained():
    g = ag.Graph("late_v")
    q, k = (g.input(n, (B, H, T, D)) for n in "qk")
    p = ag.softmax(q @ kt(k) * 0.5, axis=-1)
    x = g.input("x", (B, H, T, D))
    v = ag.tanh(x)                                          # V's node comes after the softmax
    g.output("weights", p)
    g.output("o", p @ v)
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    assert "attention" not in exe.graph.op_counts()
    assert "V must be computed before the softmax" in exe.explain, exe.explain


def test_a_weights_pattern_that_cannot_fuse_says_why():
    g = ag.Graph("tensor_scale")
    q, k, v = (g.input(n, (B, H, T, D)) for n in "qkv")
    p = ag.softmax((q @ kt(k)) * g.input("temp", (B, H, T, 1)), axis=-1)
    g.output("weights", p)
    g.output("o", p @ v)
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    assert "attention" not in exe.graph.op_counts()
    assert "multiplied by a tensor" in exe.explain, exe.explain


def test_multihead_attention_need_weights_fuses_and_matches_torch(rng):
    torch.manual_seed(0)
    E, heads, L, S = 8, 2, 5, 6
    tm = torch.nn.MultiheadAttention(E, heads, batch_first=True).eval()
    m = nn.MultiheadAttention(E, heads, batch_first=True)
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    g = ag.Graph("mha")
    xq = g.input("q", (B, L, E))
    xkv = g.input("kv", (B, S, E))
    pad = g.input("pad", (B, S), "bool")
    out, avg = m(xq, xkv, xkv, key_padding_mask=pad, need_weights=True)
    out2, per_head = m(xkv, xkv, xkv, need_weights=True, average_attn_weights=False, is_causal=True)
    for name, t in (("out", out), ("avg", avg), ("self_out", out2), ("per_head", per_head)):
        g.output(name, t)
    exe = ag.compile(g, backend="cpu")
    fused = [n for n in exe.graph.nodes if n.op == "attention"]
    assert len(fused) == 2 and all(n.attrs.get("return_weights") for n in fused)
    assert "softmax" not in exe.graph.op_counts()
    feeds = {"q": rng.standard_normal((B, L, E)).astype(np.float32),
             "kv": rng.standard_normal((B, S, E)).astype(np.float32),
             "pad": rng.random((B, S)) < 0.3}
    feeds["pad"][:, 0] = False
    got = exe.run(feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        want_out, want_avg = tm(t["q"], t["kv"], t["kv"], key_padding_mask=t["pad"], need_weights=True)
        causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
        want_self, want_heads = tm(t["kv"], t["kv"], t["kv"], attn_mask=causal, need_weights=True,
                                   average_attn_weights=False)
    for name, want in (("out", want_out), ("avg", want_avg), ("self_out", want_self), ("per_head", want_heads)):
        np.testing.assert_allclose(got[name], want.numpy(), rtol=1e-5, atol=1e-5)


# -- gradients ----------------------------------------------------------------------------------
def _torch_loss(feeds, causal, bias_name):
    t = {n: torch.tensor(a, requires_grad=True) for n, a in feeds.items()}
    s = t["q"] @ t["k"].transpose(-1, -2) / math.sqrt(D)
    if bias_name:
        s = s + t[bias_name]
    if causal:
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
    p = s.softmax(-1)
    o = p @ t["v"]
    ((o * o).sum() + 3 * (p * p).sum()).backward()
    return {n: x.grad.numpy() for n, x in t.items()}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_gradient_through_the_returned_weights(backend, rng):
    """ag.attention(return_weights=True) used in a loss: both outputs' gradients flow (vs torch)."""
    g = ag.Graph("grad")
    q, k, v = (g.input(n, (B, H, T, D)) for n in "qkv")
    bias = g.input("bias", (1, 1, T, T))
    o, w = ag.attention(q, k, v, bias=bias, causal=True, return_weights=True)
    loss = ag.sum(o * o) + ag.sum(w * w) * 3.0
    names = ["q", "k", "v", "bias"]
    for n, d in zip(names, ag.grad(loss, [q, k, v, bias])):
        g.output("d" + n, d)
    feeds = {n: rng.standard_normal((B, H, T, D)).astype(np.float32) for n in "qkv"}
    feeds["bias"] = rng.standard_normal((1, 1, T, T)).astype(np.float32)
    got = ag.compile(g, backend=backend).run(feeds)
    want = _torch_loss(feeds, causal=True, bias_name="bias")
    for n in names:
        np.testing.assert_allclose(got["d" + n], want[n], rtol=1e-4, atol=1e-5)


def test_training_graph_with_weights_in_the_loss_fuses_and_matches_torch(rng):
    """autodiff of the unfused pattern (weights in the loss), then the pipeline: the forward
    fuses with return_weights and the backward reads its weights."""
    g = ag.Graph("train")
    q, k, v = (g.input(n, (B, H, T, D)) for n in "qkv")
    s = ag.mask(q @ kt(k) / math.sqrt(D), ag.causal_mask(g, T))
    p = ag.softmax(s, axis=-1)
    o = p @ v
    loss = ag.sum(o * o) + ag.sum(p * p) * 3.0
    for n, d in zip("qkv", ag.grad(loss, [q, k, v])):
        g.output("d" + n, d)
    exe = ag.compile(g, backend="cpu")
    assert any(n.op == "attention" and n.attrs.get("return_weights") for n in exe.graph.nodes)
    feeds = {n: rng.standard_normal((B, H, T, D)).astype(np.float32) for n in "qkv"}
    got = exe.run(feeds)
    want = _torch_loss(feeds, causal=True, bias_name=None)
    for n in "qkv":
        np.testing.assert_allclose(got["d" + n], want[n], rtol=1e-4, atol=1e-5)


# -- cuda ---------------------------------------------------------------------------------------
_CUDA_CASE = """
import numpy as np, attngraph as ag
g = ag.Graph("w")
q, k, v = (g.input(n, (1, 2, 5, 4)) for n in "qkv")
p = ag.softmax(q @ k.transpose(0, 1, 3, 2) * 0.5, axis=-1)
g.output("w", p)
g.output("o", p @ v)
try:
    ag.compile(g, backend="cuda")
except ag.errors.BackendError as err:
    print("ERROR:", str(err).splitlines()[0])
exe = ag.compile(g, backend="cuda", host_fallback=True)
rng = np.random.default_rng(0)
feeds = {n: rng.standard_normal((1, 2, 5, 4)).astype(np.float32) for n in "qkv"}
got, want = exe.run(feeds), ag.compile(g, backend="numpy").run(feeds)
print("DIFF:", max(float(np.abs(got[n] - want[n]).max()) for n in want), sorted(exe.kernel_sources.values()))
"""


def test_cuda_names_the_weights_form_and_host_fallback_runs_it():
    """No device kernel for return_weights: a BackendError naming the op form; host_fallback runs
    it. In a subprocess on the numba-cuda simulator (it must be switched on before numba loads)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("numba_cuda")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CUDA_CASE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: the cuda backend has no kernel for attention(" in proc.stdout
    assert "with return_weights=True" in proc.stdout
    diff = proc.stdout.split("DIFF:")[1]
    assert float(diff.split()[0]) < 1e-6 and "'host'" in diff

def test_v_from_an_attention_fused_in_the_same_sweep():
    """The second pattern's V is the first pattern's output: both fuse, nothing unfused is left."""
    g = ag.Graph("stacked")
    q, k, v = (g.input(n, (B, H, T, D)) for n in "qkv")
    o1 = ag.softmax(q @ kt(k) * 0.5, axis=-1) @ v
    p2 = ag.softmax(k @ kt(q) * 0.5, axis=-1)
    g.output("w2", p2)
    g.output("o2", p2 @ o1)
    exe = ag.compile(g, backend="numpy", optimize=True)
    assert exe.graph.op_counts() == {"input": 3, "attention": 2}
    feeds = random_feeds(g)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    got = exe.run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
