"""SAGAN self-attention over feature maps and the FPN segmenter, against independent torch
implementations with the same weights (cpu backend, optimized: the attention fused)."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph.compiler import compile as compile_graph
from attngraph.models.cnn_attention import FPNSegmenter, SelfAttention2d

torch = pytest.importorskip("torch")
F = torch.nn.functional


class TorchSelfAttention(torch.nn.Module):
    """SAGAN's Self_Attn block as its authors wrote it (bmm with v on the left)."""

    def __init__(self, c: int, reduction: int = 8, scaled: bool = False):
        super().__init__()
        inner = max(1, c // reduction)
        self.query_conv = torch.nn.Conv2d(c, inner, 1)
        self.key_conv = torch.nn.Conv2d(c, inner, 1)
        self.value_conv = torch.nn.Conv2d(c, c, 1)
        self.gamma = torch.nn.Parameter(torch.zeros(1))
        self.scale = inner ** -0.5 if scaled else 1.0

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)      # (B, N, C')
        k = self.key_conv(x).view(b, -1, h * w)                          # (B, C', N)
        attention = torch.softmax(torch.bmm(q, k) * self.scale, dim=-1)  # (B, N, N)
        v = self.value_conv(x).view(b, -1, h * w)                        # (B, C, N)
        out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, h, w)
        return self.gamma * out + x, attention


class TorchFPN(torch.nn.Module):
    """The FPNSegmenter architecture, written with torch.nn (same attribute names)."""

    def __init__(self, cin=3, classes=4, channels=(16, 24, 32, 48), d=32):
        super().__init__()
        c1, c2, c3, c4 = channels
        block = lambda i, o, s=1: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, s, 1), torch.nn.ReLU())  # noqa: E731
        self.stem, self.layer1, self.layer2, self.layer3 = block(cin, c1), block(c1, c2, 2), block(c2, c3, 2), \
            block(c3, c4, 2)
        self.attn = TorchSelfAttention(c4)
        self.lateral = torch.nn.ModuleList([torch.nn.Conv2d(c, d, 1) for c in (c2, c3, c4)])
        self.smooth = torch.nn.Conv2d(d, d, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)
        self.skip = torch.nn.Conv2d(c1, d, 1)
        self.head = torch.nn.Conv2d(d, classes, 1)

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.layer1(f1)
        f3 = self.layer2(f2)
        f4, weights = self.attn(self.layer3(f3))
        p4 = self.lateral[2](f4)
        p3 = self.lateral[1](f3) + F.interpolate(p4, scale_factor=2, mode="nearest")
        p2 = self.lateral[0](f2) + F.interpolate(p3, scale_factor=2, mode="nearest")
        p2 = F.relu(self.smooth(p2))
        return self.head(F.relu(self.up(p2) + self.skip(f1))), weights


def _state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _ops(exe):
    return [n.op for n in exe.graph.nodes]


