"""LayerNorm and BatchNorm2d (inference: the running statistics), with torch's keys."""

from __future__ import annotations

import numpy as np

from .. import ops
from ..errors import ShapeError
from .module import Module, constant_init

__all__ = ["LayerNorm", "BatchNorm2d"]


class LayerNorm(Module):
    """torch.nn.LayerNorm over the last ``len(normalized_shape)`` axes; keys ``weight``, ``bias``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
        self.normalized_shape = tuple(int(d) for d in shape)
        self.eps = float(eps)
        if elementwise_affine:
            self.register_parameter("weight", self.normalized_shape, constant_init(1.0))
            if bias:
                self.register_parameter("bias", self.normalized_shape, constant_init(0.0))

    def forward(self, x):
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ShapeError(f"LayerNorm{self.normalized_shape} got an input of shape {x.shape}")
        gamma = self.param("weight") if self.has_param("weight") else None
        beta = self.param("bias") if self.has_param("bias") else None
        if k == 1:
            return ops.layernorm(x, gamma, beta, eps=self.eps)
        size = int(np.prod(self.normalized_shape))
        flat = x.reshape(tuple(x.shape[:-k]) + (size,))                # (..., prod(normalized_shape))
        gamma = None if gamma is None else gamma.reshape(size)
        beta = None if beta is None else beta.reshape(size)
        return ops.layernorm(flat, gamma, beta, eps=self.eps).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class BatchNorm2d(Module):
    """torch.nn.BatchNorm2d at inference: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    Keys ``weight``, ``bias`` (params; absent when ``affine=False``), ``running_mean`` and
    ``running_var`` (buffers: graph consts), and ``num_batches_tracked`` (accepted, ignored).
    With ``track_running_stats=False`` torch normalizes by the batch's own statistics even in
    eval mode, and so does this module.
    """

    _ignored_keys = ("num_batches_tracked",)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.track_running_stats = track_running_stats
        c = (self.num_features,)
        if affine:
            self.register_parameter("weight", c, constant_init(1.0))
            self.register_parameter("bias", c, constant_init(0.0))
        if track_running_stats:
            self.register_buffer("running_mean", c, constant_init(0.0))
            self.register_buffer("running_var", c, constant_init(1.0))

    def _extra_state(self):
        return {"num_batches_tracked": np.array(0, dtype=np.int64)} if self.track_running_stats else {}

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ShapeError(f"BatchNorm2d({self.num_features}) expects (N, {self.num_features}, H, W), got {x.shape}")
        per_channel = (self.num_features, 1, 1)
        if self.track_running_stats:
            mean = self.param("running_mean").reshape(per_channel)
            var = self.param("running_var").reshape(per_channel)
        else:
            mean = x.mean(axis=(0, 2, 3), keepdims=True)                         # (1, C, 1, 1)
            var = ((x - mean) * (x - mean)).mean(axis=(0, 2, 3), keepdims=True)  # biased, as torch
        y = (x - mean) / ops.sqrt(var + self.eps)
        if self.has_param("weight"):
            y = y * self.param("weight").reshape(per_channel) + self.param("bias").reshape(per_channel)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
