"""softmax_cross_entropy and its gradient, each one pass over a row of logits.

- ``softmax_cross_entropy(logits, targets)``: logits (..., C) float, targets (...) int class
  ids; attrs ``label_smoothing`` ε and ``ignore_index`` (an int or None). The per-example loss
  (...), with log p = log_softmax(logits):

      loss = (1 − ε)·(−log p[t]) + ε·mean_c(−log p[c]),   0 where t == ignore_index

  A target outside [0, C) that is not ignored picks nothing (its first term is 0), as
  ``train.losses.nll_from_log_probs``. ``train.losses.cross_entropy`` uses it for int targets.
- ``softmax_cross_entropy_grad(logits, targets, g)``: its gradient w.r.t. the logits,
  (softmax(logits) − ((1 − ε)·onehot(t) + ε/C)) · g[..., None], 0 in ignored rows (for a
  target outside [0, C), which picks nothing, ε·(softmax − 1/C)·g). Not differentiable itself.
"""

from __future__ import annotations

import numpy as np

from attngraph.dsl import apply
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, register
from attngraph.ir.rules import require_float
from attngraph.ir.shapes import dim_mul, format_shape

__all__ = ["softmax_cross_entropy"]


def _check(logits, targets):
    require_float(logits, "logits")
    if logits.rank == 0:
        raise ShapeError("softmax_cross_entropy needs logits with a class axis, got a scalar")
    if not targets.dtype.is_int:
        raise DTypeError(f"softmax_cross_entropy needs int class ids as targets, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(f"logits {format_shape(logits.shape)} need targets of shape "
                         f"{format_shape(logits.shape[:-1])}, got {format_shape(targets.shape)}")


def _infer(logits, targets, *, label_smoothing, ignore_index):
    _check(logits, targets)
    return logits.with_shape(logits.shape[:-1])


def _grad_infer(logits, targets, g, *, label_smoothing, ignore_index):
    _check(logits, targets)
    if g != logits.with_shape(logits.shape[:-1]):
        raise ShapeError(f"the output gradient is {g.dtype}{format_shape(g.shape)}, but the loss is "
                         f"{logits.dtype}{format_shape(logits.shape[:-1])}")
    return logits


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    shifted = x - np.where(np.isneginf(m), 0, m)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _onehot(targets, num_classes, dtype):
    return (np.arange(num_classes) == targets[..., None]).astype(dtype)


def _reference(logits, targets, *, label_smoothing, ignore_index):
    eps = logits.dtype.type(label_smoothing)
    log_p = _log_softmax(logits)
    inside = (targets >= 0) & (targets < logits.shape[-1])
    index = np.where(inside, targets, 0)[..., None].astype(np.intp)
    picked = np.where(inside, -np.take_along_axis(log_p, index, axis=-1)[..., 0], 0)   # (…); no −inf·0
    loss = (1 - eps) * picked - eps * log_p.mean(axis=-1) if label_smoothing else picked
    if ignore_index is not None:
        loss = np.where(targets == ignore_index, 0, loss)
    return np.asarray(loss, dtype=logits.dtype)


def _grad_reference(logits, targets, g, *, label_smoothing, ignore_index):
    eps = logits.dtype.type(label_smoothing)
    num_classes = logits.shape[-1]
    p = np.exp(_log_softmax(logits))
    onehot = _onehot(targets, num_classes, logits.dtype)
    picked = onehot.sum(axis=-1, keepdims=True)                 # 0 for a target outside [0, C)
    target = (1 - eps) * onehot + eps / num_classes
    dx = (((1 - eps) * picked + eps) * p - target) * g[..., None]
    if ignore_index is not None:
        dx = np.where((targets == ignore_index)[..., None], 0, dx)
    return np.ascontiguousarray(dx, dtype=logits.dtype)


def _grad(ctx, g):
    logits, targets = ctx.inputs
    return [apply("softmax_cross_entropy_grad", [logits, targets, g], **ctx.attrs), None]


def _examples(rng):
    x = rng.standard_normal((2, 3, 7)).astype(np.float32) * 2
    t = rng.integers(0, 7, (2, 3)).astype(np.int64)
    t[0, 1] = -100
    x64 = rng.standard_normal((5, 4))
    t32 = rng.integers(0, 4, 5).astype(np.int32)
    return [Example((x, t), {"label_smoothing": 0.0, "ignore_index": None}, "plain, a target out of range"),
            Example((x, t), {"label_smoothing": 0.1, "ignore_index": -100}, "smoothing, ignore_index"),
            Example((x64, t32), {"label_smoothing": 0.25, "ignore_index": 2}, "float64, int32 targets")]


def _grad_examples(rng):
    out = []
    for ex in _examples(rng):
        x, t = ex.inputs
        out.append(Example((x, t, rng.standard_normal(t.shape).astype(x.dtype)), ex.attrs, ex.label))
    return out


_F, _I = DType.float32, DType.int64
_ATTRS = {"label_smoothing": 0.0, "ignore_index": None}

register(OpDef(
    "softmax_cross_entropy", infer=_infer, reference=_reference, grad=_grad, fusion=Fusion.OPAQUE,
    examples=_examples, flops=lambda i, o, **a: dim_mul(4, i[0].size),
    bad_cases=(BadCase(((_F, (3, 5)), (_I, (4,))), _ATTRS, label="targets shape"),
               BadCase(((_F, (3, 5)), (_F, (3,))), _ATTRS, label="float targets", error="DTypeError")),
    doc="per-example softmax cross-entropy of (..., C) logits and (...) int targets, with label_smoothing and "
        "ignore_index (ignored targets give 0).",
    family="softmax_cross_entropy"))

register(OpDef(
    "softmax_cross_entropy_grad", infer=_grad_infer, reference=_grad_reference, fusion=Fusion.OPAQUE,
    differentiable=False, examples=_grad_examples, flops=lambda i, o, **a: dim_mul(4, i[0].size),
    bad_cases=(BadCase(((_F, (3, 5)), (_I, (3,)), (_F, (3, 5))), _ATTRS, label="out_grad shape"),),
    doc="(softmax(logits) - smoothed one-hot) * g: the gradient of softmax_cross_entropy w.r.t. the logits in "
        "one pass; 0 in ignored rows. Not differentiable itself.",
    family="softmax_cross_entropy"))


def softmax_cross_entropy(logits, targets, *, label_smoothing: float = 0.0, ignore_index: int | None = None):
    """Per-example softmax cross-entropy (see the module docstring); the loss has logits' shape
    without the class axis."""
    return apply("softmax_cross_entropy", [logits, targets], label_smoothing=float(label_smoothing),
                 ignore_index=None if ignore_index is None else int(ignore_index))
