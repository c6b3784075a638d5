"""Each loss against torch.nn.functional on random inputs, and its gradient (ag.grad) against torch autograd."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph import errors
from attngraph import train

torch = pytest.importorskip("torch")
F = torch.nn.functional


def evaluate(build, arrays: dict, wrt: str | None = None, shapes: dict | None = None):
    """Build a graph with one input per array, ``loss = build(**tensors)``; return (loss, d loss / d wrt)."""
    g = ag.Graph("loss")
    tensors = {k: g.input(k, (shapes or {}).get(k, a.shape), a.dtype.name) for k, a in arrays.items()}
    loss = build(**tensors)
    g.output("loss", loss)
    if wrt is not None:
        g.output("grad", ag.grad(loss, tensors[wrt]))
    out = ag.compile(g, backend="numpy").run(arrays)
    return out["loss"], out.get("grad")


def torch_eval(fn, arrays: dict, wrt: str | None = None):
    ts = {k: torch.tensor(a, requires_grad=(k == wrt)) for k, a in arrays.items()}
    loss = fn(**ts)
    grad = None
    if wrt is not None:
        loss.backward()
        grad = ts[wrt].grad.numpy()
    return loss.detach().numpy(), grad


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


# -- cross-entropy -------------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore", [None, 2, -100])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(rng, smoothing, ignore, reduction):
    logits = rng.standard_normal((7, 5)).astype(np.float32) * 3
    targets = rng.integers(0, 5, 7)
    if ignore is not None:
        targets[[1, 4]] = ignore
    ours, dours = evaluate(lambda logits, targets: train.cross_entropy(
        logits, targets, label_smoothing=smoothing, ignore_index=ignore, reduction=reduction),
        {"logits": logits, "targets": targets}, wrt="logits" if reduction != "none" else None)
    theirs, dtheirs = torch_eval(lambda logits, targets: F.cross_entropy(
        logits, targets, label_smoothing=smoothing, ignore_index=-100 if ignore is None else ignore,
        reduction=reduction), {"logits": logits, "targets": targets},
        wrt="logits" if reduction != "none" else None)
    close(ours, theirs)
    if dours is not None:
        close(dours, dtheirs)


def test_cross_entropy_classes_last_and_torch_layout(rng):
    logits = rng.standard_normal((2, 6, 4)).astype(np.float32)          # (B, T, C)
    targets = rng.integers(0, 4, (2, 6))
    targets[0, 0] = 0
    build = lambda logits, targets: train.cross_entropy(logits, targets, label_smoothing=0.2, ignore_index=0)
    ours, dours = evaluate(build, {"logits": logits, "targets": targets}, wrt="logits")
    theirs, dtheirs = torch_eval(lambda logits, targets: F.cross_entropy(
        logits.transpose(1, 2), targets, label_smoothing=0.2, ignore_index=0), {"logits": logits, "targets": targets},
        wrt="logits")
    close(ours, theirs)
    close(dours, dtheirs)
    # axis=1: torch's own (N, C, d) layout
    ours1, _ = evaluate(lambda logits, targets: train.cross_entropy(logits, targets, label_smoothing=0.2,
                                                                     ignore_index=0, axis=1),
                        {"logits": np.ascontiguousarray(logits.transpose(0, 2, 1)), "targets": targets})
    close(ours1, theirs)


def test_cross_entropy_soft_targets(rng):
    logits = rng.standard_normal((5, 3)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), 5).astype(np.float32)
    ours, dours = evaluate(lambda logits, probs: train.cross_entropy(logits, probs, label_smoothing=0.1),
                           {"logits": logits, "probs": probs}, wrt="logits")
    theirs, dtheirs = torch_eval(lambda logits, probs: F.cross_entropy(logits, probs, label_smoothing=0.1),
                                 {"logits": logits, "probs": probs}, wrt="logits")
    close(ours, theirs)
    close(dours, dtheirs)


def test_cross_entropy_symbolic_batch(rng):
    build = lambda logits, targets: train.cross_entropy(logits, targets, ignore_index=-1)
    for n in (3, 8):
        logits = rng.standard_normal((n, 4)).astype(np.float32)
        targets = rng.integers(-1, 4, n)
        targets[0] = 1
        ours, _ = evaluate(build, {"logits": logits, "targets": targets},
                           shapes={"logits": ("B", 4), "targets": ("B",)})
        close(ours, F.cross_entropy(torch.tensor(logits), torch.tensor(targets), ignore_index=-1).numpy())


def test_cross_entropy_rejects_bad_targets():
    g = ag.Graph("bad")
    logits = g.input("logits", (4, 3))
    with pytest.raises(errors.ShapeError):
        train.cross_entropy(logits, g.input("t", (3,), "int64"))
    with pytest.raises(errors.DTypeError):
        train.cross_entropy(logits, g.input("b", (4,), "bool"))
    with pytest.raises(errors.AttngraphError):
        train.cross_entropy(logits, g.input("t2", (4,), "int64"), reduction="avg")


# -- regression and binary losses --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mse_loss", "l1_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regression_losses_match_torch(rng, name, reduction):
    a = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float32)
    wrt = None if reduction == "none" else "a"
    ours, dours = evaluate(lambda a, b: getattr(train, name)(a, b, reduction=reduction), {"a": a, "b": b}, wrt=wrt)
    theirs, dtheirs = torch_eval(lambda a, b: getattr(F, name)(a, b, reduction=reduction), {"a": a, "b": b}, wrt=wrt)
    close(ours, theirs)
    if wrt:
        close(dours, dtheirs)


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_with_logits_matches_torch_and_is_stable(rng, weighted):
    x = (rng.standard_normal((6, 3)) * 4).astype(np.float32)
    x[0, 0], x[1, 1] = 120.0, -120.0                       # exp would overflow in a naive formula
    t = rng.random((6, 3)).astype(np.float32)
    w = rng.random((3,)).astype(np.float32) + 0.5
    pw = rng.random((3,)).astype(np.float32) * 3
    arrays = {"x": x, "t": t, **({"w": w, "pw": pw} if weighted else {})}
    ours, dours = evaluate(lambda x, t, w=None, pw=None: train.binary_cross_entropy_with_logits(
        x, t, weight=w, pos_weight=pw), arrays, wrt="x")
    theirs, dtheirs = torch_eval(lambda x, t, w=None, pw=None: F.binary_cross_entropy_with_logits(
        x, t, weight=w, pos_weight=pw), arrays, wrt="x")
    assert np.isfinite(ours) and np.isfinite(dours).all()
    close(ours, theirs)
    close(dours, dtheirs)


def test_bce_on_probabilities_matches_torch(rng):
    p = rng.uniform(0.01, 0.99, (5, 4)).astype(np.float32)
    p[0, 0], p[0, 1] = 0.0, 1.0                             # log clamped at -100, as torch
    t = (rng.random((5, 4)) > 0.5).astype(np.float32)
    t[0, 0], t[0, 1] = 1.0, 0.0
    ours, _ = evaluate(lambda p, t: train.binary_cross_entropy(p, t, reduction="sum"), {"p": p, "t": t})
    theirs, _ = torch_eval(lambda p, t: F.binary_cross_entropy(p, t, reduction="sum"), {"p": p, "t": t})
    close(ours, theirs)
    q = p[1:]
    ours, dours = evaluate(lambda q, t: train.binary_cross_entropy(q, t), {"q": q, "t": t[1:]}, wrt="q")
    theirs, dtheirs = torch_eval(lambda q, t: F.binary_cross_entropy(q, t), {"q": q, "t": t[1:]}, wrt="q")
    close(ours, theirs)
    close(dours, dtheirs, tol=1e-4)


# -- GIoU ------------------------------------------------------------------------------------------

def torch_giou_loss(a, b, eps=1e-7):
    """torchvision.ops.generalized_box_iou_loss (xyxy), written out."""
    ax0, ay0, ax1, ay1 = a.unbind(-1)
    bx0, by0, bx1, by1 = b.unbind(-1)
    inter = (torch.min(ax1, bx1) - torch.max(ax0, bx0)).clamp(min=0) * \
        (torch.min(ay1, by1) - torch.max(ay0, by0)).clamp(min=0)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    iou = inter / (union + eps)
    hull = (torch.max(ax1, bx1) - torch.min(ax0, bx0)) * (torch.max(ay1, by1) - torch.min(ay0, by0))
    return (1 - (iou - (hull - union) / (hull + eps))).mean()


def random_xyxy(rng, n):
    xy = rng.random((n, 2))
    wh = rng.uniform(0.05, 0.6, (n, 2))
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def test_giou_matches_torch_in_both_formats(rng):
    a, b = random_xyxy(rng, 8), random_xyxy(rng, 8)
    b[0] = a[0]                                              # identical: loss 0
    b[1] = a[1] + np.array([5, 5, 5, 5], np.float32)         # disjoint: loss > 1
    ours, dours = evaluate(lambda a, b: train.giou_loss(a, b), {"a": a, "b": b}, wrt="a")
    theirs, dtheirs = torch_eval(torch_giou_loss, {"a": a, "b": b}, wrt="a")
    close(ours, theirs)
    close(dours, dtheirs, tol=1e-4)
    per_box, _ = evaluate(lambda a, b: train.giou_loss(a, b, reduction="none"), {"a": a, "b": b})
    assert abs(per_box[0]) < 1e-6 and per_box[1] > 1.0

    def to_cxcywh(x):
        return np.concatenate([(x[:, :2] + x[:, 2:]) / 2, x[:, 2:] - x[:, :2]], axis=-1).astype(np.float32)

    ours_c, _ = evaluate(lambda a, b: train.giou_loss(a, b, fmt="cxcywh"), {"a": to_cxcywh(a), "b": to_cxcywh(b)})
    close(ours_c, theirs)
