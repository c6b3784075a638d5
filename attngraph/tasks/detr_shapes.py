"""DETR finding coloured shapes in generated images, scored by mAP@0.5 on held-out images.

    from attngraph.tasks import detr_shapes
    result = detr_shapes.run(detr_shapes.Config(epochs=30))
    result.metrics["map50"], result.metrics["matched_iou"]

The data (:func:`make_shapes`): 32×32 RGB images on a dark, noisy background, each with 1-3
non-overlapping filled shapes, a square, a circle or a triangle (the class), 7-13 pixels
across, in one of five colours (not part of the class: the model must see the shape).
Each target box is the tight box of the shape's pixels, as (cx, cy, w, h) / image size.
Training and held-out images come from different seeds.

Each training step (:class:`DetrTrainer`):

1. the eval graph runs on the batch with the current weights (logits and boxes);
2. :class:`~attngraph.models.matching.HungarianMatcher` matches queries to targets in numpy
   (``scipy.optimize.linear_sum_assignment``) and lays the targets out per query;
3. the training step (forward + backward of DETR's set loss for that matching, then AdamW)
   runs with those targets.

Step 1 repeats the forward of step 3 (about a fifth of a step's time). That is the price
of matching on the current predictions, as DETR does; matching on the previous step's
predictions would skip it but pair the loss with a stale assignment.

Metrics (:func:`mean_average_precision`, :func:`matched_iou`): VOC-style AP at IoU 0.5
per class (every query is a detection, scored by its class probability; the all-points
interpolated area under precision-recall), averaged over classes; and the mean IoU of
each target with the detection (score >= 0.5) a Hungarian match on IoU gives it, 0 when
none does.

Measured numbers are in docs/tutorials/detr.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import train
from ..errors import AttngraphError
from ..models.detr import DETR, DETRConfig, LossWeights, build_eval_graph, build_train_graph
from ..models.matching import HungarianMatcher, box_cxcywh_to_xyxy, box_iou, softmax

__all__ = ["Config", "Result", "SHAPES", "COLOURS", "draw_shape", "make_shapes", "build_model", "detections",
           "average_precision", "mean_average_precision", "matched_iou", "DetrTrainer", "evaluate", "run"]

# Each step matches predictions to targets (Hungarian) between two runs of the model, in its own
# loop rather than ag.train.fit, so `mpiexec -n N attngraph train detr-shapes` is refused.
DATA_PARALLEL = False

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (0.95, 0.2, 0.2), "green": (0.2, 0.85, 0.3), "blue": (0.25, 0.4, 1.0),
           "yellow": (0.95, 0.9, 0.2), "white": (0.95, 0.95, 0.95)}


@dataclass
class Config:
    """Everything a run depends on; the defaults (40 epochs, 2,520 steps) reached mAP@0.5 0.904 and
    0.693, matched-box IoU 0.836 and 0.827, on the held-out images in two runs (seed 0) on two
    revisions of the kernels (docs/tutorials/detr.md)."""

    image_size: int = 32
    max_objects: int = 3
    min_size: int = 7
    max_size: int = 13
    n_train: int = 2000
    n_test: int = 300
    d_model: int = 64
    nhead: int = 4
    num_encoder_layers: int = 1
    num_decoder_layers: int = 2
    dim_feedforward: int = 128
    num_queries: int = 6
    backbone_channels: tuple = (16, 32)
    batch_size: int = 32
    epochs: int = 40
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05     # the cosine schedule ends at lr · this (1.0: constant after the warmup)
    weight_decay: float = 1e-4
    clip_norm: float = 0.1
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    aux_loss: bool = False         # DETR's auxiliary losses on every decoder layer (no gain at this size)
    loss: LossWeights = field(default_factory=LossWeights)
    seed: int = 0
    backend: str = "cpu"
    eval_every: int = 0                # log the held-out metrics every this many epochs (0: only at the end)
    threads: int | None = 1        # numba and BLAS threads while running (None: leave them); one is
                                   # fastest for this tiny model, and two pools spinning on 2 cores are slow
    progress: bool = False         # a tqdm bar per epoch
    checkpoint: str | None = None  # saved after every epoch; a run resumes from it when it exists


@dataclass
class Result:
    config: Config
    metrics: dict                 # map50, ap50 per class, matched_iou, n_train, n_test, steps, final_loss
    train_seconds: float
    eval_seconds: float
    history: list                 # mean loss per epoch
    model: DETR = None
    trainer: "DetrTrainer" = None

    def summary(self) -> str:
        m = self.metrics
        return (f"DETR on generated shapes: mAP@0.5 {m['map50']:.3f}, matched-box IoU {m['matched_iou']:.3f} on "
                f"{m['n_test']} held-out images; trained {m['steps']} steps on {m['n_train']} in "
                f"{self.train_seconds:.0f} s")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def draw_shape(kind: str, size: int) -> np.ndarray:
    """A (size, size) bool mask of a filled ``kind`` ("square", "circle", "triangle": apex up)."""
    c = (np.arange(size) + 0.5) / size                              # pixel centres in (0, 1)
    y, x = np.meshgrid(c, c, indexing="ij")
    if kind == "square":
        return np.ones((size, size), bool)
    if kind == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if kind == "triangle":
        return np.abs(x - 0.5) <= 0.5 * y + 0.5 / size
    raise AttngraphError(f"unknown shape {kind!r}; shapes are {', '.join(SHAPES)}")


def make_shapes(n: int, seed: int = 0, image_size: int = 32, max_objects: int = 3, min_size: int = 7,
                max_size: int = 13) -> tuple[np.ndarray, list[dict]]:
    """(images (n, 3, S, S) float32 in [0, 1], targets): per image a dict with ``labels`` (M,) int64
    (index into :data:`SHAPES`), ``boxes`` (M, 4) float32 cxcywh / S, ``colours`` (M,) names."""
    rng = np.random.default_rng(seed)
    s = image_size
    images = np.empty((n, 3, s, s), np.float32)
    targets = []
    names = list(COLOURS)
    for i in range(n):
        img = rng.uniform(0.0, 0.15) + rng.normal(0, 0.04, (3, s, s))
        taken = np.zeros((s, s), bool)
        labels, boxes, colours = [], [], []
        for _ in range(rng.integers(1, max_objects + 1)):
            for _attempt in range(50):                              # rejection: no overlap, 1 pixel apart
                size = int(rng.integers(min_size, max_size + 1))
                r, c = rng.integers(0, s - size + 1, 2)
                if not taken[max(r - 1, 0):r + size + 1, max(c - 1, 0):c + size + 1].any():
                    break
            else:
                continue
            kind = int(rng.integers(len(SHAPES)))
            colour = names[rng.integers(len(names))]
            mask = draw_shape(SHAPES[kind], size)
            rgb = np.array(COLOURS[colour]) * rng.uniform(0.8, 1.0)
            img[:, r:r + size, c:c + size][:, mask] = rgb[:, None]
            taken[r:r + size, c:c + size] = True
            rows, cols = np.nonzero(mask)
            x0, x1, y0, y1 = c + cols.min(), c + cols.max() + 1, r + rows.min(), r + rows.max() + 1
            labels.append(kind)
            boxes.append([(x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s])
            colours.append(colour)
        images[i] = np.clip(img, 0, 1)
        targets.append({"labels": np.array(labels, np.int64), "boxes": np.array(boxes, np.float32).reshape(-1, 4),
                        "colours": colours})
    return images, targets


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

def detections(logits: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """Per image, every query as a detection: ``scores`` (N,) (the best object class's
    probability), ``labels`` (N,), ``boxes`` (N, 4) cxcywh; from (B, N, C+1) logits, (B, N, 4) boxes."""
    prob = softmax(logits)[..., :-1]                                # (B, N, C): no object dropped
    return [{"scores": p.max(-1), "labels": p.argmax(-1), "boxes": np.asarray(b, np.float64)}
            for p, b in zip(prob, boxes)]


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC's all-points AP: the area under the precision-recall curve made monotone from the right."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _class_ap(dets: list[dict], targets: list[dict], cls: int, iou_threshold: float) -> float | None:
    """AP of one class, or None when no image has a target of it."""
    n_gt = sum(int((t["labels"] == cls).sum()) for t in targets)
    if n_gt == 0:
        return None
    records = []                                                    # (score, image, box)
    for i, d in enumerate(dets):
        for s, b in zip(d["scores"][d["labels"] == cls], d["boxes"][d["labels"] == cls]):
            records.append((float(s), i, b))
    records.sort(key=lambda rec: -rec[0])                           # stable: ties keep image order
    used = [np.zeros(int((t["labels"] == cls).sum()), bool) for t in targets]
    tp = np.zeros(len(records))
    for k, (_, i, b) in enumerate(records):
        gt = np.asarray(targets[i]["boxes"])[targets[i]["labels"] == cls]
        if len(gt) == 0:
            continue
        ious = box_iou(box_cxcywh_to_xyxy(b[None]), box_cxcywh_to_xyxy(gt))[0][0]
        j = int(ious.argmax())
        if ious[j] >= iou_threshold and not used[i][j]:            # VOC: the best-overlapping target, once
            tp[k], used[i][j] = 1, True
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(records) + 1)
    return average_precision(recall, precision)


def mean_average_precision(dets: list[dict], targets: list[dict], num_classes: int,
                           iou_threshold: float = 0.5) -> tuple[float, list]:
    """(mAP, per-class AP list with None for classes absent from the targets), VOC style:
    detections of a class in descending score order; each is a true positive when its IoU
    with the image's best-overlapping target of that class is >= ``iou_threshold`` and that
    target was not taken by a higher-scored detection."""
    if len(dets) != len(targets):
        raise AttngraphError(f"mean_average_precision: {len(dets)} images of detections, {len(targets)} of targets")
    aps = [_class_ap(dets, targets, c, iou_threshold) for c in range(num_classes)]
    present = [a for a in aps if a is not None]
    return (float(np.mean(present)) if present else math.nan), aps


def matched_iou(dets: list[dict], targets: list[dict], score_threshold: float = 0.5) -> float:
    """Mean over all targets of the IoU with the detection (score >= threshold) matched to it by a
    Hungarian match maximizing total IoU; a target left without a detection counts 0."""
    from scipy.optimize import linear_sum_assignment

    total, count = 0.0, 0
    for d, t in zip(dets, targets):
        gt = np.asarray(t["boxes"]).reshape(-1, 4)
        count += len(gt)
        keep = d["scores"] >= score_threshold
        if len(gt) == 0 or not keep.any():
            continue
        ious = box_iou(box_cxcywh_to_xyxy(d["boxes"][keep]), box_cxcywh_to_xyxy(gt))[0]   # (kept, M)
        rows, cols = linear_sum_assignment(-ious)
        total += float(ious[rows, cols].sum())
    return total / count if count else math.nan


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

def build_model(cfg: Config) -> DETR:
    model = DETR(DETRConfig(image_size=cfg.image_size, in_channels=3, backbone_channels=tuple(cfg.backbone_channels),
                            d_model=cfg.d_model, nhead=cfg.nhead, num_encoder_layers=cfg.num_encoder_layers,
                            num_decoder_layers=cfg.num_decoder_layers, dim_feedforward=cfg.dim_feedforward,
                            num_queries=cfg.num_queries, num_classes=len(SHAPES)))
    return model.reset_parameters(cfg.seed)


class DetrTrainer:
    """One compiled eval graph, one compiled training step and the matcher; ``step(images, targets)``
    matches on the current predictions and makes one update (see the module's docstring)."""

    def __init__(self, model: DETR, optimizer, matcher: HungarianMatcher, loss: LossWeights | None = None,
                 aux_loss: bool = False, backend: str = "cpu", seed: int = 0):
        from ..compiler import compile as compile_graph

        self.model, self.matcher = model, matcher
        self.num_classes = model.config.num_classes
        self.aux = aux_loss and model.config.num_decoder_layers > 1
        self.step_exe = train.compile_train_step(build_train_graph(model, loss, aux_loss=self.aux), "loss",
                                                 optimizer=optimizer, backend=backend, seed=seed)
        self.eval_exe = compile_graph(build_eval_graph(model, aux=self.aux), backend=backend)

    def sync(self) -> None:
        """Copy the trained weights into the eval executable."""
        for name in self.eval_exe.params:
            self.eval_exe.params[name] = self.step_exe.params[name]

    def predict(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(logits (B, N, C+1), boxes (B, N, 4)) with the current weights."""
        self.sync()
        outs = [self.eval_exe.run({"images": images[i:i + batch_size]}) for i in range(0, len(images), batch_size)]
        return np.concatenate([o["logits"] for o in outs]), np.concatenate([o["boxes"] for o in outs])

    def step(self, images: np.ndarray, targets: list[dict]) -> float:
        self.sync()
        out = self.eval_exe.run({"images": images})
        feeds = {"images": images}
        prefixes = [""] + [f"aux{i}_" for i in range(self.model.config.num_decoder_layers - 1)] * self.aux
        for prefix in prefixes:                                     # each layer matched to its own predictions
            per_query = self.matcher.targets(out[f"{prefix}logits"], out[f"{prefix}boxes"], targets,
                                             self.num_classes)
            feeds.update({f"{prefix}{k}": v for k, v in per_query.items()})
        return self.step_exe(feeds)


def evaluate(trainer: DetrTrainer, images: np.ndarray, targets: list[dict]) -> dict:
    """``map50``, ``ap50`` (per class), ``matched_iou`` of the trainer's current weights."""
    dets = detections(*trainer.predict(images))
    m, aps = mean_average_precision(dets, targets, trainer.num_classes)
    return {"map50": m, "ap50": aps, "matched_iou": matched_iou(dets, targets)}


def run(cfg: Config | None = None, *, log: Callable[[str], None] | None = None) -> Result:
    """Generate the data, train DETR, and measure mAP@0.5 and matched-box IoU on the held-out images."""
    cfg = cfg or Config()
    if cfg.threads is None:
        return _run(cfg, log)
    import numba
    from threadpoolctl import threadpool_limits

    before = numba.get_num_threads()
    numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(cfg.threads):
            return _run(cfg, log)
    finally:
        numba.set_num_threads(before)


def _run(cfg: Config, log: Callable[[str], None] | None) -> Result:
    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    shape_args = dict(image_size=cfg.image_size, max_objects=cfg.max_objects, min_size=cfg.min_size,
                      max_size=cfg.max_size)
    x_train, t_train = make_shapes(cfg.n_train, seed=cfg.seed * 2 + 1, **shape_args)
    x_test, t_test = make_shapes(cfg.n_test, seed=cfg.seed * 2 + 2, **shape_args)
    model = build_model(cfg)
    steps_per_epoch = -(-cfg.n_train // cfg.batch_size)
    total = max(cfg.epochs * steps_per_epoch, cfg.warmup_steps + 1)
    optimizer = train.AdamW(train.cosine(cfg.lr, total, warmup=cfg.warmup_steps, min_lr=cfg.lr * cfg.min_lr_ratio),
                            weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    trainer = DetrTrainer(model, optimizer, HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou),
                          cfg.loss, cfg.aux_loss, cfg.backend, cfg.seed)
    start_epoch, history = 0, []
    if cfg.checkpoint and os.path.exists(cfg.checkpoint):
        info = trainer.step_exe.load(cfg.checkpoint)
        start_epoch, history = int(info.get("epoch", 0)), list(info.get("history", []))
    log(f"{cfg.n_train} training and {cfg.n_test} held-out images; compiled in {time.perf_counter() - t_start:.1f} s")
    for epoch in range(start_epoch, cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(cfg.n_train)
        losses = []
        batches = range(steps_per_epoch)
        if cfg.progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for b in batches:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            losses.append(trainer.step(x_train[idx], [t_train[i] for i in idx]))
        history.append(float(np.mean(losses)))
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]:.4f} ({time.perf_counter() - t_start:.0f} s)")
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            m = evaluate(trainer, x_test, t_test)
            log(f"  held-out mAP@0.5 {m['map50']:.3f}, matched-box IoU {m['matched_iou']:.3f}")
        if cfg.checkpoint:
            trainer.step_exe.save(cfg.checkpoint, epoch=epoch + 1, history=history)
    train_seconds = time.perf_counter() - t_start
    t_eval = time.perf_counter()
    metrics = evaluate(trainer, x_test, t_test)
    eval_seconds = time.perf_counter() - t_eval
    model.load_from(trainer.step_exe.exe)
    metrics.update(n_train=cfg.n_train, n_test=cfg.n_test, steps=trainer.step_exe.step_count,
                   final_loss=history[-1] if history else math.nan)
    return Result(cfg, metrics, train_seconds, eval_seconds, history, model, trainer)
