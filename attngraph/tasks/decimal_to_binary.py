"""The seed notes' toy task: translate decimal numbers to binary with a Transformer.

    from attngraph.tasks import decimal_to_binary as d2b
    result = d2b.run(d2b.Config())                 # trains on the CPU backend
    result.metrics["exact_match"]                  # on numbers never seen in training

The data: every number in ``0 .. max_number - 1`` (default 0..9999) is one example. Its
decimal digits, most significant first, are the source sentence; its binary digits, most
significant first, are the target sentence between ``<sos>`` and ``<eos>``. Both are
written at a fixed width with leading zeros ("0042" → "000000101010"), so a position is a
place value; with ``leading_zeros=False`` they are not (the source is padded with ``<pad>``
after its digits and the model must also find how many bits to write, which takes several
times more training). A seeded permutation puts
``test_fraction`` of the numbers aside: the model never sees them in training.

The model: an encoder-decoder ``nn.Transformer`` (post-norm, as the paper) with token
embeddings and sinusoidal positions, and a final Linear over the 5 target tokens.
It is trained teacher-forced: the decoder reads ``<sos> b1 b2 …`` and predicts
``b1 b2 … <eos>`` under a causal mask, with cross-entropy that ignores the padding.

Decoding is greedy, from ``<sos>`` until ``<eos>``, by full recomputation: one compiled
graph maps (source, the target prefix padded to ``tgt_len``) to the logits of every
position, and step t reads position t. The causal mask makes the padding after t
invisible to it, so no key/value cache is needed; the outputs are 15 tokens long (14 bits and <eos>),
so the cost (15 runs per batch) is small. The same graph can also output the last
decoder layer's cross-attention weights, averaged over heads: (B, tgt_len, src_len),
the alignment of binary digits to decimal digits that the seed notes want to see.

Measured (the defaults: d=64, 2+2 layers, 4 heads, 60 epochs of 125 batches, AdamW with
warmup + cosine to 3e-3; one thread, CPU backend, 2-core machine): 99.60% exact match
(99.87% of tokens) on the 2,000 held-out numbers with seed 0 and 99.70% with seed 1, each
trained in 217 s, compiling included. 45 epochs gave 99.15% on one version of the kernels
and 98.15% on the next (float rounding moves this chaotic run by a point), so the default
keeps a margin over the 99% target. Held-out exact match stays low for most of the run and
rises late, as the learning rate decays. With 0..4095 (3,277 training numbers) the model
learns the training set by heart and reaches only ~46% in 30 epochs: the task needs the
larger range.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import nn, train
from .loop import fit_and_evaluate
from ..dsl import Graph
from ..nn.module import Module

__all__ = ["Config", "Result", "Seq2SeqTransformer", "SRC_TOKENS", "TGT_TOKENS", "PAD", "SOS", "EOS",
           "source_length", "target_length", "encode_source", "encode_target", "decode_target", "binary_text",
           "split_numbers", "make_arrays", "build_model", "build_train_graph", "build_decode_graph",
           "greedy_decode", "exact_match", "run"]

SRC_TOKENS = ["<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
TGT_TOKENS = ["<pad>", "<sos>", "<eos>", "0", "1"]
PAD, SOS, EOS = 0, 1, 2
_DIGIT0_SRC, _BIT0_TGT = 1, 3   # the id of "0" in each vocabulary


@dataclass
class Config:
    """Everything a run depends on; the defaults reach ≥ 99% exact match on the held-out numbers."""

    max_number: int = 10000         # numbers 0 .. max_number-1: 4 decimal digits, 14 bits
    leading_zeros: bool = True      # both written at a fixed width ("0042" → "000000101010"); else no
                                    # leading zeros, the source padded after its digits
    test_fraction: float = 0.2      # held out, never trained on
    d_model: int = 64
    nhead: int = 4
    num_layers: int = 2             # each side
    dim_feedforward: int = 128
    dropout: float = 0.0
    norm_first: bool = False        # pre-norm layers (the paper's are post-norm)
    batch_size: int = 64
    epochs: int = 60
    lr: float = 3e-3                # peak of the warmup + cosine schedule
    warmup_steps: int = 200
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    clip_norm: float | None = 1.0
    seed: int = 0
    backend: str = "cpu"
    eval_every: int = 0             # evaluate the held-out numbers every n epochs (0: at the end only)
    progress: bool = False          # tqdm bars from train.fit
    checkpoint: str | None = None   # a file for train.fit (resumable)


@dataclass
class Result:
    """What ``run`` returns: the metrics on the held-out numbers, times and the trained state."""

    config: Config
    metrics: dict                   # exact_match, token_accuracy, n_test, n_train, final_loss
    train_seconds: float            # compiling included
    eval_seconds: float
    history: object = None          # train.History
    step: object = None             # the train.TrainStep (its params are the trained weights)
    model: object = None            # the Seq2SeqTransformer, weights loaded back from the step
    examples: list = field(default_factory=list)   # a few (number, predicted bits, ok)

    def summary(self) -> str:
        m = self.metrics
        return (f"decimal→binary: exact match {m['exact_match']:.2%} on {m['n_test']} held-out numbers "
                f"(token accuracy {m['token_accuracy']:.2%}); trained on {m['n_train']} numbers in "
                f"{self.train_seconds:.0f} s, evaluated in {self.eval_seconds:.1f} s")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def source_length(max_number: int) -> int:
    """Decimal digits of the largest number."""
    return len(str(max_number - 1))


def target_length(max_number: int) -> int:
    """Binary digits of the largest number, plus one for <sos> (decoder input) or <eos> (output)."""
    return len(format(max_number - 1, "b")) + 1


def encode_source(numbers, src_len: int, leading_zeros: bool = True) -> np.ndarray:
    """(N, src_len) int64: the decimal digits' ids, most significant first; written at the
    fixed width ``src_len`` with ``leading_zeros`` (so a position is a place value), or
    else without them and followed by <pad>."""
    out = np.full((len(numbers), src_len), PAD, np.int64)
    for i, n in enumerate(numbers):
        text = str(int(n)).zfill(src_len) if leading_zeros else str(int(n))
        digits = [int(c) + _DIGIT0_SRC for c in text]
        out[i, :len(digits)] = digits
    return out


def binary_text(n: int, tgt_len: int, leading_zeros: bool = True) -> str:
    """The binary digits the model should produce for ``n``: ``tgt_len - 1`` of them with ``leading_zeros``."""
    return format(int(n), f"0{tgt_len - 1}b" if leading_zeros else "b")


def encode_target(numbers, tgt_len: int, leading_zeros: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(decoder input, decoder output), each (N, tgt_len) int64:
    ``<sos> b1 … bk <pad>…`` and ``b1 … bk <eos> <pad>…`` (k = tgt_len - 1 with ``leading_zeros``)."""
    dec_in = np.full((len(numbers), tgt_len), PAD, np.int64)
    dec_out = np.full((len(numbers), tgt_len), PAD, np.int64)
    for i, n in enumerate(numbers):
        bits = [int(c) + _BIT0_TGT for c in binary_text(n, tgt_len, leading_zeros)]
        dec_in[i, :len(bits) + 1] = [SOS] + bits
        dec_out[i, :len(bits) + 1] = bits + [EOS]
    return dec_in, dec_out


