"""Losses: functions that build graph nodes from Tensors, with torch.nn.functional's meaning.

Each takes graph Tensors and returns a Tensor of the same graph: a scalar for
``reduction="mean"`` (the default) or ``"sum"``, the per-element loss for ``"none"``.
They are written with ordinary ops (``log_softmax``, ``where``, ``maximum`` ...), so
``ag.grad`` differentiates them and the passes fuse them like the model; ``cross_entropy``
with int class targets is one ``softmax_cross_entropy`` op, whose gradient is one fused
``softmax_cross_entropy_grad`` op.

>>> logits = model(x)                                        # (B, T, V)
>>> loss = cross_entropy(logits, targets, label_smoothing=0.1, ignore_index=0)
>>> g.output("loss", loss)

Differences from torch, on purpose:

- ``cross_entropy`` puts the classes on the last axis (``axis=-1``), where attention
  models have them ((B, T, V) logits); torch puts them on axis 1 ((N, C, d1, ...)).
  Pass ``axis=1`` for torch's layout. For 2-D logits the two agree.
- ``ignore_index`` defaults to None (no class ignored); torch's default is -100.
- ``giou_loss`` compares boxes pairwise (box i of ``a`` with box i of ``b``), not all
  pairs; DETR takes the diagonal of its pairwise matrix, which is the same thing.
"""

from __future__ import annotations

from ..dsl import Tensor
from ..errors import AttngraphError, DTypeError, ShapeError
from ..ir import normalize_axis
from ..ir.shapes import format_shape
from .. import ops

