"""Every op in the registry, checked the same way: its reference against an independent
computation (torch where torch has the op), and its shape rule against bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph import errors
from attngraph.dsl import apply
from attngraph.ir import all_ops, get_op
from tests.helpers import run_op

torch = pytest.importorskip("torch")
F = torch.nn.functional


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _softmax_oracle(x, axis):
    # torch gives NaN for a row of all −inf; attngraph's pinned contract is zeros.
    return torch.nan_to_num(torch.softmax(T(x), dim=axis), nan=0.0).numpy()


def _log_softmax_oracle(x, axis):
    out = torch.log_softmax(T(x), dim=axis)
    return torch.where(torch.isnan(out), torch.tensor(-math.inf, dtype=out.dtype), out).numpy()


def _layernorm_oracle(x, *affine, eps, has_gamma, has_beta):
    rest = list(affine)
    gamma = T(rest.pop(0)) if has_gamma else None
    beta = T(rest.pop(0)) if has_beta else None
    return F.layer_norm(T(x), (x.shape[-1],), gamma, beta, eps).numpy()


def _reduce(fn):
    def oracle(x, axis, keepdims):
        t = T(x)
        if axis is None or axis == tuple(range(x.ndim)):
            out = fn(t.reshape(-1), 0)
            return (out.reshape((1,) * x.ndim) if keepdims else out).numpy()
        for a in sorted(axis if isinstance(axis, tuple) else (axis,), reverse=True):
            t = fn(t, a, keepdims=keepdims)
        return t.numpy()
    return oracle


def _sum(t, a, keepdims=False):
    return torch.sum(t, dim=a, keepdim=keepdims, dtype=t.dtype)


def _mean(t, a, keepdims=False):
    return torch.mean(t, dim=a, keepdim=keepdims)


def _max(t, a, keepdims=False):
    return torch.amax(t, dim=a, keepdim=keepdims)


def _slice_oracle(x, starts, stops, steps):
    # torch has no negative steps: flip those axes and slice the mirrored range.
    t = T(x)
    index = []
    for axis, (a, b, c) in enumerate(zip(starts, stops, steps)):
        idx = list(range(x.shape[axis]))[slice(a, b, c)]
        t = torch.index_select(t, axis, torch.tensor(idx, dtype=torch.long))
    return t.numpy()


def _trilu_oracle(x, k, upper):
    t = T(x)
    return (torch.triu(t, k) if upper else torch.tril(t, k)).numpy()


def _cast_oracle(x, dtype):
    table = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32, "int64": torch.int64,
             "bool": torch.bool}
    return T(x).to(table[str(dtype)]).numpy()


def _attention_oracle(q, k, v, *extra, scale, causal, has_bias, has_mask):
    s = torch.matmul(T(q), T(k).transpose(-1, -2)) * scale
    rest = list(extra)
    if has_bias:
        s = s + T(rest.pop(0))
    if has_mask:
        s = s.masked_fill(T(rest.pop(0)), -math.inf)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.matmul(p, T(v)).numpy()


def _scatter_add_oracle(data, idx, updates, axis):
    idx = np.where(idx < 0, idx + data.shape[axis], idx).reshape(-1)
    rows = updates.reshape(data.shape[:axis] + (-1,) + data.shape[axis + 1:])
    return torch.index_add(T(data), axis, T(idx).long(), T(rows)).numpy()


def _attention_grad_oracle(q, k, v, *rest, scale, causal, has_bias, has_mask):
    *extra, g = rest
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    extra = list(extra)
    if has_bias:
        s = s + T(extra.pop(0))
    if has_mask:
        s = s.masked_fill(T(extra.pop(0)), -math.inf)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    dead = torch.isneginf(s).all(-1, keepdim=True)          # fully masked rows: zeros, without NaN
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    torch.matmul(p, vt).backward(T(g))
    return [qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()]


def _max_pool2d_grad_oracle(x, g, kernel_size, stride, padding):
    xt = torch.tensor(x, requires_grad=True)
    F.max_pool2d(xt, kernel_size, stride, padding).backward(T(g))
    return xt.grad.numpy()


def _avg_pool2d_grad_oracle(g, size, kernel_size, stride, padding, count_include_pad):
    xt = torch.zeros(g.shape[:-2] + tuple(size), dtype=T(g).dtype, requires_grad=True)
    F.avg_pool2d(xt, kernel_size, stride, padding, count_include_pad=count_include_pad).backward(T(g))
    return xt.grad.numpy()


def _layernorm_grad_oracle(x, *rest, eps, has_gamma, has_beta):
    *affine, g = rest
    xt = torch.tensor(x, requires_grad=True)
    gamma = torch.tensor(affine[0], requires_grad=True) if has_gamma else None
    beta = torch.zeros(x.shape[-1], dtype=xt.dtype, requires_grad=True) if has_beta else None
    F.layer_norm(xt, (x.shape[-1],), gamma, beta, eps).backward(T(g))
    return [t.grad.numpy() for t in (xt, gamma, beta) if t is not None]


def _sce_torch(x, t, label_smoothing, ignore_index):
    """Per-example torch cross-entropy; a target outside [0, C) that is not ignored picks nothing."""
    t = T(t).long()
    ii = -100 if ignore_index is None else ignore_index
    ignored = t == ii
    inside = (t >= 0) & (t < x.shape[-1])
    safe = torch.where(inside & ~ignored, t, torch.full_like(t, ii))
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), safe.reshape(-1), ignore_index=ii, reduction="none",
                           label_smoothing=label_smoothing).reshape(t.shape)
    if label_smoothing:   # rows torch ignored only because the target is out of range keep the smoothing term
        smooth = -label_smoothing * torch.log_softmax(x, -1).mean(-1)
        loss = torch.where(~inside & ~ignored, smooth, loss)
    return loss


def _sce_oracle(x, t, label_smoothing, ignore_index):
    return _sce_torch(T(x), t, label_smoothing, ignore_index).numpy()


def _sce_grad_oracle(x, t, g, label_smoothing, ignore_index):
    xt = torch.tensor(x, requires_grad=True)
    _sce_torch(xt, t, label_smoothing, ignore_index).backward(T(g))
    return xt.grad.numpy()


# op name → oracle(*inputs, **attrs). Independent of attngraph's references.
ORACLES = {
    "add": lambda a, b: (T(a) + T(b)).numpy(),
    "sub": lambda a, b: (T(a) - T(b)).numpy(),
    "mul": lambda a, b: (T(a) * T(b)).numpy(),
    "div": lambda a, b: (T(a) / T(b)).numpy(),
    "pow": lambda a, b: torch.pow(T(a), T(b)).numpy(),
    "maximum": lambda a, b: torch.maximum(T(a), T(b)).numpy(),
    "minimum": lambda a, b: torch.minimum(T(a), T(b)).numpy(),
    "neg": lambda x: (-T(x)).numpy(),
    "abs": lambda x: torch.abs(T(x)).numpy(),
    "exp": lambda x: torch.exp(T(x)).numpy(),
    "log": lambda x: torch.log(T(x)).numpy(),
    "sqrt": lambda x: torch.sqrt(T(x)).numpy(),
    "rsqrt": lambda x: torch.rsqrt(T(x)).numpy(),
    "tanh": lambda x: torch.tanh(T(x)).numpy(),
    "erf": lambda x: torch.erf(T(x)).numpy(),
    "sigmoid": lambda x: torch.sigmoid(T(x)).numpy(),
    "sin": lambda x: torch.sin(T(x)).numpy(),
    "cos": lambda x: torch.cos(T(x)).numpy(),
    "relu": lambda x: torch.relu(T(x)).numpy(),
    "gelu": lambda x, approximate: F.gelu(T(x), approximate=approximate).numpy(),
    "equal": lambda a, b: torch.eq(T(a), T(b)).numpy(),
    "not_equal": lambda a, b: torch.ne(T(a), T(b)).numpy(),
    "less": lambda a, b: torch.lt(T(a), T(b)).numpy(),
    "less_equal": lambda a, b: torch.le(T(a), T(b)).numpy(),
    "greater": lambda a, b: torch.gt(T(a), T(b)).numpy(),
    "greater_equal": lambda a, b: torch.ge(T(a), T(b)).numpy(),
    "logical_and": lambda a, b: torch.logical_and(T(a), T(b)).numpy(),
    "logical_or": lambda a, b: torch.logical_or(T(a), T(b)).numpy(),
    "logical_not": lambda x: torch.logical_not(T(x)).numpy(),
    "where": lambda c, a, b: torch.where(T(c), T(a), T(b)).numpy(),
    "matmul": lambda a, b: torch.matmul(T(a), T(b)).numpy(),
    "softmax": _softmax_oracle,
    "log_softmax": _log_softmax_oracle,
    "mask": lambda x, m, value: T(x).masked_fill(T(m), value).numpy(),
    "layernorm": _layernorm_oracle,
    "concat": lambda *xs, axis: torch.cat([T(x) for x in xs], dim=axis).numpy(),
    "sum": lambda x, axis, keepdims: _reduce(_sum)(x, axis, keepdims),
    "mean": lambda x, axis, keepdims: _reduce(_mean)(x, axis, keepdims),
    "max": lambda x, axis, keepdims: _reduce(_max)(x, axis, keepdims),
    "argmax": lambda x, axis, keepdims: torch.argmax(T(x), dim=axis, keepdim=keepdims).numpy(),
    "reshape": lambda x, shape: T(x).reshape(shape).numpy(),
    "transpose": lambda x, axes: T(x).permute(*(axes or reversed(range(x.ndim)))).numpy(),
    "broadcast_to": lambda x, shape: T(x).expand(*shape).numpy(),
    "slice": _slice_oracle,
    "split": lambda x, sizes, axis: [p.numpy() for p in torch.split(
        T(x), x.shape[axis] // sizes if isinstance(sizes, int) else list(sizes), dim=axis)],
    "gather": lambda data, idx, axis: torch.index_select(
        T(data), axis, T(np.where(idx < 0, idx + data.shape[axis], idx).reshape(-1)).long()).reshape(
        data.shape[:axis] + idx.shape + data.shape[axis + 1:]).numpy(),
    "cast": _cast_oracle,
    "stop_gradient": lambda x: T(x).detach().numpy(),
    "dropout": lambda x, p: F.dropout(T(x), p, training=False).numpy(),
    "full": lambda shape, value, dtype: torch.full(shape, value, dtype=getattr(torch, str(dtype))).numpy(),
    "arange": lambda stop, dtype: torch.arange(stop, dtype=getattr(torch, str(dtype))).numpy(),
    "trilu": _trilu_oracle,
    "attention": _attention_oracle,
    "attention_grad": _attention_grad_oracle,
    "layernorm_grad": _layernorm_grad_oracle,
    "softmax_cross_entropy": _sce_oracle,
    "softmax_cross_entropy_grad": _sce_grad_oracle,
    "scatter_add": _scatter_add_oracle,
    "max_pool2d_grad": _max_pool2d_grad_oracle,
    "avg_pool2d_grad": _avg_pool2d_grad_oracle,
    # conv family: checked against torch in tests/ops/test_conv_family.py with many configurations.
    "conv2d": None, "conv_transpose2d": None, "max_pool2d": None, "avg_pool2d": None, "upsample": None,
    "patchify": None, "pad": None,
}


def _expression_oracle(expr, arrays):
    """Evaluate a fused region's expression tree with the oracles of the ops inside it."""
    def walk(e):
        if e[0] == "in":
            return arrays[e[1]]
        if e[0] == "const":
            return np.asarray(e[1], dtype=e[2])
        return ORACLES[e[0]](*(walk(c) for c in e[2:]), **dict(e[1]))
    return walk(expr)


