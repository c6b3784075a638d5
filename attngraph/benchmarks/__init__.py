"""Benchmarks: attngraph vs the numpy reference, torch and ONNX Runtime (the dev extra),
measured in one process with interleaved repeats and 2 threads for everyone.

Run ``attngraph bench`` or ``python bench/run_all.py``; results go to docs/benchmarks.md.
"""
