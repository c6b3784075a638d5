"""Greedy and beam-search decoding over any incremental model, from <sos> until <eos>.

The searches only need an object with two methods (:class:`IncrementalModel`):

- ``step(tokens) -> log_probs``: feed the last token of every row, (N,) int64, and get the
  log-probabilities of the next token, (N, V) float; the model advances one position;
- ``reorder(rows)``: keep, drop or duplicate rows of its state (``rows`` indexes the old
  rows, one entry per new row); beam search calls it to follow the surviving beams.

``Seq2SeqTransformer.incremental(src)`` gives one with a key/value cache (each step O(T));
``Seq2SeqTransformer.recompute(src)`` one that reruns the whole prefix (each step O(T²));
both give the same numbers.

Conventions shared by both searches:

- Generation starts from ``sos`` (fed, not returned). A row stops at ``eos``, which is part of
  the returned sequence and of its score; every later position holds ``pad``. A row that has
  not produced ``eos`` after ``max_len`` tokens stops there.
- Tokens in ``banned`` (by default nothing; the Transformer passes its <pad> and <sos>) are
  never produced: their log-probabilities are set to −inf, the others are not renormalized.
- A score is the sum of the model's log-probabilities of the produced tokens. Beam search
  ranks finished hypotheses by ``score / lp(len)`` with GNMT's length penalty
  ``lp(len) = ((5 + len) / 6) ** length_penalty`` (``length_penalty=0``: the raw sum); it
  returns the raw sum and the normalized score of the best one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import AttngraphError

__all__ = ["IncrementalModel", "SearchResult", "greedy_search", "beam_search", "length_penalty_factor"]


class IncrementalModel(Protocol):
    def step(self, tokens: np.ndarray) -> np.ndarray: ...       # (N,) int64 → (N, V) log-probs
    def reorder(self, rows: np.ndarray) -> None: ...             # new row i takes old row rows[i]


@dataclass
class SearchResult:
    """What a search returns, per source row ``b``."""

    tokens: np.ndarray              # (B, max_len) int64: the produced ids, <eos> included, <pad> after
    scores: np.ndarray              # (B,) float64: sum of log-probabilities of the produced tokens
    lengths: np.ndarray             # (B,) int64: tokens produced (<eos> counted)
    normalized: np.ndarray | None = None   # (B,) beam search: scores / lp(lengths)
    beams: list | None = None       # beam search: per row, [(normalized, score, ids)] best first


def length_penalty_factor(length, alpha: float):
    """GNMT's ``((5 + length) / 6) ** alpha`` (1 for ``alpha = 0``)."""
    return ((5.0 + np.asarray(length, np.float64)) / 6.0) ** alpha


def _check(max_len: int, beam_size: int = 1) -> None:
    if int(max_len) < 1:
        raise AttngraphError(f"max_len must be >= 1, got {max_len}")
    if int(beam_size) < 1:
        raise AttngraphError(f"beam_size must be >= 1, got {beam_size}")


def _banned(log_probs: np.ndarray, banned) -> np.ndarray:
    lp = np.asarray(log_probs, np.float64)
    if banned:
        lp = lp.copy()
        lp[:, list(banned)] = -np.inf
    return lp


def greedy_search(model: IncrementalModel, batch: int, *, sos: int, eos: int, pad: int, max_len: int,
                  banned=()) -> SearchResult:
    """The most likely next token at every step, for ``batch`` rows at once."""
    _check(max_len)
    tokens = np.full((batch, max_len), pad, np.int64)
    scores = np.zeros(batch, np.float64)
    lengths = np.full(batch, max_len, np.int64)
    done = np.zeros(batch, bool)
    last = np.full(batch, sos, np.int64)
    for t in range(max_len):
        lp = _banned(model.step(last), banned)                       # (B, V)
        nxt = lp.argmax(axis=1)
        live = ~done
        tokens[live, t] = nxt[live]
        scores[live] += lp[live, nxt[live]]
        ended = live & (nxt == eos)
        lengths[ended] = t + 1
        done |= ended
        if done.all():
            break
        last = np.where(done, pad, nxt)
    return SearchResult(tokens, scores, lengths)


