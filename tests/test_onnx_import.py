"""ONNX import: torch exports of attention models import, fuse, and match torch.

Each model is exported with torch's TorchScript exporter (``dynamo=False``) with a dynamic
batch axis, imported with ``ag.from_onnx``, compiled for the cpu backend, run at a batch
size other than the one traced, and compared with torch. The attention nodes must all fuse.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
nn = torch.nn

import attngraph as ag  # noqa: E402
from attngraph import onnx_import  # noqa: E402

from_onnx = getattr(ag, "from_onnx", onnx_import.from_onnx)      # the public name, once __init__ exports it

D, HEADS = 16, 4


def _export(model, args, names, path, opset=17, dynamic=None):
    model.eval()
    dynamic = dynamic if dynamic is not None else {n: {0: "batch"} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["y"], dynamic_axes=dynamic,
                          opset_version=opset, dynamo=False)
    return path


def _check(model, path, feeds: dict, attention_blocks: int, atol=1e-5):
    """Import, compile, compare with torch at the feeds, and count the fused attention nodes."""
    g = from_onnx(path)
    assert list(g.inputs) == list(feeds)
    assert list(g.outputs) == ["y"]
    exe = ag.compile(g, backend="cpu", explain=True)
    out = exe.run(feeds)["y"]
    with torch.no_grad():
        want = model(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    np.testing.assert_allclose(out, want, atol=atol, rtol=atol)
    counts = exe.graph.op_counts()
    assert counts.get("attention", 0) == attention_blocks, exe.explain
    assert counts.get("softmax", 0) == 0, exe.explain
    return g, exe


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- the models -----------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x):
        return self.m(x, x, x, need_weights=False)[0]


class HandWrittenCausal(nn.Module):
    """Attention written out by hand (GPT style): scale by division, masked_fill with a buffer."""

    def __init__(self, t=6):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.register_buffer("causal", torch.triu(torch.ones(t, t, dtype=torch.bool), 1))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (z.reshape(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))   # (B, H, T, Dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // HEADS)
        scores = scores.masked_fill(self.causal[:t, :t], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v                                              # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(b, t, D))


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, HEADS, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


class CausalTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(D, HEADS, 1, 1, 32, dropout=0.0, batch_first=True)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.t(src, tgt, tgt_mask=mask)


class TinyViT(nn.Module):
    def __init__(self, image=16, patch=4, classes=5):
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, D, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, HEADS, 32, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)                  # (B, N, D)
        cls = self.cls.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos                          # (B, N+1, D)
        x = self.norm(self.enc(x))
        return self.head(x[:, 0])


def _sine_positions(h, w, d):
    """DETR's 2-D sine embedding, (h*w, d): half the channels for y, half for x."""
    half = d // 2
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 1, torch.arange(w, dtype=torch.float32) + 1,
                            indexing="ij")
    freqs = 10000 ** (2 * (torch.arange(half) // 2) / half)
    py, px = ys[..., None] / freqs, xs[..., None] / freqs
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], dim=-1).flatten(2)
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], dim=-1).flatten(2)
    return torch.cat([py, px], dim=-1).reshape(h * w, d)


class DetrLayer(nn.Module):
    """Post-norm attention + FFN; positions added to the queries and keys only (DETR)."""

    def __init__(self, cross: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(D, HEADS, batch_first=True) if cross else None
        self.ff = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, D))
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(3 if cross else 2))

    def forward(self, x, pos, memory=None, memory_pos=None):
        q = x + pos
        x = self.norms[0](x + self.self_attn(q, q, x, need_weights=False)[0])
        if self.cross_attn is not None:
            x = self.norms[1](x + self.cross_attn(x + pos, memory + memory_pos, memory, need_weights=False)[0])
        return self.norms[-1](x + self.ff(x))


class TinyDetr(nn.Module):
    def __init__(self, queries=6, classes=4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.proj = nn.Conv2d(16, D, 1)
        self.register_buffer("pos", _sine_positions(4, 4, D)[None])          # (1, HW, D) for 16x16 images
        self.encoder = DetrLayer(cross=False)
        self.decoder = DetrLayer(cross=True)
        self.query_pos = nn.Parameter(torch.randn(queries, D))
        self.cls_head = nn.Linear(D, classes + 1)
        self.box_head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 4))

    def forward(self, images):
        f = self.proj(self.backbone(images))                                 # (B, D, 4, 4)
        src = f.flatten(2).transpose(1, 2)                                   # (B, HW, D)
        memory = self.encoder(src, self.pos)
        qpos = self.query_pos.unsqueeze(0).expand(src.shape[0], -1, -1)      # (B, Q, D)
        hs = self.decoder(torch.zeros_like(qpos), qpos, memory, self.pos)
        return torch.cat([self.cls_head(hs), self.box_head(hs).sigmoid()], dim=-1)


