"""Linear (torch's (out, in) weight: y = x Wᵀ + b) and Identity."""

from __future__ import annotations

import math

from .module import Module, uniform_init

__all__ = ["Linear", "Identity", "linear"]


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` with torch's (out_features, in_features) weight."""
    y = x @ weight.T
    return y if bias is None else y + bias


class Linear(Module):
    """torch.nn.Linear: keys ``weight`` (out, in) and ``bias`` (out,); uniform(±1/√in) init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.register_parameter("weight", (out_features, in_features), uniform_init(bound))
        if bias:
            self.register_parameter("bias", (out_features,), uniform_init(bound))

    def forward(self, x):
        return linear(x, self.param("weight"), self.param("bias") if self.has_param("bias") else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_param('bias')}"


class Identity(Module):
    """Returns its input (torch.nn.Identity)."""

    def forward(self, x, *args, **kwargs):
        return x
