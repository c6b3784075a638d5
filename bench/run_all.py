"""Run every benchmark and write docs/benchmarks.md (same as `attngraph bench`).

    python bench/run_all.py                 # all suites
    python bench/run_all.py attention       # one suite: attention | models | compile | memory | training
"""

import sys

from attngraph.benchmarks.report import main

if __name__ == "__main__":
    main(sys.argv[1:])
