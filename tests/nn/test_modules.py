"""Each nn module against torch with the same weights: state_dict → numpy → load_state_dict,
compiled for the cpu backend with the optimizer on, outputs equal to 1e-5 (float32).

Graphs are few on purpose (each cpu compile costs seconds): one graph holds several modules
(children of a ModuleDict, so their keys do not clash) or several calls of one module on
different inputs (so CSE cannot merge them and each attention can fuse).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
import attngraph.nn as nn

torch = pytest.importorskip("torch")

from tests.torch_references import DetrPositionEmbeddingSine  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*mismatched.*:UserWarning"),        # torch on mixed mask types
              pytest.mark.filterwarnings("ignore:.*enable_nested_tensor.*:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*padding='same'.*:UserWarning")]

TOL = 1e-5


def numpy_state(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def close(got, want, tol=TOL):
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def some_masked(rng, shape, p=0.3):
    """A bool mask (True = not allowed) that leaves every row at least its first key."""
    m = rng.random(shape) < p
    m[..., 0] = False
    return m


def run_cpu(g, feeds):
    exe = ag.compile(g, backend="cpu")
    return exe, exe.run(feeds)


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# -- MultiheadAttention ------------------------------------------------------------------------
def test_multihead_attention_every_mask_fuses_and_matches_torch(rng):
    torch.manual_seed(0)
    B, L, S, E, H = 2, 5, 7, 16, 4
    tm = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        tm.in_proj_bias.normal_()
        tm.out_proj.bias.normal_()
    m = nn.MultiheadAttention(E, H, batch_first=True)
    m.load_state_dict(numpy_state(tm))

    feeds = {f"x{i}": randn(rng, B, L, E) for i in range(10)}
    feeds.update(mem=randn(rng, B, S, E), mem2=randn(rng, B, S, E), value2=randn(rng, B, S, E),
                 bool_mask=some_masked(rng, (L, L)), float_mask=randn(rng, L, L),
                 mask3d=some_masked(rng, (B * H, L, L)), kpm=some_masked(rng, (B, S)),
                 kpm_self=some_masked(rng, (B, L)), kpm_float=np.where(some_masked(rng, (B, L)), -1e9, 0).astype(
                     np.float32))
    kv_mask = some_masked(rng, (L, S))                                     # a numpy mask becomes a const
    g = ag.Graph("mha_masks")
    t = {k: g.input(k, v.shape, v.dtype) for k, v in feeds.items()}
    x = [t[f"x{i}"] for i in range(10)]
    fused_calls = {
        "plain": dict(args=(x[0], x[0], x[0])),
        "bool_attn_mask": dict(args=(x[1], x[1], x[1]), attn_mask=t["bool_mask"]),
        "float_attn_mask": dict(args=(x[2], x[2], x[2]), attn_mask=t["float_mask"]),
        "attn_mask_3d": dict(args=(x[3], x[3], x[3]), attn_mask=t["mask3d"]),
        "key_padding": dict(args=(x[4], x[4], x[4]), key_padding_mask=t["kpm_self"]),
        "float_key_padding": dict(args=(x[5], x[5], x[5]), key_padding_mask=t["kpm_float"]),
        "causal": dict(args=(x[6], x[6], x[6]), is_causal=True),
        "causal_const": dict(args=(x[7], x[7], x[7]), attn_mask=nn.generate_square_subsequent_mask(L)),
        "cross_padded": dict(args=(x[8], t["mem"], t["mem"]), key_padding_mask=t["kpm"]),
        "distinct_kv": dict(args=(x[9], t["mem2"], t["value2"]), attn_mask=kv_mask),
    }
    for name, call in fused_calls.items():
        kwargs = {k: v for k, v in call.items() if k != "args"}
        out, w = m(*call["args"], need_weights=False, **kwargs)
        assert w is None
        g.output(name, out)
    # need_weights: the softmax is an output as well; the fuser keeps it as attention's second
    # output (return_weights). nw_heads never uses its `@ V`, so that softmax stays a node.
    y = g.input("y", (B, L, E))
    out, w = m(y, t["mem"], t["mem"], key_padding_mask=t["kpm"])
    g.output("nw_out", out), g.output("nw_avg", w)
    y2 = g.input("y2", (B, L, E))
    out, w = m(y2, y2, y2, attn_mask=t["bool_mask"], average_attn_weights=False)
    g.output("nw_heads", w)
    feeds.update(y=randn(rng, B, L, E), y2=randn(rng, B, L, E))

    exe, got = run_cpu(g, feeds)
    assert exe.graph.op_counts().get("attention", 0) == len(fused_calls) + 1
    assert exe.graph.op_counts().get("softmax", 0) == 1
    assert len(exe.params) == 4                                            # created once, shared by every call

    f = {k: T(v) for k, v in feeds.items()}
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        X = [f[f"x{i}"] for i in range(10)]
        want = {
            "plain": tm(X[0], X[0], X[0], need_weights=False)[0],
            "bool_attn_mask": tm(X[1], X[1], X[1], attn_mask=f["bool_mask"], need_weights=False)[0],
            "float_attn_mask": tm(X[2], X[2], X[2], attn_mask=f["float_mask"], need_weights=False)[0],
            "attn_mask_3d": tm(X[3], X[3], X[3], attn_mask=f["mask3d"], need_weights=False)[0],
            "key_padding": tm(X[4], X[4], X[4], key_padding_mask=f["kpm_self"], need_weights=False)[0],
            "float_key_padding": tm(X[5], X[5], X[5], key_padding_mask=f["kpm_float"], need_weights=False)[0],
            "causal": tm(X[6], X[6], X[6], attn_mask=causal, is_causal=True, need_weights=False)[0],
            "causal_const": tm(X[7], X[7], X[7], attn_mask=causal, need_weights=False)[0],
            "cross_padded": tm(X[8], f["mem"], f["mem"], key_padding_mask=f["kpm"], need_weights=False)[0],
        }
        want["distinct_kv"] = tm(X[9], f["mem2"], f["value2"], attn_mask=T(kv_mask), need_weights=False)[0]
        want["nw_out"], want["nw_avg"] = tm(f["y"], f["mem"], f["mem"], key_padding_mask=f["kpm"])
        want["nw_heads"] = tm(f["y2"], f["y2"], f["y2"], attn_mask=f["bool_mask"], average_attn_weights=False)[1]
    for name, value in want.items():
        close(got[name], value)


def test_multihead_attention_layouts_and_projections(rng):
    """Sequence-first inputs, kdim/vdim (separate projection weights), add_bias_kv with add_zero_attn
    and masks, no bias, unbatched inputs: one graph, each variant a child of a ModuleDict."""
    torch.manual_seed(1)
    L, S, N, E, H = 4, 6, 3, 8, 2
    theirs = {
        "seq_first": torch.nn.MultiheadAttention(E, H),
        "kv_dims": torch.nn.MultiheadAttention(E, H, kdim=5, vdim=3, batch_first=True),
        "bias_kv": torch.nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True, batch_first=True),
        "no_bias": torch.nn.MultiheadAttention(E, H, bias=False, batch_first=True),
        "unbatched": torch.nn.MultiheadAttention(E, H),
    }
    mine = nn.ModuleDict({
        "seq_first": nn.MultiheadAttention(E, H),
        "kv_dims": nn.MultiheadAttention(E, H, kdim=5, vdim=3, batch_first=True),
        "bias_kv": nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True, batch_first=True),
        "no_bias": nn.MultiheadAttention(E, H, bias=False, batch_first=True),
        "unbatched": nn.MultiheadAttention(E, H),
    })
    mine.load_state_dict({f"{k}.{n}": v for k, m in theirs.items() for n, v in numpy_state(m).items()})
    for m in theirs.values():
        m.eval()
    assert "kv_dims.q_proj_weight" in mine.state_dict() and "kv_dims.in_proj_weight" not in mine.state_dict()

    feeds = dict(sf_q=randn(rng, L, N, E), sf_kv=randn(rng, S, N, E), sf_kpm=some_masked(rng, (N, S)),
                 kd_q=randn(rng, N, L, E), kd_k=randn(rng, N, S, 5), kd_v=randn(rng, N, S, 3),
                 bk_x=randn(rng, N, L, E), bk_mask=some_masked(rng, (L, L)), bk_kpm=some_masked(rng, (N, L)),
                 nb_x=randn(rng, N, L, E), ub_x=randn(rng, L, E), ub_kpm=some_masked(rng, (L,)))
    g = ag.Graph("mha_variants")
    t = {k: g.input(k, v.shape, v.dtype) for k, v in feeds.items()}
    g.output("seq_first", mine["seq_first"](t["sf_q"], t["sf_kv"], t["sf_kv"], key_padding_mask=t["sf_kpm"],
                                            need_weights=False)[0])
    g.output("kv_dims", mine["kv_dims"](t["kd_q"], t["kd_k"], t["kd_v"], need_weights=False)[0])
    g.output("bias_kv", mine["bias_kv"](t["bk_x"], t["bk_x"], t["bk_x"], attn_mask=t["bk_mask"],
                                        key_padding_mask=t["bk_kpm"], need_weights=False)[0])
    g.output("no_bias", mine["no_bias"](t["nb_x"], t["nb_x"], t["nb_x"], need_weights=False)[0])
    out, w = mine["unbatched"](t["ub_x"], t["ub_x"], t["ub_x"], key_padding_mask=t["ub_kpm"])
    g.output("unbatched", out), g.output("unbatched_w", w)
    exe, got = run_cpu(g, feeds)
    assert exe.graph.op_counts().get("attention", 0) == 5

    f = {k: T(v) for k, v in feeds.items()}
    with torch.no_grad():
        close(got["seq_first"], theirs["seq_first"](f["sf_q"], f["sf_kv"], f["sf_kv"],
                                                    key_padding_mask=f["sf_kpm"], need_weights=False)[0])
        close(got["kv_dims"], theirs["kv_dims"](f["kd_q"], f["kd_k"], f["kd_v"], need_weights=False)[0])
        close(got["bias_kv"], theirs["bias_kv"](f["bk_x"], f["bk_x"], f["bk_x"], attn_mask=f["bk_mask"],
                                                key_padding_mask=f["bk_kpm"], need_weights=False)[0])
        close(got["no_bias"], theirs["no_bias"](f["nb_x"], f["nb_x"], f["nb_x"], need_weights=False)[0])
        out, w = theirs["unbatched"](f["ub_x"], f["ub_x"], f["ub_x"], key_padding_mask=f["ub_kpm"])
        close(got["unbatched"], out)
        close(got["unbatched_w"], w)


# -- the Transformer family ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["post_norm_relu_batch_first", "pre_norm_gelu_seq_first"])
def test_transformer_matches_torch_through_safetensors(variant, rng, tmp_path):
    """nn.Transformer (encoder, decoder, their layers and final norms) with every mask kind,
    loaded from a safetensors file written from torch's state_dict."""
    torch.manual_seed(2)
    d, heads, ffn, S, L, N = 16, 2, 32, 6, 5, 2
    batch_first = variant.endswith("batch_first")
    cfg = dict(d_model=d, nhead=heads, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=ffn,
               dropout=0.1, batch_first=batch_first, norm_first=variant.startswith("pre"),
               activation="relu" if "relu" in variant else "gelu")
    theirs = torch.nn.Transformer(**cfg).eval()
    # torch's encoder, given a right-padded key padding mask in eval mode, runs on nested tensors and
    # returns zeros at the padded positions; these modules (and torch without nested tensors) do not.
    theirs.encoder.use_nested_tensor = False
    path = tmp_path / "transformer.safetensors"
    ag.io.save_safetensors(theirs.state_dict(), path)
    mine = nn.Transformer(**cfg)
    mine.load_state_dict(ag.io.load_safetensors(path))
    assert set(mine.state_dict()) == set(theirs.state_dict())

    batch = "B"
    shape = (lambda t: (batch, t, d)) if batch_first else (lambda t: (t, batch, d))
    g = ag.Graph(f"transformer_{variant}")
    src, tgt = g.input("src", shape(S)), g.input("tgt", shape(L))
    src_kpm = g.input("src_kpm", (batch, S), "bool")
    mem_kpm = g.input("mem_kpm", (batch, S), "bool")
    if batch_first:                                   # bool padding masks, a float causal mask as a const
        kwargs = dict(tgt_mask=nn.generate_square_subsequent_mask(L), src_key_padding_mask=src_kpm,
                      memory_key_padding_mask=mem_kpm)
    else:                                             # float masks fed at run time, the causal flag
        src_mask = g.input("src_mask", (S, S))
        mem_mask = g.input("mem_mask", (L, S), "bool")
        kwargs = dict(src_mask=src_mask, memory_mask=mem_mask, tgt_is_causal=True, src_key_padding_mask=src_kpm,
                      memory_key_padding_mask=mem_kpm)
    g.output("y", mine(src, tgt, **kwargs))

    feeds = dict(src=randn(rng, *[N if s == batch else s for s in shape(S)]),
                 tgt=randn(rng, *[N if s == batch else s for s in shape(L)]),
                 src_kpm=some_masked(rng, (N, S)), mem_kpm=some_masked(rng, (N, S)))
    if not batch_first:
        feeds.update(src_mask=randn(rng, S, S), mem_mask=some_masked(rng, (L, S)))
    exe, got = run_cpu(g, feeds)
    assert exe.graph.op_counts()["attention"] == 2 + 2 * 2

    f = {k: T(v) for k, v in feeds.items()}
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        if batch_first:
            want = theirs(f["src"], f["tgt"], tgt_mask=causal, src_key_padding_mask=f["src_kpm"],
                          memory_key_padding_mask=f["mem_kpm"])
        else:
            want = theirs(f["src"], f["tgt"], src_mask=f["src_mask"], memory_mask=f["mem_mask"], tgt_mask=causal,
                          tgt_is_causal=True, src_key_padding_mask=f["src_kpm"],
                          memory_key_padding_mask=f["mem_kpm"])
    close(got["y"], want)


