"""GRU and LSTM with torch's keys and gate order, unrolled over a static sequence length.

Keys per layer ``k`` (and ``_reverse`` for the backward direction): ``weight_ih_lk``
(G·H, in), ``weight_hh_lk`` (G·H, H), ``bias_ih_lk``, ``bias_hh_lk``, with G = 3 gates
(r, z, n) for GRU and 4 (i, f, g, o) for LSTM. The input projection of every time step is
one matmul; each step then adds ``h Wₕₕᵀ`` and applies the gates. The batch may be
symbolic; the length must be a number, since the loop is unrolled into the graph.
"""

from __future__ import annotations

import math

from .. import ops
from ..errors import AttngraphError, ShapeError
from .linear import linear
from .module import Module, uniform_init

__all__ = ["GRU", "LSTM"]


class _RNNBase(Module):
    _gates = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0):
        super().__init__()
        if proj_size:
            raise AttngraphError("LSTM proj_size is not supported")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        init = uniform_init(1.0 / math.sqrt(hidden_size))
        gh = self._gates * hidden_size
        for layer in range(num_layers):
            size_in = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes(layer):
                self.register_parameter(f"weight_ih{suffix}", (gh, size_in), init)
                self.register_parameter(f"weight_hh{suffix}", (gh, hidden_size), init)
                if bias:
                    self.register_parameter(f"bias_ih{suffix}", (gh,), init)
                    self.register_parameter(f"bias_hh{suffix}", (gh,), init)

    def _suffixes(self, layer: int):
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}")

    def _cell(self, gi, hc, suffix):
        """One step: the input projection ``gi`` (N, G·H) and the state tuple → the new state tuple."""
        raise NotImplementedError

    def _run(self, x, states):
        """x (N, T, in) or (T, N, in); states: one (h0, c0) per layer·direction → output, final states."""
        t_axis = 1 if self.batch_first else 0
        steps = x.shape[t_axis]
        if not isinstance(steps, int):
            raise ShapeError(f"{type(self).__name__} is unrolled over the sequence, so its length must be a number; "
                             f"got {steps!r}", hint="declare the input with a fixed length, e.g. ('B', 12, 32)")
        n, h = x.shape[1 - t_axis], self.hidden_size
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                b_ih = self.param(f"bias_ih{suffix}") if self.bias else None
                xw = linear(x, self.param(f"weight_ih{suffix}"), b_ih)   # every step's input projection
                hc = states[layer * self.num_directions + direction]
                seq = [None] * steps
                for t in (reversed(range(steps)) if direction else range(steps)):
                    gi = xw[:, t] if self.batch_first else xw[t]         # (N, G·H)
                    hc = self._cell(gi, hc, suffix)
                    seq[t] = hc[0].reshape((n, 1, h) if self.batch_first else (1, n, h))
                outputs.append(ops.concat(seq, axis=t_axis))             # (N, T, H) or (T, N, H)
                finals.append(hc)
            x = outputs[0] if len(outputs) == 1 else ops.concat(outputs, axis=-1)
            if self.dropout and layer < self.num_layers - 1:
                x = ops.dropout(x, self.dropout)
        return x, finals

    def _hidden(self, h, suffix):
        """h Wₕₕᵀ + bₕₕ: (N, G·H)."""
        return linear(h, self.param(f"weight_hh{suffix}"), self.param(f"bias_hh{suffix}") if self.bias else None)

    def _prepare(self, input, hx_parts):
        """Batch the input if unbatched; split each given (L·D, N, H) state into per-layer (N, H) pieces."""
        unbatched = input.ndim == 2
        if input.ndim not in (2, 3):
            raise ShapeError(f"{type(self).__name__} expects a 2-D or 3-D input, got {input.shape}")
        if unbatched:                                                    # (T, in) → (T, 1, in) or (1, T, in)
            input = input.reshape((1,) + tuple(input.shape) if self.batch_first else
                                  (input.shape[0], 1, input.shape[1]))
        if input.shape[-1] != self.input_size:
            raise ShapeError(f"{type(self).__name__}(input_size={self.input_size}) got {input.shape[-1]} features")
        n = input.shape[0 if self.batch_first else 1]
        count, h = self.num_layers * self.num_directions, self.hidden_size
        pieces = []
        for part in hx_parts:
            if part is None:
                zeros = input.graph.full((n, h), 0.0, input.dtype)
                pieces.append([zeros] * count)
                continue
            if unbatched:
                part = part.reshape(part.shape[0], 1, part.shape[1])
            if tuple(part.shape) != (count, n, h):
                raise ShapeError(f"expected a hidden state of shape {(count, n, h)}, got {part.shape}")
            pieces.append([part[i] for i in range(count)])               # each (N, H)
        return input, unbatched, pieces

    @staticmethod
    def _stack(states, unbatched):
        """Per-layer (N, H) states → (L·D, N, H), or (L·D, H) when unbatched."""
        n, h = states[0].shape
        out = ops.concat([s.reshape(1, n, h) for s in states], axis=0)
        return out.reshape(out.shape[0], h) if unbatched else out

    def _finish(self, output, unbatched):
        if unbatched:
            return output.reshape(tuple(output.shape[1:]) if self.batch_first else
                                  (output.shape[0], output.shape[2]))
        return output


class GRU(_RNNBase):
    """torch.nn.GRU. ``forward(input, hx=None)`` → ``(output, h_n)``.

    r = σ(Wᵢᵣx + bᵢᵣ + Wₕᵣh + bₕᵣ), z = σ(Wᵢ𝓏x + bᵢ𝓏 + Wₕ𝓏h + bₕ𝓏),
    n = tanh(Wᵢₙx + bᵢₙ + r ⊙ (Wₕₙh + bₕₙ)), h' = (1 − z) ⊙ n + z ⊙ h.
    """

    _gates = 3

    def _cell(self, gi, hc, suffix):
        (h,) = hc
        gh = self._hidden(h, suffix)                                     # (N, 3H)
        i_r, i_z, i_n = ops.split(gi, 3, axis=-1)
        h_r, h_z, h_n = ops.split(gh, 3, axis=-1)
        r = ops.sigmoid(i_r + h_r)
        z = ops.sigmoid(i_z + h_z)
        cand = ops.tanh(i_n + r * h_n)
        return (cand + z * (h - cand),)

    def forward(self, input, hx=None):
        x, unbatched, (h0,) = self._prepare(input, [hx])
        out, finals = self._run(x, [(h,) for h in h0])
        return self._finish(out, unbatched), self._stack([f[0] for f in finals], unbatched)


class LSTM(_RNNBase):
    """torch.nn.LSTM. ``forward(input, (h0, c0)=None)`` → ``(output, (h_n, c_n))``.

    Gates i, f, g, o from Wᵢx + bᵢ + Wₕh + bₕ; c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g), h' = σ(o) ⊙ tanh(c').
    """

    _gates = 4

    def _cell(self, gi, hc, suffix):
        h, c = hc
        i, f, g, o = ops.split(gi + self._hidden(h, suffix), 4, axis=-1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        return ops.sigmoid(o) * ops.tanh(c), c

    def forward(self, input, hx=None):
        h0, c0 = (None, None) if hx is None else hx
        x, unbatched, (hs, cs) = self._prepare(input, [h0, c0])
        out, finals = self._run(x, list(zip(hs, cs)))
        h_n = self._stack([f[0] for f in finals], unbatched)
        c_n = self._stack([f[1] for f in finals], unbatched)
        return self._finish(out, unbatched), (h_n, c_n)