def _residual_layernorm_oracle(a, b, *affine, **attrs):
    total = (T(a) + T(b)).numpy()
    return [total, _layernorm_oracle(total, *affine, **attrs)]


ORACLES.update({
    "fused_elementwise": lambda *xs, expr: _expression_oracle(expr, xs),
    "matmul_epilogue": lambda a, b, *extra, expr: _expression_oracle(expr, (ORACLES["matmul"](a, b), *extra)),
    "residual_layernorm": _residual_layernorm_oracle,
})

OPS = all_ops()
EXAMPLES = [pytest.param(op.name, ex, id=f"{op.name}-{ex.label or i}")
            for op in OPS for i, ex in enumerate(op.examples(np.random.default_rng(0)) if op.examples else [])]
BAD = [pytest.param(op.name, case, id=f"{op.name}-{case.label or i}")
       for op in OPS for i, case in enumerate(op.bad_cases)]


def test_every_op_has_an_oracle_and_examples():
    missing = [op.name for op in OPS if op.name not in ORACLES]
    assert not missing, f"add an independent oracle for {missing}"
    assert not [op.name for op in OPS if not op.examples], "every op needs examples"
    assert len(OPS) >= 55


@pytest.mark.parametrize("name, example", EXAMPLES)
def test_reference_matches_oracle(name, example):
    oracle = ORACLES[name]
    if oracle is None:
        pytest.skip("checked in its own family test")
    attrs = dict(example.attrs)
    got = run_op(name, list(example.inputs), attrs)
    # The oracle sees the attrs the op normalizes to (positive axes, resolved shapes).
    g = ag.Graph("n")
    handles = [g.input(f"i{k}", a.shape, a.dtype) for k, a in enumerate(example.inputs)]
    node = apply(name, handles, graph=g, **attrs)
    node = node[0].node if isinstance(node, tuple) else node.node
    want = oracle(*example.inputs, **dict(node.attrs))
    gots = got if isinstance(got, list) else [got]
    wants = want if isinstance(want, list) else [want]
    assert len(gots) == len(wants)
    for g_, w in zip(gots, wants):
        w = np.asarray(w)
        assert g_.shape == w.shape
        assert g_.dtype == w.dtype or name in ("argmax",)
        tol = 1e-6 if g_.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(g_, w, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("name, case", BAD)
def test_bad_inputs_are_refused_at_build_time(name, case):
    g = ag.Graph("bad")
    handles = [g.input(f"i{k}", shape, dtype) for k, (dtype, shape) in enumerate(case.inputs)]
    error = getattr(errors, case.error)
    with pytest.raises(error) as info:
        apply(name, handles, graph=g, **case.attrs)
    assert name in str(info.value)
    assert __file__.split("/")[-1] in str(info.value)  # points at this test's line


def test_unknown_op_is_a_clear_error():
    with pytest.raises(errors.UnknownOpError, match="did you mean softmax"):
        get_op("sofmax")


def test_fully_masked_softmax_row_is_zero():
    x = np.full((2, 4), -np.inf, np.float32)
    x[1] = [1, 2, 3, 4]
    out = run_op("softmax", [x], {"axis": -1})
    assert np.all(out[0] == 0) and np.isfinite(out).all()
    np.testing.assert_allclose(out[1].sum(), 1, rtol=1e-6)