def test_encoder_and_decoder_stacks_alone(rng):
    """TransformerEncoder (causal, final norm) and TransformerDecoder (no final norm) used on their
    own, with a symbolic batch and sequence length."""
    torch.manual_seed(3)
    d, heads = 8, 2
    enc_t = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d, heads, 16, batch_first=True, activation="gelu"), 2,
        norm=torch.nn.LayerNorm(d), enable_nested_tensor=False).eval()
    dec_t = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(d, heads, 16, batch_first=True,
                                                                         norm_first=True), 1).eval()
    root = nn.ModuleDict({
        "enc": nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 16, batch_first=True, activation="gelu"),
                                     2, norm=nn.LayerNorm(d)),
        "dec": nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, 16, batch_first=True, norm_first=True), 1),
    })
    root.load_state_dict({**{f"enc.{k}": v for k, v in numpy_state(enc_t).items()},
                          **{f"dec.{k}": v for k, v in numpy_state(dec_t).items()}})
    g = ag.Graph("stacks")
    x, mem = g.input("x", ("B", "T", d)), g.input("mem", ("B", "S", d))
    g.output("enc", root["enc"](x, is_causal=True))
    g.output("dec", root["dec"](x, mem, tgt_is_causal=True))
    feeds = dict(x=randn(rng, 3, 5, d), mem=randn(rng, 3, 4, d))
    exe, got = run_cpu(g, feeds)
    assert exe.graph.op_counts()["attention"] == 2 + 2

    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        close(got["enc"], enc_t(T(feeds["x"]), mask=causal, is_causal=True))
        close(got["dec"], dec_t(T(feeds["x"]), T(feeds["mem"]), tgt_mask=causal, tgt_is_causal=True))


