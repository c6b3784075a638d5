"""The training step and fit: a tiny regression and a tiny classifier learn, dropout differs between
train and eval mode, seeded runs are reproducible, callbacks and the progress bar, and the cpu backend."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph import errors
from attngraph import train
from attngraph.train.trainer import GRAD_PREFIX


def regression_graph():
    g = ag.Graph("regression", seed=1)
    x, y = g.input("x", ("B", 3)), g.input("y", ("B", 1))
    w1, b1 = g.param("w1", (3, 16)), g.param("b1", (16,), init="zeros")
    w2 = g.param("w2", (16, 1))
    pred = ag.tanh(x @ w1 + b1) @ w2
    g.output("pred", pred)
    g.output("loss", train.mse_loss(pred, y))
    return g


def regression_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]).astype(np.float32)
    return {"x": x, "y": y}


def classifier_graph(p=0.3):
    g = ag.Graph("classifier", seed=2)
    x, t = g.input("x", ("B", 4)), g.input("t", ("B",), "int64")
    w1, b1 = g.param("w1", (4, 32)), g.param("b1", (32,), init="zeros")
    w2 = g.param("w2", (32, 3))
    h = ag.dropout(ag.relu(x @ w1 + b1), p)
    logits = h @ w2
    g.output("logits", logits)
    g.output("loss", train.cross_entropy(logits, t, label_smoothing=0.05))
    return g


def classifier_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    t = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] + x[:, 2] > 0.5)
    return {"x": x, "t": t}


def test_regression_loss_decreases():
    step = train.compile_train_step(regression_graph(), "loss", optimizer=train.Adam(2e-2), backend="numpy")
    data = regression_data()
    history = train.fit(step, train.Batches(data, 16), epochs=8, progress=False)
    assert len(history.loss) == 8 * 4 and len(history.epoch_loss) == 8
    assert history.epoch_loss[-1] < 0.5 * history.epoch_loss[0]
    final = step.evaluate(data)
    assert float(final["loss"]) < history.epoch_loss[0]


def test_classifier_learns_with_dropout_and_eval_callback():
    data = classifier_data()
    step = train.compile_train_step(classifier_graph(), "loss",
                                    optimizer=train.AdamW(train.cosine(3e-2, total_steps=60, warmup=5)),
                                    backend="numpy", seed=3)

    def accuracy(s):
        s.eval()
        out = s.forward(data)
        s.train()
        return {"acc": float((out["logits"].argmax(-1) == data["t"]).mean()), "loss": float(out["loss"])}

    history = train.fit(step, train.Batches(data, 32), epochs=12, eval_fn=accuracy, progress=False)
    assert history.metrics[-1]["loss"] < 0.7 * history.metrics[0]["loss"] or history.metrics[0]["acc"] > 0.9
    assert history.metrics[-1]["acc"] > 0.8
    assert step.step_count == 36 and step.optimizer.last_lr == pytest.approx(train.cosine(3e-2, 60, 5)(36))


def test_dropout_train_and_eval_modes():
    p = 0.5
    g = ag.Graph("drop")
    x = g.input("x", ("B", 64))
    w = g.param("w", (64,), init="ones")
    h = ag.dropout(x * w, p)
    g.output("h", h)
    g.output("loss", ag.mean(h * h))
    step = train.compile_train_step(g, "loss", optimizer=train.SGD(0.0), backend="numpy", seed=0)
    assert [s.input for s in step.dropout_sites] == ["__dropout_0"]
    assert "dropout" in g.op_counts() and "dropout" not in step.train_graph.op_counts()
    xv = np.random.default_rng(1).uniform(1, 2, (8, 64)).astype(np.float32)

    a, b = step.forward({"x": xv})["h"], step.forward({"x": xv})["h"]          # train mode
    assert not np.array_equal(a, b)
    for out in (a, b):
        kept = out != 0
        np.testing.assert_allclose(out[kept], xv[kept] / (1 - p), rtol=1e-6)
        assert 0.3 < kept.mean() < 0.7

    step.eval()
    c, d = step.forward({"x": xv})["h"], step.forward({"x": xv})["h"]          # eval mode: the identity
    assert np.array_equal(c, d) and np.array_equal(c, xv)
    reference = ag.compile(g, backend="numpy").run({"x": xv})["h"]
    assert np.array_equal(c, reference)
    # an update step in eval mode feeds masks of ones: the loss is the eval loss
    assert step.step({"x": xv}) == pytest.approx(float(np.mean(xv * xv)), rel=1e-6)
    with pytest.raises(errors.FeedError):                  # masks are sized from the feeds
        step.train().forward({})


def test_with_dropout_leaves_the_graph_alone():
    g = classifier_graph()
    before = [n.id for n in g.nodes]
    new, sites = train.with_dropout(g)
    assert [n.id for n in g.nodes] == before and "__dropout_0" not in g.inputs
    assert len(sites) == 1 and sites[0].p == pytest.approx(0.3) and sites[0].shape == ("B", 32)
    assert "__dropout_0" in new.inputs and set(new.outputs) == set(g.outputs)
    step = train.compile_train_step(g, "loss", backend="numpy")
    assert [n.id for n in g.nodes] == before and set(g.outputs) == {"logits", "loss"}
    assert {GRAD_PREFIX + n for n in ("w1", "b1", "w2")} <= set(step.train_graph.outputs)


def test_seeded_runs_are_reproducible_and_seeds_matter():
    data = classifier_data()

    def run(seed):
        step = train.compile_train_step(classifier_graph(), "loss", optimizer=train.Adam(1e-2), backend="numpy",
                                        seed=seed)
        history = train.fit(step, train.Batches(data, 32, seed=7), epochs=2, progress=False)
        return history.loss, {k: v.copy() for k, v in step.params.items()}

    (l1, p1), (l2, p2), (l3, _) = run(0), run(0), run(1)
    assert l1 == l2 and all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert l1 != l3


def test_callbacks_and_early_stop():
    events = []

    class Recorder(train.Callback):
        def on_fit_start(self, state):
            events.append("start")

        def on_step_end(self, state):
            events.append(("step", state.epoch, state.batch))

        def on_epoch_end(self, state):
            events.append(("epoch", state.epoch, dict(state.metrics)))
            if state.epoch == 1:
                state.stop = True

        def on_fit_end(self, state):
            events.append("end")

    seen = []
    step = train.compile_train_step(regression_graph(), "loss", optimizer=train.SGD(0.05), backend="numpy")
    data = regression_data(32)
    batches = [{"x": data["x"][i:i + 16], "y": data["y"][i:i + 16]} for i in (0, 16)]   # a plain list works too
    history = train.fit(step, batches, epochs=5, eval_fn=lambda s: 1.5, callbacks=[Recorder(), seen.append],
                        progress=False)
    assert events[0] == "start" and events[-1] == "end"
    assert [e for e in events if e[0] == "step"] == [("step", 0, 1), ("step", 0, 2), ("step", 1, 1), ("step", 1, 2)]
    assert ("epoch", 0, {"eval": 1.5}) in events
    assert len(seen) == 2 and len(history.epoch_loss) == 2 and history.metrics == [{"eval": 1.5}] * 2


def test_progress_bar_shows_loss_and_throughput(capsys):
    step = train.compile_train_step(regression_graph(), "loss", optimizer=train.SGD(0.05), backend="numpy")
    train.fit(step, train.Batches(regression_data(32), 16), epochs=1, progress=True,
              eval_fn=lambda s: {"mse": 0.25})
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "samples_s=" in err


def test_compile_train_step_errors():
    g = regression_graph()
    with pytest.raises(errors.AttngraphError, match="no output 'nope'"):
        train.compile_train_step(g, "nope", backend="numpy")
    with pytest.raises(errors.AttngraphError, match="unknown parameter"):
        train.compile_train_step(g, "loss", ["w9"], backend="numpy")
    with pytest.raises(errors.GradError):
        train.compile_train_step(g, "pred", backend="numpy")        # not a scalar


def test_train_some_parameters_only():
    step = train.compile_train_step(regression_graph(), "loss", ["w2"], optimizer=train.SGD(0.1), backend="numpy")
    frozen = step.params["w1"].copy()
    step.step(regression_data(16))
    assert np.array_equal(step.params["w1"], frozen) and step.param_names == ["w2"]


def test_cpu_backend_train_step_matches_numpy():
    data = classifier_data(32)
    feeds = {"x": data["x"], "t": data["t"]}
    steps = [train.compile_train_step(classifier_graph(p=0.2), "loss", optimizer=train.Adam(1e-2), backend=b, seed=4)
             for b in ("numpy", "cpu")]
    for _ in range(3):
        losses = [s.step(feeds) for s in steps]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for name in steps[0].params:
        np.testing.assert_allclose(steps[1].params[name], steps[0].params[name], rtol=1e-4, atol=1e-5)


def test_train_steps_equal_torch_training():
    """Loss, gradients (ag.grad) and the optimizer together: three AdamW steps of the regression MLP."""
    torch = pytest.importorskip("torch")
    g = regression_graph()
    step = train.compile_train_step(g, "loss", optimizer=train.AdamW(1e-2, weight_decay=0.1), backend="numpy")
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in g.values.items() if k in g.params}
    opt = torch.optim.AdamW(list(tp.values()), lr=1e-2, weight_decay=0.1)
    data = regression_data(48)
    for i in range(3):
        feeds = {k: v[16 * i:16 * (i + 1)] for k, v in data.items()}
        x, y = torch.tensor(feeds["x"]), torch.tensor(feeds["y"])
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch.tanh(x @ tp["w1"] + tp["b1"]) @ tp["w2"], y)
        loss.backward()
        opt.step()
        assert step.step(feeds) == pytest.approx(loss.item(), rel=1e-5)
    for k, t in tp.items():
        np.testing.assert_allclose(step.params[k], t.detach().numpy(), rtol=1e-5, atol=1e-6)
