"""The segmentation-shapes task: generated scenes and masks, the IoU metric, a tiny run, the
command line (fast), and the held-out mean-IoU target (slow: run in CI)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from attngraph.compiler import compile as compile_graph
from attngraph.errors import AttngraphError
from attngraph.tasks import TASKS, load_task
from attngraph.tasks import segmentation_shapes as seg
from tests.helpers import train_command


def _tiny(**kw) -> seg.Config:
    base = dict(n_train=24, n_test=8, channels=(4, 8, 8, 16), fpn_dim=8, batch_size=8, epochs=2, warmup_steps=2)
    base.update(kw)
    return seg.Config(**base)


# -- data -------------------------------------------------------------------------------------------

def test_dataset_shapes_ranges_and_determinism():
    cfg = seg.Config()
    x, y = seg.make_dataset(40, cfg, seed=5)
    assert x.shape == (40, 3, 32, 32) and x.dtype == np.float32 and y.shape == (40, 32, 32) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == {0, 1, 2, 3}
    assert all(len(np.unique(m)) >= 2 for m in y)               # every image holds a shape
    x2, y2 = seg.make_dataset(40, cfg, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(seg.make_dataset(40, cfg, seed=6)[1], y)
    with pytest.raises(AttngraphError):
        seg.make_dataset(0, cfg, seed=0)


def test_masks_follow_the_drawn_pixels():
    """Shape pixels are bright in some channel; background pixels are dim (tint <= 0.3 plus noise)."""
    cfg = seg.Config(noise=0.0)
    x, y = seg.make_dataset(30, cfg, seed=1)
    brightest = x.max(axis=1)                                   # (N, H, W)
    assert brightest[y > 0].min() >= 0.75 and brightest[y == 0].max() <= 0.3


def test_shape_masks_have_their_geometry():
    circle, square, triangle = (seg._shape_mask(k, 16.0, 16.0, 8.0, 32) for k in (1, 2, 3))
    assert square.sum() == 16 * 16                                # side 2r
    assert abs(circle.sum() - np.pi * 64) < 12                    # area πr²
    assert abs(triangle.sum() - 8 * 16) < 12                      # base 2r, height 2r
    rows = triangle.sum(1)
    assert rows[8] < rows[16] < rows[23]                          # widens downwards: apex on top


# -- the metric ---------------------------------------------------------------------------------------

def test_confusion_and_iou_by_hand():
    truth = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]])
    conf = seg.confusion(pred, truth)
    assert conf.sum() == 8 and conf[0, 0] == 1 and conf[0, 1] == 1 and conf[2, 0] == 1
    iou = seg.iou_per_class(conf)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2, 1.0])
    assert seg.mean_iou(pred, truth) == pytest.approx(np.mean([1 / 3, 2 / 3, 1 / 2, 1.0]))
    assert seg.mean_iou(truth, truth) == 1.0
    # a class in neither truth nor prediction is left out of the mean
    assert seg.mean_iou(np.array([0, 0, 1]), np.array([0, 1, 1])) == pytest.approx((1 / 2 + 1 / 2) / 2)
    with pytest.raises(AttngraphError):
        seg.confusion(pred, truth[:1])


def test_mean_iou_agrees_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, (2, 5, 8, 8))
    want = metrics.jaccard_score(truth.ravel(), pred.ravel(), average="macro")
    assert seg.mean_iou(pred, truth) == pytest.approx(want)


# -- the model and a tiny run -------------------------------------------------------------------------

def test_eval_graph_fuses_the_attention_and_returns_weights():
    cfg = _tiny()
    model = seg.build_model(cfg)
    exe = compile_graph(seg.build_eval_graph(model, cfg, need_weights=True), backend="cpu")
    assert [n.op for n in exe.graph.nodes].count("attention") == 1
    x, _ = seg.make_dataset(3, cfg, seed=0)
    out = exe.run({"images": x})
    assert out["logits"].shape == (3, 4, 32, 32) and out["attention"].shape == (3, 16, 16)
    np.testing.assert_allclose(out["attention"].sum(-1), 1.0, rtol=1e-5)
    assert seg.predict(exe, x, batch_size=2).shape == (3, 32, 32)


def test_run_tiny():
    result = seg.run(_tiny())
    m = result.metrics
    assert (m["n_train"], m["n_test"]) == (24, 8) and len(m["iou"]) == 4
    assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["pixel_accuracy"] <= 1.0
    assert len(result.history.epoch_loss) == 2 and result.history.epoch_loss[1] < result.history.epoch_loss[0]
    assert "mean IoU" in result.summary()
    assert "attn.gamma" in result.model.state_dict()
    with pytest.raises(AttngraphError, match="multiple of 8"):
        seg.run(_tiny(image_size=30))


def test_registered_and_cli_passes_options(monkeypatch, capsys):
    assert TASKS["segmentation-shapes"] == "attngraph.tasks.segmentation_shapes"
    assert load_task("segmentation-shapes") is seg
    status, cfg, lines = train_command(monkeypatch, capsys, seg, ["segmentation-shapes", "--epochs", "2", "--seed", "3"])
    assert status == 0
    assert isinstance(cfg, seg.Config) and (cfg.epochs, cfg.seed, cfg.backend) == (2, 3, "cpu")
    assert lines[-1] == "fake summary"


# -- the target (slow) ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_segmentation_reaches_target_miou(one_thread):
    t0 = time.perf_counter()
    result = seg.run(seg.Config())
    print(f"\n{result.summary()} ({time.perf_counter() - t0:.0f} s in all)")
    assert result.metrics["n_test"] == 300
    assert result.metrics["miou"] >= MIOU_TARGET, result.summary()


# The defaults reach 0.779 on seed 0 (circle 0.63, square 0.73, triangle 0.75), with 25 s of CPU time
# (one thread, compiling included; kernels warm from the tests above). 0.70 leaves room for other BLAS builds.
MIOU_TARGET = 0.70