# -- layers without attention --------------------------------------------------------------------
def test_linear_embedding_norms_convs_match_torch(rng):
    torch.manual_seed(4)
    theirs = torch.nn.ModuleDict({
        "linear": torch.nn.Linear(6, 5),
        "linear_nobias": torch.nn.Linear(6, 3, bias=False),
        "embedding": torch.nn.Embedding(11, 6, padding_idx=0),
        "ln": torch.nn.LayerNorm(6, eps=1e-6),
        "ln2d": torch.nn.LayerNorm((4, 6)),
        "conv": torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
        "conv_same": torch.nn.Conv2d(4, 4, (2, 3), padding="same", dilation=(1, 2), groups=2, bias=False),
        "deconv": torch.nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1, output_padding=1),
        "bn": torch.nn.BatchNorm2d(6),
        "bn_batch_stats": torch.nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        "mlp": torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                   torch.nn.Linear(8, 6), torch.nn.Tanh()),
    })
    with torch.no_grad():                     # non-trivial statistics and affine weights
        theirs["bn"].running_mean.normal_()
        theirs["bn"].running_var.uniform_(0.5, 2.0)
        theirs["bn"].weight.normal_()
        theirs["bn"].bias.normal_()
        theirs["ln"].weight.normal_()
        theirs["ln2d"].bias.normal_()
    theirs.eval()
    mine = nn.ModuleDict({
        "linear": nn.Linear(6, 5),
        "linear_nobias": nn.Linear(6, 3, bias=False),
        "embedding": nn.Embedding(11, 6, padding_idx=0),
        "ln": nn.LayerNorm(6, eps=1e-6),
        "ln2d": nn.LayerNorm((4, 6)),
        "conv": nn.Conv2d(4, 6, 3, stride=2, padding=1),
        "conv_same": nn.Conv2d(4, 4, (2, 3), padding="same", dilation=(1, 2), groups=2, bias=False),
        "deconv": nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1, output_padding=1),
        "bn": nn.BatchNorm2d(6),
        "bn_batch_stats": nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        "mlp": nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Dropout(0.2), nn.Linear(8, 6), nn.Tanh()),
    })
    state = numpy_state(theirs)
    assert "bn.num_batches_tracked" in state
    mine.load_state_dict(state)
    assert set(mine.state_dict()) == set(state)

    feeds = dict(v=randn(rng, 2, 4, 6), ids=rng.integers(0, 11, (2, 5)), img=randn(rng, 2, 4, 9, 8))
    g = ag.Graph("basic_modules")
    v, ids, img = g.input("v", ("B", 4, 6)), g.input("ids", ("B", 5), "int64"), g.input("img", ("B", 4, 9, 8))
    outs = {
        "linear": mine["linear"](v), "linear_nobias": mine["linear_nobias"](v), "embedding": mine["embedding"](ids),
        "ln": mine["ln"](v), "ln2d": mine["ln2d"](v), "conv_same": mine["conv_same"](img),
        "bn": mine["bn"](mine["conv"](img)), "mlp": mine["mlp"](v), "bn_batch_stats": mine["bn_batch_stats"](img),
    }
    outs["deconv"] = mine["deconv"](outs["bn"])
    outs["deconv_sized"] = mine["deconv"](outs["bn"], output_size=(9, 7))
    for k, t in outs.items():
        g.output(k, t)
    exe, got = run_cpu(g, feeds)

    f = {k: T(a) for k, a in feeds.items()}
    with torch.no_grad():
        conv_bn = theirs["bn"](theirs["conv"](f["img"]))
        want = {k: theirs[k](f["v"]) for k in ("linear", "linear_nobias", "ln", "ln2d", "mlp")}
        want.update(embedding=theirs["embedding"](f["ids"]), conv_same=theirs["conv_same"](f["img"]), bn=conv_bn,
                    deconv=theirs["deconv"](conv_bn), deconv_sized=theirs["deconv"](conv_bn, output_size=(9, 7)),
                    bn_batch_stats=theirs["bn_batch_stats"](f["img"]))
    for k, value in want.items():
        close(got[k], value)


