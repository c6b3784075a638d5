"""Native CPU kernels for the fused backward ops: ``attention_grad``, ``layernorm_grad``,
``softmax_cross_entropy`` and ``softmax_cross_entropy_grad`` (registered in kernels.NATIVE).

Same contract as kernels.py: ``build(node) -> kernel(inputs, outs, bindings)`` or None.

- attention_grad: the flash backward of attention_kernels.py. It needs the forward's output
  and log-sum-exp; the kernel recomputes them with one ``attention_forward(return_lse=True)``
  (about a third of the backward's time) instead of routing them from the forward node, which
  would need autodiff to see the fused forward (it runs before fusion). Measured in
  docs/benchmarks.md ("Training"). Batch dims that broadcasting stretched are summed back.
- layernorm_grad: one pass per row (statistics in float64), ``prange`` over fixed row chunks;
  dgamma / dbeta are accumulated per chunk into its own row of a (chunks, C) float64 array and
  summed afterwards, so no two threads write the same memory.
- softmax_cross_entropy(_grad): one row per iteration, ``prange`` over rows; the gradient is
  (softmax - smoothed one-hot) * g written in one pass, zero for ignored targets.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ...ir import Node
from .kernels import _FLOATS, _one, _plain, _qkv_4d, _row_mean_rstd, _rows, _scores_4d

__all__ = ["BACKWARD_NATIVE"]


# -- attention_grad ---------------------------------------------------------------------------
def _sum_to(x: np.ndarray, shape: tuple) -> np.ndarray:
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)
    return x.sum(axis=axes).reshape(shape) if axes else x.reshape(shape)


def _build_attention_grad(node: Node):
    from .attention_kernels import attention_backward, attention_forward

    if node.inputs[0].type.dtype.numpy not in _FLOATS:
        return None
    scale, causal = float(node.attrs["scale"]), bool(node.attrs["causal"])
    has_bias, has_mask = bool(node.attrs["has_bias"]), bool(node.attrs["has_mask"])

    def kernel(inputs, outs, bindings):
        q, k, v = inputs[:3]
        g = inputs[-1]
        dq_out, dk_out, dv_out = outs
        batch, tq, tk = g.shape[:-2], q.shape[-2], k.shape[-2]
        if g.size == 0 or tk == 0 or q.shape[-1] == 0:
            for o in outs:
                o[...] = 0
            return
        rest = list(inputs[3:-1])
        bias = _scores_4d(rest.pop(0), batch, tq, tk) if has_bias else None
        mask = _scores_4d(rest.pop(0), batch, tq, tk) if has_mask else None
        q4, k4, v4 = _qkv_4d(q, batch), _qkv_4d(k, batch), _qkv_4d(v, batch)
        g4 = _qkv_4d(g, batch)
        kw = dict(scale=scale, causal=causal, bias=bias, mask=mask)
        out, lse = attention_forward(q4, k4, v4, return_lse=True, **kw)
        dq, dk, dv = attention_backward(q4, k4, v4, out, lse, np.ascontiguousarray(g4), **kw)
        for res, o, x in ((dq, dq_out, q), (dk, dk_out, k), (dv, dv_out, v)):
            res = res.reshape(batch + res.shape[-2:])
            np.copyto(o, res if res.shape == o.shape else _sum_to(res, o.shape))
    return kernel


# -- layernorm_grad ---------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def _layernorm_grad_rows(x, gamma, g, has_gamma, eps, n_chunks, dx, dgamma_part, dbeta_part):
    """dx per row; dgamma/dbeta partial sums per chunk of rows (chunk c owns row c of *_part)."""
    n_rows, n = x.shape
    per = (n_rows + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        r0 = c * per
        r1 = min(n_rows, r0 + per)
        for r in range(r0, r1):
            mean, rstd = _row_mean_rstd(x, r, eps)
            sg = 0.0
            sgx = 0.0
            for j in range(n):
                xhat = (x[r, j] - mean) * rstd
                gx = g[r, j] * gamma[j] if has_gamma else g[r, j] * 1.0
                sg += gx
                sgx += gx * xhat
                dgamma_part[c, j] += g[r, j] * xhat
                dbeta_part[c, j] += g[r, j]
            mg = sg / n
            mgx = sgx / n
            for j in range(n):
                xhat = (x[r, j] - mean) * rstd
                gx = g[r, j] * gamma[j] if has_gamma else g[r, j] * 1.0
                dx[r, j] = rstd * (gx - mg - xhat * mgx)


def _build_layernorm_grad(node: Node):
    x_t = node.inputs[0].type
    if x_t.rank < 1 or x_t.dtype.numpy not in _FLOATS:
        return None
    eps = float(node.attrs["eps"])
    has_gamma, has_beta = bool(node.attrs["has_gamma"]), bool(node.attrs["has_beta"])

    def kernel(inputs, outs, bindings):
        x, g = inputs[0], inputs[-1]
        dx = outs[0]
        n = x.shape[-1]
        n_rows = x.size // n if n else 0
        if n_rows == 0 or n == 0:
            for o in outs:
                o[...] = 0
            return
        gamma = _plain(inputs[1]) if has_gamma else _one(dx.dtype)
        n_chunks = max(1, min(n_rows, 4 * numba.get_num_threads()))
        dgamma_part = np.zeros((n_chunks, n), np.float64)
        dbeta_part = np.zeros((n_chunks, n), np.float64)
        _layernorm_grad_rows(_rows(x), gamma, _rows(g), has_gamma, eps, n_chunks, dx.reshape(-1, n),
                             dgamma_part, dbeta_part)
        rest = list(outs[1:])
        if has_gamma:
            np.copyto(rest.pop(0), dgamma_part.sum(axis=0), casting="unsafe")
        if has_beta:
            np.copyto(rest.pop(0), dbeta_part.sum(axis=0), casting="unsafe")
    return kernel


# -- softmax cross-entropy -----------------------------------------------------------------------
@njit(cache=True, parallel=True)
def _sce_rows(x, t, smoothing, ignore, has_ignore, loss):
    """loss[r] = (1-ε)·(-log p[t]) + ε·mean(-log p); 0 for an ignored target; a target outside
    [0, C) picks nothing (its term is 0), as losses.nll_from_log_probs."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        y = t[r]
        if has_ignore and y == ignore:
            loss[r] = 0.0
            continue
        m = x[r, 0]
        for j in range(1, n):
            if x[r, j] > m or x[r, j] != x[r, j]:
                m = x[r, j]
        if m == -np.inf:
            m = 0.0
        s = 0.0
        tot = 0.0
        for j in range(n):
            s += np.exp(x[r, j] - m)
            tot += x[r, j]
        lz = m + np.log(s)                       # log-sum-exp
        picked = 0.0
        if 0 <= y < n:
            picked = lz - x[r, y]
        if smoothing != 0.0:         # (a −inf logit makes this term inf; without smoothing it must not count)
            picked = (1.0 - smoothing) * picked + smoothing * (lz - tot / n)
        loss[r] = picked


