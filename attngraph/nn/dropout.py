"""Dropout: ``ag.dropout`` (the identity when the graph runs for inference)."""

from __future__ import annotations

from .. import ops
from ..errors import AttngraphError
from .module import Module

__all__ = ["Dropout"]


class Dropout(Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise AttngraphError(f"dropout probability has to be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x):
        return ops.dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