# -- recurrent -----------------------------------------------------------------------------------
def test_gru_and_lstm_match_torch(rng):
    torch.manual_seed(5)
    steps, n, d_in, hid = 4, 3, 5, 6
    theirs = torch.nn.ModuleDict({
        "gru": torch.nn.GRU(d_in, hid, num_layers=2, batch_first=True, bidirectional=True),
        "lstm": torch.nn.LSTM(d_in, hid, num_layers=2),
        "gru_nobias": torch.nn.GRU(d_in, hid, bias=False),
    }).eval()
    mine = nn.ModuleDict({
        "gru": nn.GRU(d_in, hid, num_layers=2, batch_first=True, bidirectional=True),
        "lstm": nn.LSTM(d_in, hid, num_layers=2),
        "gru_nobias": nn.GRU(d_in, hid, bias=False),
    })
    mine.load_state_dict(numpy_state(theirs))
    assert "gru.weight_hh_l1_reverse" in mine.state_dict()

    feeds = dict(xb=randn(rng, n, steps, d_in), xs=randn(rng, steps, n, d_in), h0=randn(rng, 2, n, hid),
                 c0=randn(rng, 2, n, hid), xu=randn(rng, steps, d_in))
    g = ag.Graph("recurrent")
    xb, xs = g.input("xb", ("B", steps, d_in)), g.input("xs", (steps, "B", d_in))
    h0, c0, xu = g.input("h0", (2, "B", hid)), g.input("c0", (2, "B", hid)), g.input("xu", (steps, d_in))
    out, h = mine["gru"](xb)
    g.output("gru_out", out), g.output("gru_h", h)
    out, (h, c) = mine["lstm"](xs, (h0, c0))
    g.output("lstm_out", out), g.output("lstm_h", h), g.output("lstm_c", c)
    out, h = mine["gru_nobias"](xu)
    g.output("unbatched_out", out), g.output("unbatched_h", h)
    exe, got = run_cpu(g, feeds)

    f = {k: T(a) for k, a in feeds.items()}
    with torch.no_grad():
        out, h = theirs["gru"](f["xb"])
        close(got["gru_out"], out), close(got["gru_h"], h)
        out, (h, c) = theirs["lstm"](f["xs"], (f["h0"], f["c0"]))
        close(got["lstm_out"], out), close(got["lstm_h"], h), close(got["lstm_c"], c)
        out, h = theirs["gru_nobias"](f["xu"])
        close(got["unbatched_out"], out), close(got["unbatched_h"], h)


