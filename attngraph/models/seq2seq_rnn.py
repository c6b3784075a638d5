"""Bahdanau's seq2seq: a GRU encoder and a GRU decoder with additive attention.

The seed notes' first model (Bahdanau, Cho & Bengio 2015). The encoder reads the source
and leaves one state h_j per source position. The decoder, at step t, scores every
encoder state against its previous state s_{t-1} with a small fully connected network,

    e_tj = vᵀ tanh(W s_{t-1} + U h_j),    a_t = softmax_j(e_tj),    c_t = Σ_j a_tj h_j,

then reads ``[embedding(y_{t-1}); c_t]`` into its GRU cell (the context enters every step)
and predicts y_t from ``[s_t; c_t; embedding(y_{t-1})]``. y_0 is the start token.

    import attngraph as ag
    from attngraph.models.seq2seq_rnn import BahdanauSeq2Seq, greedy_decode

    model = BahdanauSeq2Seq(src_vocab=11, tgt_vocab=5, emb_dim=16, hidden_size=32)
    g = ag.Graph("train")
    src = g.input("src", ("B", 4), "int64")
    tgt_in = g.input("tgt_in", ("B", 15), "int64")
    logits, weights = model(src, tgt_in)                  # (B, 15, 5), (B, 15, 4); model(src, tgt_in, src_pad)
    g.output("logits", logits)                            # with a padding mask (B, 4) bool, True = padding

    decoder = model.compile_decoder(src_len=4, backend="cpu")   # encoder + one-step graphs
    tokens, attention = decoder.greedy({"src": ids, "src_pad": ids == 0}, ids == 0, max_len=15, sos=1, eos=2)

Decoding is greedy through two small graphs compiled once: the encoder graph (source →
encoder states, their projections U h_j, the decoder's first state) and a one-step graph
(previous token, state → logits, next state, attention weights), looped in Python.

Everything matches torch: the GRUs are ``torch.nn.GRU`` / ``torch.nn.GRUCell`` (gate order
r, z, n; the same keys), and the other layers are ``nn.Linear`` / ``nn.Embedding``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import nn, ops
from ..dsl import Graph, Tensor
from ..errors import FeedError, ShapeError
from ..nn.linear import linear
from ..nn.module import Module, uniform_init

__all__ = ["AdditiveAttention", "GRUCell", "AttentionGRUDecoder", "BahdanauSeq2Seq", "Seq2SeqRNN",
           "StepDecoder", "build_step_graph", "masked_mean"]


class AdditiveAttention(Module):
    """Bahdanau's scoring: e_j = vᵀ tanh(W q + U k_j), weights = softmax over j, context = Σ_j w_j k_j.

    Keys ``W.weight`` (attn, query_dim), ``U.weight`` / ``U.bias`` (attn, key_dim),
    ``v.weight`` (1, attn). ``U k_j`` does not depend on the query, so a decoder computes it
    once per source (:meth:`project_keys`) and passes it to every step.
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        self.query_dim, self.key_dim, self.attn_dim = int(query_dim), int(key_dim), int(attn_dim)
        self.W = nn.Linear(query_dim, attn_dim, bias=False)
        self.U = nn.Linear(key_dim, attn_dim)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, keys: Tensor) -> Tensor:
        """U k_j for every key: (B, S, key_dim) → (B, S, attn)."""
        if keys.ndim != 3 or keys.shape[-1] != self.key_dim:
            raise ShapeError(f"AdditiveAttention expects keys (B, S, {self.key_dim}), got {keys.shape}")
        return self.U(keys)

    def forward(self, query: Tensor, keys: Tensor, projected_keys: Tensor | None = None,
                key_padding_mask: Tensor | None = None):
        """query (B, query_dim), keys (B, S, key_dim), key_padding_mask (B, S) bool, True = padding.

        Returns (context (B, key_dim), weights (B, S)). Padded keys get weight 0; a row
        whose keys are all padding gets all-zero weights and a zero context.
        """
        if query.ndim != 2 or query.shape[-1] != self.query_dim:
            raise ShapeError(f"AdditiveAttention expects a query (B, {self.query_dim}), got {query.shape}")
        uk = self.project_keys(keys) if projected_keys is None else projected_keys
        b, s = keys.shape[0], keys.shape[1]
        wq = self.W(query).reshape(b, 1, self.attn_dim)                 # (B, 1, A)
        scores = self.v(ops.tanh(wq + uk)).reshape(b, s)                 # (B, S)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (b, s):
                raise ShapeError(f"the padding mask (key_padding_mask) must be (B, S) = {(b, s)}, "
                                 f"got {key_padding_mask.shape}")
            scores = ops.mask(scores, key_padding_mask)
        weights = ops.softmax(scores, axis=-1)                           # (B, S)
        context = (weights.reshape(b, 1, s) @ keys).reshape(b, self.key_dim)   # (B, 1, S) @ (B, S, K) → (B, K)
        return context, weights

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, attn_dim={self.attn_dim}"


