"""Bahdanau's seq2seq against an independent torch implementation with the same weights
(cpu backend, optimized), greedy decoding through the step graph, and the attention weights."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph import train
from attngraph.errors import ShapeError
from attngraph.models.seq2seq_rnn import AdditiveAttention, BahdanauSeq2Seq, GRUCell, StepDecoder

torch = pytest.importorskip("torch")
tnn = torch.nn

SRC_V, TGT_V, S, T = 9, 6, 5, 7
PAD, SOS, EOS = 0, 1, 2


# -- the independent implementation: torch modules with the same keys, the equations written out ----

class TorchAttention(tnn.Module):
    def __init__(self, q, k, a):
        super().__init__()
        self.W = tnn.Linear(q, a, bias=False)
        self.U = tnn.Linear(k, a)
        self.v = tnn.Linear(a, 1, bias=False)

    def forward(self, s, h, pad):
        e = self.v(torch.tanh(self.W(s)[:, None, :] + self.U(h)))[..., 0]     # e_tj = vᵀ tanh(W s + U h_j)
        if pad is not None:
            e = e.masked_fill(pad, float("-inf"))
        a = torch.softmax(e, dim=-1)
        return torch.einsum("bs,bsd->bd", a, h), a


class TorchDecoder(tnn.Module):
    def __init__(self, vocab, emb, mem, hid, att):
        super().__init__()
        self.embedding = tnn.Embedding(vocab, emb, padding_idx=PAD)
        self.init = tnn.Linear(mem, hid)
        self.attention = TorchAttention(hid, mem, att)
        self.cell = tnn.GRUCell(emb + mem, hid)
        self.out = tnn.Linear(hid + mem + emb, vocab)

    def start(self, h, pad):
        keep = (~pad).float() if pad is not None else torch.ones(h.shape[:2])
        mean = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        return torch.tanh(self.init(mean))

    def step(self, y_prev, s, h, pad):
        e = self.embedding(y_prev)
        c, a = self.attention(s, h, pad)
        s = self.cell(torch.cat([e, c], -1), s)
        return self.out(torch.cat([s, c, e], -1)), s, a

    def forward(self, tgt_in, h, pad):
        s = self.start(h, pad)
        logits, weights = [], []
        for t in range(tgt_in.shape[1]):
            lo, s, a = self.step(tgt_in[:, t], s, h, pad)
            logits.append(lo)
            weights.append(a)
        return torch.stack(logits, 1), torch.stack(weights, 1)


class TorchBahdanau(tnn.Module):
    def __init__(self, emb, hid, att, bidirectional):
        super().__init__()
        self.src_embed = tnn.Embedding(SRC_V, emb, padding_idx=PAD)
        self.encoder = tnn.GRU(emb, hid, batch_first=True, bidirectional=bidirectional)
        self.decoder = TorchDecoder(TGT_V, emb, hid * (2 if bidirectional else 1), hid, att)

    def forward(self, src, tgt_in, pad):
        h, _ = self.encoder(self.src_embed(src))
        return self.decoder(tgt_in, h, pad)

    def greedy(self, src, pad, max_len):
        h, _ = self.encoder(self.src_embed(src))
        s = self.decoder.start(h, pad)
        y = torch.full((src.shape[0],), SOS, dtype=torch.long)
        out = []
        for _ in range(max_len):
            lo, s, _ = self.decoder.step(y, s, h, pad)
            y = lo.argmax(-1)
            out.append(y)
        return torch.stack(out, 1)


def _pair(bidirectional=True, emb=6, hid=8, att=7, seed=0):
    model = BahdanauSeq2Seq(SRC_V, TGT_V, emb, hid, att, bidirectional=bidirectional).reset_parameters(seed)
    ref = TorchBahdanau(emb, hid, att, bidirectional)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return model, ref.eval()


def _batch(rng, n=4):
    src = rng.integers(1, SRC_V, (n, S))
    src[1, 3:] = PAD                          # padded sources: rows 1 and 2
    src[2, 1:] = PAD
    tgt = rng.integers(1, TGT_V, (n, T))
    return src, src == PAD, tgt


def _train_graph(model, with_pad=True):
    g = ag.Graph("bahdanau")
    src = g.input("src", ("B", S), "int64")
    pad = g.input("src_pad", ("B", S), "bool") if with_pad else None
    tgt = g.input("tgt_in", ("B", T), "int64")
    logits, weights = model(src, tgt, pad)
    g.output("logits", logits)
    g.output("attention", weights)
    return g


@pytest.mark.parametrize("bidirectional", [True, False])
def test_teacher_forced_logits_and_attention_equal_torch(bidirectional, rng):
    model, ref = _pair(bidirectional)
    exe = ag.compile(_train_graph(model), backend="cpu")          # optimized (fused)
    src, pad, tgt = _batch(rng)
    out = exe.run({"src": src, "src_pad": pad, "tgt_in": tgt})
    with torch.no_grad():
        logits, weights = ref(torch.from_numpy(src), torch.from_numpy(tgt), torch.from_numpy(pad))
    assert out["logits"].shape == (4, T, TGT_V) and out["attention"].shape == (4, T, S)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["attention"], weights.numpy(), rtol=1e-5, atol=1e-5)


def test_without_padding_mask_equals_torch(rng):
    model, ref = _pair(True, seed=1)
    exe = ag.compile(_train_graph(model, with_pad=False), backend="cpu")
    src = rng.integers(1, SRC_V, (3, S))
    tgt = rng.integers(1, TGT_V, (3, T))
    out = exe.run({"src": src, "tgt_in": tgt})
    with torch.no_grad():
        logits, weights = ref(torch.from_numpy(src), torch.from_numpy(tgt), None)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["attention"], weights.numpy(), rtol=1e-5, atol=1e-5)


def test_loss_gradients_equal_torch(rng):
    model, ref = _pair(True, seed=2)
    g = ag.Graph("bahdanau_loss")
    src = g.input("src", ("B", S), "int64")
    pad = g.input("src_pad", ("B", S), "bool")
    tgt = g.input("tgt_in", ("B", T), "int64")
    tgt_out = g.input("tgt_out", ("B", T), "int64")
    logits, _ = model(src, tgt, pad)
    loss = train.cross_entropy(logits, tgt_out, ignore_index=PAD)
    g.output("loss", loss)
    params = model.parameters(g)
    for name, grad in zip(params, ag.grad(loss, list(params.values()))):
        g.output("grad." + name, grad)
    exe = ag.compile(g, backend="cpu")
    s, p, t = _batch(rng)
    t_out = np.roll(t, -1, axis=1)
    t_out[0, -2:] = PAD
    out = exe.run({"src": s, "src_pad": p, "tgt_in": t, "tgt_out": t_out})
    lo, _ = ref(torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(p))
    ref_loss = tnn.functional.cross_entropy(lo.reshape(-1, TGT_V), torch.from_numpy(t_out).reshape(-1),
                                            ignore_index=PAD)
    ref_loss.backward()
    np.testing.assert_allclose(out["loss"], ref_loss.item(), rtol=1e-5)
    ref_params = dict(ref.named_parameters())
    assert set(params) == set(ref_params)
    for name in params:
        got, want = out["grad." + name], ref_params[name].grad.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_step_decoder_greedy_equals_torch_and_recomputation(rng):
    model, ref = _pair(True, seed=3)
    decoder = model.compile_decoder(S, backend="cpu")
    src, pad, _ = _batch(rng, n=5)
    tokens, attention = decoder.greedy({"src": src, "src_pad": pad}, pad, T, SOS, eos=-1)   # never stops
    with torch.no_grad():
        expected = ref.greedy(torch.from_numpy(src), torch.from_numpy(pad), T).numpy()
    np.testing.assert_array_equal(tokens, expected)
    # the teacher-forced graph, recomputed on the produced prefix, picks the same tokens and weights
    full = ag.compile(_train_graph(model), backend="cpu")
    prefix = np.concatenate([np.full((5, 1), SOS), tokens[:, :-1]], axis=1)
    out = full.run({"src": src, "src_pad": pad, "tgt_in": prefix})
    np.testing.assert_array_equal(out["logits"].argmax(-1), tokens)
    np.testing.assert_allclose(attention, out["attention"], rtol=1e-5, atol=1e-6)


def test_greedy_stops_each_row_at_eos(rng):
    model, _ = _pair(True, seed=4)
    decoder = model.compile_decoder(S, backend="cpu")
    src, pad, _ = _batch(rng, n=6)
    free, _ = decoder.greedy({"src": src, "src_pad": pad}, pad, T, SOS, eos=-1)
    eos = int(free[0, 1])                                       # pretend row 0's second token is <eos>
    tokens, attention = decoder.greedy({"src": src, "src_pad": pad}, pad, T, SOS, eos=eos)
    for row_free, row, att in zip(free, tokens, attention):
        hits = np.flatnonzero(row_free == eos)
        stop = hits[0] + 1 if len(hits) else T
        np.testing.assert_array_equal(row[:stop], row_free[:stop])
        assert (row[stop:] == PAD).all() and (att[stop:] == 0).all()
    assert (tokens[0, 2:] == PAD).all()


def test_attention_rows_sum_to_one_and_padding_gets_zero(rng):
    model, _ = _pair(False, seed=5)
    exe = ag.compile(_train_graph(model), backend="cpu")
    src, pad, tgt = _batch(rng)
    weights = exe.run({"src": src, "src_pad": pad, "tgt_in": tgt})["attention"]     # (B, T, S)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert (weights[np.broadcast_to(pad[:, None, :], weights.shape)] == 0).all()
    assert (weights[~np.broadcast_to(pad[:, None, :], weights.shape)] > 0).all()
    np.testing.assert_allclose(weights[2, :, 0], 1.0, rtol=1e-6)                     # one real source token


def test_additive_attention_alone_fully_masked_row_gives_zeros():
    att = AdditiveAttention(3, 4, 5)
    g = ag.Graph("att")
    q = g.input("q", ("B", 3))
    k = g.input("k", ("B", 2, 4))
    m = g.input("m", ("B", 2), "bool")
    ctx, w = att(q, k, key_padding_mask=m)
    g.output("ctx", ctx)
    g.output("w", w)
    rng = np.random.default_rng(0)
    out = ag.compile(g, backend="cpu").run({"q": rng.standard_normal((2, 3), np.float32),
                                             "k": rng.standard_normal((2, 2, 4), np.float32),
                                             "m": np.array([[True, True], [False, True]])})
    assert (out["w"][0] == 0).all() and (out["ctx"][0] == 0).all()
    assert out["w"][1].tolist() == [1.0, 0.0]


def test_gru_cell_equals_torch(rng):
    cell = GRUCell(5, 4).reset_parameters(0)
    ref = tnn.GRUCell(5, 4)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in cell.state_dict().items()})
    g = ag.Graph("cell")
    x, h = g.input("x", ("B", 5)), g.input("h", ("B", 4))
    g.output("y", cell(x, h))
    xs, hs = rng.standard_normal((3, 5), np.float32), rng.standard_normal((3, 4), np.float32)
    got = ag.compile(g, backend="cpu").run({"x": xs, "h": hs})["y"]
    with torch.no_grad():
        np.testing.assert_allclose(got, ref(torch.from_numpy(xs), torch.from_numpy(hs)).numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_bad_inputs_raise_shape_errors():
    model = BahdanauSeq2Seq(SRC_V, TGT_V, 4, 6)
    g = ag.Graph("bad")
    with pytest.raises(ShapeError, match="fixed length|a number"):
        model(g.input("src", ("B", S), "int64"), g.input("tgt_in", ("B", "T"), "int64"))
    g = ag.Graph("bad2")
    with pytest.raises(ShapeError, match="src"):
        model(g.input("src", ("B", S, 2), "int64"), g.input("tgt_in", ("B", T), "int64"))
    g = ag.Graph("bad3")
    with pytest.raises(ShapeError, match="padding mask"):
        model(g.input("src", ("B", S), "int64"), g.input("tgt_in", ("B", T), "int64"),
              g.input("src_pad", ("B", S + 1), "bool"))


def test_step_decoder_rejects_a_wrong_padding_mask(rng):
    model, _ = _pair(True)
    decoder = model.compile_decoder(S, backend="cpu")
    assert isinstance(decoder, StepDecoder)
    src, pad, _ = _batch(rng)
    with pytest.raises(ag.errors.FeedError):
        decoder.greedy({"src": src, "src_pad": pad}, pad[:, :-1], T, SOS, EOS)


def test_state_dict_keys_are_torch_keys():
    model, ref = _pair(True)
    assert set(model.state_dict()) == set(ref.state_dict())