__all__ = ["cross_entropy", "nll_from_log_probs", "mse_loss", "l1_loss", "binary_cross_entropy_with_logits",
           "binary_cross_entropy", "giou_loss", "box_cxcywh_to_xyxy", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    return loss


def _check_reduction(reduction: str, fn: str) -> None:
    if reduction not in REDUCTIONS:
        raise AttngraphError(f"{fn}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def _check_float(t: Tensor, what: str, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise AttngraphError(f"{fn}: {what} must be a graph Tensor, got {type(t).__name__}")
    if not t.dtype.is_float:
        raise DTypeError(f"{fn}: {what} must be float32 or float64, got {t.dtype}")


def _check_same_shape(a: Tensor, b: Tensor, fn: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ShapeError(f"{fn}: input {format_shape(a.shape)} and target {format_shape(b.shape)} differ in shape",
                         hint="losses compare element by element; reshape one of them")


def _as_float(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.astype(like.dtype)


# -- classification ---------------------------------------------------------------------------

def cross_entropy(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0, ignore_index: int | None = None,
                  reduction: str = "mean", axis: int = -1) -> Tensor:
    """Softmax cross-entropy, as ``torch.nn.functional.cross_entropy`` (without class weights).

    - ``logits``: (..., C) float scores, classes on ``axis`` (default the last one).
    - ``targets``: int class ids of shape ``logits.shape`` without the class axis; or float
      class probabilities of the same shape as ``logits`` (soft targets).
    - ``label_smoothing`` ε: the target becomes (1-ε)·one_hot + ε/C, so each loss is
      (1-ε)·(-log p[y]) + ε·mean_c(-log p[c]).
    - ``ignore_index``: targets equal to it add no loss; ``"mean"`` divides by the number
      of targets that are not ignored (NaN when all are, as in torch).
    """
    fn = "cross_entropy"
    _check_float(logits, "logits", fn)
    _check_reduction(reduction, fn)
    if not 0.0 <= label_smoothing <= 1.0:
        raise AttngraphError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.ndim == 0:
        raise ShapeError(f"{fn}: logits must have a class axis, got a scalar")
    axis = normalize_axis(axis, logits.ndim)
    if axis != logits.ndim - 1:   # move the classes last: (N, C, d1, ...) → (N, d1, ..., C)
        order = tuple(a for a in range(logits.ndim) if a != axis) + (axis,)
        logits = logits.transpose(order)
        if targets.dtype.is_float:
            targets = targets.transpose(order)
    num_classes = logits.shape[-1]
    eps = float(label_smoothing)

    if targets.dtype.is_float:                       # class probabilities
        log_p = ops.log_softmax(logits, axis=-1)
        if ignore_index is not None:
            raise AttngraphError(f"{fn}: ignore_index only applies to integer class targets")
        _check_same_shape(logits, targets, fn)
        probs = _as_float(targets, logits)
        if eps:
            probs = probs * (1.0 - eps) + eps / num_classes
        return _reduce(-ops.sum(log_p * probs, axis=-1), reduction)

    if not targets.dtype.is_int:
        raise DTypeError(f"{fn}: targets must be int class ids or float probabilities, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(f"{fn}: logits {format_shape(logits.shape)} (classes last) need targets of shape "
                         f"{format_shape(logits.shape[:-1])}, got {format_shape(targets.shape)}")
    if not isinstance(num_classes, int):
        raise ShapeError(f"{fn}: the class axis must have a fixed size, got {num_classes!r}")
    # one fused op (ops/softmax_cross_entropy.py): ignored targets give 0, and its gradient is
    # one pass, (softmax - smoothed one-hot) * g
    loss = ops.softmax_cross_entropy(logits, targets, label_smoothing=eps, ignore_index=ignore_index)   # (...)
    if ignore_index is None:
        return _reduce(loss, reduction)
    valid = (targets != int(ignore_index)).astype(logits.dtype)                 # (...) 1 where counted
    if reduction == "mean":
        return ops.sum(loss) / ops.sum(valid)
    return _reduce(loss, reduction)


def nll_from_log_probs(log_p: Tensor, targets: Tensor) -> Tensor:
    """``-log_p[..., targets]`` per position: (..., C) log-probabilities and (...) int ids → (...).

    The pick is a product with a one-hot built from ``arange(C) == targets``, so a target
    outside [0, C) (a padding id such as -100) picks nothing and gives 0.
    """
    num_classes = log_p.shape[-1]
    classes = log_p.graph.arange(num_classes, dtype=targets.dtype)               # (C,)
    one_hot = (classes == targets[..., None]).astype(log_p.dtype)               # (..., C)
    return -ops.sum(log_p * one_hot, axis=-1)


def binary_cross_entropy_with_logits(logits: Tensor, targets: Tensor, *, weight=None, pos_weight=None,
                                     reduction: str = "mean") -> Tensor:
    """Sigmoid + binary cross-entropy in one stable formula (torch's):
    (1-t)·x + max(-x, 0) + log(1 + exp(-|x|)), and with ``pos_weight`` w:
    (1-t)·x + (1 + (w-1)·t)·(log(1 + exp(-|x|)) + max(-x, 0)).
    ``weight`` and ``pos_weight`` are Tensors or numbers that broadcast against ``logits``."""
    fn = "binary_cross_entropy_with_logits"
    _check_float(logits, "logits", fn)
    _check_reduction(reduction, fn)
    _check_same_shape(logits, targets, fn)
    t = _as_float(targets, logits)
    softplus_neg = ops.log(ops.exp(-ops.abs(logits)) + 1.0) + ops.maximum(-logits, 0.0)   # log(1 + e^-x)
    if pos_weight is None:
        loss = (1.0 - t) * logits + softplus_neg
    else:
        loss = (1.0 - t) * logits + ((pos_weight - 1.0) * t + 1.0) * softplus_neg
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def binary_cross_entropy(probs: Tensor, targets: Tensor, *, weight=None, reduction: str = "mean") -> Tensor:
    """-(t·log p + (1-t)·log(1-p)) on probabilities; each log is clamped at -100, as torch does."""
    fn = "binary_cross_entropy"
    _check_float(probs, "probs", fn)
    _check_reduction(reduction, fn)
    _check_same_shape(probs, targets, fn)
    t = _as_float(targets, probs)
    log_p = ops.maximum(ops.log(probs), -100.0)
    log_q = ops.maximum(ops.log(1.0 - probs), -100.0)
    loss = -(t * log_p + (1.0 - t) * log_q)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


# -- regression ------------------------------------------------------------------------------

def mse_loss(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:  # noqa: A002 (torch's name)
    """Mean squared error: (input - target)², reduced."""
    _check_float(input, "input", "mse_loss")
    _check_reduction(reduction, "mse_loss")
    _check_same_shape(input, target, "mse_loss")
    d = input - _as_float(target, input)
    return _reduce(d * d, reduction)


def l1_loss(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:  # noqa: A002
    """Mean absolute error: |input - target|, reduced."""
    _check_float(input, "input", "l1_loss")
    _check_reduction(reduction, "l1_loss")
    _check_same_shape(input, target, "l1_loss")
    return _reduce(ops.abs(input - _as_float(target, input)), reduction)


# -- boxes (DETR) ----------------------------------------------------------------------------

def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) boxes as (center x, center y, width, height) → (x0, y0, x1, y1), as in DETR."""
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return ops.concat([(c - 0.5 * s)[..., None] for c, s in ((cx, w), (cy, h))]
                      + [(c + 0.5 * s)[..., None] for c, s in ((cx, w), (cy, h))], axis=-1)


def giou_loss(boxes_a: Tensor, boxes_b: Tensor, *, fmt: str = "xyxy", reduction: str = "mean",
              eps: float = 1e-7) -> Tensor:
    """1 - generalized IoU of box i of ``boxes_a`` with box i of ``boxes_b``, shapes (..., 4).

    ``fmt="xyxy"``: corners (x0, y0, x1, y1) with x0 <= x1, y0 <= y1 (torchvision's
    ``generalized_box_iou_loss``, whose ``eps`` this shares); ``fmt="cxcywh"``: (center x,
    center y, width, height), DETR's prediction format, converted to corners first.
    GIoU = IoU - (C - U) / C, with U the union and C the smallest enclosing box's area.
    """
    fn = "giou_loss"
    _check_float(boxes_a, "boxes_a", fn)
    _check_float(boxes_b, "boxes_b", fn)
    _check_reduction(reduction, fn)
    _check_same_shape(boxes_a, boxes_b, fn)
    if boxes_a.ndim == 0 or boxes_a.shape[-1] != 4:
        raise ShapeError(f"{fn}: boxes must have shape (..., 4), got {format_shape(boxes_a.shape)}")
    if fmt == "cxcywh":
        boxes_a, boxes_b = box_cxcywh_to_xyxy(boxes_a), box_cxcywh_to_xyxy(boxes_b)
    elif fmt != "xyxy":
        raise AttngraphError(f"{fn}: fmt must be 'xyxy' or 'cxcywh', got {fmt!r}")
    ax0, ay0, ax1, ay1 = (boxes_a[..., i] for i in range(4))
    bx0, by0, bx1, by1 = (boxes_b[..., i] for i in range(4))
    area_a = (ax1 - ax0) * (ay1 - ay0)
    area_b = (bx1 - bx0) * (by1 - by0)
    inter_w = ops.maximum(ops.minimum(ax1, bx1) - ops.maximum(ax0, bx0), 0.0)
    inter_h = ops.maximum(ops.minimum(ay1, by1) - ops.maximum(ay0, by0), 0.0)
    inter = inter_w * inter_h
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    hull_w = ops.maximum(ax1, bx1) - ops.minimum(ax0, bx0)
    hull_h = ops.maximum(ay1, by1) - ops.minimum(ay0, by0)
    hull = hull_w * hull_h
    giou = iou - (hull - union) / (hull + eps)
    return _reduce(1.0 - giou, reduction)
