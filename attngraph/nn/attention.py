"""MultiheadAttention with torch's keys and semantics, written from primitives.

The graph is the textbook one: project, split heads by reshape + transpose, ``q kᵀ``,
scale, add float masks, fill bool masks with −inf, softmax, ``@ v``, merge heads, project.
The optimizer's attention fusion turns that chain into one ``attention`` node. With
``need_weights=True`` the softmax is read elsewhere too, and the fuser makes it the second
output of that node (``attention(..., return_weights=True)``).
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..dsl import Tensor, as_tensor
from ..errors import DTypeError, ShapeError
from .linear import Linear, linear
from .module import Module, constant_init, xavier_normal_init, xavier_uniform_init

__all__ = ["MultiheadAttention", "as_mask"]


def as_mask(mask, graph, dtype, what: str):
    """A mask argument as a Tensor: bool (True = not allowed) or float (added), arrays become consts."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        arr = np.asarray(mask)
        if arr.dtype != bool and arr.dtype.kind != "f":
            raise DTypeError(f"{what} must be bool or float, got {arr.dtype}")
        mask = as_tensor(arr if arr.dtype == bool else arr.astype(dtype.numpy), graph)
    if mask.dtype.value != "bool" and mask.dtype != dtype:
        raise DTypeError(f"{what} must be bool or {dtype}, got {mask.dtype}")
    return mask


def _apply_mask(scores, mask):
    """Bool masks fill −inf where True; float masks are added (torch's rule)."""
    if mask.dtype.value == "bool":
        return ops.mask(scores, mask)
    return scores + mask


