"""Bahdanau attention on the seed notes' toy task: a GRU encoder-decoder translating decimal
numbers to binary, and the alignment it learns (binary digits × decimal digits).

Trains on 80% of the numbers 0..9999 (attngraph's CPU backend), greedy-decodes the other
20% (never seen in training) through the one-step graph, prints the exact-match accuracy
and draws the additive attention weights a_tj for a few held-out numbers.

    python examples/bahdanau_decimal.py --out bahdanau_out
    attngraph train bahdanau-decimal                 # the same, without the picture
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import attngraph as ag
from attngraph.tasks import bahdanau_decimal as bd
from attngraph.tasks import decimal_to_binary as d2b


def draw_alignment(result: bd.Result, numbers, path: Path) -> Path:
    """One heatmap per number: rows are the produced bits (and <eos>), columns the decimal digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    tokens, attention = bd.decode(result.decoder, numbers, cfg)
    src = d2b.encode_source(numbers, d2b.source_length(cfg.max_number), cfg.leading_zeros)
    fig, axes = plt.subplots(1, len(numbers), figsize=(2.0 * len(numbers), 4.0), squeeze=False)
    for ax, n, s, p, w in zip(axes[0], numbers, src, tokens, attention):
        bits = d2b.decode_target(p)
        digits = [d2b.SRC_TOKENS[i] for i in s if i != d2b.PAD]
        rows = len(bits) + 1                                          # the bits and <eos>
        ag.viz.attention_heatmap(w[:rows, :len(digits)], x_labels=digits, y_labels=list(bits) + ["<eos>"],
                                 ax=ax, title=f"{n} → {bits}", xlabel="decimal digits", ylabel=None)
    axes[0][0].set_ylabel("binary digits (output)")
    fig.suptitle("Bahdanau attention: e_tj = vᵀ tanh(W s_{t-1} + U h_j)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=bd.Config.epochs)
    parser.add_argument("--max-number", type=int, default=bd.Config.max_number)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=5, help="held-out accuracy every n epochs")
    parser.add_argument("--out", default="bahdanau_out", help="folder for the attention heatmap")
    args = parser.parse_args()

    cfg = bd.Config(epochs=args.epochs, max_number=args.max_number, seed=args.seed, eval_every=args.eval_every)
    t0 = time.perf_counter()
    result = bd.run(cfg, log=print)
    print(result.summary())
    tgt_len = d2b.target_length(cfg.max_number)
    for n, bits, ok in result.examples:
        print(f"  {n:>5} → {bits:<15} {'ok' if ok else 'expected ' + d2b.binary_text(n, tgt_len, cfg.leading_zeros)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_numbers = d2b.split_numbers(cfg.max_number, cfg.test_fraction, cfg.seed)[1]
    picked = [int(n) for n in np.random.default_rng(cfg.seed).choice(test_numbers, 4, replace=False)]
    path = draw_alignment(result, picked, out / "bahdanau_alignment.png")
    print(f"wrote {path}  ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