# -- the tests ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("opset", [14, 17])            # 14: the first opset torch exports SDPA to
def test_multihead_attention(tmp_path, opset):
    model = SelfAttention()
    path = _export(model, (torch.randn(2, 5, D),), ["x"], tmp_path / "mha.onnx", opset=opset)
    g, _ = _check(model, path, {"x": _rand(np.random.default_rng(0), 3, 5, D)}, attention_blocks=1)
    assert g.inputs["x"].out.type.shape == ("batch", 5, D)                 # the dynamic axis stays symbolic


def test_hand_written_causal_attention_opset13(tmp_path):
    """Dynamic batch and sequence: the reshapes and the mask slice [:T, :T] stay symbolic."""
    model = HandWrittenCausal()
    path = _export(model, (torch.randn(2, 6, D),), ["x"], tmp_path / "hand.onnx", opset=13,
                   dynamic={"x": {0: "batch", 1: "seq"}})
    g, exe = _check(model, path, {"x": _rand(np.random.default_rng(6), 3, 4, D)}, attention_blocks=1)
    assert g.inputs["x"].out.type.shape == ("batch", "seq", D)
    out = exe.run({"x": _rand(np.random.default_rng(7), 1, 6, D)})["y"]                     # another length
    assert out.shape == (1, 6, D)


def test_fixed_sequence_length_in_the_file_is_bound(tmp_path):
    """torch's MultiheadAttention export writes the traced length into its reshapes even when the axis
    is declared dynamic (onnxruntime fails on other lengths too): the import binds it, with a warning."""
    model = PaddedEncoder()
    args = (torch.randn(2, 6, D), torch.zeros(2, 6, dtype=torch.bool))
    dynamic = {"x": {0: "batch", 1: "seq"}, "pad": {0: "batch", 1: "seq"}}
    path = _export(model, args, ["x", "pad"], tmp_path / "enc.onnx", dynamic=dynamic)
    with pytest.warns(UserWarning, match="'seq'"):
        g = from_onnx(path)
    assert g.inputs["x"].out.type.shape == ("batch", 6, D)
    assert from_onnx(path, dims={"seq": 6, "batch": 2}).inputs["pad"].out.type.shape == (2, 6)


def test_transformer_encoder_key_padding_mask(tmp_path):
    model = PaddedEncoder()
    args = (torch.randn(2, 6, D), torch.zeros(2, 6, dtype=torch.bool))
    path = _export(model, args, ["x", "pad"], tmp_path / "enc.onnx")
    pad = np.zeros((3, 6), bool)
    pad[1, 4:] = True
    pad[2, 1:] = True
    _check(model, path, {"x": _rand(np.random.default_rng(1), 3, 6, D), "pad": pad}, attention_blocks=2)


def test_transformer_causal_mask(tmp_path):
    model = CausalTransformer()
    args = (torch.randn(2, 5, D), torch.randn(2, 4, D))
    path = _export(model, args, ["src", "tgt"], tmp_path / "tr.onnx")
    rng = np.random.default_rng(2)
    _, exe = _check(model, path, {"src": _rand(rng, 3, 5, D), "tgt": _rand(rng, 3, 4, D)}, attention_blocks=3)
    assert sum(n.attrs["causal"] for n in exe.graph.nodes if n.op == "attention") == 1


@pytest.mark.parametrize("opset", [14, 17])            # 14: LayerNormalization comes decomposed (ReduceMean, Pow...)
def test_vit(tmp_path, opset):
    model = TinyViT()
    path = _export(model, (torch.randn(2, 3, 16, 16),), ["images"], tmp_path / "vit.onnx", opset=opset)
    _, exe = _check(model, path, {"images": _rand(np.random.default_rng(3), 3, 3, 16, 16)}, attention_blocks=2)
    assert "reduce_mean" not in exe.graph.op_counts() and "mean" not in exe.graph.op_counts()   # norms fused


def test_detr_like(tmp_path):
    model = TinyDetr()
    path = _export(model, (torch.randn(2, 3, 16, 16),), ["images"], tmp_path / "detr.onnx")
    _check(model, path, {"images": _rand(np.random.default_rng(4), 3, 3, 16, 16)}, attention_blocks=3)


def test_weights_are_params(tmp_path):
    model = SelfAttention()
    path = _export(model, (torch.randn(2, 5, D),), ["x"], tmp_path / "mha.onnx")
    g = from_onnx(path)
    assert "m.out_proj.weight" in g.params
    np.testing.assert_array_equal(g.values["m.out_proj.weight"], model.m.out_proj.weight.detach().numpy())


