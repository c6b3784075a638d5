"""The demo tasks: data generation, decoding and the train step on tiny configs (fast), and
the end-to-end accuracy targets (slow: run in CI)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from attngraph import train
from attngraph.compiler import compile as compile_graph
from attngraph.tasks import TASKS, load_task
from attngraph.tasks import decimal_to_binary as d2b
from attngraph.tasks import vit_digits as vit
from tests.helpers import train_command


# -- decimal → binary: data -------------------------------------------------------------------------

def test_lengths():
    assert d2b.source_length(4096) == 4          # 4095
    assert d2b.target_length(4096) == 13         # 12 bits + <sos>/<eos>
    assert d2b.source_length(1000) == 3 and d2b.target_length(1000) == 11
    assert d2b.source_length(10000) == 4 and d2b.target_length(10000) == 15   # the default: 9999 → 14 bits


def test_encode_source_with_and_without_leading_zeros():
    src = d2b.encode_source([0, 42, 4095], 4)
    assert src.tolist() == [[1, 1, 1, 1], [1, 1, 5, 3], [5, 1, 10, 6]]   # "0000", "0042", "4095" (id = digit + 1)
    src = d2b.encode_source([0, 42, 4095], 4, leading_zeros=False)
    assert src.tolist() == [[1, 0, 0, 0], [5, 3, 0, 0], [5, 1, 10, 6]]
    assert [d2b.SRC_TOKENS[i] for i in src[1]] == ["4", "2", "<pad>", "<pad>"]


def test_encode_target_fixed_width():
    dec_in, dec_out = d2b.encode_target([5], 13)
    assert d2b.binary_text(5, 13) == "000000000101"
    assert [d2b.TGT_TOKENS[i] for i in dec_in[0]] == ["<sos>"] + list("000000000101")
    assert [d2b.TGT_TOKENS[i] for i in dec_out[0]] == list("000000000101") + ["<eos>"]
    assert d2b.decode_target(dec_out[0]) == "000000000101"


def test_encode_target_is_teacher_forcing_shifted():
    dec_in, dec_out = d2b.encode_target([0, 5, 4095], 13, leading_zeros=False)
    sos, eos, pad, zero, one = d2b.SOS, d2b.EOS, d2b.PAD, 3, 4
    assert dec_in[1].tolist() == [sos, one, zero, one] + [pad] * 9
    assert dec_out[1].tolist() == [one, zero, one, eos] + [pad] * 9
    assert dec_in[0].tolist()[:3] == [sos, zero, pad] and dec_out[0].tolist()[:3] == [zero, eos, pad]
    assert dec_out[2].tolist() == [one] * 12 + [eos]
    np.testing.assert_array_equal(dec_in[:, 1:][dec_out[:, :-1] != eos], dec_out[:, :-1][dec_out[:, :-1] != eos])
    for n, row in zip([0, 5, 4095], dec_out):
        assert d2b.decode_target(row) == format(n, "b")


def test_split_holds_numbers_out():
    train_n, test_n = d2b.split_numbers(4096, 0.2, seed=0)
    assert len(train_n) + len(test_n) == 4096 and len(test_n) == 819
    assert not set(train_n.tolist()) & set(test_n.tolist())
    again = d2b.split_numbers(4096, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], test_n)
    assert not np.array_equal(d2b.split_numbers(4096, 0.2, seed=1)[1], test_n)


def test_make_arrays():
    arrays = d2b.make_arrays(np.array([3, 10]), 100, leading_zeros=False)
    assert set(arrays) == {"src", "src_pad", "tgt_in", "tgt_out"}
    assert arrays["src_pad"].tolist() == [[False, True], [False, False]]
    assert arrays["tgt_in"].shape == arrays["tgt_out"].shape == (2, 8)


def test_exact_match():
    numbers = [5, 6]
    _, dec_out = d2b.encode_target(numbers, 5)
    em, tok = d2b.exact_match(dec_out, numbers)
    assert em == 1.0 and tok == 1.0
    assert d2b.decode_target(dec_out[1]) == "0110"
    wrong = dec_out.copy()
    wrong[1, 0] = 4                                        # "1110"
    em, tok = d2b.exact_match(wrong, numbers)
    assert em == 0.5 and tok == pytest.approx(9 / 10)     # 4 bits + <eos> per number
    _, short = d2b.encode_target(numbers, 5, leading_zeros=False)
    assert d2b.exact_match(short, numbers, leading_zeros=False) == (1.0, 1.0)


# -- decimal → binary: model, decoding, training -----------------------------------------------------

def _tiny_d2b(**kw):
    return d2b.Config(max_number=64, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, **kw)


def test_greedy_decode_feeds_back_its_tokens():
    """A fake graph that always predicts "1" until position 2, then <eos>: decoding follows it."""
    seen = []

    def fake(feeds):
        seen.append(feeds["tgt_in"].copy())
        n, t = feeds["tgt_in"].shape
        logits = np.zeros((n, t, len(d2b.TGT_TOKENS)), np.float32)
        logits[:, :, 4] = 1.0
        logits[:, 2:, d2b.EOS] = 2.0
        return {"logits": logits}

    produced = d2b.greedy_decode(fake, d2b.encode_source([3, 7], 2), 6)
    assert [d2b.decode_target(p) for p in produced] == ["11", "11"]
    assert produced[0].tolist() == [4, 4, d2b.EOS, 0, 0, 0]
    assert len(seen) == 3                                  # stopped once every row had <eos>
    assert seen[-1][0].tolist() == [d2b.SOS, 4, 4, 0, 0, 0]


@pytest.mark.parametrize("norm_first", [False, True])
def test_decode_graph_runs_and_gives_attention(norm_first):
    cfg = _tiny_d2b(norm_first=norm_first)
    model = d2b.build_model(cfg)
    exe = compile_graph(d2b.build_decode_graph(model, cfg, attention=True), backend="cpu")
    src = d2b.encode_source([0, 9, 63], 2)
    produced, weights = d2b.greedy_decode(exe.run, src, d2b.target_length(64), attention=True)
    assert produced.shape == (3, 7) and weights.shape == (3, 7, 2)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    plain = compile_graph(d2b.build_decode_graph(model, cfg), backend="cpu")
    feeds = {"src": src, "src_pad": src == d2b.PAD, "tgt_in": d2b.encode_target([0, 9, 63], 7)[0]}
    np.testing.assert_allclose(exe.run(feeds)["logits"], plain.run(feeds)["logits"], rtol=1e-4, atol=1e-5)


def test_decode_graph_matches_numpy_reference():
    cfg = _tiny_d2b(leading_zeros=False)
    model = d2b.build_model(cfg)
    graph = d2b.build_decode_graph(model, cfg)
    arrays = d2b.make_arrays([1, 17, 40], 64, leading_zeros=False)
    feeds = {k: arrays[k] for k in ("src", "src_pad", "tgt_in")}
    ref = compile_graph(graph, backend="numpy").run(feeds)["logits"]
    cpu = compile_graph(graph, backend="cpu").run(feeds)["logits"]
    np.testing.assert_allclose(cpu, ref, rtol=1e-4, atol=1e-4)


def test_d2b_train_step_lowers_the_loss():
    cfg = _tiny_d2b()
    model = d2b.build_model(cfg)
    step = train.compile_train_step(d2b.build_train_graph(model, cfg), "loss", optimizer=train.AdamW(3e-3))
    feeds = d2b.make_arrays(np.arange(32), 64)
    losses = [step(feeds) for _ in range(15)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] * 0.8


def test_d2b_run_tiny():
    result = d2b.run(_tiny_d2b(epochs=2, batch_size=16, warmup_steps=4))
    m = result.metrics
    assert m["n_train"] + m["n_test"] == 64 and m["n_test"] == 13
    assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["token_accuracy"] <= 1.0
    assert len(result.history.epoch_loss) == 2 and result.history.epoch_loss[1] < result.history.epoch_loss[0]
    assert "exact match" in result.summary()
    assert set(result.model.state_dict()) >= {"generator.weight", "transformer.decoder.norm.weight"}


# -- ViT digits ---------------------------------------------------------------------------------------

def test_synthetic_digits():
    images, labels = vit.synthetic_digits(50, seed=0)
    assert images.shape == (50, 8, 8) and labels.shape == (50,)
    assert images.min() >= 0 and images.max() <= 16
    np.testing.assert_array_equal(vit.synthetic_digits(50, seed=0)[0], images)


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 20)
    tr, te = vit.split(labels, 0.25, seed=0)
    assert len(te) == 50 and len(tr) == 150 and not set(tr) & set(te)
    assert np.bincount(labels[te]).tolist() == [5] * 10


def test_shift_images_and_shifted_batches():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    moved = vit.shift_images(x, np.array([[1, -1]]), fill=-1.0)[0, 0]
    assert moved[0].tolist() == [-1, -1, -1, -1] and moved[:, -1].tolist() == [-1, -1, -1, -1]
    np.testing.assert_array_equal(moved[1:, :3], x[0, 0, :3, 1:])
    assert vit.shift_images(x, np.array([[0, 0]]))[0, 0].tolist() == x[0, 0].tolist()
    data = {"images": np.random.default_rng(0).random((10, 1, 8, 8), np.float32), "labels": np.arange(10)}
    batches = vit.ShiftedBatches(train.Batches(data, 4), max_shift=1, fill=0.0)
    assert len(batches) == 3
    first, again = list(batches(0)), list(batches(0))
    assert all(np.array_equal(a["images"], b["images"]) for a, b in zip(first, again))   # same epoch, same data
    assert sum(len(f["labels"]) for f in first) == 10


def test_vit_forward_shapes_and_reference():
    model = vit.TinyViT(8, 1, 4, 10, d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    graph = vit.build_eval_graph(model)
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    ref = compile_graph(graph, backend="numpy").run({"images": x})["logits"]
    cpu = compile_graph(graph, backend="cpu").run({"images": x})["logits"]
    assert ref.shape == (3, 10)
    np.testing.assert_allclose(cpu, ref, rtol=1e-4, atol=1e-4)
    assert "cls_token" in model.state_dict() and model.state_dict()["pos_embed.weight"].shape == (5, 16)


def test_vit_run_tiny_on_generated_images():
    cfg = vit.Config(synthetic=True, n_synthetic=200, patch=4, d_model=16, nhead=2, num_layers=1,
                     dim_feedforward=32, epochs=3, batch_size=32, warmup_steps=5)
    result = vit.run(cfg)
    m = result.metrics
    assert m["dataset"] == "generated digits" and m["n_train"] + m["n_test"] == 200 and 30 <= m["n_test"] <= 50
    assert result.history.epoch_loss[-1] < result.history.epoch_loss[0]
    assert 0.0 <= m["accuracy"] <= 1.0


# -- the command --------------------------------------------------------------------------------------

def test_tasks_registry():
    assert set(TASKS) >= {"decimal-to-binary", "vit-digits", "bahdanau-decimal", "captioning-shapes",
                          "detr-shapes", "segmentation-shapes"}
    assert load_task("decimal-to-binary") is d2b
    for name in TASKS:              # every task has what `attngraph train` calls
        task = load_task(name)
        assert callable(task.run) and hasattr(task, "Config") and hasattr(task.Result, "summary"), name


def test_cli_train_passes_its_options(monkeypatch, capsys):
    status, cfg, lines = train_command(monkeypatch, capsys, d2b, ["decimal-to-binary", "--epochs", "3", "--seed", "7"],
                                       log_line="training")
    assert status == 0
    assert isinstance(cfg, d2b.Config) and (cfg.epochs, cfg.seed, cfg.backend) == (3, 7, "cpu")
    assert lines == ["training", "fake summary"]
    status, cfg, _ = train_command(monkeypatch, capsys, vit, ["vit-digits"], log_line="training")
    assert status == 0
    assert isinstance(cfg, vit.Config) and cfg.epochs == vit.Config.epochs


def test_cli_train_rejects_bad_epochs(capsys):
    from attngraph.cli import main

    assert main(["train", "decimal-to-binary", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


# -- the accuracy targets (slow) ------------------------------------------------------------------------

@pytest.mark.slow
def test_decimal_to_binary_reaches_99_percent_exact_match(one_thread):
    t0 = time.perf_counter()
    result = d2b.run(d2b.Config())
    print(f"\n{result.summary()} ({time.perf_counter() - t0:.0f} s in all)")
    assert result.metrics["n_test"] == 2000
    assert result.metrics["exact_match"] >= 0.99, result.summary()


@pytest.mark.slow
def test_vit_digits_reaches_95_percent(one_thread):
    pytest.importorskip("sklearn")
    t0 = time.perf_counter()
    result = vit.run(vit.Config())
    print(f"\n{result.summary()} ({time.perf_counter() - t0:.0f} s in all)")
    assert result.metrics["accuracy"] >= 0.95, result.summary()
