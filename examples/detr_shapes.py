"""DETR finding squares, circles and triangles in generated 32×32 images.

Trains the tiny DETR of attngraph.tasks.detr_shapes (Hungarian matching in numpy each step,
class + L1 + GIoU set loss on the CPU backend), prints mAP@0.5 and the matched-box IoU on
held-out images, and draws held-out images with the predicted boxes and, under each, the
decoder cross-attention of the query that found the most confident object.

    python examples/detr_shapes.py                        # 40 epochs, a few minutes on one core
    python examples/detr_shapes.py --epochs 8 --png detr.png
    attngraph train detr-shapes                           # the task's defaults, no picture
"""

from __future__ import annotations

import argparse

import attngraph as ag
from attngraph.models.detr import build_eval_graph
from attngraph.models.matching import box_cxcywh_to_xyxy
from attngraph.tasks import detr_shapes as ds

COLOURS = ["#ff00ff", "#00ffff", "#ff8800"]                  # per class: square, circle, triangle


def draw(model, images, targets, path, n=6, score_threshold=0.5):
    """Row 1: images with predicted boxes (solid, class and score) and targets (dotted);
    row 2: the last decoder layer's cross-attention of each image's most confident query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    exe = ag.compile(build_eval_graph(model, attention=True), backend="cpu")
    out = exe.run({"images": images[:n]})
    dets = ds.detections(out["logits"], out["boxes"])
    side, grid = images.shape[-1], model.config.feature_size
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for k in range(n):
        ax = axes[0, k]
        ax.imshow(images[k].transpose(1, 2, 0), extent=(0, side, side, 0), interpolation="nearest")
        for x0, y0, x1, y1 in box_cxcywh_to_xyxy(targets[k]["boxes"]) * side:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls=":", lw=0.8))
        d = dets[k]
        for s, label, box in zip(d["scores"], d["labels"], box_cxcywh_to_xyxy(d["boxes"]) * side):
            if s >= score_threshold:
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=COLOURS[label], lw=1.2))
                ax.text(x0, y0 - 0.5, f"{ds.SHAPES[label][:3]} {s:.2f}", color=COLOURS[label], fontsize=6)
        ax.set_axis_off()
        q = int(d["scores"].argmax())
        ag.viz.image_attention_overlay(images[k], out["attention"][k, q].reshape(grid, grid), ax=axes[1, k],
                                       title=f"query {q}")
    fig.suptitle("DETR on held-out images: predictions (solid), targets (dotted); cross-attention below",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default="detr_shapes.png", help="where to draw the held-out predictions")
    parser.add_argument("--eval-every", type=int, default=10, help="log held-out metrics every N epochs")
    args = parser.parse_args()
    cfg = ds.Config(epochs=args.epochs, seed=args.seed, eval_every=args.eval_every)
    result = ds.run(cfg, log=print)
    print(result.summary())
    aps = ", ".join(f"{name} {ap:.3f}" for name, ap in zip(ds.SHAPES, result.metrics["ap50"]))
    print(f"AP@0.5 per class: {aps}")
    images, targets = ds.make_shapes(6, seed=10_000 + args.seed)
    draw(result.model, images, targets, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
