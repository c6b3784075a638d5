"""The Transformer encoder-decoder of "Attention Is All You Need", with cached decoding.

    import attngraph as ag
    from attngraph.models import transformer as T

    cfg = T.TransformerConfig.tiny(src_vocab=13, tgt_vocab=13)      # or .base(...): N=6, d=512, h=8, FFN 2048
    model = T.Seq2SeqTransformer(cfg).reset_parameters(0)
    step = ag.train.compile_train_step(model.build_graph("train"), "loss")   # teacher forcing
    ...
    model.load_from(step.exe)                                        # trained weights back into the module
    out = T.greedy_decode(model, src)                                # or T.beam_search(model, src, beam_size=4)
    out.tokens, out.scores

The model (seed notes, item 8): token embeddings scaled by √d plus sinusoidal positions,
torch's ``nn.Transformer`` (post-norm by default, as the paper; ``norm_first`` for pre-norm),
and a Linear "generator" to the target vocabulary. The state_dict keys are those of a torch
module with attributes ``src_embed``, ``tgt_embed`` (``nn.Embedding``), ``transformer``
(``nn.Transformer(batch_first=True)``) and ``generator`` (``nn.Linear``); with
``share_embeddings`` one table ``embed`` serves the source, the target and the generator
(logits = x · embedᵀ, no bias), as in the paper.

The graphs (``model.build_graph(kind)``; ``model.compiled(kind)`` compiles each once):

- ``"train"``: src (B, S), tgt_in (B, T), tgt_out (B, T) int64 → ``loss``, the mean
  cross-entropy over the targets that are not <pad>. The source padding (src == pad) is a
  key padding mask; the target self-attention is causal.
- ``"logits"``: src, tgt_in → ``logits`` (B, T, V): the full recomputation of every position.
  ``build_graph("logits", attention=True)`` also outputs ``cross_attention`` (B, T, S), the
  last decoder layer's attention over the source, averaged over heads.
- ``"encode"``: src → ``memory`` (B, S, d) and, for every decoder layer l, the cross-attention
  keys and values of the memory ``cross_k_l``, ``cross_v_l`` (B, H, S, d/H): computed once per
  source, never per step.
- ``"step"``: one decoder position for every row. Inputs: ``tokens`` (B,) the newest token,
  ``position`` (B,) its index, ``self_k_l`` / ``self_v_l`` (B, H, C, d/H) the cached
  self-attention keys and values of the earlier positions (a cache of capacity C; slots at
  and after ``position`` are masked out), ``cross_k_l`` / ``cross_v_l`` from the encode graph
  and ``memory_pad`` (B, S) bool. Outputs: ``logits`` (B, V) for the next token and
  ``new_k_l`` / ``new_v_l`` (B, H, 1, d/H), the rows the caller writes into the cache at
  ``position``. The new token attends to the C cached slots plus itself, so a step costs
  O(C) = O(T): nothing of an earlier position is recomputed.

Shape buckets. Every graph has symbolic dims (B, S, T, C), so each kind is compiled once
(passes, fusion, kernels); what depends on the sizes is the executable's memory plan, made
once per set of sizes and kept (``max_plans``). To keep that set small, sources are padded
with <pad> to a multiple of ``cfg.bucket`` (capped at ``max_len``; the padding is masked, so
the numbers do not change), and the cache capacity C grows by ``cfg.bucket`` slots when the
decoded length reaches it. With bucket 16 and 64-token outputs a batch uses 4 step plans.
Compiled executables are kept on the model per (kind, backend); after its weights change
(``load_state_dict``, ``load_from``, ``reset_parameters``) they get the new weights on next use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .. import nn, ops, train
from ..dsl import Graph
from ..errors import AttngraphError, DTypeError, FeedError, ShapeError
from ..nn.linear import linear
from ..nn.module import Module, normal_init
from ..nn.positional import sinusoidal_table
from . import decoding
from .decoding import SearchResult

__all__ = ["TransformerConfig", "Seq2SeqTransformer", "KVCacheDecoder", "RecomputeDecoder", "greedy_decode",
           "beam_search", "pad_batch", "round_up", "SearchResult"]


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------

@dataclass
class TransformerConfig:
    """Sizes and special tokens. The defaults are the paper's base model (``base``)."""

    src_vocab: int
    tgt_vocab: int
    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False        # pre-norm layers (the paper's are post-norm)
    layer_norm_eps: float = 1e-5
    max_len: int = 256              # longest source and longest target (the position table's rows)
    pad_id: int = 0
    sos_id: int = 1
    eos_id: int = 2
    share_embeddings: bool = False  # one table for source, target and generator (needs one vocabulary)
    bucket: int = 16                # sources and the decoding cache are rounded up to multiples of this

    def __post_init__(self):
        if self.d_model % self.nhead:
            raise ShapeError(f"d_model {self.d_model} must be divisible by nhead {self.nhead}")
        if self.share_embeddings and self.src_vocab != self.tgt_vocab:
            raise ShapeError(f"share_embeddings needs one vocabulary, got {self.src_vocab} and {self.tgt_vocab}")
        if not 0 <= self.pad_id < min(self.src_vocab, self.tgt_vocab):
            raise ShapeError(f"pad_id={self.pad_id} is outside the vocabularies")
        for name in ("sos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.tgt_vocab:
                raise ShapeError(f"{name}={getattr(self, name)} is outside the target vocabulary of {self.tgt_vocab}")
        if self.bucket < 1 or self.max_len < 1:
            raise ShapeError(f"bucket and max_len must be >= 1, got {self.bucket} and {self.max_len}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    @classmethod
    def base(cls, src_vocab: int, tgt_vocab: int, **changes) -> "TransformerConfig":
        """The paper's base model: N=6 layers each side, d=512, 8 heads, FFN 2048, dropout 0.1, post-norm."""
        return replace(cls(src_vocab, tgt_vocab), **changes)

    @classmethod
    def tiny(cls, src_vocab: int, tgt_vocab: int, **changes) -> "TransformerConfig":
        """A model for tests and toy tasks: d=32, 4 heads, 2 layers each side, FFN 64, no dropout."""
        small = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                     dropout=0.0, max_len=64, bucket=8)
        return replace(cls(src_vocab, tgt_vocab, **small), **changes)


def round_up(n: int, bucket: int) -> int:
    """The smallest multiple of ``bucket`` that is >= ``n`` (and >= ``bucket``)."""
    return max(bucket, -(-int(n) // bucket) * bucket)


def pad_batch(sequences, pad_id: int, length: int | None = None, bucket: int = 1) -> np.ndarray:
    """(N, L) int64 ids from a list of id lists, <pad> after each; L is ``length`` or the
    longest rounded up to ``bucket``."""
    longest = max((len(s) for s in sequences), default=0)
    width = length if length is not None else round_up(max(longest, 1), bucket)
    if longest > width:
        raise ShapeError(f"a sequence of {longest} ids does not fit a width of {width}")
    out = np.full((len(sequences), width), pad_id, np.int64)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = s
    return out


# ------------------------------------------------------------------------------------------------
# modules with a cached-decoding mode (torch's keys and arithmetic otherwise)
# ------------------------------------------------------------------------------------------------

def _heads(x, n, length, h, d):
    return x.reshape(n, length, h, d).transpose(0, 2, 1, 3)                  # (N, len, E) → (N, H, len, d)


class _CachedAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch_first) with three more calls for cached decoding.

    - ``attn(memory, mode="kv")`` → the keys and values of ``memory`` (N, S, E), each (N, H, S, d);
    - ``attn(x, mode="self_step", k_cache=, v_cache=, cache_mask=)``: x (N, 1, E) attends to the
      cache (N, H, C, d) where ``cache_mask`` (N, 1, 1, C+1) is False, and to itself (the last
      slot) → (output (N, 1, E), its key, its value (N, H, 1, d));
    - ``attn(x, mode="cross_step", k=, v=, key_padding_mask=)`` → output (N, 1, E).

    The score chains are written as in ``nn.MultiheadAttention``, so each fuses into one
    ``attention`` node.
    """

    def forward(self, query, key=None, value=None, *args, mode: str = "full", **kwargs):
        if mode == "full":
            return super().forward(query, key, value, *args, **kwargs)
        if mode == "kv":
            return self._memory_kv(query)
        if mode == "self_step":
            return self._self_step(query, **kwargs)
        if mode == "cross_step":
            return self._cross_step(query, **kwargs)
        raise AttngraphError(f"unknown attention mode {mode!r}")

    def _in_proj(self, rows: slice):
        """Rows of the packed in-projection: [0, E) for queries, [E, 3E) for keys and values."""
        w = self.param("in_proj_weight")[rows]                               # (rows, E)
        b = self.param("in_proj_bias")[rows] if self.has_param("in_proj_bias") else None
        return w, b

    def _memory_kv(self, memory):
        n, s, _ = memory.shape
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        k, v = ops.split(linear(memory, *self._in_proj(slice(e, 3 * e))), 2, axis=-1)   # (N, S, E) each
        return _heads(k, n, s, h, d), _heads(v, n, s, h, d)                 # (N, H, S, d)

    def _attend(self, q, k, v, mask):
        n, h, _, d = q.shape
        scores = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(d))          # (N, H, 1, keys)
        p = ops.softmax(ops.mask(scores, mask), axis=-1)
        out = (p @ v).transpose(0, 2, 1, 3).reshape(n, 1, self.embed_dim)    # (N, 1, E)
        return self.out_proj(out)

    def _self_step(self, x, *, k_cache, v_cache, cache_mask):
        n = x.shape[0]
        h, d = self.num_heads, self.head_dim
        qkv = linear(x, self.param("in_proj_weight"),
                     self.param("in_proj_bias") if self.has_param("in_proj_bias") else None)    # (N, 1, 3E)
        q, k, v = [_heads(t, n, 1, h, d) for t in ops.split(qkv, 3, axis=-1)]                # (N, H, 1, d)
        keys = ops.concat([k_cache, k], axis=2)                              # (N, H, C+1, d)
        values = ops.concat([v_cache, v], axis=2)
        return self._attend(q, keys, values, cache_mask), k, v

    def _cross_step(self, x, *, k, v, key_padding_mask):
        n = x.shape[0]
        q = linear(x, *self._in_proj(slice(0, self.embed_dim)))              # (N, 1, E)
        q = _heads(q, n, 1, self.num_heads, self.head_dim)                   # (N, H, 1, d)
        return self._attend(q, k, v, key_padding_mask.reshape(n, 1, 1, k.shape[2]))


class _CachedDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` plus ``mode="step"`` (one position against a cache) and
    ``mode="weights"`` (the full layer, also returning the cross-attention weights)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, norm_first):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                         batch_first=True, norm_first=norm_first)
        self.self_attn = _CachedAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = _CachedAttention(d_model, nhead, dropout=dropout, batch_first=True)

    def forward(self, tgt, memory=None, *args, mode: str = "full", **kwargs):
        if mode == "full":
            return super().forward(tgt, memory, *args, **kwargs)
        if mode == "step":
            return self._step(tgt, **kwargs)
        if mode == "weights":
            return self._with_weights(tgt, memory, **kwargs)
        raise AttngraphError(f"unknown decoder layer mode {mode!r}")

    def _step(self, x, *, k_cache, v_cache, cache_mask, cross_k, cross_v, memory_pad):
        def sa(y):
            out, k, v = self.self_attn(y, mode="self_step", k_cache=k_cache, v_cache=v_cache, cache_mask=cache_mask)
            return self.dropout1(out), k, v

        def ca(y):
            out = self.multihead_attn(y, mode="cross_step", k=cross_k, v=cross_v, key_padding_mask=memory_pad)
            return self.dropout2(out)

        if self.norm_first:
            out, k, v = sa(self.norm1(x))
            x = x + out
            x = x + ca(self.norm2(x))
            return x + self.dropout3(self._ff_block(self.norm3(x))), k, v
        out, k, v = sa(x)
        x = self.norm1(x + out)
        x = self.norm2(x + ca(x))
        return self.norm3(x + self.dropout3(self._ff_block(x))), k, v

    def _with_weights(self, x, memory, *, memory_key_padding_mask):
        def ca(y):
            out, weights = self.multihead_attn(y, memory, memory, key_padding_mask=memory_key_padding_mask,
                                               need_weights=True)
            return self.dropout2(out), weights

        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), None, None, True)
            out, weights = ca(self.norm2(x))
            x = x + out
            return x + self.dropout3(self._ff_block(self.norm3(x))), weights
        x = self.norm1(x + self._sa_block(x, None, None, True))
        out, weights = ca(x)
        x = self.norm2(x + out)
        return self.norm3(x + self.dropout3(self._ff_block(x))), weights


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------

class Seq2SeqTransformer(Module):
    """Embeddings (× √d) + sinusoidal positions → ``nn.Transformer`` → generator; see the module doc.

    ``model(src, tgt_in)`` on graph tensors gives the logits (B, T, V); ``build_graph(kind)``
    builds the train / logits / encode / step graphs and ``compiled(kind)`` compiles them once.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        emb_init = normal_init(d ** -0.5)          # × √d in forward: unit variance, like the positions

        def embedding(vocab):
            table = nn.Embedding(vocab, d, padding_idx=cfg.pad_id)

            def init(rng, shape):
                w = emb_init(rng, shape)
                w[cfg.pad_id] = 0.0
                return w

            table.register_parameter("weight", (vocab, d), init)
            return table

        if cfg.share_embeddings:
            self.embed = embedding(cfg.tgt_vocab)
        else:
            self.src_embed = embedding(cfg.src_vocab)
            self.tgt_embed = embedding(cfg.tgt_vocab)
        layer = _CachedDecoderLayer(d, cfg.nhead, cfg.dim_feedforward, cfg.dropout, cfg.activation,
                                    cfg.layer_norm_eps, cfg.norm_first)
        decoder = nn.TransformerDecoder(layer, cfg.num_decoder_layers, nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        self.transformer = nn.Transformer(d, cfg.nhead, cfg.num_encoder_layers, cfg.num_decoder_layers,
                                          cfg.dim_feedforward, cfg.dropout, cfg.activation, custom_decoder=decoder,
                                          layer_norm_eps=cfg.layer_norm_eps, batch_first=True,
                                          norm_first=cfg.norm_first)
        if not cfg.share_embeddings:
            self.generator = nn.Linear(d, cfg.tgt_vocab)
        self.dropout = nn.Dropout(cfg.dropout)
        object.__setattr__(self, "_compiled", {})        # (kind, backend, options) → [exe, weights version]
        object.__setattr__(self, "_version", 0)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_model={c.d_model}, nhead={c.nhead}, layers={c.num_encoder_layers}+{c.num_decoder_layers}, "
                f"ffn={c.dim_feedforward}, vocab={c.src_vocab}/{c.tgt_vocab}")

    def num_parameters(self) -> int:
        """Trainable numbers, counted from the declared shapes (nothing is drawn)."""
        return sum(int(np.prod(slot.shape)) for _, _, _, slot in self._named_slots() if not slot.buffer)

    # -- weights changed: compiled executables take them on next use --------------------------------
    def load_state_dict(self, state_dict, strict: bool = True):
        result = super().load_state_dict(state_dict, strict)
        object.__setattr__(self, "_version", self._version + 1)
        return result

    def load_from(self, exe):
        super().load_from(exe)
        object.__setattr__(self, "_version", self._version + 1)
        return self

    def reset_parameters(self, seed: int = 0):
        super().reset_parameters(seed)
        object.__setattr__(self, "_version", self._version + 1)
        return self

    def copy(self):
        """A deep copy of the module and its weights (without the compiled executables)."""
        compiled = self._compiled
        object.__setattr__(self, "_compiled", {})
        try:
            return super().copy()
        finally:
            object.__setattr__(self, "_compiled", compiled)

    # -- pieces of the graphs ----------------------------------------------------------------------
    def forward(self, *tensors, mode: str = "logits", **kwargs):
        """Dispatch for ``Module.__call__`` (the module must be being called to create its consts)."""
        return getattr(self, f"_build_{mode}")(*tensors, **kwargs)

    def _embed(self, ids, which: str, positions=None):
        """(…) ids → (…, d): table[ids]·√d + PE (PE[:T] for (B, T) ids, else PE[positions])."""
        table = self.embed if self.cfg.share_embeddings else (self.src_embed if which == "src" else self.tgt_embed)
        pe = self.const("pe", sinusoidal_table(self.cfg.max_len, self.cfg.d_model))      # (max_len, d)
        x = table(ids) * math.sqrt(self.cfg.d_model)
        if positions is None:
            steps = ids.shape[1]
            if isinstance(steps, int) and steps > self.cfg.max_len:
                raise ShapeError(f"{steps} positions is longer than max_len={self.cfg.max_len}")
            return self.dropout(x + pe[:steps])                                        # (B, T, d)
        return self.dropout(x + ops.embedding(positions, pe))                          # (B, d)

    def _generate(self, y):
        if self.cfg.share_embeddings:
            table = self.embed(y.graph.arange(self.cfg.tgt_vocab))                     # (V, d): the weight itself
            return y @ table.T
        return self.generator(y)

    def _memory(self, src):
        pad = src == self.cfg.pad_id                                                     # (B, S) True = padding
        memory = self.transformer.encoder(self._embed(src, "src"), src_key_padding_mask=pad)   # (B, S, d)
        return memory, pad

    def _build_logits(self, src, tgt_in, attention: bool = False):
        memory, pad = self._memory(src)
        y = self._embed(tgt_in, "tgt")
        decoder = self.transformer.decoder
        if not attention:
            y = decoder(y, memory, memory_key_padding_mask=pad, tgt_is_causal=True)
            return self._generate(y)                                                    # (B, T, V)
        *first, last = list(decoder.layers)
        for layer in first:
            y = layer(y, memory, memory_key_padding_mask=pad, tgt_is_causal=True)
        y, weights = last(y, memory, mode="weights", memory_key_padding_mask=pad)
        return self._generate(decoder.norm(y)), weights                                 # (B, T, V), (B, T, S)

    def _build_encode(self, src):
        memory, _ = self._memory(src)
        kv = [layer.multihead_attn(memory, mode="kv") for layer in self.transformer.decoder.layers]
        return memory, kv

    def _build_step(self, tokens, position, caches, cross, memory_pad):
        g = tokens.graph
        n = tokens.shape[0]
        x = self._embed(tokens, "tgt", positions=position).reshape(n, 1, self.cfg.d_model)   # (B, 1, d)
        capacity = caches[0][0].shape[2]
        cache_mask = g.arange(capacity) >= position.reshape(n, 1)                        # (B, C) True = empty
        cache_mask = ops.pad(cache_mask, [(0, 0), (0, 1)], value=False)                  # (B, C+1): itself
        cache_mask = cache_mask.reshape(n, 1, 1, cache_mask.shape[1])                    # (B, 1, 1, C+1)
        new = []
        for layer, (k_cache, v_cache), (ck, cv) in zip(self.transformer.decoder.layers, caches, cross):
            x, k, v = layer(x, mode="step", k_cache=k_cache, v_cache=v_cache, cache_mask=cache_mask,
                            cross_k=ck, cross_v=cv, memory_pad=memory_pad)
            new.append((k, v))
        y = self.transformer.decoder.norm(x).reshape(n, self.cfg.d_model)               # (B, d)
        return self._generate(y), new                                                   # (B, V)

    # -- graphs ------------------------------------------------------------------------------------
    def build_graph(self, kind: str, *, attention: bool = False, label_smoothing: float = 0.0) -> Graph:
        """The graph ``kind``: "train", "logits" (``attention=True`` adds ``cross_attention``),
        "encode" or "step" (inputs and outputs in the module doc)."""
        cfg = self.cfg
        g = Graph(f"transformer_{kind}")
        if kind in ("train", "logits"):
            src = g.input("src", ("B", "S"), "int64")
            tgt_in = g.input("tgt_in", ("B", "T"), "int64")
            if kind == "train":
                tgt_out = g.input("tgt_out", ("B", "T"), "int64")
                logits = self(src, tgt_in, mode="logits")
                g.output("loss", train.cross_entropy(logits, tgt_out, ignore_index=cfg.pad_id,
                                                     label_smoothing=label_smoothing))
            elif attention:
                logits, weights = self(src, tgt_in, mode="logits", attention=True)
                g.output("logits", logits)
                g.output("cross_attention", weights)
            else:
                g.output("logits", self(src, tgt_in, mode="logits"))
        elif kind == "encode":
            src = g.input("src", ("B", "S"), "int64")
            memory, kv = self(src, mode="encode")
            g.output("memory", memory)
            for i, (k, v) in enumerate(kv):
                g.output(f"cross_k_{i}", k)
                g.output(f"cross_v_{i}", v)
        elif kind == "step":
            h, d = cfg.nhead, cfg.head_dim
            tokens = g.input("tokens", ("B",), "int64")
            position = g.input("position", ("B",), "int64")
            layers = range(cfg.num_decoder_layers)
            caches = [(g.input(f"self_k_{i}", ("B", h, "C", d)), g.input(f"self_v_{i}", ("B", h, "C", d)))
                      for i in layers]
            cross = [(g.input(f"cross_k_{i}", ("B", h, "S", d)), g.input(f"cross_v_{i}", ("B", h, "S", d)))
                     for i in layers]
            memory_pad = g.input("memory_pad", ("B", "S"), "bool")
            logits, new = self(tokens, position, caches, cross, memory_pad, mode="step")
            g.output("logits", logits)
            for i, (k, v) in enumerate(new):
                g.output(f"new_k_{i}", k)
                g.output(f"new_v_{i}", v)
        else:
            raise AttngraphError(f"unknown graph kind {kind!r}", hint="train, logits, encode or step")
        return g

    def compiled(self, kind: str, backend: str = "cpu", *, attention: bool = False, max_plans: int = 32, **options):
        """``build_graph(kind)`` compiled for ``backend``, once per model (then reused), with the
        model's current weights. ``options`` go to ``ag.compile``."""
        from ..compiler import compile as compile_graph

        key = (kind, backend, attention, tuple(sorted(options.items())))
        entry = self._compiled.get(key)
        if entry is None:
            if backend != "numpy":
                options = {"max_plans": max_plans, **options}
            exe = compile_graph(self.build_graph(kind, attention=attention), backend=backend, **options)
            entry = self._compiled[key] = [exe, self._version]
        elif entry[1] != self._version:
            weights = self.state_dict()
            for name in entry[0].params:
                entry[0].params[name] = weights[name]
            entry[1] = self._version
        return entry[0]

    # -- feeding -----------------------------------------------------------------------------------
    def check_ids(self, ids, what: str, vocab: int, *, max_len: int | None = None) -> np.ndarray:
        """``ids`` as a (N, L) int64 array; wrong dtypes, shapes, lengths or values raise."""
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise DTypeError(f"{what} must be integer token ids, got {arr.dtype}")
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ShapeError(f"{what} must be a non-empty (batch, length) array, got shape {arr.shape}")
        limit = self.cfg.max_len if max_len is None else max_len
        if arr.shape[1] > limit:
            raise ShapeError(f"{what} has {arr.shape[1]} positions, more than max_len={limit}")
        if arr.min() < 0 or arr.max() >= vocab:
            raise FeedError(f"{what} holds ids outside 0..{vocab - 1} (min {arr.min()}, max {arr.max()})")
        return arr.astype(np.int64, copy=False)

    def bucket_source(self, src) -> np.ndarray:
        """Checked source ids, padded with <pad> to a multiple of ``cfg.bucket`` (at most max_len)."""
        src = self.check_ids(src, "src", self.cfg.src_vocab)
        width = min(round_up(src.shape[1], self.cfg.bucket), self.cfg.max_len)
        if width == src.shape[1]:
            return src
        out = np.full((src.shape[0], width), self.cfg.pad_id, np.int64)
        out[:, :src.shape[1]] = src
        return out

    def logits(self, src, tgt_in, backend: str = "cpu") -> np.ndarray:
        """Full recomputation: logits (N, T, V) of every target position (teacher forcing)."""
        src = self.bucket_source(src)
        tgt_in = self.check_ids(tgt_in, "tgt_in", self.cfg.tgt_vocab)
        return self.compiled("logits", backend).run({"src": src, "tgt_in": tgt_in})["logits"]

    def incremental(self, src, backend: str = "cpu") -> "KVCacheDecoder":
        """An incremental decoder over ``src`` with a key/value cache (see ``decoding``)."""
        return KVCacheDecoder(self, src, backend)

    def recompute(self, src, backend: str = "cpu") -> "RecomputeDecoder":
        """An incremental decoder over ``src`` that reruns the whole prefix every step."""
        return RecomputeDecoder(self, src, backend)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _token_column(tokens, n: int, vocab: int) -> np.ndarray:
    """The newest token of each of ``n`` rows as (n,) int64; anything else raises."""
    arr = np.asarray(tokens)
    if arr.dtype.kind not in "iu":
        raise DTypeError(f"tokens must be integer ids, got {arr.dtype}")
    if arr.shape != (n,):
        raise ShapeError(f"one token per row expected, shape ({n},); got {arr.shape}")
    if n and (arr.min() < 0 or arr.max() >= vocab):
        raise FeedError(f"tokens hold ids outside 0..{vocab - 1}")
    return arr.astype(np.int64, copy=False)


class KVCacheDecoder:
    """Decoding state for a batch of sources: the cross-attention K/V (from one encode run) and a
    self-attention cache per decoder layer, (N, H, C, d/H), filled one row per step.

    ``step(tokens)`` runs the step graph for the next position and writes its K/V rows into the
    cache; when the cache is full it grows by ``cfg.bucket`` slots. ``step_logits(tokens)`` is the
    same, returning the raw logits instead of log-probabilities.
    """

    def __init__(self, model: Seq2SeqTransformer, src, backend: str = "cpu"):
        self.model, self.cfg, self.backend = model, model.cfg, backend
        src = model.bucket_source(src)
        enc = model.compiled("encode", backend).run({"src": src})
        layers = range(self.cfg.num_decoder_layers)
        self.cross = [(enc[f"cross_k_{i}"], enc[f"cross_v_{i}"]) for i in layers]
        self.memory_pad = src == self.cfg.pad_id
        self.exe = model.compiled("step", backend)
        self.n = src.shape[0]
        self.position = 0
        shape = (self.n, self.cfg.nhead, self.cfg.bucket, self.cfg.head_dim)
        self.cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in layers]

    @property
    def capacity(self) -> int:
        return self.cache[0][0].shape[2]

    def _grow(self) -> None:
        grow = [(0, 0), (0, 0), (0, self.cfg.bucket), (0, 0)]
        self.cache = [(np.pad(k, grow), np.pad(v, grow)) for k, v in self.cache]

    def step_logits(self, tokens) -> np.ndarray:
        tokens = _token_column(tokens, self.n, self.cfg.tgt_vocab)
        if self.position >= self.cfg.max_len:
            raise ShapeError(f"cannot decode past max_len={self.cfg.max_len} positions")
        if self.position >= self.capacity:
            self._grow()
        feeds = {"tokens": tokens, "position": np.full(self.n, self.position, np.int64),
                 "memory_pad": self.memory_pad}
        for i, ((k, v), (ck, cv)) in enumerate(zip(self.cache, self.cross)):
            feeds.update({f"self_k_{i}": k, f"self_v_{i}": v, f"cross_k_{i}": ck, f"cross_v_{i}": cv})
        out = self.exe.run(feeds)
        for i, (k, v) in enumerate(self.cache):
            k[:, :, self.position] = out[f"new_k_{i}"][:, :, 0]
            v[:, :, self.position] = out[f"new_v_{i}"][:, :, 0]
        self.position += 1
        return out["logits"]

    def step(self, tokens) -> np.ndarray:
        return _log_softmax(self.step_logits(tokens))

    def reorder(self, rows) -> None:
        rows = np.asarray(rows, np.int64)
        if len(rows) == self.n and (rows == np.arange(self.n)).all():
            return
        self.cache = [(k[rows], v[rows]) for k, v in self.cache]
        self.cross = [(k[rows], v[rows]) for k, v in self.cross]
        self.memory_pad = self.memory_pad[rows]
        self.n = len(rows)


class RecomputeDecoder:
    """The same interface by full recomputation: each step runs the logits graph on the whole
    prefix (padded to a multiple of ``cfg.bucket``) and reads the last position. O(T²) per step."""

    def __init__(self, model: Seq2SeqTransformer, src, backend: str = "cpu"):
        self.model, self.cfg = model, model.cfg
        self.src = model.bucket_source(src)
        self.exe = model.compiled("logits", backend)
        self.prefix = np.zeros((self.src.shape[0], 0), np.int64)

    def step_logits(self, tokens) -> np.ndarray:
        tokens = _token_column(tokens, len(self.prefix), self.cfg.tgt_vocab).reshape(-1, 1)
        self.prefix = np.concatenate([self.prefix, tokens], axis=1)               # (N, t+1)
        t = self.prefix.shape[1]
        if t > self.cfg.max_len:
            raise ShapeError(f"cannot decode past max_len={self.cfg.max_len} positions")
        width = min(round_up(t, self.cfg.bucket), self.cfg.max_len)
        tgt = np.full((len(self.prefix), width), self.cfg.pad_id, np.int64)
        tgt[:, :t] = self.prefix                                                  # causal: the padding is unseen
        return self.exe.run({"src": self.src, "tgt_in": tgt})["logits"][:, t - 1]

    def step(self, tokens) -> np.ndarray:
        return _log_softmax(self.step_logits(tokens))

    def reorder(self, rows) -> None:
        rows = np.asarray(rows, np.int64)
        self.src, self.prefix = self.src[rows], self.prefix[rows]


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------

def _search_args(model: Seq2SeqTransformer, max_len):
    cfg = model.cfg
    max_len = cfg.max_len if max_len is None else int(max_len)
    if max_len > cfg.max_len:
        raise ShapeError(f"max_len={max_len} is more than the model's max_len={cfg.max_len}")
    return dict(sos=cfg.sos_id, eos=cfg.eos_id, pad=cfg.pad_id, max_len=max_len,
                banned=sorted({cfg.pad_id, cfg.sos_id}))


def greedy_decode(model: Seq2SeqTransformer, src, max_len: int | None = None, *, backend: str = "cpu",
                  cache: bool = True) -> SearchResult:
    """Greedy decoding of a batch of sources (N, S) from <sos> until <eos> or ``max_len`` tokens.

    Returns a :class:`~attngraph.models.decoding.SearchResult`: ``tokens`` (N, max_len) with
    <eos> included and <pad> after it, ``scores`` (N,) the sum of log-probabilities. <pad> and
    <sos> are never produced. ``cache=False`` recomputes the whole prefix every step instead.
    """
    state = model.incremental(src, backend) if cache else model.recompute(src, backend)
    return decoding.greedy_search(state, np.asarray(src).shape[0], **_search_args(model, max_len))


def beam_search(model: Seq2SeqTransformer, src, beam_size: int = 4, max_len: int | None = None, *,
                length_penalty: float = 0.0, backend: str = "cpu", cache: bool = True) -> SearchResult:
    """Beam search (``beam_size`` beams per source, GNMT length penalty ``length_penalty``);
    see :func:`~attngraph.models.decoding.beam_search` for the rules."""
    state = model.incremental(src, backend) if cache else model.recompute(src, backend)
    return decoding.beam_search(state, np.asarray(src).shape[0], beam_size=beam_size,
                                length_penalty=length_penalty, **_search_args(model, max_len))
