"""Position encodings: sinusoidal (consts), learned (a trained table), and DETR's 2-D sine.

- ``SinusoidalPositionalEncoding``: sin on even features, cos on odd ones, frequencies
  10000^(-2i/d) (the PyTorch tutorial's ``PositionalEncoding``; no state_dict entries, and a
  tutorial checkpoint's ``pe`` buffer is accepted and ignored).
- ``LearnedPositionalEncoding``: a trained (max_len, d) table, key ``weight`` (like nn.Embedding).
- ``PositionEmbeddingSine``: DETR's 2-D encoding of an image feature map, from the padding mask.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..errors import AttngraphError, ShapeError
from .dropout import Dropout
from .module import Module, normal_init

__all__ = ["SinusoidalPositionalEncoding", "LearnedPositionalEncoding", "PositionEmbeddingSine",
           "sinusoidal_table"]


def sinusoidal_table(length: int, d_model: int) -> np.ndarray:
    """(length, d_model) float32: sin(pos·ω_i) at feature 2i, cos(pos·ω_i) at 2i+1, ω_i = 10000^(-2i/d)."""
    position = np.arange(length, dtype=np.float32)[:, None]                          # (length, 1)
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / d_model))
    angles = (position * div_term).astype(np.float32)                                 # (length, ceil(d/2))
    pe = np.zeros((length, d_model), np.float32)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles[:, : d_model // 2])
    return pe


def _add_along_sequence(x, table, batch_first):
    """x + table[:T], the table (T_or_max, d) broadcast over the batch."""
    t_axis = 1 if batch_first else 0
    steps = x.shape[t_axis]
    if table.shape[0] != steps:
        table = table[:steps]                                                         # (T, d)
    if not batch_first:
        table = table.reshape(table.shape[0], 1, table.shape[1])                      # (T, 1, d)
    return x + table


class SinusoidalPositionalEncoding(Module):
    """``forward(x)`` = dropout(x + PE[:T]); x is (N, T, d) with ``batch_first`` (the default), else (T, N, d)."""

    _ignored_keys = ("pe",)

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0, batch_first: bool = True):
        super().__init__()
        self.d_model, self.max_len, self.batch_first = int(d_model), int(max_len), batch_first
        self.dropout = Dropout(dropout)

    def forward(self, x):
        steps = x.shape[1 if self.batch_first else 0]
        if isinstance(steps, int) and steps > self.max_len:
            raise ShapeError(f"sequence of {steps} positions is longer than max_len={self.max_len}")
        length = steps if isinstance(steps, int) else self.max_len                   # symbolic: slice at run time
        table = self.const(f"pe_{length}", sinusoidal_table(length, self.d_model))
        return self.dropout(_add_along_sequence(x, table, self.batch_first))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositionalEncoding(Module):
    """A trained table, key ``weight`` (max_len, d_model), drawn from N(0, 0.02) as in BERT and ViT.

    ``forward(x, positions=None)``: x + weight[:T] (or + weight[positions] for an int Tensor of
    positions broadcastable to x's leading axes), then dropout.
    """

    def __init__(self, max_len: int, d_model: int, dropout: float = 0.0, batch_first: bool = True):
        super().__init__()
        self.max_len, self.d_model, self.batch_first = int(max_len), int(d_model), batch_first
        self.register_parameter("weight", (max_len, d_model), normal_init(0.02))
        self.dropout = Dropout(dropout)

    def forward(self, x, positions=None):
        weight = self.param("weight")
        if positions is not None:
            return self.dropout(x + ops.embedding(positions, weight))
        steps = x.shape[1 if self.batch_first else 0]
        if isinstance(steps, int) and steps > self.max_len:
            raise ShapeError(f"sequence of {steps} positions is longer than max_len={self.max_len}")
        return self.dropout(_add_along_sequence(x, weight, self.batch_first))


class PositionEmbeddingSine(Module):
    """DETR's ``PositionEmbeddingSine``: ``forward(x, mask=None)`` → (N, 2·num_pos_feats, H, W).

    ``x`` is the (N, C, H, W) feature map (only its shape is used); ``mask`` (N, H, W) is bool,
    True at padded pixels. Each valid pixel's row and column counts (cumulative sums of the
    unpadded pixels, as matmuls with triangular consts) are, with ``normalize``, divided by the
    last count and multiplied by ``scale`` (2π); then feature c of each half is
    sin (even c) or cos (odd c) of count / temperature^(2⌊c/2⌋/num_pos_feats). The y half comes first.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise AttngraphError("normalize should be True if scale is passed (as in DETR)")
        self.num_pos_feats, self.temperature, self.normalize = int(num_pos_feats), temperature, normalize
        self.scale = 2 * math.pi if scale is None else float(scale)

    def forward(self, x, mask=None):
        if x.ndim != 4 or not all(isinstance(d, int) for d in x.shape[2:]):
            raise ShapeError(f"PositionEmbeddingSine needs an (N, C, H, W) map with fixed H and W, got {x.shape}")
        n, (h, w) = x.shape[0], x.shape[2:]
        if mask is None:
            not_mask = x.graph.full((n, h, w), 1.0, "float32")
        else:
            if tuple(mask.shape[1:]) != (h, w) or mask.dtype.value != "bool":
                raise ShapeError(f"the mask must be bool (N, {h}, {w}), got {mask.dtype}{mask.shape}")
            not_mask = ops.logical_not(mask).astype("float32")                       # (N, H, W)
        y_embed = self.const(f"tril_{h}", np.tril(np.ones((h, h), np.float32))) @ not_mask  # cumsum over rows
        x_embed = not_mask @ self.const(f"triu_{w}", np.triu(np.ones((w, w), np.float32)))  # cumsum over columns
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        f = self.num_pos_feats
        dim_t = np.arange(f, dtype=np.float32)
        dim_t = (np.float32(self.temperature) ** (2 * (dim_t // 2) / np.float32(f))).astype(np.float32)
        dim_t = self.const("dim_t", dim_t)
        odd = self.const("odd", np.arange(f) % 2 == 1)

        def encode(embed):                                                            # (N, H, W) → (N, H, W, F)
            a = embed.reshape(n, h, w, 1) / dim_t
            return ops.where(odd, ops.cos(a), ops.sin(a))

        pos = ops.concat([encode(y_embed), encode(x_embed)], axis=3)                 # (N, H, W, 2F)
        return pos.transpose(0, 3, 1, 2)                                              # (N, 2F, H, W)
