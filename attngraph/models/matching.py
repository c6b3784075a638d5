"""DETR's set matching in numpy: box formats, IoU and generalized IoU, and the Hungarian matcher.

DETR predicts a fixed set of N boxes per image and matches them one-to-one to the image's
M <= N target objects before computing any loss. The match minimizes, over all injective
maps from targets to predictions, the sum of the costs

    cost_class · (-p̂(class of the target))  +  cost_bbox · ‖b̂ - b‖₁  +  cost_giou · (-GIoU(b̂, b))

(DETR's ``HungarianMatcher``; ``scipy.optimize.linear_sum_assignment`` solves it). The
matching runs outside the graph, on the predictions of the current weights, and gives
the training graph its per-query targets (:meth:`HungarianMatcher.targets`).

Boxes are (center x, center y, width, height) in [0, 1] ("cxcywh", what DETR predicts) or
corners (x0, y0, x1, y1) ("xyxy"); the pairwise functions follow torchvision's ``box_iou``
and DETR's ``generalized_box_iou``.
"""

from __future__ import annotations

import numpy as np

from ..errors import AttngraphError, ShapeError

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou", "generalized_box_iou",
           "softmax", "HungarianMatcher", "QueryTargets"]


def _boxes(b, what: str = "boxes") -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    if b.ndim < 1 or b.shape[-1] != 4:
        raise ShapeError(f"{what} must have shape (..., 4), got {b.shape}")
    return b


def box_cxcywh_to_xyxy(b) -> np.ndarray:
    """(..., 4) (cx, cy, w, h) → (x0, y0, x1, y1)."""
    b = _boxes(b)
    cx, cy, w, h = np.moveaxis(b, -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(b) -> np.ndarray:
    """(..., 4) (x0, y0, x1, y1) → (cx, cy, w, h)."""
    b = _boxes(b)
    x0, y0, x1, y1 = np.moveaxis(b, -1, 0)
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(b) -> np.ndarray:
    """(..., 4) xyxy → (...) areas."""
    b = _boxes(b)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a, b) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, union), both (N, M), of every xyxy box of ``a`` (N, 4) with every one of ``b`` (M, 4)."""
    a, b = _boxes(a, "a").reshape(-1, 4), _boxes(b, "b").reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])                      # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])                      # (N, M, 2)
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return iou, union


def generalized_box_iou(a, b) -> np.ndarray:
    """(N, M) GIoU = IoU - (C - U) / C of xyxy boxes, C the area of the smallest box holding both.

    Degenerate boxes (x1 < x0) are an error, as in DETR (they make the enclosing area wrong).
    """
    a, b = _boxes(a, "a").reshape(-1, 4), _boxes(b, "b").reshape(-1, 4)
    if (a[:, 2:] < a[:, :2]).any() or (b[:, 2:] < b[:, :2]).any():
        raise AttngraphError("generalized_box_iou: boxes need x1 >= x0 and y1 >= y0")
    iou, union = box_iou(a, b)
    lt = np.minimum(a[:, None, :2], b[None, :, :2])
    rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    hull = wh[..., 0] * wh[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return iou - np.where(hull > 0, (hull - union) / np.where(hull > 0, hull, 1), 0.0)


def softmax(x, axis: int = -1) -> np.ndarray:
    """A numerically stable softmax in float64 (the class probabilities of the logits)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class QueryTargets(dict):
    """The training graph's per-query feeds for a batch (a dict; see :meth:`HungarianMatcher.targets`):

    - ``target_classes`` (B, N) int64: the matched target's class, ``num_classes`` (no object) elsewhere;
    - ``target_boxes`` (B, N, 4) float32 cxcywh: the matched target's box, a dummy valid box elsewhere;
    - ``box_weights`` (B, N) float32: 1 for matched queries, 0 elsewhere.
    """


class HungarianMatcher:
    """DETR's matcher: per image, the assignment of targets to queries of least total cost.

    ``matcher(logits, boxes, targets)``: ``logits`` (B, N, C+1) and ``boxes`` (B, N, 4) cxcywh
    are the model's outputs; ``targets`` a list of B dicts with ``labels`` (M,) and ``boxes``
    (M, 4) cxcywh. Returns B pairs (query indices, target indices), as DETR, sorted by query.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise AttngraphError("HungarianMatcher: all costs can't be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = float(cost_class), float(cost_bbox), float(cost_giou)

    def cost_matrix(self, logits, boxes, labels, target_boxes) -> np.ndarray:
        """(N, M) cost of giving target j to query i, for one image's (N, C+1) logits and (N, 4) boxes."""
        prob = softmax(logits)                                          # (N, C+1)
        labels = np.asarray(labels, dtype=np.int64)
        target_boxes = _boxes(target_boxes, "target boxes").reshape(-1, 4)
        boxes = _boxes(boxes).reshape(-1, 4)
        cost_class = -prob[:, labels]                                   # (N, M)
        cost_bbox = np.abs(boxes[:, None, :] - target_boxes[None, :, :]).sum(-1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    def __call__(self, logits, boxes, targets) -> list[tuple[np.ndarray, np.ndarray]]:
        from scipy.optimize import linear_sum_assignment

        logits, boxes = np.asarray(logits), np.asarray(boxes)
        if logits.ndim != 3 or boxes.shape != logits.shape[:2] + (4,):
            raise ShapeError(f"HungarianMatcher: logits (B, N, C+1) and boxes (B, N, 4) expected, got "
                             f"{logits.shape} and {boxes.shape}")
        if len(targets) != len(logits):
            raise ShapeError(f"HungarianMatcher: {len(logits)} images of predictions but {len(targets)} targets")
        out = []
        for lg, bx, t in zip(logits, boxes, targets):
            labels = np.asarray(t["labels"], dtype=np.int64)
            if len(labels) > len(lg):
                raise ShapeError(f"HungarianMatcher: {len(labels)} targets but only {len(lg)} queries")
            if len(labels) == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            rows, cols = linear_sum_assignment(self.cost_matrix(lg, bx, labels, t["boxes"]))
            out.append((rows.astype(np.int64), cols.astype(np.int64)))
        return out

    def targets(self, logits, boxes, targets, num_classes: int) -> QueryTargets:
        """Match, then lay the targets out per query: the feeds of DETR's training graph."""
        b, n = np.asarray(logits).shape[:2]
        classes = np.full((b, n), num_classes, np.int64)
        tboxes = np.tile(np.array([0.5, 0.5, 0.5, 0.5], np.float32), (b, n, 1))   # dummy: valid, weight 0
        weights = np.zeros((b, n), np.float32)
        for i, (q, j) in enumerate(self(logits, boxes, targets)):
            classes[i, q] = np.asarray(targets[i]["labels"])[j]
            tboxes[i, q] = np.asarray(targets[i]["boxes"], np.float32)[j]
            weights[i, q] = 1.0
        return QueryTargets(target_classes=classes, target_boxes=tboxes, box_weights=weights)
