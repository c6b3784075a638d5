"""The Numba CPU backend (``ag.compile(graph, backend="cpu")``): a memory-planned executor
(executable.py) running native kernels (kernels.py, attention_kernels.py) and, for every
other op, the op's numpy reference."""

from .executable import CpuExecutable

__all__ = ["CpuExecutable"]