class GRUCell(Module):
    """torch.nn.GRUCell: keys ``weight_ih`` (3H, in), ``weight_hh`` (3H, H), ``bias_ih``, ``bias_hh``;
    gates r, z, n in torch's order. ``forward(x (B, in), h (B, H))`` → h' (B, H)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        init = uniform_init(1.0 / math.sqrt(hidden_size))
        self.register_parameter("weight_ih", (3 * hidden_size, input_size), init)
        self.register_parameter("weight_hh", (3 * hidden_size, hidden_size), init)
        self.register_parameter("bias_ih", (3 * hidden_size,), init)
        self.register_parameter("bias_hh", (3 * hidden_size,), init)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        if x.shape[-1] != self.input_size:
            raise ShapeError(f"GRUCell(input_size={self.input_size}) got {x.shape[-1]} features")
        gi = linear(x, self.param("weight_ih"), self.param("bias_ih"))      # (B, 3H)
        gh = linear(h, self.param("weight_hh"), self.param("bias_hh"))      # (B, 3H)
        i_r, i_z, i_n = ops.split(gi, 3, axis=-1)
        h_r, h_z, h_n = ops.split(gh, 3, axis=-1)
        r = ops.sigmoid(i_r + h_r)
        z = ops.sigmoid(i_z + h_z)
        cand = ops.tanh(i_n + r * h_n)
        return cand + z * (h - cand)                                        # (1 - z) n + z h

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def masked_mean(x: Tensor, pad: Tensor | None) -> Tensor:
    """Mean of x (B, S, D) over the positions that are not padding (pad (B, S), True = padding) → (B, D)."""
    if pad is None:
        return ops.mean(x, axis=1)
    if tuple(pad.shape) != tuple(x.shape[:2]):
        raise ShapeError(f"the padding mask must be (B, S) = {tuple(x.shape[:2])}, got {pad.shape}")
    keep = ops.cast(ops.logical_not(pad), x.dtype)                          # (B, S)
    b, s = pad.shape
    total = ops.sum(x * keep.reshape(b, s, 1), axis=1)                      # (B, D)
    count = ops.maximum(ops.sum(keep, axis=1, keepdims=True), 1.0)          # (B, 1)
    return total / count


class AttentionGRUDecoder(Module):
    """The decoder both models share: a GRU cell with additive attention over a memory.

    Keys ``embedding.weight``, ``init.weight``/``init.bias`` (s_0 = tanh(init(mean of the
    memory))), ``attention.*`` (:class:`AdditiveAttention`), ``cell.*`` (:class:`GRUCell`
    over ``[embedding(y_{t-1}); c_t]``) and ``out.*`` (a Linear from ``[s_t; c_t; embedding(y_{t-1})]``).
    """

    def __init__(self, vocab: int, emb_dim: int, memory_dim: int, hidden_size: int, attn_dim: int,
                 padding_idx: int | None = 0):
        super().__init__()
        self.vocab, self.emb_dim, self.memory_dim = int(vocab), int(emb_dim), int(memory_dim)
        self.hidden_size, self.attn_dim = int(hidden_size), int(attn_dim)
        self.embedding = nn.Embedding(vocab, emb_dim, padding_idx=padding_idx)
        self.init = nn.Linear(memory_dim, hidden_size)
        self.attention = AdditiveAttention(hidden_size, memory_dim, attn_dim)
        self.cell = GRUCell(emb_dim + memory_dim, hidden_size)
        self.out = nn.Linear(hidden_size + memory_dim + emb_dim, vocab)

    def initial_state(self, memory: Tensor, memory_pad: Tensor | None = None) -> Tensor:
        """s_0 = tanh(init(mean of the unpadded memory)): (B, H)."""
        return ops.tanh(self.init(masked_mean(memory, memory_pad)))

    def encoder_outputs(self, graph: Graph, memory: Tensor, memory_pad: Tensor | None = None) -> None:
        """Make ``graph`` an encoder graph for :class:`StepDecoder`: outputs ``memory`` (B, S, M),
        ``projected`` (B, S, A) = U h_j, and ``state`` (B, H) = s_0."""
        graph.output("memory", memory)
        graph.output("projected", self.attention.project_keys(memory))
        graph.output("state", self.initial_state(memory, memory_pad))

    def _advance(self, emb: Tensor, state: Tensor, memory: Tensor, projected: Tensor, memory_pad: Tensor | None):
        """Attend with s_{t-1}, then update the cell: → (s_t, [s_t; c_t; emb] (B, H+M+E), weights (B, S))."""
        context, weights = self.attention(state, memory, projected, memory_pad)   # (B, M), (B, S)
        state = self.cell(ops.concat([emb, context], axis=-1), state)        # (B, H)
        return state, ops.concat([state, context, emb], axis=-1), weights

    def step(self, prev_ids: Tensor, state: Tensor, memory: Tensor, projected: Tensor,
             memory_pad: Tensor | None = None):
        """One step: y_{t-1} (B,) ids, s_{t-1} (B, H) → (logits (B, V), s_t (B, H), weights (B, S))."""
        state, readout, weights = self._advance(self.embedding(prev_ids), state, memory, projected, memory_pad)
        return self.out(readout), state, weights

    def forward(self, tgt_in: Tensor, memory: Tensor, memory_pad: Tensor | None = None):
        """Teacher forcing: tgt_in (B, T) ids (y_0 = start token first) → logits (B, T, V), weights (B, T, S).

        The same arithmetic as T calls of :meth:`step`, with the embedding lookup and the
        output Linear done once for all steps (fewer, larger nodes).
        """
        steps = tgt_in.shape[1]
        if not isinstance(steps, int):
            raise ShapeError(f"the decoder is unrolled over the target, so its length must be a number; got {steps!r}",
                             hint="declare tgt_in with a fixed length, e.g. ('B', 15)")
        b, s = memory.shape[0], memory.shape[1]
        emb = self.embedding(tgt_in)                                          # (B, T, E)
        projected = self.attention.project_keys(memory)                      # (B, S, A), once
        state = self.initial_state(memory, memory_pad)
        readouts, all_weights = [], []
        for t in range(steps):
            state, readout, weights = self._advance(emb[:, t], state, memory, projected, memory_pad)
            readouts.append(readout.reshape(b, 1, readout.shape[-1]))
            all_weights.append(weights.reshape(b, 1, s))
        logits = self.out(ops.concat(readouts, axis=1))                       # (B, T, H+M+E) → (B, T, V)
        return logits, ops.concat(all_weights, axis=1)                        # (B, T, V), (B, T, S)


class BahdanauSeq2Seq(Module):
    """Embedding → (bi)GRU encoder → :class:`AttentionGRUDecoder`.

    Keys ``src_embed.weight``, ``encoder.*`` (``torch.nn.GRU(emb_dim, hidden_size,
    batch_first=True, bidirectional=...)``), ``decoder.*``. The decoder state has
    ``hidden_size`` units; the encoder states h_j have ``hidden_size`` (×2 if bidirectional).

    ``forward(src (B, S), tgt_in (B, T), src_pad=None)`` → (logits (B, T, V), attention (B, T, S)).

    Padded source positions run through the GRU like any other (as torch's GRU does without
    ``pack_padded_sequence``); the padding mask keeps them out of every context c_t and of s_0.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, emb_dim: int = 32, hidden_size: int = 64,
                 attn_dim: int | None = None, bidirectional: bool = True, padding_idx: int | None = 0):
        super().__init__()
        self.src_vocab, self.tgt_vocab, self.emb_dim = int(src_vocab), int(tgt_vocab), int(emb_dim)
        self.hidden_size, self.bidirectional = int(hidden_size), bool(bidirectional)
        self.attn_dim = int(attn_dim or hidden_size)
        self.memory_dim = hidden_size * (2 if bidirectional else 1)
        self.src_embed = nn.Embedding(src_vocab, emb_dim, padding_idx=padding_idx)
        self.encoder = nn.GRU(emb_dim, hidden_size, batch_first=True, bidirectional=bidirectional)
        self.decoder = AttentionGRUDecoder(tgt_vocab, emb_dim, self.memory_dim, hidden_size, self.attn_dim,
                                           padding_idx)

    def encode(self, src: Tensor) -> Tensor:
        """src (B, S) ids → the encoder states h_j (B, S, memory_dim)."""
        if src.ndim != 2:
            raise ShapeError(f"BahdanauSeq2Seq expects src (B, S) ids, got {src.shape}")
        memory, _ = self.encoder(self.src_embed(src))
        return memory

    def forward(self, src: Tensor, tgt_in: Tensor, src_pad: Tensor | None = None):
        return self.decoder(tgt_in, self.encode(src), src_pad)

    def compile_decoder(self, src_len: int, backend: str = "cpu", **options) -> "StepDecoder":
        """The encoder graph and the one-step graph, compiled, for :meth:`StepDecoder.greedy`."""
        return StepDecoder.build(self, src_len, backend, **options)

    def extra_repr(self) -> str:
        return f"memory_dim={self.memory_dim}, attn_dim={self.attn_dim}"


