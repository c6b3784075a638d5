"""Array helpers the backends share."""

from __future__ import annotations

import numpy as np

__all__ = ["c_contiguous", "matmul_into"]


def c_contiguous(a, dtype=None) -> np.ndarray:
    """``a`` as a C-contiguous array (copied only when needed). Unlike np.ascontiguousarray,
    a 0-d array stays 0-d: a scalar const must keep the shape () its type says."""
    a = np.asarray(a, dtype=dtype)
    return a if a.flags.c_contiguous else np.array(a, order="C")


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = a @ b``. A stack of rows times one matrix ((…, M, K) @ (K, N), ``a`` and
    ``out`` C-contiguous) runs as one (…·M, K) @ (K, N) GEMM: numpy's batched matmul loops
    over the stack and was 2.2× slower at (32, 24, 384) @ (384, 1152)."""
    if (a.ndim > 2 and b.ndim == 2 and out.shape == a.shape[:-1] + b.shape[-1:]
            and a.size > 0 and a.flags.c_contiguous and out.flags.c_contiguous):
        np.matmul(a.reshape(-1, a.shape[-1]), b, out=out.reshape(-1, out.shape[-1]))
    else:
        np.matmul(a, b, out=out)
