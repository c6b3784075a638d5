"""Gradient clipping by global norm, as ``torch.nn.utils.clip_grad_norm_``.

The optimizers also take ``clip_norm=`` and clip inside their fused step; this function is
for gradients you hold yourself.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..errors import AttngraphError

__all__ = ["clip_grad_norm", "global_norm"]


def global_norm(grads: Mapping[str, np.ndarray] | list, norm_type: float = 2.0) -> float:
    """The norm of all gradients taken together (the norm of the per-array norms), in float64."""
    arrays = list(grads.values()) if isinstance(grads, Mapping) else list(grads)
    if not arrays:
        return 0.0
    norm_type = float(norm_type)
    if math.isinf(norm_type):
        return float(max(np.max(np.abs(a)) if np.size(a) else 0.0 for a in arrays))
    norms = np.array([np.linalg.norm(np.asarray(a, dtype=np.float64).reshape(-1), ord=norm_type)
                      for a in arrays])
    return float(np.linalg.norm(norms, ord=norm_type))


def clip_grad_norm(grads: Mapping[str, np.ndarray] | list, max_norm: float, norm_type: float = 2.0, *,
                   error_if_nonfinite: bool = False) -> float:
    """Scale the gradients in place so that their global norm is at most ``max_norm``;
    returns the norm before clipping.

    As torch: coef = max_norm / (norm + 1e-6), applied when it is below 1; ``norm_type``
    may be ``inf`` (the largest absolute entry).
    """
    arrays = list(grads.values()) if isinstance(grads, Mapping) else list(grads)
    total = global_norm(arrays, norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise AttngraphError(f"the total norm of order {norm_type} of the gradients is {total}",
                             hint="pass error_if_nonfinite=False to clip anyway")
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for a in arrays:
            a *= a.dtype.type(coef)
    return total