Seq2SeqRNN = BahdanauSeq2Seq


def build_step_graph(decoder: AttentionGRUDecoder, memory_len: int, name: str = "decoder_step") -> Graph:
    """One decoder step as a graph. Inputs ``memory`` (B, S, M), ``projected`` (B, S, A),
    ``memory_pad`` (B, S) bool, ``prev`` (B,) int64, ``state`` (B, H); outputs ``logits``
    (B, V), ``next_state`` (B, H), ``attention`` (B, S)."""
    g = Graph(name)
    memory = g.input("memory", ("B", memory_len, decoder.memory_dim))
    projected = g.input("projected", ("B", memory_len, decoder.attn_dim))
    pad = g.input("memory_pad", ("B", memory_len), "bool")
    prev = g.input("prev", ("B",), "int64")
    state = g.input("state", ("B", decoder.hidden_size))
    logits, nxt, weights = decoder.step(prev, state, memory, projected, pad)
    g.output("logits", logits)
    g.output("next_state", nxt)
    g.output("attention", weights)
    return g


@dataclass
class StepDecoder:
    """Greedy decoding with two compiled graphs: ``encoder`` (inputs → ``memory``,
    ``projected``, ``state``) and ``step`` (see :func:`build_step_graph`).

    ``sync(params)`` copies trained weights (name → array) into both executables.
    """

    encoder: object          # Executable: the model's inputs → memory, projected, state
    step: object             # Executable: one decoder step
    memory_len: int

    @classmethod
    def build(cls, model: BahdanauSeq2Seq, src_len: int, backend: str = "cpu", **options) -> "StepDecoder":
        """The seq2seq model's encoder graph (inputs ``src``, ``src_pad``) and step graph, compiled."""
        g = Graph("bahdanau_encoder")
        src = g.input("src", ("B", src_len), "int64")
        pad = g.input("src_pad", ("B", src_len), "bool")
        model.decoder.encoder_outputs(g, model.encode(src), pad)
        return cls.compile(g, model.decoder, src_len, "bahdanau_step", backend, **options)

    @classmethod
    def compile(cls, encoder_graph: Graph, decoder: AttentionGRUDecoder, memory_len: int, step_name: str,
                backend: str = "cpu", **options) -> "StepDecoder":
        """Compile ``encoder_graph`` (outputs ``memory``, ``projected``, ``state``: see
        :meth:`AttentionGRUDecoder.encoder_outputs`) and the decoder's one-step graph."""
        from ..compiler import compile as compile_graph

        step = build_step_graph(decoder, memory_len, step_name)
        return cls(compile_graph(encoder_graph, backend=backend, **options),
                   compile_graph(step, backend=backend, **options), memory_len)

    def sync(self, params) -> None:
        for exe in (self.encoder, self.step):
            for name in exe.params:
                exe.params[name] = params[name]

    def greedy(self, feeds: dict, memory_pad: np.ndarray, max_len: int, sos: int, eos: int, pad: int = 0):
        """Greedy decoding from ``sos``: each row stops after its ``eos``; later tokens are ``pad``.

        ``feeds`` are the encoder graph's inputs; ``memory_pad`` (N, S) marks padded memory.
        Returns (tokens (N, max_len) int64, attention (N, max_len, S)): row t of the
        attention is what the decoder looked at to produce token t (0 after the row stopped).
        """
        enc = self.encoder.run(feeds)
        memory_pad = np.asarray(memory_pad, bool)
        n, s = memory_pad.shape
        if enc["memory"].shape[:2] != (n, s):
            raise FeedError(f"memory_pad has shape {memory_pad.shape}; the memory is {enc['memory'].shape[:2]}")
        state = enc["state"]
        prev = np.full(n, sos, np.int64)
        tokens = np.full((n, max_len), pad, np.int64)
        attention = np.zeros((n, max_len, s), np.float32)
        done = np.zeros(n, bool)
        for t in range(max_len):
            out = self.step.run({"memory": enc["memory"], "projected": enc["projected"], "memory_pad": memory_pad,
                                 "prev": prev, "state": state})
            nxt = np.where(done, pad, out["logits"].argmax(-1))
            tokens[:, t] = nxt
            attention[:, t] = np.where(done[:, None], 0.0, out["attention"])
            done |= nxt == eos
            if done.all():
                break
            prev, state = nxt, out["next_state"]
        return tokens, attention
