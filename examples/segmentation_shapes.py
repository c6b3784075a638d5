"""Segment generated shapes with a CNN + self-attention + FPN encoder-decoder on the CPU backend.

Trains attngraph.models.cnn_attention.FPNSegmenter on 32×32 scenes of circles, squares and
triangles (any colour), prints the mean IoU on held-out scenes, and saves a picture: for a
few test images the input, the true and predicted masks, and where one position of the
coarse 4×4 feature map attends (SAGAN self-attention), drawn over the image.

    python examples/segmentation_shapes.py                       # writes segmentation_shapes.png
    python examples/segmentation_shapes.py --epochs 12 --out seg.png
    attngraph train segmentation-shapes                           # the training alone
"""

from __future__ import annotations

import argparse

from attngraph.compiler import compile as compile_graph
from attngraph.tasks import segmentation_shapes as seg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=seg.Config.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="segmentation_shapes.png", help="where to save the picture")
    parser.add_argument("--examples", type=int, default=5, help="test images in the picture")
    args = parser.parse_args()

    cfg = seg.Config(epochs=args.epochs, seed=args.seed)
    result = seg.run(cfg, log=print)
    print(result.summary())

    # the trained weights are back in result.model: compile an eval graph that also returns the attention
    exe = compile_graph(seg.build_eval_graph(result.model, cfg, need_weights=True), backend=cfg.backend)
    images, masks = seg.make_dataset(args.examples, cfg, seed=cfg.seed * 2 + 2)   # the first test images
    out = exe.run({"images": images})
    seg.save_examples(args.out, images, masks, out["logits"].argmax(1), out["attention"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