@njit(cache=True, parallel=True)
def _sce_grad_rows(x, t, g, smoothing, ignore, has_ignore, dx):
    """dx[r] = (softmax(x[r]) - ((1-ε)·onehot(t[r]) + ε/C)) · g[r]; 0 for an ignored target,
    ε·(softmax - 1/C)·g[r] for a target outside [0, C)."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        y = t[r]
        if has_ignore and y == ignore:
            for j in range(n):
                dx[r, j] = 0.0
            continue
        m = x[r, 0]
        for j in range(1, n):
            if x[r, j] > m or x[r, j] != x[r, j]:
                m = x[r, j]
        if m == -np.inf:
            m = 0.0
        s = 0.0
        for j in range(n):
            s += np.exp(x[r, j] - m)
        inv = 1.0 / s if s != 0.0 else 0.0
        gr = g[r]
        off = smoothing / n
        picked = 0 <= y < n
        if not picked:                   # the target picks nothing: only the smoothing term
            inv = inv * smoothing
        for j in range(n):
            dx[r, j] = (np.exp(x[r, j] - m) * inv - off) * gr
        if picked:
            dx[r, y] -= (1.0 - smoothing) * gr


def _sce_args(node: Node):
    x_t, t_t = node.inputs[0].type, node.inputs[1].type
    if x_t.rank < 1 or x_t.dtype.numpy not in _FLOATS:
        return None
    ignore = node.attrs["ignore_index"]
    return float(node.attrs["label_smoothing"]), (0 if ignore is None else int(ignore)), ignore is not None


def _targets(t: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(t.reshape(-1), dtype=np.int64)


def _build_sce(node: Node):
    args = _sce_args(node)
    if args is None:
        return None
    smoothing, ignore, has_ignore = args

    def kernel(inputs, outs, bindings):
        x, t = inputs
        if outs[0].size == 0:
            return
        if x.shape[-1] == 0:
            outs[0][...] = np.nan
            return
        _sce_rows(_rows(x), _targets(t), smoothing, ignore, has_ignore, outs[0].reshape(-1))
    return kernel


def _build_sce_grad(node: Node):
    args = _sce_args(node)
    if args is None:
        return None
    smoothing, ignore, has_ignore = args

    def kernel(inputs, outs, bindings):
        x, t, g = inputs
        dx = outs[0]
        if dx.size == 0:
            return
        _sce_grad_rows(_rows(x), _targets(t), _plain(g).reshape(-1).astype(x.dtype, copy=False), smoothing,
                       ignore, has_ignore, dx.reshape(-1, dx.shape[-1]))
    return kernel


BACKWARD_NATIVE = {
    "attention_grad": _build_attention_grad,
    "layernorm_grad": _build_layernorm_grad,
    "softmax_cross_entropy": _build_sce,
    "softmax_cross_entropy_grad": _build_sce_grad,
}
