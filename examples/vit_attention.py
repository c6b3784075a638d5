"""Where a ViT looks: attention over the image patches of a small ViT trained on 8×8 digits.

Trains the ``vit-digits`` task's model (attngraph/tasks/vit_digits.py: patch 2, d=64, 2 layers,
4 heads), moves its weights into :class:`attngraph.models.vit.ViT` (same architecture; only the
position table's key differs), checks both give the same logits, then compiles the ViT with
``return_weights=True``: each layer's attention weights are graph outputs, and the attention
still fuses (``attention(..., return_weights=True)``). For a few test images it draws

- the class token's attention over the 4×4 patches in the last layer (mean over heads), and
- attention rollout (Abnar & Zuidema 2020) through both layers,

with :func:`attngraph.viz.image_attention_overlay`.

    python examples/vit_attention.py --out vit_out       # 96.4% test accuracy, ~75 s on a shared 2-core machine
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import attngraph as ag
from attngraph.models.vit import ViT, ViTConfig
from attngraph.tasks import vit_digits


def to_vit(tiny: vit_digits.TinyViT, cfg: vit_digits.Config) -> ViT:
    """The task's TinyViT as a models.vit.ViT with the same weights."""
    vit = ViT(ViTConfig(image_size=8, patch_size=cfg.patch, in_channels=1, num_classes=10, dim=cfg.d_model,
                        depth=cfg.num_layers, heads=cfg.nhead, mlp_dim=cfg.dim_feedforward,
                        layer_norm_eps=1e-5))                                     # nn.LayerNorm's default
    state = tiny.state_dict()
    state["pos_embed"] = state.pop("pos_embed.weight")[None]                  # (1 + N, d) → (1, 1 + N, d)
    vit.load_state_dict(state)
    return vit


def held_out_images(cfg: vit_digits.Config):
    """The task's held-out images, normalised as its run() does; (images (N, 1, 8, 8), labels)."""
    images, labels, _ = vit_digits.load_images(cfg.synthetic, cfg.n_synthetic, cfg.seed)
    train_idx, test_idx = vit_digits.split(labels, cfg.test_fraction, cfg.seed)
    x = images[:, None] / np.float32(16.0)                                    # (N, 1, 8, 8)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    return ((x[test_idx] - mean) / std).astype(np.float32), labels[test_idx], images[test_idx]


def draw(raw_images, labels, predicted, last, rollout, path: Path) -> Path:
    """One column per image: the digit, last-layer class-token attention, rollout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(raw_images)
    fig, axes = plt.subplots(3, n, figsize=(1.7 * n, 5.4), squeeze=False)
    for j in range(n):
        axes[0][j].imshow(raw_images[j], cmap="gray")
        axes[0][j].set_title(f"label {labels[j]}, said {predicted[j]}", fontsize=8)
        axes[0][j].axis("off")
        ag.viz.image_attention_overlay(raw_images[j], last[j], ax=axes[1][j])
        ag.viz.image_attention_overlay(raw_images[j], rollout[j], ax=axes[2][j])
    axes[1][0].set_ylabel("last layer\n[cls] → patches", fontsize=8)
    axes[2][0].set_ylabel("rollout\n[cls] → patches", fontsize=8)
    fig.suptitle("ViT on 8×8 digits: where the class token looks (4×4 patches of 2×2 pixels)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=vit_digits.Config.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=6, help="how many test images to draw")
    parser.add_argument("--out", default="vit_out", help="folder for the picture")
    args = parser.parse_args()

    t0 = time.perf_counter()
    cfg = vit_digits.Config(epochs=args.epochs, seed=args.seed)
    result = vit_digits.run(cfg)
    print(result.summary())
    tiny = vit_digits.build_model(cfg).load_from(result.step.exe)
    vit = to_vit(tiny, cfg)

    g = ag.Graph("vit_attention")
    images = g.input("images", ("B", 1, 8, 8))
    logits, weights = vit(images, return_weights=True)
    g.output("logits", logits)
    for i, w in enumerate(weights):
        g.output(f"attn{i}", w)                                             # (B, heads, 17, 17)
    exe = ag.compile(g, backend="cpu")
    fused = [n for n in exe.graph.nodes if n.op == "attention"]
    flags = [n.attrs.get("return_weights") for n in fused]
    print(f"compiled: {len(fused)} fused attention nodes, return_weights={flags}")

    x, labels, raw = held_out_images(cfg)
    out = exe.run({"images": x})
    tiny_logits = ag.compile(vit_digits.build_eval_graph(tiny), backend="cpu").run({"images": x})["logits"]
    predicted = out["logits"].argmax(-1)
    print(f"ViT test accuracy {np.mean(predicted == labels):.2%}; max |logits - TinyViT logits| "
          f"{np.abs(out['logits'] - tiny_logits).max():.2e}")

    pick = np.random.default_rng(args.seed).choice(len(x), args.images, replace=False)
    layers = [out[f"attn{i}"][pick] for i in range(len(weights))]           # each (n, heads, 17, 17)
    last = layers[-1].mean(axis=1)[:, 0, 1:]                                  # (n, 16): [cls] → patches
    rollout = ag.viz.attention_rollout(layers)[:, 0, 1:]                      # (n, 16)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    written = draw(raw[pick], labels[pick], predicted[pick], last, rollout, path / "vit_attention.png")
    print(f"wrote {written}  ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