def test_recurrent_needs_a_static_length():
    g = ag.Graph("rnn")
    with pytest.raises(ag.errors.ShapeError, match="length must be a number"):
        nn.GRU(3, 4, batch_first=True)(g.input("x", ("B", "T", 3)))


# -- positional encodings ------------------------------------------------------------------------
class TutorialPositionalEncoding(torch.nn.Module):
    """The PyTorch tutorial's sinusoidal encoding, (T, N, d) layout."""

    def __init__(self, d_model, max_len=64):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return x + self.pe[: x.size(0)]


def test_positional_encodings_match_their_references(rng):
    d, steps, n, hh, ww, feats = 10, 7, 2, 5, 6, 8
    tutorial = TutorialPositionalEncoding(d)
    learned_t = torch.nn.Embedding(16, d)
    mine = nn.ModuleDict({"sin": nn.SinusoidalPositionalEncoding(d, max_len=64, batch_first=False),
                          "sin_bf": nn.SinusoidalPositionalEncoding(d, max_len=64),
                          "learned": nn.LearnedPositionalEncoding(16, d),
                          "detr": nn.PositionEmbeddingSine(feats, normalize=True),
                          "detr_raw": nn.PositionEmbeddingSine(feats)})
    mine.load_state_dict({"sin.pe": tutorial.pe.numpy(), "learned.weight": learned_t.weight.detach().numpy()})
    assert set(mine.state_dict()) == {"learned.weight"}

    mask = np.zeros((n, hh, ww), bool)
    mask[0, 3:, :], mask[1, :, 4:] = True, True                          # padded bottom rows / right columns
    feeds = dict(xs=randn(rng, steps, n, d), xb=randn(rng, n, steps, d), fmap=randn(rng, n, 3, hh, ww),
                 mask=mask)
    g = ag.Graph("positional")
    xs, xb = g.input("xs", (steps, "B", d)), g.input("xb", ("B", "T", d))
    fmap, m = g.input("fmap", ("B", 3, hh, ww)), g.input("mask", ("B", hh, ww), "bool")
    g.output("sin", mine["sin"](xs))
    g.output("sin_bf", mine["sin_bf"](xb))                                # symbolic length: a slice at run time
    g.output("learned", mine["learned"](xb))
    g.output("detr", mine["detr"](fmap, m))
    g.output("detr_raw", mine["detr_raw"](fmap, m))
    g.output("detr_nomask", mine["detr"](fmap))
    exe, got = run_cpu(g, feeds)

    f = {k: T(a) for k, a in feeds.items()}
    with torch.no_grad():
        close(got["sin"], tutorial(f["xs"]))
        close(got["sin_bf"], tutorial(f["xb"].transpose(0, 1)).transpose(0, 1))
        close(got["learned"], f["xb"] + learned_t.weight[:steps])
        close(got["detr"], DetrPositionEmbeddingSine(feats, normalize=True)(f["mask"]))
        close(got["detr_raw"], DetrPositionEmbeddingSine(feats)(f["mask"]))
        close(got["detr_nomask"], DetrPositionEmbeddingSine(feats, normalize=True)(torch.zeros(n, hh, ww,
                                                                                              dtype=bool)))