def decode_target(ids) -> str:
    """Target ids → the binary string, stopping at the first <eos> (other specials are dropped)."""
    out = []
    for t in np.asarray(ids).tolist():
        if t == EOS:
            break
        if t >= _BIT0_TGT:
            out.append(TGT_TOKENS[t])
    return "".join(out)


def split_numbers(max_number: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train numbers, held-out numbers): a seeded permutation of 0..max_number-1, cut in two."""
    order = np.random.default_rng(seed).permutation(max_number)
    n_test = int(round(max_number * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def make_arrays(numbers, max_number: int, leading_zeros: bool = True) -> dict[str, np.ndarray]:
    """The feeds of the training graph for ``numbers``: src, src_pad, tgt_in, tgt_out."""
    src = encode_source(numbers, source_length(max_number), leading_zeros)
    tgt_in, tgt_out = encode_target(numbers, target_length(max_number), leading_zeros)
    return {"src": src, "src_pad": src == PAD, "tgt_in": tgt_in, "tgt_out": tgt_out}


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------

class Seq2SeqTransformer(Module):
    """Embeddings + sinusoidal positions → ``nn.Transformer`` → Linear to the target vocabulary.

    The embeddings are drawn from N(0, 1) (torch's default) and not scaled by √d: each
    feature of a token and of its position then has about the same size, so the model
    sees where a digit stands from the first step (scaled by √d = 8, the position is
    drowned and training takes several times longer).

    ``forward(src, src_pad, tgt_in, return_attention=False)`` → logits (B, T, 5), and with
    ``return_attention`` also the last decoder layer's cross-attention weights (B, T, S),
    averaged over heads.
    """

    def __init__(self, src_len: int, tgt_len: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, dropout: float = 0.0, norm_first: bool = False):
        super().__init__()
        self.d_model, self.norm_first = d_model, norm_first
        self.src_embed = nn.Embedding(len(SRC_TOKENS), d_model, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(len(TGT_TOKENS), d_model, padding_idx=PAD)
        self.src_pos = nn.SinusoidalPositionalEncoding(d_model, max_len=src_len, dropout=dropout)
        self.tgt_pos = nn.SinusoidalPositionalEncoding(d_model, max_len=tgt_len, dropout=dropout)
        self.transformer = nn.Transformer(d_model, nhead, num_layers, num_layers, dim_feedforward,
                                          dropout=dropout, batch_first=True, norm_first=norm_first)
        self.generator = nn.Linear(d_model, len(TGT_TOKENS))

    def forward(self, src, src_pad, tgt_in, return_attention: bool = False):
        s = self.src_pos(self.src_embed(src))                                   # (B, S, d)
        t = self.tgt_pos(self.tgt_embed(tgt_in))                                # (B, T, d)
        memory = self.transformer.encoder(s, src_key_padding_mask=src_pad)      # (B, S, d)
        decoder = self.transformer.decoder
        if not return_attention:
            y = decoder(t, memory, memory_key_padding_mask=src_pad, tgt_is_causal=True)
            return self.generator(y)                                            # (B, T, V)
        *first, last = list(decoder.layers)
        for layer in first:
            t = layer(t, memory, memory_key_padding_mask=src_pad, tgt_is_causal=True)
        t, weights = _decoder_layer_with_weights(last, t, memory, src_pad, self.norm_first)
        return self.generator(decoder.norm(t)), weights                        # (B, T, V), (B, T, S)


def _decoder_layer_with_weights(layer, x, memory, memory_pad, norm_first: bool):
    """An ``nn.TransformerDecoderLayer`` step by step, keeping the cross-attention weights
    (``need_weights=True``: the fused attention node returns them as its second output)."""
    if norm_first:
        x = x + layer._sa_block(layer.norm1(x), None, None, True)
        out, weights = layer.multihead_attn(layer.norm2(x), memory, memory, key_padding_mask=memory_pad,
                                            need_weights=True)
        x = x + layer.dropout2(out)
        return x + layer.dropout3(layer._ff_block(layer.norm3(x))), weights
    x = layer.norm1(x + layer._sa_block(x, None, None, True))
    out, weights = layer.multihead_attn(x, memory, memory, key_padding_mask=memory_pad, need_weights=True)
    x = layer.norm2(x + layer.dropout2(out))
    return layer.norm3(x + layer.dropout3(layer._ff_block(x))), weights


def build_model(cfg: Config) -> Seq2SeqTransformer:
    model = Seq2SeqTransformer(source_length(cfg.max_number), target_length(cfg.max_number), cfg.d_model,
                               cfg.nhead, cfg.num_layers, cfg.dim_feedforward, cfg.dropout, cfg.norm_first)
    return model.reset_parameters(cfg.seed)


def _inputs(g: Graph, cfg: Config):
    s, t = source_length(cfg.max_number), target_length(cfg.max_number)
    return (g.input("src", ("B", s), "int64"), g.input("src_pad", ("B", s), "bool"),
            g.input("tgt_in", ("B", t), "int64"))


def build_train_graph(model: Seq2SeqTransformer, cfg: Config) -> Graph:
    """Inputs src, src_pad, tgt_in, tgt_out; output ``loss`` (mean cross-entropy over non-pad targets)."""
    g = Graph("decimal_to_binary_train")
    src, src_pad, tgt_in = _inputs(g, cfg)
    tgt_out = g.input("tgt_out", tuple(tgt_in.shape), "int64")
    logits = model(src, src_pad, tgt_in)
    g.output("loss", train.cross_entropy(logits, tgt_out, ignore_index=PAD, label_smoothing=cfg.label_smoothing))
    return g


def build_decode_graph(model: Seq2SeqTransformer, cfg: Config, attention: bool = False) -> Graph:
    """Inputs src, src_pad, tgt_in; outputs ``logits`` (B, T, V) and, with ``attention``,
    ``attention`` (B, T, S): the last decoder layer's cross-attention weights."""
    g = Graph("decimal_to_binary_decode")
    src, src_pad, tgt_in = _inputs(g, cfg)
    if attention:
        logits, weights = model(src, src_pad, tgt_in, return_attention=True)
        g.output("attention", weights)
    else:
        logits = model(src, src_pad, tgt_in)
    g.output("logits", logits)
    return g


# ------------------------------------------------------------------------------------------------
# decoding and evaluation
# ------------------------------------------------------------------------------------------------

def greedy_decode(run_graph: Callable[[dict], dict], src: np.ndarray, tgt_len: int,
                  attention: bool = False):
    """Greedy decoding from <sos> until every row has produced <eos> (or ``tgt_len`` tokens).

    ``run_graph(feeds) -> outputs`` runs the decode graph (``exe.run``). Returns the
    produced ids (N, tgt_len), <pad> after each row's <eos>; with ``attention`` also the
    cross-attention weights of the last run (N, tgt_len, S): row t is the weights used to
    produce output token t.
    """
    n = src.shape[0]
    tokens = np.full((n, tgt_len), PAD, np.int64)
    tokens[:, 0] = SOS
    produced = np.full((n, tgt_len), PAD, np.int64)
    done = np.zeros(n, bool)
    feeds = {"src": src, "src_pad": src == PAD}
    out = {}
    for t in range(tgt_len):
        out = run_graph({**feeds, "tgt_in": tokens})
        nxt = out["logits"][:, t].argmax(-1)
        nxt = np.where(done, PAD, nxt)
        produced[:, t] = nxt
        done |= nxt == EOS
        if t + 1 < tgt_len:
            tokens[:, t + 1] = nxt
        if done.all() and not attention:
            break
    if attention:
        return produced, out["attention"]
    return produced


def exact_match(produced: np.ndarray, numbers, leading_zeros: bool = True) -> tuple[float, float]:
    """(exact-match accuracy, token accuracy) of produced ids against the numbers' binary digits + <eos>."""
    target = encode_target(numbers, produced.shape[1], leading_zeros)[1]
    valid = target != PAD
    token_ok = (produced == target) | ~valid
    return float(token_ok.all(axis=1).mean()), float((produced == target)[valid].mean())


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def run(cfg: Config | None = None, *, log: Callable[[str], None] | None = None) -> Result:
    """Train on the training numbers and measure exact match on the held-out ones."""
    from ..compiler import compile as compile_graph

    cfg = cfg or Config()
    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    train_numbers, test_numbers = split_numbers(cfg.max_number, cfg.test_fraction, cfg.seed)
    data = make_arrays(train_numbers, cfg.max_number, cfg.leading_zeros)
    model = build_model(cfg)
    batches = train.Batches(data, cfg.batch_size, seed=cfg.seed)
    total_steps = max(cfg.epochs * len(batches), cfg.warmup_steps + 1)
    optimizer = train.AdamW(train.cosine(cfg.lr, total_steps, warmup=cfg.warmup_steps, min_lr=cfg.lr * 0.02),
                            betas=(0.9, 0.98), weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    step = train.compile_train_step(build_train_graph(model, cfg), "loss", optimizer=optimizer,
                                    backend=cfg.backend, seed=cfg.seed)
    decode_exe = compile_graph(build_decode_graph(model, cfg), backend=cfg.backend)
    tgt_len = target_length(cfg.max_number)
    test_src = encode_source(test_numbers, source_length(cfg.max_number), cfg.leading_zeros)
    log(f"compiled in {time.perf_counter() - t_start:.1f} s; {len(train_numbers)} training numbers, "
        f"{len(test_numbers)} held out, {len(batches)} batches of {cfg.batch_size} per epoch")

    def evaluate(step_) -> dict:
        for name in decode_exe.params:
            decode_exe.params[name] = step_.params[name]
        produced = greedy_decode(decode_exe.run, test_src, tgt_len)
        em, tok = exact_match(produced, test_numbers, cfg.leading_zeros)
        return {"exact_match": em, "token_accuracy": tok}

    history, metrics, train_seconds, eval_seconds = fit_and_evaluate(step, batches, cfg, evaluate, log, t_start)
    metrics.update(n_test=len(test_numbers), n_train=len(train_numbers),
                   final_loss=history.epoch_loss[-1] if history.epoch_loss else math.nan)
    model.load_from(step.exe)
    produced = greedy_decode(decode_exe.run, test_src[:8], tgt_len)
    examples = [(int(n), decode_target(p), decode_target(p) == binary_text(n, tgt_len, cfg.leading_zeros))
                for n, p in zip(test_numbers[:8], produced)]
    return Result(cfg, metrics, train_seconds, eval_seconds, history, step, model, examples)
