"""Scaled dot-product attention written with primitives equals torch's SDPA; self-attention
without positions is permutation-equivariant."""

import math

import numpy as np
import pytest

import attngraph as ag

torch = pytest.importorskip("torch")


def sdpa_graph(shape, causal, dtype="float32"):
    B, H, T, D = shape
    g = ag.Graph("sdpa")
    q, k, v = (g.input(n, ("B", H, "T", D), dtype) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)      # (B, H, T, T)
    if causal:
        scores = ag.mask(scores, ag.causal_mask(g, q.shape[2]))
    g.output("o", ag.softmax(scores, axis=-1) @ v)              # (B, H, T, D)
    return ag.compile(g)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (1, 2, 16, 4)])
def test_sdpa_from_primitives_equals_torch(shape, causal, rng):
    exe = sdpa_graph(shape, causal)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    got = exe.run({"q": q, "k": k, "v": v})["o"]
    want = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), is_causal=causal).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def self_attention_graph(d=16, heads=2):
    g = ag.Graph("self_attention")
    x = g.input("x", ("B", "T", d))
    B, T = x.shape[0], x.shape[1]
    wq, wk, wv, wo = (g.param(n, (d, d)) for n in ("wq", "wk", "wv", "wo"))

    def split_heads(t):
        return t.reshape(B, T, heads, d // heads).transpose(0, 2, 1, 3)   # (B, H, T, Dh)

    q, k, v = split_heads(x @ wq), split_heads(x @ wk), split_heads(x @ wv)
    att = ag.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads), axis=-1)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, d) @ wo               # (B, T, d)
    g.output("y", y)
    return ag.compile(g)


def test_self_attention_is_permutation_equivariant(rng):
    exe = self_attention_graph()
    x = rng.standard_normal((2, 9, 16)).astype(np.float32)
    perm = rng.permutation(9)
    y = exe.run({"x": x})["y"]
    y_perm = exe.run({"x": x[:, perm]})["y"]
    np.testing.assert_allclose(y_perm, y[:, perm], rtol=1e-5, atol=1e-6)


def test_causal_attention_ignores_the_future(rng):
    exe = sdpa_graph((1, 2, 6, 4), causal=True)
    q, k, v = (rng.standard_normal((1, 2, 6, 4)).astype(np.float32) for _ in range(3))
    base = exe.run({"q": q, "k": k, "v": v})["o"]
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 4:] += 10
    v2[:, :, 4:] -= 10
    changed = exe.run({"q": q, "k": k2, "v": v2})["o"]
    np.testing.assert_array_equal(base[:, :, :4], changed[:, :, :4])
    assert not np.allclose(base[:, :, 4:], changed[:, :, 4:])
