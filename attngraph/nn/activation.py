"""Activations as modules (for Sequential) and the by-name lookup the transformer layers use."""

from __future__ import annotations

from typing import Callable

from .. import ops
from ..errors import AttngraphError
from .module import Module

__all__ = ["ReLU", "GELU", "Tanh", "Sigmoid", "get_activation"]


class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class GELU(Module):
    """torch.nn.GELU; ``approximate="tanh"`` for the tanh form."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return ops.gelu(x, approximate=self.approximate)


class Tanh(Module):
    def forward(self, x):
        return ops.tanh(x)


class Sigmoid(Module):
    def forward(self, x):
        return ops.sigmoid(x)


def get_activation(activation) -> Callable:
    """``"relu"`` / ``"gelu"`` (torch's strings) or a callable Tensor → Tensor (a Module too)."""
    if callable(activation):
        return activation
    if activation == "relu":
        return ops.relu
    if activation == "gelu":
        return ops.gelu
    raise AttngraphError(f"activation should be 'relu' or 'gelu' or a callable, not {activation!r}")