@pytest.mark.parametrize("scaled", [False, True])
def test_self_attention_matches_torch_and_fuses(scaled):
    torch.manual_seed(0)
    ref = TorchSelfAttention(16, scaled=scaled)
    with torch.no_grad():
        ref.gamma.fill_(0.7)                         # SAGAN starts at 0, which would hide the attention
    m = SelfAttention2d(16, scaled=scaled)
    m.load_state_dict(_state(ref))
    g = ag.Graph("sagan")
    x = g.input("x", ("B", 16, 3, 5))
    y, w = m(x, need_weights=True)
    g.output("y", y)
    g.output("w", w)
    exe = compile_graph(g, backend="cpu", explain=True)
    assert _ops(exe).count("attention") == 1 and "softmax" not in _ops(exe)
    assert "fuse_attention fired" in exe.explain
    xs = np.random.default_rng(0).standard_normal((2, 16, 3, 5)).astype(np.float32)
    out = exe.run({"x": xs})
    want_y, want_w = ref(torch.tensor(xs))
    np.testing.assert_allclose(out["y"], want_y.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["w"], want_w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_self_attention_without_weights_output_fuses_and_starts_as_identity():
    m = SelfAttention2d(8, reduction=4)               # gamma starts at 0, as SAGAN
    assert m.state_dict()["gamma"].tolist() == [0.0] and m.inner == 2
    g = ag.Graph("sagan_id")
    x = g.input("x", (1, 8, 4, 4))
    g.output("y", m(x))
    exe = compile_graph(g, backend="cpu")
    assert _ops(exe).count("attention") == 1 and "softmax" not in _ops(exe)
    xs = np.random.default_rng(1).standard_normal((1, 8, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(exe.run({"x": xs})["y"], xs)
    assert SelfAttention2d(8, gamma_init=0.25).state_dict()["gamma"].tolist() == [0.25]


def test_self_attention_gradients_match_torch():
    torch.manual_seed(1)
    ref = TorchSelfAttention(8, reduction=4)
    with torch.no_grad():
        ref.gamma.fill_(-0.4)
    m = SelfAttention2d(8, reduction=4)
    m.load_state_dict(_state(ref))
    g = ag.Graph("sagan_grad")
    x = g.input("x", (2, 8, 3, 3))
    t = g.input("t", (2, 8, 3, 3))
    loss = ag.mean((m(x) - t) * (m(x) - t))
    g.output("loss", loss)
    params = m.parameters(g)
    names = sorted(params)
    for name, grad in zip(names, ag.grad(loss, [params[n] for n in names])):
        g.output("d_" + name, grad)
    exe = compile_graph(g, backend="cpu")
    assert "attention_grad" in _ops(exe)
    rng = np.random.default_rng(2)
    xs, ts = (rng.standard_normal((2, 8, 3, 3)).astype(np.float32) for _ in range(2))
    out = exe.run({"x": xs, "t": ts})
    want = F.mse_loss(ref(torch.tensor(xs))[0], torch.tensor(ts))
    want.backward()
    np.testing.assert_allclose(out["loss"], want.item(), rtol=1e-5)
    torch_grads = dict(ref.named_parameters())
    for name in names:
        np.testing.assert_allclose(out["d_" + name], torch_grads[name].grad.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_fpn_segmenter_matches_torch_and_fuses():
    torch.manual_seed(0)
    ref = TorchFPN(channels=(8, 16, 16, 24), d=16)
    with torch.no_grad():
        ref.attn.gamma.fill_(0.5)
    model = FPNSegmenter(3, 4, channels=(8, 16, 16, 24), fpn_dim=16)
    model.load_state_dict(_state(ref))
    assert set(model.state_dict()) == set(ref.state_dict())
    g = ag.Graph("fpn")
    x = g.input("images", ("B", 3, 16, 24))
    logits, weights = model(x, need_weights=True)
    g.output("logits", logits)
    g.output("attention", weights)
    exe = compile_graph(g, backend="cpu")
    assert _ops(exe).count("attention") == 1 and "softmax" not in _ops(exe)
    assert {"conv_transpose2d", "upsample"} <= set(_ops(exe))
    xs = np.random.default_rng(0).random((2, 3, 16, 24), dtype=np.float32)
    out = exe.run({"images": xs})
    want, want_w = ref(torch.tensor(xs))
    assert out["logits"].shape == (2, 4, 16, 24) and out["attention"].shape == (2, 6, 6)
    np.testing.assert_allclose(out["logits"], want.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["attention"], want_w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_fpn_segmenter_loss_gradients_match_torch():
    torch.manual_seed(3)
    ref = TorchFPN(channels=(4, 8, 8, 16), d=8)
    with torch.no_grad():
        ref.attn.gamma.fill_(0.3)
    model = FPNSegmenter(3, 4, channels=(4, 8, 8, 16), fpn_dim=8)
    model.load_state_dict(_state(ref))
    g = ag.Graph("fpn_grad")
    x = g.input("images", (2, 3, 16, 16))
    masks = g.input("masks", (2, 16, 16), "int64")
    loss = ag.train.cross_entropy(model(x), masks, axis=1)
    g.output("loss", loss)
    params = model.parameters(g)
    check = ["stem.0.weight", "attn.gamma", "attn.query_conv.weight", "up.weight", "lateral.2.bias", "head.bias"]
    for name, grad in zip(check, ag.grad(loss, [params[n] for n in check])):
        g.output("d_" + name, grad)
    exe = compile_graph(g, backend="cpu")
    rng = np.random.default_rng(4)
    xs = rng.random((2, 3, 16, 16), dtype=np.float32)
    ms = rng.integers(0, 4, (2, 16, 16))
    out = exe.run({"images": xs, "masks": ms})
    want = F.cross_entropy(ref(torch.tensor(xs))[0], torch.tensor(ms))
    want.backward()
    np.testing.assert_allclose(out["loss"], want.item(), rtol=1e-5)
    grads = dict(ref.named_parameters())
    for name in check:
        np.testing.assert_allclose(out["d_" + name], grads[name].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_bad_shapes_raise_shape_errors():
    g = ag.Graph("bad")
    with pytest.raises(ag.errors.ShapeError, match="expects"):
        SelfAttention2d(16)(g.input("x", (1, 8, 4, 4)))
    with pytest.raises(ag.errors.ShapeError, match="fixed height"):
        SelfAttention2d(8)(g.input("y", (1, 8, "H", 4)))
    with pytest.raises(ag.errors.ShapeError, match="divisible by 8"):
        FPNSegmenter()(g.input("z", (1, 3, 30, 32)))
    with pytest.raises(ag.errors.ShapeError, match="expects"):
        FPNSegmenter(in_channels=3)(g.input("w", (1, 1, 32, 32)))