def test_unsupported_ops_listed_in_one_error(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Celu", ["a"], ["b"]),
             helper.make_node("Hardmax", ["b"], ["c"]), helper.make_node("Celu", ["c"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "bad", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ag.errors.AttngraphError) as info:
        from_onnx(path)
    text = str(info.value)
    assert "Celu" in text and "Hardmax" in text and "Relu" not in text.split("hint")[0]


def test_symbolic_shape_arithmetic(tmp_path):
    """Shape → Gather → Mul → Concat → Reshape with a symbolic batch stays symbolic ((B*2, 4))."""
    from onnx import TensorProto, helper

    ints = lambda name, vals: helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)  # noqa: E731
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch size", 2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Mul", ["b", "two"], ["b2"]),
        helper.make_node("Unsqueeze", ["b2", "axes0"], ["b2v"]),
        helper.make_node("Concat", ["b2v", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Erf", ["r"], ["e"]),
        helper.make_node("Slice", ["e", "starts", "ends", "axes"], ["y"]),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("two", TensorProto.INT64, [], [2]),
             ints("axes0", [0]), ints("minus1", [-1]), ints("starts", [1]), ints("ends", [2 ** 63 - 1]),
             ints("axes", [1])]
    model = helper.make_model(helper.make_graph(nodes, "sym", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    g = from_onnx(model)
    assert g.inputs["x"].out.type.shape == ("batch_size", 2, 4)
    assert g.outputs["y"].type.shape == ("2*batch_size", 3)
    xs = np.random.default_rng(5).standard_normal((3, 2, 4)).astype(np.float32)
    out = ag.compile(g, backend="numpy").run({"x": xs})["y"]
    from math import erf
    np.testing.assert_allclose(out, np.vectorize(erf)(xs.reshape(6, 4))[:, 1:], atol=1e-6)


def test_op_coverage_against_onnxruntime(tmp_path):
    """The ops the models above do not reach, in one hand-built graph, against onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    f32 = lambda name, arr: numpy_helper.from_array(np.asarray(arr, np.float32), name)  # noqa: E731
    i64 = lambda name, arr: numpy_helper.from_array(np.asarray(arr, np.int64), name)    # noqa: E731
    rng = np.random.default_rng(8)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6]),
              helper.make_tensor_value_info("img", TensorProto.FLOAT, ["B", 2, 5, 5])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("gemm", "conv", "mix", "red")]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["gemm"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Conv", ["img", "k"], ["c1"], pads=[1, 0, 0, 1], strides=[2, 1]),
        helper.make_node("Flatten", ["c1"], ["conv"], axis=1),
        helper.make_node("IsNaN", ["x"], ["nan"]),
        helper.make_node("GreaterOrEqual", ["x", "zero"], ["ge"]),
        helper.make_node("Not", ["nan"], ["ok"]),
        helper.make_node("And", ["ge", "ok"], ["keep"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Where", ["keep", "t", "s"], ["w1"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Concat", ["xs", "one"], ["cshape"], axis=0),
        helper.make_node("ConstantOfShape", ["cshape"], ["ones"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Squeeze", ["ones", "minus1"], ["ones2"]),
        helper.make_node("Trilu", ["ones2", "kone"], ["tri"], upper=1),
        helper.make_node("Mul", ["w1", "tri"], ["m1"]),
        helper.make_node("Cast", ["keep"], ["keepf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["m1", "keepf"], ["mix"]),
        helper.make_node("Unsqueeze", ["x", "one_axis"], ["x3"]),
        helper.make_node("Expand", ["x3", "eshape"], ["xe"]),
        helper.make_node("ReduceMean", ["xe"], ["red"], axes=[1], keepdims=0),
        helper.make_node("Equal", ["red", "red"], ["same"]),
    ]
    inits = [f32("w", rng.standard_normal((3, 6))), f32("c", rng.standard_normal(3)),
             f32("k", rng.standard_normal((4, 2, 3, 3))), f32("zero", 0.0), i64("one", [1]), i64("minus1", [-1]),
             i64("kone", 1), i64("one_axis", [1]), i64("eshape", [1, 3, 1])]
    model = helper.make_model(helper.make_graph(nodes, "cover", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "cover.onnx"
    onnx.save(model, str(path))
    feeds = {"x": _rand(rng, 3, 6), "img": _rand(rng, 3, 2, 5, 5)}
    feeds["x"][0, 0] = np.nan
    want = ort.InferenceSession(str(path)).run(None, feeds)
    g = from_onnx(path)
    assert g.outputs["red"].type.shape == ("B", 6)
    got = ag.compile(g, backend="numpy").run(feeds)
    for name, w in zip(("gemm", "conv", "mix", "red"), want):
        np.testing.assert_allclose(got[name], w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_missing_onnx_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ag.errors.AttngraphError, match=r"attngraph\[onnx\]"):
        from_onnx("model.onnx")
