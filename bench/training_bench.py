"""One training step (forward + backward + AdamW) of the encoder and ViT-Tiny, and the attention
backward alone, against torch eager; writes the "training" section of docs/benchmarks.md.

    python bench/training_bench.py            # same as: python bench/run_all.py training
"""

import sys

from attngraph.benchmarks.report import main

if __name__ == "__main__":
    main(["training", *sys.argv[1:]])
