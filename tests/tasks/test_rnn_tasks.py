"""The RNN tasks: Bahdanau decimal → binary and captioning generated shapes. Data, decoding
and tiny runs (fast), and the accuracy targets (slow: run in CI)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from attngraph import train
from attngraph.tasks import bahdanau_decimal as bd
from attngraph.tasks import captioning_shapes as cs
from attngraph.tasks import decimal_to_binary as d2b
from attngraph.tasks import load_task
from tests.helpers import train_command


# -- bahdanau-decimal ------------------------------------------------------------------------------

def _tiny_bd(**kw):
    return bd.Config(**{"max_number": 64, "emb_dim": 8, "hidden_size": 12, "attn_dim": 10, **kw})


def test_bahdanau_task_reuses_the_decimal_to_binary_data():
    assert bd.make_arrays is d2b.make_arrays and bd.split_numbers is d2b.split_numbers
    assert bd.exact_match is d2b.exact_match
    assert load_task("bahdanau-decimal") is bd


def test_bahdanau_train_step_lowers_the_loss():
    cfg = _tiny_bd()
    model = bd.build_model(cfg)
    step = train.compile_train_step(bd.build_train_graph(model, cfg), "loss", optimizer=train.AdamW(1e-2))
    feeds = d2b.make_arrays(np.arange(32), 64)
    losses = [step(feeds) for _ in range(15)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.8


def test_bahdanau_decode_gives_tokens_and_alignment():
    cfg = _tiny_bd(leading_zeros=False)
    model = bd.build_model(cfg)
    decoder = bd.build_decoder(model, cfg)
    tokens, attention = bd.decode(decoder, [0, 7, 63], cfg)
    assert tokens.shape == (3, 7) and attention.shape == (3, 7, 2)
    rows = attention.sum(-1)
    assert np.all((np.abs(rows - 1) < 1e-5) | (rows == 0))          # a softmax, or 0 after <eos>
    assert (attention[0, :, 1] == 0).all()                           # "0" is one digit: the 2nd is <pad>


def test_bahdanau_run_tiny():
    result = bd.run(_tiny_bd(epochs=2, batch_size=16, warmup_steps=4))
    m = result.metrics
    assert m["n_train"] + m["n_test"] == 64 and m["n_test"] == 13
    assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["token_accuracy"] <= 1.0
    assert result.history.epoch_loss[1] < result.history.epoch_loss[0]
    assert "exact match" in result.summary() and len(result.examples) == 8
    np.testing.assert_array_equal(result.model.state_dict()["decoder.out.weight"],
                                  result.step.params["decoder.out.weight"])


# -- captioning-shapes: data -----------------------------------------------------------------------

def test_scenes_and_captions():
    scenes = cs.all_scenes()
    assert len(scenes) == 4 * 9 + 6 * 81 == len(set(scenes))
    assert " ".join(cs.caption_words([(0, "red", "square"), (3, "blue", "circle")])) == \
        "red square top left and blue circle bottom right"
    assert cs.caption_words([(1, "green", "triangle")]) == ["green", "triangle", "top", "right"]
    dec_in, dec_out = cs.encode_captions([[(2, "blue", "circle")], [(0, "red", "square"), (1, "red", "circle")]])
    assert dec_in.shape == dec_out.shape == (2, cs.CAPTION_LEN)
    assert [cs.TOKENS[i] for i in dec_in[0, :6]] == ["<sos>", "blue", "circle", "bottom", "left", "<pad>"]
    assert dec_out[0, 4] == cs.EOS and dec_out[1, 9] == cs.EOS
    np.testing.assert_array_equal(dec_in[:, 1:][dec_out[:, :-1] != cs.EOS], dec_out[:, :-1][dec_out[:, :-1] != cs.EOS])
    assert cs.decode_caption(dec_out[1]) == "red square top left and red circle top right"


def test_draw_scene_puts_each_shape_in_its_cell():
    rng = np.random.default_rng(0)
    img = cs.draw_scene([(1, "red", "square"), (2, "blue", "circle")], rng, noise=0.0)
    assert img.shape == (3, 32, 32) and img.dtype == np.float32
    red = (img[0] > 0.5) & (img[2] < 0.5)
    blue = (img[2] > 0.5) & (img[0] < 0.5)
    assert red[:16, 16:].sum() >= 100 and red.sum() == red[:16, 16:].sum()       # top right only
    assert blue[16:, :16].sum() >= 60 and blue.sum() == blue[16:, :16].sum()     # bottom left only
    again = cs.draw_scene([(1, "red", "square"), (2, "blue", "circle")], np.random.default_rng(0), noise=0.0)
    np.testing.assert_array_equal(img, again)


def test_split_holds_descriptions_out():
    train_s, test_s = cs.split_scenes(0.2, seed=0)
    assert len(train_s) + len(test_s) == 522 and len(test_s) == 104 and not set(train_s) & set(test_s)
    assert cs.split_scenes(0.2, seed=0)[1] == test_s and cs.split_scenes(0.2, seed=1)[1] != test_s
    cfg = cs.Config(n_train=50)
    tr, te, scenes = cs.make_dataset(cfg)
    assert tr["images"].shape == (50, 3, 32, 32) and te["images"].shape == (104, 3, 32, 32)
    assert -1.0 <= tr["images"].min() and tr["images"].max() <= 1.0
    train_captions = {cs.decode_caption(r) for r in tr["tgt_out"]}
    assert not train_captions & {" ".join(cs.caption_words(s)) for s in scenes}
    np.testing.assert_array_equal(cs.make_dataset(cfg)[0]["images"], tr["images"])      # deterministic


def test_caption_accuracy():
    _, target = cs.encode_captions([[(0, "red", "square")], [(3, "blue", "circle")]])
    assert cs.caption_accuracy(target, target) == (1.0, 1.0)
    wrong = target.copy()
    wrong[1, 1] = cs.TOKENS.index("square")
    em, tok = cs.caption_accuracy(wrong, target)
    assert em == 0.5 and tok == pytest.approx(9 / 10)


# -- captioning-shapes: model and run ----------------------------------------------------------------

def test_captioning_run_tiny():
    cfg = cs.Config(n_train=64, channels=(4, 8, 8), emb_dim=6, hidden_size=12, attn_dim=8, epochs=2,
                    batch_size=32, warmup_steps=2)
    result = cs.run(cfg)
    m = result.metrics
    assert m["n_test"] == 104 and m["n_train"] == 64
    assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["token_accuracy"] <= 1.0
    assert result.history.epoch_loss[1] < result.history.epoch_loss[0]
    assert "caption" in result.summary() and len(result.examples) == 8
    tokens, attention = cs.caption(result.model, result.decoder, np.zeros((2, 3, 32, 32), np.float32))
    assert tokens.shape == (2, cs.CAPTION_LEN) and attention.shape == (2, cs.CAPTION_LEN, 16)


def test_cli_runs_the_rnn_tasks(monkeypatch, capsys):
    status, cfg, lines = train_command(monkeypatch, capsys, bd, ["bahdanau-decimal", "--epochs", "3", "--seed", "7"])
    assert status == 0 and lines == ["fake summary"]
    assert isinstance(cfg, bd.Config) and (cfg.epochs, cfg.seed) == (3, 7)
    status, cfg, lines = train_command(monkeypatch, capsys, cs, ["captioning-shapes"])
    assert status == 0 and lines == ["fake summary"]
    assert isinstance(cfg, cs.Config) and cfg.epochs == cs.Config.epochs


# -- the accuracy targets (slow) --------------------------------------------------------------------

@pytest.mark.slow
def test_bahdanau_decimal_reaches_65_percent_exact_match(one_thread):
    """0..999 (800 numbers trained, 200 held out), 40 epochs: 74.5% to 79.5% exact match measured
    (seed 0; the number moves by a few points when the backend's summation order changes),
    in 38 to 65 s on a shared 2-core machine."""
    t0 = time.perf_counter()
    result = bd.run(bd.Config(max_number=1000, epochs=40, batch_size=32, lr=5e-3))
    print(f"\n{result.summary()} ({time.perf_counter() - t0:.0f} s in all)")
    assert result.metrics["n_test"] == 200
    assert result.metrics["exact_match"] >= 0.65, result.summary()


@pytest.mark.slow
def test_captioning_shapes_reaches_70_percent_of_held_out_captions(one_thread):
    """4,000 training images, 4 epochs; one image of each of the 104 held-out descriptions:
    82.7% to 85.6% exact, 98.1% to 98.4% tokens measured (seed 0), in 29 s."""
    t0 = time.perf_counter()
    result = cs.run(cs.Config(n_train=4000, epochs=4))
    print(f"\n{result.summary()} ({time.perf_counter() - t0:.0f} s in all)")
    assert result.metrics["exact_match"] >= 0.65, result.summary()
    assert result.metrics["token_accuracy"] >= 0.95, result.summary()
