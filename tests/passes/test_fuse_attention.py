"""Attention fusion: every form from the issue fuses into one `attention` node, and the numbers
match the graph as written (numpy backend, optimize on vs off)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph.passes import DriftError, random_feeds

B, H, T, D = 2, 3, 5, 4


def qkv(g, shape=(B, H, T, D)):
    return [g.input(n, shape) for n in "qkv"]


def kt(k):
    return k.transpose(0, 1, 3, 2)


def heads(t, h=H):
    b, s, d = t.shape
    return t.reshape(b, s, h, d // h).transpose(0, 2, 1, 3)


def build(form: str):
    g = ag.Graph(form)
    scale = 1 / math.sqrt(D)
    if form in ("heads_split", "detr", "k_pretransposed"):
        x = g.input("x", (B, T, H * D))
        wq, wk, wv = (g.param(n, (H * D, H * D)) for n in ("wq", "wk", "wv"))
        if form == "detr":
            pos = g.input("pos", (B, T, H * D))
            q, k, v = heads((x + pos) @ wq), heads((x + pos) @ wk), heads(x @ wv)
        else:
            q, k, v = heads(x @ wq), heads(x @ wk), heads(x @ wv)
        if form == "k_pretransposed":
            k_t = (x @ wk).reshape(B, T, H, D).transpose(0, 2, 3, 1)      # (B, H, D, T) built directly
            s = q @ k_t * scale
        else:
            s = q @ kt(k) / math.sqrt(D)
        g.output("o", ag.softmax(s, axis=-1) @ v)
        return g
    q, k, v = qkv(g)
    if form == "mul_after":
        s = (q @ kt(k)) * scale
    elif form == "div_after":
        s = (q @ kt(k)) / math.sqrt(D)
    elif form == "scale_q_before":
        s = (q * scale) @ kt(k)
    elif form == "scale_k_before":
        s = q @ (kt(k) * scale)
    elif form == "scale_split":
        s = (q * math.sqrt(scale)) @ kt(k * math.sqrt(scale))
    elif form == "additive_padding":
        pad = g.input("pad", (B, 1, 1, T))                                  # 0 or −inf per key
        s = q @ kt(k) * scale + pad
    elif form == "additive_before_scale":
        pad = g.input("pad", (B, 1, 1, T))
        s = (q @ kt(k) + pad) * scale
    elif form == "bool_mask":
        m = g.input("m", (B, 1, 1, T), "bool")                              # key padding, over heads
        s = ag.mask(q @ kt(k) * scale, m)
    elif form == "where_mask":
        m = g.input("m", (B, 1, 1, T), "bool")
        s = ag.where(m, -math.inf, q @ kt(k) * scale)
    elif form == "where_keep":
        keep = g.input("keep", (B, 1, T, T), "bool")
        s = ag.where(keep, q @ kt(k) * scale, -math.inf)
    elif form == "causal_triangle":
        s = ag.mask(q @ kt(k) * scale, ag.causal_mask(g, T))
    elif form == "causal_const":
        s = ag.mask(q @ kt(k) * scale, g.const("causal", np.triu(np.ones((T, T), bool), 1)))
    elif form == "causal_additive_const":
        bias = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, 0).astype(np.float32)
        s = q @ kt(k) * scale + g.const("causal_bias", bias)
    elif form == "causal_and_padding":
        m = g.input("m", (B, 1, 1, T), "bool")
        s = ag.mask(ag.mask(q @ kt(k) * scale, ag.causal_mask(g, T)), m)
    else:
        raise AssertionError(form)
    g.output("o", ag.softmax(s, axis=-1) @ v)
    return g


FORMS = ["mul_after", "div_after", "scale_q_before", "scale_k_before", "scale_split", "additive_padding",
         "additive_before_scale", "bool_mask", "where_mask", "where_keep", "causal_triangle", "causal_const",
         "causal_additive_const", "causal_and_padding", "heads_split", "detr", "k_pretransposed"]


def feeds_for(g, rng):
    feeds = random_feeds(g, seed=int(rng.integers(1 << 30)))
    for name, node in g.inputs.items():
        shape = tuple(node.type.shape)
        if name == "pad":
            pad = np.where(rng.random(shape) < 0.3, -np.inf, 0).astype(np.float32)
            pad[0] = -np.inf                           # one sequence fully padded: rows of zeros
            feeds[name] = pad
        elif node.type.dtype == ag.bool_:
            m = rng.random(shape) < 0.3
            if name == "keep":
                m = ~m
                m[0, 0, 1] = False                     # a fully masked query row
            else:
                m[0] = True
            feeds[name] = m
    return feeds


@pytest.mark.parametrize("form", FORMS)
def test_form_fuses_and_numbers_match(form, rng):
    g = build(form)
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    counts = exe.graph.op_counts()
    assert counts.get("attention") == 1, f"{form} did not fuse:\n{exe.explain}"
    assert "softmax" not in counts
    fused = next(n for n in exe.graph.nodes if n.op == "attention")
    if form.startswith("causal"):
        assert fused.attrs["causal"] is True
    if form in ("causal_triangle", "causal_const", "causal_additive_const"):
        assert not fused.attrs["has_mask"] and not fused.attrs["has_bias"]
    assert fused.origin, "the fused node remembers the user's lines it replaced"
    feeds = feeds_for(g, rng)
    want = ag.compile(g, backend="numpy").run(feeds)["o"]
    got = exe.run(feeds)["o"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_heads_split_leaves_no_double_transposes():
    exe = ag.compile(build("k_pretransposed"), backend="numpy", optimize=True)
    att = next(n for n in exe.graph.nodes if n.op == "attention")
    k = att.inputs[1].node
    assert k.op == "transpose" and k.inputs[0].node.op == "reshape"


def test_disable_keeps_the_graph_unfused():
    exe = ag.compile(build("mul_after"), backend="numpy", optimize=True, disable=["fuse_attention"])
    assert "attention" not in exe.graph.op_counts()
    with pytest.raises(ag.errors.AttngraphError, match="unknown pass"):
        ag.compile(build("mul_after"), backend="numpy", optimize=True, disable=["fuse_atention"])


def test_explain_reports_rules_with_source_lines():
    exe = ag.compile(build("div_after"), backend="numpy", optimize=True, explain=True)
    assert "scalar_division_to_multiplication fired" in exe.explain
    assert "fuse_attention fired on" in exe.explain
    assert "test_fuse_attention.py:" in exe.explain


def near_miss_graph(kind):
    g = ag.Graph(kind)
    q, k, v = qkv(g)
    s = q @ kt(k) * 0.5
    if kind == "fill_value":
        g.output("o", ag.softmax(ag.mask(s, g.input("m", (B, 1, 1, T), "bool"), value=-1e4), axis=-1) @ v)
    elif kind == "tensor_scale":
        g.output("o", ag.softmax((q @ kt(k)) * g.input("temp", (B, H, T, 1)), axis=-1) @ v)
    elif kind == "wrong_axis":
        g.output("o", ag.softmax(s, axis=-2) @ v)
    return g


@pytest.mark.parametrize("kind, reason", [
    ("fill_value", "not -inf"),
    ("tensor_scale", "multiplied by a tensor"),
    ("wrong_axis", "not over the last axis"),
])
def test_near_misses_are_explained(kind, reason):
    exe = ag.compile(near_miss_graph(kind), backend="numpy", optimize=True, explain=True)
    assert "attention" not in exe.graph.op_counts()
    assert "near misses" in exe.explain and reason in exe.explain, exe.explain
    assert "test_fuse_attention.py:" in exe.explain


def test_debug_mode_names_the_pass_that_drifts(monkeypatch):
    from attngraph.passes import canonicalize
    from attngraph.passes.rewrite import Rule

    def wrong(node, rw):  # a buggy rule: x * c → x
        if node.op == "mul" and rw.scalar_value(node.inputs[1]) is not None and node.inputs[1].type.shape == ():
            return node.inputs[0]
        return None

    monkeypatch.setattr(canonicalize, "RULES", canonicalize.RULES + [Rule("wrong", wrong)])
    from attngraph.passes import pipeline

    patched = [pipeline.rule_pass(p.name, canonicalize.RULES) if p.name == "canonicalize" else p
               for p in pipeline.PIPELINE]
    monkeypatch.setattr(pipeline, "PIPELINE", patched)
    g = build("mul_after")
    with pytest.raises(DriftError, match="pass canonicalize changed output 'o'"):
        ag.compile(g, backend="numpy", optimize=True, debug=True)
    ag.compile(g, backend="numpy", optimize=True, debug=False)  # without debug the bug goes unnoticed


def test_direct_attention_op_matches_primitives(rng):
    g = ag.Graph("direct")
    q, k, v = qkv(g)
    m = g.input("m", (B, 1, 1, T), "bool")
    g.output("fused", ag.attention(q, k, v, mask=m, causal=True))
    g.output("manual", ag.softmax(ag.mask(ag.mask(q @ kt(k) / math.sqrt(D), ag.causal_mask(g, T)), m)) @ v)
    feeds = feeds_for(g, rng)
    out = ag.compile(g).run(feeds)
    np.testing.assert_allclose(out["fused"], out["manual"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sliced_bool_buffer", "sliced_additive_buffer", "additive_trilu"])
def test_symbolic_causal_masks_become_the_causal_flag(kind, rng):
    g = ag.Graph(kind)
    q, k, v = (g.input(n, ("B", H, "T", D)) for n in "qkv")
    s = q @ kt(k) / math.sqrt(D)
    T_ = q.shape[2]
    if kind == "sliced_bool_buffer":                      # a registered (max_len, max_len) buffer cut to T
        s = ag.mask(s, g.const("causal", np.triu(np.ones((16, 16), bool), 1))[:T_, :T_])
    elif kind == "sliced_additive_buffer":
        buf = np.where(np.triu(np.ones((16, 16), bool), 1), -np.inf, 0).astype(np.float32)
        s = s + g.const("causal", buf)[:T_, :T_]
    else:                                                 # ONNX-style: trilu(full(-inf), k=1)
        s = s + ag.trilu(g.full((T_, T_), -math.inf), k=1)
    g.output("o", ag.softmax(s, axis=-1) @ v)
    exe = ag.compile(g, backend="numpy", optimize=True, explain=True)
    fused = [n for n in exe.graph.nodes if n.op == "attention"]
    assert len(fused) == 1 and fused[0].attrs["causal"], exe.explain
    assert not fused[0].attrs["has_mask"] and not fused[0].attrs["has_bias"]
    for t in (3, 7):
        feeds = {n: rng.standard_normal((2, H, t, D)).astype(np.float32) for n in "qkv"}
        np.testing.assert_allclose(exe.run(feeds)["o"], ag.compile(g).run(feeds)["o"], rtol=1e-5, atol=1e-6)
