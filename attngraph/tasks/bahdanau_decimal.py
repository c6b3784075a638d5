"""The seed notes' toy task with the seed notes' first model: decimal → binary with Bahdanau attention.

    from attngraph.tasks import bahdanau_decimal as bd
    result = bd.run(bd.Config())                   # trains on the CPU backend
    result.metrics["exact_match"]                  # on numbers never seen in training

The data are those of :mod:`attngraph.tasks.decimal_to_binary` (imported from there, not
copied): every number below ``max_number`` is one example, its decimal digits the source
and its binary digits, between ``<sos>`` and ``<eos>``, the target; a seeded permutation
holds ``test_fraction`` of the numbers out of training.

The model is :class:`attngraph.models.seq2seq_rnn.BahdanauSeq2Seq`: a bidirectional GRU
encoder over the digits and a GRU decoder that, before writing each bit, scores every
digit with e_tj = vᵀ tanh(W s_{t-1} + U h_j) and reads their weighted sum. It is trained
teacher-forced with cross-entropy, and decoded greedily from ``<sos>`` with a one-step
graph compiled once. The alignment (bits × digits) is what the seed notes want to see.

Measured (seed 0, one thread, CPU backend, a 2-core machine shared with other jobs): the
defaults (0..9999, 30 epochs of 125 batches of 64) reach 97.1% exact match (99.6% of
tokens) on the 2,000 held-out numbers in 724 s (65% after 15 epochs, 91% after 20);
0..999 with 40 epochs of 25 batches of 32 (lr 5e-3) reach 79.5% in about a minute.
More in docs/tutorials/seq2seq_rnn.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import train
from .loop import fit_and_evaluate
from ..dsl import Graph
from ..models.seq2seq_rnn import BahdanauSeq2Seq, StepDecoder
from .decimal_to_binary import (EOS, PAD, SOS, SRC_TOKENS, TGT_TOKENS, binary_text, decode_target, encode_source,
                                exact_match, make_arrays, source_length, split_numbers, target_length)

__all__ = ["Config", "Result", "build_model", "build_train_graph", "build_decoder", "decode", "run"]


@dataclass
class Config:
    """Everything a run depends on (the data options are decimal_to_binary's); the defaults
    reach 97% exact match on the held-out numbers."""

    max_number: int = 10000         # numbers 0 .. max_number-1: 4 decimal digits, 14 bits
    leading_zeros: bool = True      # fixed-width source and target ("0042" → "000000101010")
    test_fraction: float = 0.2      # held out, never trained on
    emb_dim: int = 32
    hidden_size: int = 64           # decoder state; each encoder direction too
    attn_dim: int = 64
    bidirectional: bool = True
    batch_size: int = 64
    epochs: int = 30
    lr: float = 5e-3                # peak of the warmup + cosine schedule
    warmup_steps: int = 100
    weight_decay: float = 0.0
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
    step: object = None             # the train.TrainStep
    model: object = None            # the BahdanauSeq2Seq, trained weights loaded back
    decoder: object = None          # the StepDecoder (compiled encoder + step graphs)
    examples: list = field(default_factory=list)   # a few (number, predicted bits, ok)

    def summary(self) -> str:
        m = self.metrics
        return (f"bahdanau decimal→binary: exact match {m['exact_match']:.2%} on {m['n_test']} held-out numbers "
                f"(token accuracy {m['token_accuracy']:.2%}); trained on {m['n_train']} numbers in "
                f"{self.train_seconds:.0f} s, evaluated in {self.eval_seconds:.1f} s")


def build_model(cfg: Config) -> BahdanauSeq2Seq:
    model = BahdanauSeq2Seq(len(SRC_TOKENS), len(TGT_TOKENS), cfg.emb_dim, cfg.hidden_size, cfg.attn_dim,
                            cfg.bidirectional, padding_idx=PAD)
    return model.reset_parameters(cfg.seed)


def build_train_graph(model: BahdanauSeq2Seq, cfg: Config) -> Graph:
    """Inputs src, src_pad, tgt_in, tgt_out (decimal_to_binary.make_arrays); outputs ``loss``
    (mean cross-entropy over the non-pad targets) and ``attention`` (B, T, S)."""
    s, t = source_length(cfg.max_number), target_length(cfg.max_number)
    g = Graph("bahdanau_decimal_train")
    src = g.input("src", ("B", s), "int64")
    src_pad = g.input("src_pad", ("B", s), "bool")
    tgt_in = g.input("tgt_in", ("B", t), "int64")
    tgt_out = g.input("tgt_out", ("B", t), "int64")
    logits, weights = model(src, tgt_in, src_pad)
    g.output("loss", train.cross_entropy(logits, tgt_out, ignore_index=PAD))
    g.output("logits", logits)
    g.output("attention", weights)
    return g


def build_decoder(model: BahdanauSeq2Seq, cfg: Config) -> StepDecoder:
    return model.compile_decoder(source_length(cfg.max_number), backend=cfg.backend)


def decode(decoder: StepDecoder, numbers, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding of ``numbers``: (token ids (N, tgt_len), attention (N, tgt_len, src_len))."""
    src = encode_source(numbers, source_length(cfg.max_number), cfg.leading_zeros)
    return decoder.greedy({"src": src, "src_pad": src == PAD}, src == PAD, target_length(cfg.max_number),
                          SOS, EOS, PAD)


def run(cfg: Config | None = None, *, log: Callable[[str], None] | None = None) -> Result:
    """Train on the training numbers and measure exact match on the held-out ones."""
    cfg = cfg or Config()
    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    train_numbers, test_numbers = split_numbers(cfg.max_number, cfg.test_fraction, cfg.seed)
    data = make_arrays(train_numbers, cfg.max_number, cfg.leading_zeros)
    model = build_model(cfg)
    batches = train.Batches(data, cfg.batch_size, seed=cfg.seed)
    total_steps = max(cfg.epochs * len(batches), cfg.warmup_steps + 1)
    optimizer = train.AdamW(train.cosine(cfg.lr, total_steps, warmup=cfg.warmup_steps, min_lr=cfg.lr * 0.02),
                            weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    step = train.compile_train_step(build_train_graph(model, cfg), "loss", optimizer=optimizer,
                                    backend=cfg.backend, seed=cfg.seed)
    decoder = build_decoder(model, cfg)
    log(f"compiled in {time.perf_counter() - t_start:.1f} s; {len(train_numbers)} training numbers, "
        f"{len(test_numbers)} held out, {len(batches)} batches of {cfg.batch_size} per epoch")

    def evaluate(step_) -> dict:
        decoder.sync(step_.params)
        produced, _ = decode(decoder, test_numbers, cfg)
        em, tok = exact_match(produced, test_numbers, cfg.leading_zeros)
        return {"exact_match": em, "token_accuracy": tok}

    history, metrics, train_seconds, eval_seconds = fit_and_evaluate(step, batches, cfg, evaluate, log, t_start)
    metrics.update(n_test=len(test_numbers), n_train=len(train_numbers),
                   final_loss=history.epoch_loss[-1] if history.epoch_loss else math.nan)
    model.load_from(step.exe)
    tgt_len = target_length(cfg.max_number)
    produced, _ = decode(decoder, test_numbers[:8], cfg)
    examples = [(int(n), decode_target(p), decode_target(p) == binary_text(n, tgt_len, cfg.leading_zeros))
                for n, p in zip(test_numbers[:8], produced)]
    return Result(cfg, metrics, train_seconds, eval_seconds, history, step, model, decoder, examples)
