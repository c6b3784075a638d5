"""Image captioning with attention: a small CNN and a GRU decoder that attends over the
4×4 feature grid before every word, trained on generated scenes with generated captions.

Trains on images of 80% of the 522 scene descriptions, captions one image of each of the
other 20% (never drawn in training), prints the exact-caption and token accuracies, and
draws where the decoder looked for each word it wrote.

    python examples/captioning_shapes.py --out captioning_out
    attngraph train captioning-shapes                # the same, without the picture
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import attngraph as ag
from attngraph.tasks import captioning_shapes as cs


def draw_word_attention(result: cs.Result, images, path: Path) -> Path:
    """A row per image: the image, then the attention over the grid for each generated word."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, attention = cs.caption(result.model, result.decoder, images)
    words = [cs.decode_caption(t).split() + ["<eos>"] for t in tokens]
    cols = 1 + max(len(w) for w in words)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.35 * cols, 1.5 * len(images)), squeeze=False)
    for row, (img, ws, att) in enumerate(zip(images, words, attention)):
        shown = (img + 1.0) / 2.0                                    # back to [0, 1] for display
        axes[row][0].imshow(shown.transpose(1, 2, 0))
        axes[row][0].set_title("image", fontsize=7)
        for k, word in enumerate(ws):
            ag.viz.image_attention_overlay(shown, att[k], ax=axes[row][k + 1], title=word)
            axes[row][k + 1].title.set_fontsize(7)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle("where the decoder looked for each word (additive attention over the 4×4 grid)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=cs.Config.epochs)
    parser.add_argument("--n-train", type=int, default=cs.Config.n_train)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=2, help="held-out accuracy every n epochs")
    parser.add_argument("--out", default="captioning_out", help="folder for the attention pictures")
    args = parser.parse_args()

    cfg = cs.Config(epochs=args.epochs, n_train=args.n_train, seed=args.seed, eval_every=args.eval_every)
    t0 = time.perf_counter()
    result = cs.run(cfg, log=print)
    print(result.summary())
    for truth, produced in result.examples:
        print(f"  {produced:<50} {'ok' if produced == truth else 'expected ' + truth}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, test_feeds, scenes = cs.make_dataset(cfg)
    pairs = [i for i, s in enumerate(scenes) if len(s) == 2]
    picked = [pairs[0], pairs[len(pairs) // 2], pairs[-1]]              # three two-shape scenes
    path = draw_word_attention(result, test_feeds["images"][picked], out / "captioning_attention.png")
    print(f"wrote {path}  ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
