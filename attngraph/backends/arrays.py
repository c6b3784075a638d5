"""Array helpers the backends share."""

from __future__ import annotations

import numpy as np

__all__ = ["c_contiguous"]


def c_contiguous(a, dtype=None) -> np.ndarray:
    """``a`` as a C-contiguous array (copied only when needed). Unlike np.ascontiguousarray,
    a 0-d array stays 0-d: a scalar const must keep the shape () its type says."""
    a = np.asarray(a, dtype=dtype)
    return a if a.flags.c_contiguous else np.array(a, order="C")
