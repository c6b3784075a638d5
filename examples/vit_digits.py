"""A tiny ViT on scikit-learn's 8×8 digits images (or a generated set without scikit-learn).

Patches of 2×2 pixels, a class token, learned positions, a 2-layer pre-norm Transformer
encoder, trained on attngraph's CPU backend; prints the test accuracy (96.4%, about 25 s).

    python examples/vit_digits.py
    mpiexec -n 2 python examples/vit_digits.py     # data-parallel over 2 ranks; rank 0 reports
    attngraph train vit-digits                     # the same from the command line
"""

from __future__ import annotations

import argparse

from attngraph.distributed import world
from attngraph.tasks import vit_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=vit_digits.Config.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="use the generated image set")
    parser.add_argument("--progress", action="store_true", help="a progress bar per epoch")
    args = parser.parse_args()
    cfg = vit_digits.Config(epochs=args.epochs, seed=args.seed, synthetic=args.synthetic, progress=args.progress)
    rank = world().rank                       # 0 unless started by mpiexec -n N: rank 0 alone reports
    result = vit_digits.run(cfg, log=print if rank == 0 else None)
    if rank == 0:
        print(result.summary())


if __name__ == "__main__":
    main()