# -- state dicts, weight sharing, executables ----------------------------------------------------
def test_state_dict_errors_list_every_bad_key():
    m = nn.TransformerEncoderLayer(8, 2, 16)
    good = m.state_dict()
    bad = dict(good)
    del bad["linear1.bias"], bad["norm2.weight"]
    bad["linear2.weight"] = np.zeros((3, 3), np.float32)
    bad["self_attn.in_proj_weight"] = np.zeros((8, 8), np.float32)
    bad["extra.weight"] = np.zeros(3, np.float32)
    before = m.state_dict()["linear1.weight"]
    bad["linear1.weight"] = before + 1
    with pytest.raises(ag.errors.SerializationError) as err:
        m.load_state_dict(bad)
    text = str(err.value)
    for key in ("linear1.bias", "norm2.weight", "linear2.weight", "self_attn.in_proj_weight", "extra.weight",
                "(3, 3)", "(24, 8)"):
        assert key in text
    assert isinstance(err.value, nn.StateDictError)
    np.testing.assert_array_equal(m.state_dict()["linear1.weight"], before)     # nothing was loaded

    partial = {k: v + 1 for k, v in good.items() if k.startswith("linear")}
    partial["stray"] = np.zeros(1)
    result = m.load_state_dict(partial, strict=False)
    assert "norm1.weight" in result.missing_keys and result.unexpected_keys == ["stray"]
    np.testing.assert_array_equal(m.state_dict()["linear1.weight"], good["linear1.weight"] + 1)
    with pytest.raises(nn.StateDictError, match="linear1.weight"):              # shapes are checked even then
        m.load_state_dict({"linear1.weight": np.zeros((2, 2))}, strict=False)