def beam_search(model: IncrementalModel, batch: int, *, beam_size: int, sos: int, eos: int, pad: int,
                max_len: int, length_penalty: float = 0.0, banned=()) -> SearchResult:
    """Beam search with ``beam_size`` live hypotheses per source row.

    At each step every live beam is extended by every token; per source the best
    ``beam_size`` extensions that are not <eos> stay live, and the extensions by <eos> that
    rank among the best ``beam_size`` candidates become finished hypotheses (kept with
    their normalized score). A source is done when it has ``beam_size`` finished
    hypotheses and no live beam can still beat the worst of them (log-probabilities are
    ≤ 0, so a beam's normalized score can at most reach ``score / lp(max_len)``). At
    ``max_len`` the live beams finish without <eos>. With ``beam_size=1`` this is greedy
    search; with a beam as large as the number of prefixes, it is an exhaustive search.
    """
    _check(max_len, beam_size)
    k = int(beam_size)
    model.reorder(np.repeat(np.arange(batch), k))                   # (B·K) rows, beam-major per source
    alive = np.full((batch, k), -np.inf)
    alive[:, 0] = 0.0                                               # one live beam at the start
    hist = np.full((batch, k, 0), pad, np.int64)                    # (B, K, t) tokens so far
    finished: list[list] = [[] for _ in range(batch)]               # (normalized, score, ids)
    done = np.zeros(batch, bool)
    last = np.full(batch * k, sos, np.int64)
    for t in range(max_len):
        lp = _banned(model.step(last), banned)                      # (B·K, V)
        vocab = lp.shape[1]
        cand = (alive[:, :, None] + lp.reshape(batch, k, vocab)).reshape(batch, k * vocab)   # (B, K·V)
        order = np.argsort(-cand, axis=1, kind="stable")[:, :2 * k]                         # best 2K
        rows = np.zeros((batch, k), np.int64)
        toks = np.full((batch, k), pad, np.int64)
        new_alive = np.full((batch, k), -np.inf)
        new_hist = np.full((batch, k, t + 1), pad, np.int64)
        for b in range(batch):
            if done[b]:
                new_hist[b, :, :t] = hist[b]
                rows[b] = b * k
                continue
            kept = 0
            for rank, c in enumerate(order[b]):
                score = cand[b, c]
                if not np.isfinite(score):
                    break
                beam, tok = divmod(int(c), vocab)
                if tok == eos:
                    if rank < k:                                    # eos among the best K candidates
                        ids = np.append(hist[b, beam], eos)
                        finished[b].append((score / length_penalty_factor(t + 1, length_penalty), score, ids))
                    continue
                if kept < k:
                    rows[b, kept] = b * k + beam
                    toks[b, kept] = tok
                    new_alive[b, kept] = score
                    new_hist[b, kept, :t] = hist[b, beam]
                    new_hist[b, kept, t] = tok
                    kept += 1
            for j in range(kept, k):                                # too few live candidates: dead rows
                rows[b, j] = b * k
            finished[b].sort(key=lambda f: -f[0])
            del finished[b][k:]
            best_possible = new_alive[b].max() / length_penalty_factor(max_len, length_penalty)
            if kept == 0 or (len(finished[b]) >= k and best_possible <= finished[b][-1][0]):
                done[b] = True
        alive, hist = new_alive, new_hist
        if done.all():
            break
        if t + 1 < max_len:
            model.reorder(rows.reshape(-1))
            last = toks.reshape(-1)
    for b in range(batch):                                          # live beams end at max_len
        if not done[b]:
            for j in range(k):
                if np.isfinite(alive[b, j]):
                    n = hist.shape[2]
                    finished[b].append((alive[b, j] / length_penalty_factor(n, length_penalty), alive[b, j],
                                        hist[b, j].copy()))
            finished[b].sort(key=lambda f: -f[0])
            del finished[b][k:]
    tokens = np.full((batch, max_len), pad, np.int64)
    scores = np.full(batch, -np.inf)
    normalized = np.full(batch, -np.inf)
    lengths = np.zeros(batch, np.int64)
    for b in range(batch):
        if finished[b]:
            norm, score, ids = finished[b][0]
            tokens[b, :len(ids)] = ids
            scores[b], normalized[b], lengths[b] = score, norm, len(ids)
    return SearchResult(tokens, scores, lengths, normalized, finished)
