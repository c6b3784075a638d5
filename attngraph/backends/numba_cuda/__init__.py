"""The CUDA backend (``ag.compile(graph, backend="cuda")``): numba-cuda kernels (kernels.py)
over one device arena per memory plan (executable.py). Needs the ``cuda`` extra
(numba-cuda) and a GPU, or the simulator (``NUMBA_ENABLE_CUDASIM=1`` before numba is imported)."""

from .executable import CudaExecutable

__all__ = ["CudaExecutable"]
