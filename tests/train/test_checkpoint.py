"""Checkpoints: save and load, kill-safe writes (a crash mid-write leaves the old file), and
resuming fit after N steps gives bit-identical parameters and the same next losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import attngraph as ag
from attngraph import errors
from attngraph import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model():
    """A classifier with dropout (so the Generator's state matters) trained with Adam (so its moments do)."""
    g = ag.Graph("ckpt", seed=5)
    x, t = g.input("x", ("B", 4)), g.input("t", ("B",), "int64")
    w1, b1 = g.param("w1", (4, 24)), g.param("b1", (24,), init="zeros")
    w2 = g.param("w2", (24, 3))
    logits = ag.dropout(ag.gelu(x @ w1 + b1), 0.25) @ w2
    g.output("loss", train.cross_entropy(logits, t, label_smoothing=0.1))
    return g


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    return train.Batches({"x": x, "t": (x[:, 0] > 0).astype(np.int64) + (x[:, 3] > 0.3)}, batch_size=8, seed=1)


def new_step():
    return train.compile_train_step(model(), "loss", optimizer=train.AdamW(1e-2, amsgrad=True, clip_norm=1.0),
                                    backend="numpy", seed=11)


def params_of(step):
    return {k: v.copy() for k, v in step.params.items()}


def assert_identical(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_save_and_load_restore_everything(tmp_path):
    path = tmp_path / "run.safetensors"
    step = new_step()
    batches = list(data()(0))
    for feeds in batches[:3]:
        step.step(feeds)
    step.save(path, note="hello")
    other = new_step()
    info = other.load(path)
    assert info["note"] == "hello" and info["step"] == 3 and info["optimizer"]["type"] == "AdamW"
    assert other.step_count == 3
    assert_identical(params_of(other), params_of(step))
    assert_identical(other.optimizer.state_dict(), step.optimizer.state_dict())
    assert other.rng.bit_generator.state == step.rng.bit_generator.state
    assert other.step(batches[3]) == step.step(batches[3])              # same masks, same numbers
    assert_identical(params_of(other), params_of(step))


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    step = new_step()
    feeds = next(iter(data()(0)))
    step.step(feeds)
    step.save(path)
    saved = params_of(step)
    step.step(feeds)

    def crash(src, dst):
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(errors.SerializationError, match="disk unplugged"):
        step.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["run.safetensors"]              # the temp file is cleaned up
    other = new_step()
    assert other.load(path)["step"] == 1
    assert_identical(params_of(other), saved)


def test_a_process_killed_mid_write_leaves_the_old_checkpoint(tmp_path):
    """A child writes checkpoint 1, then is SIGKILLed while writing checkpoint 2."""
    path = tmp_path / "run.safetensors"
    ready = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        import numpy as np
        import safetensors.numpy
        from attngraph.train import save_checkpoint
        save_checkpoint({str(path)!r}, {{"w": np.arange(6, dtype=np.float32)}}, {{"step": 1}})

        def half_then_hang(arrays, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\\x00" * 40)           # a torn, half-written file
                f.flush()
            open({str(ready)!r}, "w").close()
            time.sleep(60)

        safetensors.numpy.save_file = half_then_hang
        save_checkpoint({str(path)!r}, {{"w": np.zeros(6, dtype=np.float32)}}, {{"step": 2}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert child.poll() is None, "the writer exited before the crash"
            assert time.time() < deadline, "the writer never started its second write"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    arrays, info = train.load_checkpoint(path)
    assert info["step"] == 1 and np.array_equal(arrays["w"], np.arange(6, dtype=np.float32))
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(leftovers) == 1                                  # the torn temp file, never renamed


class Crash(Exception):
    pass


class CrashAfter(train.Callback):
    """Dies (like a killed process) right after the given global step, before its checkpoint."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, state):
        if state.step.step_count == self.at:
            raise Crash


@pytest.mark.parametrize("every, crash_at, resume_from", [
    (1, 8, 7),      # checkpoint every step; crash mid-epoch 2 (5 batches per epoch)
    (None, 13, 10),  # checkpoint at epoch ends only: resume from the end of epoch 2
])
def test_resume_gives_identical_parameters_and_losses(tmp_path, every, crash_at, resume_from):
    epochs = 4
    uninterrupted = new_step()
    full = train.fit(uninterrupted, data(), epochs, progress=False)
    assert len(full.loss) == 20

    path = tmp_path / "run.safetensors"
    first = new_step()
    with pytest.raises(Crash):
        train.fit(first, data(), epochs, checkpoint=path, checkpoint_every=every, callbacks=[CrashAfter(crash_at)],
                  progress=False)
    resumed = new_step()                                          # a fresh process would compile anew
    history = train.fit(resumed, data(), epochs, checkpoint=path, checkpoint_every=every, resume=True,
                        progress=False)
    assert history.loss == full.loss[resume_from:]                  # the same next losses, exactly
    assert resumed.step_count == uninterrupted.step_count == 20
    assert_identical(params_of(resumed), params_of(uninterrupted))
    assert_identical(resumed.optimizer.state_dict(), uninterrupted.optimizer.state_dict())
    assert history.epoch_loss == full.epoch_loss


def test_resume_without_a_checkpoint_starts_fresh_and_wrong_model_is_refused(tmp_path):
    path = tmp_path / "none.safetensors"
    step = new_step()
    history = train.fit(step, data(), 1, checkpoint=path, resume=True, progress=False)
    assert len(history.loss) == 5 and path.exists()
    g = ag.Graph("other")
    x = g.input("x", ("B", 4))
    g.output("loss", ag.mean(x @ g.param("w", (4, 2))))
    other = train.compile_train_step(g, "loss", backend="numpy")
    with pytest.raises(errors.SerializationError):
        other.load(path)
    ag.io.save_safetensors({"w": np.zeros(2, np.float32)}, tmp_path / "plain.safetensors")
    with pytest.raises(errors.SerializationError, match="not an attngraph checkpoint"):
        train.load_checkpoint(tmp_path / "plain.safetensors")
