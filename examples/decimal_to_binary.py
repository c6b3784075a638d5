"""The seed notes' toy task: a Transformer that translates decimal numbers to binary.

Trains on 80% of the numbers 0..9999 (attngraph's CPU backend), greedy-decodes the other
20% (never seen in training) and prints the exact-match accuracy, then draws the last
decoder layer's cross-attention (binary digits × decimal digits) for a few numbers.

    python examples/decimal_to_binary.py --out d2b_out    # 99% exact match in ~3-4 min on 2 cores
    mpiexec -n 2 python examples/decimal_to_binary.py      # data-parallel: 2 ranks, rank 0 reports
    attngraph train decimal-to-binary                      # the same, without the picture
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from attngraph.compiler import compile as compile_graph
from attngraph.distributed import world
from attngraph.tasks import decimal_to_binary as d2b


def draw_alignment(result: d2b.Result, numbers, path: Path) -> Path:
    """A heatmap per number: rows are the produced binary digits, columns the decimal digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    exe = compile_graph(d2b.build_decode_graph(result.model, cfg, attention=True), backend=cfg.backend)
    src = d2b.encode_source(numbers, d2b.source_length(cfg.max_number), cfg.leading_zeros)
    produced, weights = d2b.greedy_decode(exe.run, src, d2b.target_length(cfg.max_number), attention=True)
    fig, axes = plt.subplots(1, len(numbers), figsize=(2.2 * len(numbers), 4.2), squeeze=False)
    for ax, n, s, p, w in zip(axes[0], numbers, src, produced, weights):
        out = d2b.decode_target(p)
        rows = len(out) + 1                                             # the bits and <eos>
        cols = [d2b.SRC_TOKENS[i] for i in s if i != d2b.PAD]
        ax.imshow(w[:rows, :len(cols)], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(rows), list(out) + ["<eos>"])
        ax.set_title(f"{n} → {out}", fontsize=9)
        ax.set_xlabel("decimal digits")
    axes[0][0].set_ylabel("binary digits (output)")
    fig.suptitle("cross-attention of the last decoder layer (mean over heads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=d2b.Config.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10, help="held-out accuracy every n epochs")
    parser.add_argument("--out", default="d2b_out", help="folder for the attention heatmap")
    parser.add_argument("--progress", action="store_true", help="a progress bar per epoch")
    args = parser.parse_args()

    cfg = d2b.Config(epochs=args.epochs, seed=args.seed, eval_every=args.eval_every, progress=args.progress)
    t0 = time.perf_counter()
    rank = world().rank                       # 0 unless started by mpiexec -n N: rank 0 alone reports
    result = d2b.run(cfg, log=print if rank == 0 else None)
    if rank != 0:
        return
    print(result.summary())
    tgt_len = d2b.target_length(cfg.max_number)
    for n, bits, ok in result.examples:
        print(f"  {n:>5} → {bits:<13} {'ok' if ok else 'expected ' + d2b.binary_text(n, tgt_len, cfg.leading_zeros)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_numbers = d2b.split_numbers(cfg.max_number, cfg.test_fraction, cfg.seed)[1]
    picked = [int(n) for n in np.random.default_rng(cfg.seed).choice(test_numbers, 4, replace=False)]
    path = draw_alignment(result, picked, out / "d2b_attention.png")
    print(f"wrote {path}  ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
