"""The captioning model against an independent torch implementation with the same weights
(cpu backend, optimized), and greedy captions through the step graph."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph.errors import ShapeError
from attngraph.models.captioning import CaptioningModel

from tests.models.test_seq2seq_rnn import TorchDecoder

torch = pytest.importorskip("torch")
tnn = torch.nn

V, T, SOS = 7, 6, 1


class TorchCaptioner(tnn.Module):
    """Stride-2 convs + ReLU → (B, cells, C) + position embedding → the attention GRU decoder."""

    def __init__(self, channels, emb, hid, att, grid):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [tnn.Conv2d(c_in, c, 3, stride=2, padding=1), tnn.ReLU()]
            c_in = c
        self.encoder = tnn.Sequential(*layers)
        self.pos_embed = tnn.Parameter(torch.zeros(grid * grid, c_in))
        self.decoder = TorchDecoder(V, emb, c_in, hid, att)

    def grid(self, images):
        f = self.encoder(images)
        return f.flatten(2).transpose(1, 2) + self.pos_embed

    def forward(self, images, tgt_in):
        return self.decoder(tgt_in, self.grid(images), None)


def _pair(image_size=16, channels=(4, 8), seed=0):
    model = CaptioningModel(V, image_size, 3, channels, emb_dim=5, hidden_size=9, attn_dim=6).reset_parameters(seed)
    state = model.state_dict()
    state["pos_embed"] = np.random.default_rng(seed).normal(0, 0.5, state["pos_embed"].shape)   # not tiny: it matters
    model.load_state_dict(state)
    ref = TorchCaptioner(channels, 5, 9, 6, model.grid)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return model, ref.eval()


def _graph(model, image_size=16):
    g = ag.Graph("caption")
    images = g.input("images", ("B", 3, image_size, image_size))
    tgt = g.input("tgt_in", ("B", T), "int64")
    logits, weights = model(images, tgt)
    g.output("logits", logits)
    g.output("attention", weights)
    return g


@pytest.mark.parametrize("image_size,channels", [(16, (4, 8)), (16, (4, 6, 8))])
def test_teacher_forced_logits_and_attention_equal_torch(image_size, channels, rng):
    model, ref = _pair(image_size, channels)
    exe = ag.compile(_graph(model, image_size), backend="cpu")
    images = rng.random((3, 3, image_size, image_size), np.float32)
    tgt = rng.integers(1, V, (3, T))
    out = exe.run({"images": images, "tgt_in": tgt})
    with torch.no_grad():
        logits, weights = ref(torch.from_numpy(images), torch.from_numpy(tgt))
    cells = model.grid ** 2
    assert out["logits"].shape == (3, T, V) and out["attention"].shape == (3, T, cells)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["attention"], weights.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["attention"].sum(-1), 1.0, rtol=1e-5)


def test_greedy_captions_equal_torch_and_recomputation(rng):
    model, ref = _pair(seed=1)
    decoder = model.compile_decoder(backend="cpu")
    images = rng.random((4, 3, 16, 16), np.float32)
    tokens, attention = decoder.greedy({"images": images}, model.no_padding(4), T, SOS, eos=-1)
    with torch.no_grad():
        h = ref.grid(torch.from_numpy(images))
        s = ref.decoder.start(h, None)
        y = torch.full((4,), SOS, dtype=torch.long)
        expected = []
        for _ in range(T):
            lo, s, _ = ref.decoder.step(y, s, h, None)
            y = lo.argmax(-1)
            expected.append(y.numpy())
    np.testing.assert_array_equal(tokens, np.stack(expected, 1))
    full = ag.compile(_graph(model), backend="cpu")
    prefix = np.concatenate([np.full((4, 1), SOS), tokens[:, :-1]], axis=1)
    out = full.run({"images": images, "tgt_in": prefix})
    np.testing.assert_array_equal(out["logits"].argmax(-1), tokens)
    np.testing.assert_allclose(attention, out["attention"], rtol=1e-5, atol=1e-6)


def test_feature_grid_is_row_major(rng):
    """Cell k of the grid is the conv output at (k // gw, k % gw): a bright patch in the
    bottom-right quarter changes only the features of bottom-right cells."""
    model = CaptioningModel(V, 16, 3, (4,), emb_dim=3, hidden_size=4, attn_dim=3)   # one conv: 8×8 grid
    g = ag.Graph("grid")
    g.output("f", model.features(g.input("images", ("B", 3, 16, 16))))
    exe = ag.compile(g, backend="cpu")
    base = np.zeros((1, 3, 16, 16), np.float32)
    bright = base.copy()
    bright[:, :, 13:, 13:] = 1.0
    diff = np.abs(exe.run({"images": bright})["f"] - exe.run({"images": base})["f"]).sum(-1)[0]   # (64,)
    changed = {divmod(int(k), 8) for k in np.flatnonzero(diff > 0)}
    assert changed and all(r >= 6 and c >= 6 for r, c in changed)


def test_bad_shapes_raise():
    with pytest.raises(ShapeError, match="divisible"):
        CaptioningModel(V, 30, channels=(4, 8))
    model = CaptioningModel(V, 16, channels=(4, 8))
    g = ag.Graph("bad")
    with pytest.raises(ShapeError, match="expects images"):
        model(g.input("images", ("B", 1, 16, 16)), g.input("tgt_in", ("B", T), "int64"))
