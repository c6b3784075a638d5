"""Parameter initializers, by name (torch's conventions for fan-in and fan-out)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import AttngraphError

__all__ = ["initialize", "INITIALIZERS"]


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """torch.nn.init's rule: a weight is (fan_out, fan_in, *receptive field)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _xavier_uniform(rng, shape):
    fan_in, fan_out = _fans(shape)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


def _xavier_normal(rng, shape):
    fan_in, fan_out = _fans(shape)
    return rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), shape)


def _kaiming_uniform(rng, shape):
    fan_in, _ = _fans(shape)
    bound = 1.0 / math.sqrt(fan_in)  # torch's default for Linear/Conv weights (a=sqrt(5))
    return rng.uniform(-bound, bound, shape)


INITIALIZERS: dict[str, Callable] = {
    "xavier_uniform": _xavier_uniform,
    "xavier_normal": _xavier_normal,
    "kaiming_uniform": _kaiming_uniform,
    "normal": lambda rng, shape: rng.normal(0.0, 0.02, shape),
    "uniform": lambda rng, shape: rng.uniform(-0.1, 0.1, shape),
    "zeros": lambda rng, shape: np.zeros(shape),
    "ones": lambda rng, shape: np.ones(shape),
}


def initialize(init, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """``init`` is a name from INITIALIZERS, a number (fill), an array, or ``f(rng, shape)``."""
    if isinstance(init, str):
        if init not in INITIALIZERS:
            raise AttngraphError(f"unknown initializer {init!r}", hint=f"use one of {', '.join(INITIALIZERS)}")
        arr = INITIALIZERS[init](rng, shape)
    elif isinstance(init, (int, float)) and not isinstance(init, bool):
        arr = np.full(shape, init)
    elif callable(init):
        arr = np.asarray(init(rng, shape))
    else:
        arr = np.asarray(init)
    if arr.shape != tuple(shape):
        raise AttngraphError(f"initial value has shape {arr.shape}, but the parameter is declared {tuple(shape)}")
    return np.array(arr, dtype=dtype, order="C")  # a copy; keeps 0-d arrays 0-d
