"""The detr-shapes task: the generated data, the detection metrics on hand-made cases, one
training step, a tiny run (fast), and the held-out mAP target (slow)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from attngraph.models.matching import box_cxcywh_to_xyxy
from attngraph.tasks import TASKS, load_task
from attngraph.tasks import detr_shapes as ds
from tests.helpers import train_command


# -- data --------------------------------------------------------------------------------------------

def test_draw_shape_masks():
    sq, circle, tri = (ds.draw_shape(k, 9) for k in ds.SHAPES)
    assert sq.all() and circle.sum() < sq.sum() and tri.sum() < circle.sum()
    assert circle[4].all() and circle[:, 4].all() and not circle[0, 0]
    assert tri[-1].all() and tri[0].sum() == 1 and tri[0, 4]                   # apex up, full base
    with pytest.raises(Exception, match="unknown shape"):
        ds.draw_shape("star", 5)


def test_make_shapes_is_deterministic_with_tight_disjoint_boxes():
    images, targets = ds.make_shapes(40, seed=3)
    again, _ = ds.make_shapes(40, seed=3)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(ds.make_shapes(40, seed=4)[0], images)
    assert images.shape == (40, 3, 32, 32) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    counts = [len(t["labels"]) for t in targets]
    assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) > 1
    labels = np.concatenate([t["labels"] for t in targets])
    assert set(labels.tolist()) == {0, 1, 2}
    for img, t in zip(images, targets):
        xyxy = np.round(box_cxcywh_to_xyxy(t["boxes"]) * 32).astype(int)
        bright = img.max(0) > 0.45                                               # shapes; background is dark
        covered = np.zeros_like(bright)
        for x0, y0, x1, y1 in xyxy:
            assert 7 <= x1 - x0 <= 13 and 7 <= y1 - y0 <= 13
            inside = bright[y0:y1, x0:x1]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()   # tight
            assert not covered[y0:y1, x0:x1].any()                               # disjoint
            covered[y0:y1, x0:x1] = True
        assert not (bright & ~covered).any()                                     # nothing outside the boxes


# -- metrics -----------------------------------------------------------------------------------------

def _targets():
    return [{"labels": np.array([0, 1]), "boxes": np.array([[0.25, 0.25, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2]])},
            {"labels": np.array([0]), "boxes": np.array([[0.5, 0.5, 0.4, 0.4]])}]


def _dets(rows):
    """rows per image: (score, label, box)."""
    return [{"scores": np.array([r[0] for r in img], float), "labels": np.array([r[1] for r in img], int),
             "boxes": np.array([r[2] for r in img], float).reshape(-1, 4)} for img in rows]


def test_perfect_detections_give_one():
    t = _targets()
    dets = _dets([[(0.9, 0, t[0]["boxes"][0]), (0.8, 1, t[0]["boxes"][1]), (0.1, 2, [0.5, 0.5, 0.1, 0.1])],
                  [(0.95, 0, t[1]["boxes"][0])]])
    m, aps = ds.mean_average_precision(dets, t, num_classes=3)
    assert m == 1.0 and aps == [1.0, 1.0, None]                                  # class 2 has no target
    assert ds.matched_iou(dets, t) == pytest.approx(1.0)


def test_hand_made_average_precision():
    t = [{"labels": np.array([0, 0]), "boxes": np.array([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}]
    # ranked: hit (P 1, R .5), miss, duplicate of the first target (a miss), hit (P 2/4, R 1)
    dets = _dets([[(0.9, 0, [0.2, 0.2, 0.2, 0.2]), (0.8, 0, [0.45, 0.45, 0.1, 0.1]),
                   (0.75, 0, [0.21, 0.2, 0.2, 0.2]), (0.7, 0, [0.7, 0.71, 0.2, 0.2])]])
    m, aps = ds.mean_average_precision(dets, t, num_classes=1)
    assert aps[0] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5) and m == aps[0]
    assert ds.average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(
        0.5 + 0.5 * 2 / 3)
    assert ds.average_precision(np.array([]), np.array([])) == 0.0


def test_wrong_class_or_poor_box_scores_zero():
    t = _targets()
    boxes = [t[0]["boxes"][0], t[0]["boxes"][1], t[1]["boxes"][0]]
    wrong_class = _dets([[(0.9, 1, boxes[0]), (0.9, 0, boxes[1])], [(0.9, 1, boxes[2])]])
    m, aps = ds.mean_average_precision(wrong_class, t, 3)
    assert aps[:2] == [0.0, 0.0] and m == 0.0
    shifted = _dets([[(0.9, 0, [0.4, 0.25, 0.2, 0.2])], []])                    # IoU 1/7 with target 0
    assert ds.mean_average_precision(shifted, t, 3)[1][0] == 0.0
    assert ds.matched_iou(shifted, t) == pytest.approx((1 / 7) / 3)              # three targets in all
    assert ds.matched_iou(_dets([[(0.4, 0, boxes[0])], []]), t) == 0.0          # below the score threshold


def test_detections_from_logits():
    logits = np.array([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]]])           # class 0; no object
    boxes = np.full((1, 2, 4), 0.5)
    d = ds.detections(logits, boxes)[0]
    assert d["labels"].tolist() == [0, 0]
    assert d["scores"][0] == pytest.approx(np.exp(2) / (np.exp(2) + 3)) and d["scores"][1] < 0.01


# -- training ----------------------------------------------------------------------------------------

def _tiny(**kw):
    return ds.Config(n_train=48, n_test=16, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                     dim_feedforward=32, num_queries=4, backbone_channels=(8, 16), batch_size=16, **kw)


def test_run_tiny_checkpoint_and_resume(tmp_path):
    path = str(tmp_path / "detr.safetensors")
    first = ds.run(_tiny(epochs=1, warmup_steps=2, checkpoint=path))
    assert first.metrics["steps"] == 3 and len(first.history) == 1
    result = ds.run(_tiny(epochs=2, warmup_steps=2, checkpoint=path))            # resumes after epoch 1
    m = result.metrics
    assert m["steps"] == 6 and m["n_test"] == 16 and result.history[0] == first.history[0]
    assert len(result.history) == 2 and np.isfinite(result.history).all()
    assert 0.0 <= m["map50"] <= 1.0 and 0.0 <= m["matched_iou"] <= 1.0 and len(m["ap50"]) == 3
    assert "mAP@0.5" in result.summary()
    assert "transformer.decoder.norm.weight" in result.model.state_dict()


def test_cli_train_builds_the_config(monkeypatch, capsys):
    assert TASKS["detr-shapes"] == "attngraph.tasks.detr_shapes" and load_task("detr-shapes") is ds
    status, cfg, lines = train_command(monkeypatch, capsys, ds, ["detr-shapes", "--epochs", "3", "--seed", "7"])
    assert status == 0
    assert isinstance(cfg, ds.Config) and (cfg.epochs, cfg.seed, cfg.backend, cfg.checkpoint) == (3, 7, "cpu", None)
    assert "\n".join(lines).strip() == "fake summary"


# -- the target (slow) -------------------------------------------------------------------------------

# 12 epochs of 63 batches (756 steps) at a constant learning rate after the warmup: measured
# (seed 0) mAP@0.5 0.356 and matched-box IoU 0.466, and 0.414 and 0.504 after other changes to
# the kernels' rounding the same day (DETR's training amplifies such differences), in 59-65 s of
# training on a quiet 2-core machine; an untrained model gets about 0.002 and 0.0. DETR is in the
# middle of its take-off then (the 40-epoch default reaches 0.69-0.90 and 0.83, see
# docs/tutorials/detr.md), so the targets say "clearly finds the shapes", with a margin.
SLOW_CONFIG = dict(epochs=12, min_lr_ratio=1.0)
MAP_TARGET = 0.20
IOU_TARGET = 0.30


@pytest.mark.slow
def test_detr_finds_the_shapes():             # run() trains on one thread (Config.threads)
    t0 = time.perf_counter()
    result = ds.run(ds.Config(**SLOW_CONFIG))
    print(f"\n{result.summary()} ({time.perf_counter() - t0:.0f} s in all)")
    assert result.metrics["map50"] >= MAP_TARGET, result.summary()
    assert result.metrics["matched_iou"] >= IOU_TARGET, result.summary()