class MultiheadAttention(Module):
    """torch.nn.MultiheadAttention.

    Keys: ``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E,), or ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``;
    ``out_proj.weight``, ``out_proj.bias``; ``bias_k``, ``bias_v`` with ``add_bias_kv``.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, weights or None)``, as torch:

    - inputs (L, N, E), or (N, L, E) with ``batch_first``, or unbatched (L, E);
    - ``attn_mask`` (L, S) or (N·H, L, S), bool (True = may not attend) or float (added); a 3-D
      mask with a symbolic batch is declared ``("B*H", L, S)`` with H the number, e.g. ``("B*4", 5, 5)``;
    - ``key_padding_mask`` (N, S), bool (True = padding) or float (added);
    - ``is_causal`` hides the keys after each query (no ``attn_mask`` needed, unlike torch);
    - ``need_weights`` returns the softmax, averaged over heads unless ``average_attn_weights=False``.

    Differences from torch: a query whose keys are all masked gives zeros where torch gives NaN;
    dropout on the attention weights is not in the graph (the graph runs for inference).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ShapeError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else int(kdim)
        self.vdim = embed_dim if vdim is None else int(vdim)
        self.dropout, self.batch_first = float(dropout), batch_first
        self.add_zero_attn = add_zero_attn
        e = embed_dim
        self._packed = self.kdim == e and self.vdim == e
        if self._packed:
            self.register_parameter("in_proj_weight", (3 * e, e), xavier_uniform_init)
        else:
            self.register_parameter("q_proj_weight", (e, e), xavier_uniform_init)
            self.register_parameter("k_proj_weight", (e, self.kdim), xavier_uniform_init)
            self.register_parameter("v_proj_weight", (e, self.vdim), xavier_uniform_init)
        if bias:
            self.register_parameter("in_proj_bias", (3 * e,), constant_init(0.0))
        if add_bias_kv:
            self.register_parameter("bias_k", (1, 1, e), xavier_normal_init)
            self.register_parameter("bias_v", (1, 1, e), xavier_normal_init)
        self.out_proj = Linear(e, e, bias=bias)
        if bias:  # torch zeroes the output projection's bias
            self.out_proj.register_parameter("bias", (e,), constant_init(0.0))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    # -- the projections ------------------------------------------------------------------------
    def _project(self, query, key, value):
        """q, k, v each (N, len, E), sharing one matmul where torch's packed weight allows."""
        bias = self.param("in_proj_bias") if self.has_param("in_proj_bias") else None
        b = [None] * 3 if bias is None else ops.split(bias, 3, axis=0)
        if not self._packed:
            ws = [self.param(n) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
            return [linear(x, w, bb) for x, w, bb in zip((query, key, value), ws, b)]
        w = self.param("in_proj_weight")
        if query is key and key is value:                                  # self-attention: one matmul
            return ops.split(linear(query, w, bias), 3, axis=-1)
        e = self.embed_dim
        if key is value:                                                   # encoder-decoder: q, then k and v
            wq, wkv = ops.split(w, [e, 2 * e], axis=0)
            bq, bkv = (None, None) if bias is None else ops.split(bias, [e, 2 * e], axis=0)
            return [linear(query, wq, bq), *ops.split(linear(key, wkv, bkv), 2, axis=-1)]
        ws = ops.split(w, 3, axis=0)
        return [linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, b)]

    # -- forward --------------------------------------------------------------------------------
    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        g = query.graph
        unbatched = query.ndim == 2
        same_kv, self_attn = key is value, query is key and key is value

        def batch_major(t):                                                # → (N, len, dim)
            if unbatched:
                return t.reshape((1,) + tuple(t.shape))
            return t if self.batch_first else t.transpose(1, 0, 2)

        query = batch_major(query)
        key = query if self_attn else batch_major(key)
        value = key if same_kv else batch_major(value)
        if query.ndim != 3 or key.ndim != 3 or value.ndim != 3:
            raise ShapeError(f"MultiheadAttention takes 2-D or 3-D inputs, got {query.ndim + unbatched}-D")
        n, tl, e = query.shape
        if e != self.embed_dim:
            raise ShapeError(f"MultiheadAttention(embed_dim={self.embed_dim}) got a query with {e} features")
        h, d = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)                         # (N, L|S, E)

        attn_mask = as_mask(attn_mask, g, q.dtype, "attn_mask")
        key_padding_mask = as_mask(key_padding_mask, g, q.dtype, "key_padding_mask")
        if unbatched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.reshape((1,) + tuple(key_padding_mask.shape))
        if self.has_param("bias_k"):                                       # one more key, always allowed
            k = ops.concat([k, ops.broadcast_to(self.param("bias_k"), (n, 1, e))], axis=1)
            v = ops.concat([v, ops.broadcast_to(self.param("bias_v"), (n, 1, e))], axis=1)
            attn_mask, key_padding_mask = _pad_key_axis(attn_mask), _pad_key_axis(key_padding_mask)
        ts = k.shape[1]
        q = q.reshape(n, tl, h, d).transpose(0, 2, 1, 3)                   # (N, H, L, d)
        k = k.reshape(n, ts, h, d).transpose(0, 2, 1, 3)                   # (N, H, S, d)
        v = v.reshape(n, ts, h, d).transpose(0, 2, 1, 3)                   # (N, H, S, d)
        if self.add_zero_attn:                                             # one more key of zeros
            zeros = g.full((n, h, 1, d), 0.0, q.dtype)
            k, v = ops.concat([k, zeros], axis=2), ops.concat([v, zeros], axis=2)
            attn_mask, key_padding_mask = _pad_key_axis(attn_mask), _pad_key_axis(key_padding_mask)
            ts = k.shape[2]

        scores = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(d))        # (N, H, L, S)
        if attn_mask is not None:
            if attn_mask.ndim == 3:                                        # (N·H, L, S) → (N, H, L, S)
                attn_mask = attn_mask.reshape(n, h, attn_mask.shape[1], attn_mask.shape[2])
            elif attn_mask.ndim != 2:
                raise ShapeError(f"attn_mask must be (L, S) or (N*H, L, S), got {attn_mask.shape}")
            scores = _apply_mask(scores, attn_mask)
        if key_padding_mask is not None:
            if key_padding_mask.ndim != 2:
                raise ShapeError(f"key_padding_mask must be (N, S), got {key_padding_mask.shape}")
            scores = _apply_mask(scores, key_padding_mask.reshape(n, 1, 1, ts))
        if is_causal:
            scores = ops.mask(scores, ops.causal_mask(g, tl, ts))
        p = ops.softmax(scores, axis=-1)                                   # (N, H, L, S)
        out = (p @ v).transpose(0, 2, 1, 3).reshape(n, tl, e)              # (N, L, E)
        out = self.out_proj(out)
        if unbatched:
            out = out.reshape(tl, e)
        elif not self.batch_first:
            out = out.transpose(1, 0, 2)                                   # (L, N, E)
        if not need_weights:
            return out, None
        weights = p.mean(axis=1) if average_attn_weights else p            # (N, L, S) or (N, H, L, S)
        if unbatched:
            weights = weights.reshape(tuple(weights.shape[1:]))
        return out, weights


def _pad_key_axis(mask):
    """One more key at the end of a mask's last axis, always allowed (False, or 0 when added)."""
    if mask is None:
        return None
    fill = False if mask.dtype.value == "bool" else 0.0
    pad = [(0, 0)] * (mask.ndim - 1) + [(0, 1)]
    return ops.pad(mask, pad, value=fill)