def test_weight_sharing_scopes_load_into_and_load_from(rng):
    torch.manual_seed(6)
    tl = torch.nn.Linear(4, 4)
    lin = nn.Linear(4, 4)
    lin.load_state_dict(tl.state_dict())                                  # torch tensors are taken as well
    g = ag.Graph("shared", seed=3)
    x = g.input("x", ("B", 4))
    y = lin(lin(x))                                                       # one set of params, used twice
    assert sorted(g.params) == ["bias", "weight"]
    with pytest.raises(ag.errors.VerifyError, match="weight"):
        nn.Linear(4, 4)(x)                                                # another root's "weight" clashes
    other = nn.Linear(4, 2).named("head")
    g.output("y", other(y))
    assert "head.weight" in g.params
    assert sorted(other.parameters(g)) == ["head.bias", "head.weight"]
    assert any(n.scope == ("head",) for n in g.nodes if n.op == "matmul")

    exe = ag.compile(g, backend="cpu")
    feeds = {"x": randn(rng, 3, 4)}
    with torch.no_grad():
        head_t = torch.nn.Linear(4, 2)
        head_t.load_state_dict({k: T(v) for k, v in other.state_dict().items()})   # the graph-seeded init
        close(exe.run(feeds)["y"], head_t(tl(tl(T(feeds["x"])))))
        tl.weight.mul_(2.0)
    nn.load_into(exe, {"weight": tl.weight, "bias": tl.bias, "head.weight": head_t.weight,
                       "head.bias": head_t.bias})
    with torch.no_grad():
        close(exe.run(feeds)["y"], head_t(tl(tl(T(feeds["x"])))))
    with pytest.raises(nn.StateDictError) as err:
        nn.load_into(exe, {"weight": np.zeros((2, 2)), "nope": np.zeros(1)})
    assert all(s in str(err.value) for s in ("weight: got shape (2, 2)", "nope", "head.bias"))

    exe.params["head.bias"] = np.full(2, 7.0, np.float32)
    other.load_from(exe)
    np.testing.assert_array_equal(other.state_dict()["bias"], np.full(2, 7.0))


def test_scopes_follow_module_names():
    layer = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    g = ag.Graph("scoped")
    g.output("y", layer(g.input("x", ("B", 3, 8))))
    scopes = {n.scope for n in g.nodes}
    assert ("TransformerEncoder", "layers.1", "self_attn", "out_proj") in scopes
    assert "layers.1.self_attn.out_proj.weight" in g.params
