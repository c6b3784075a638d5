"""ag.grad: every op's grad rule against finite differences (parametrized over the registry),
non-differentiable ops refused by name, attention and a Transformer encoder layer against
torch autograd, symbolic shapes, and the backward optimized by the passes like the forward."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph import errors
from attngraph.benchmarks.models import encoder_layer
from attngraph.dsl import apply
from attngraph.ir import SOURCE_OPS, all_ops, get_op

torch = pytest.importorskip("torch")

OPS = [op for op in all_ops() if op.family != "fused"]   # fused ops appear only after compile()
RNG0 = np.random.default_rng(0)
EXAMPLES = [pytest.param(op.name, ex, id=f"{op.name}-{ex.label or i}")
            for op in OPS if op.differentiable for i, ex in enumerate(op.examples(RNG0))]
NON_DIFFERENTIABLE = [pytest.param(op.name, op.examples(RNG0)[0], id=op.name) for op in OPS
                      if not op.differentiable and any(np.asarray(a).dtype.kind == "f"
                                                       for a in op.examples(RNG0)[0].inputs)]


def f64(a):
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype == np.float32 else a


def run(graph, feeds=None, optimize=False):
    exe = ag.compile(graph, backend="numpy", optimize=optimize)
    return exe.run(feeds or {}), exe


def central_differences(loss_of, arrays, slot, h=1e-6):
    """d loss / d arrays[slot], one element at a time."""
    x = arrays[slot]
    out = np.zeros_like(x, dtype=np.float64)
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue  # a −inf score stays −inf; its gradient is 0
        keep = x[i]
        x[i] = keep + h
        up = loss_of(arrays)
        x[i] = keep - h
        down = loss_of(arrays)
        x[i] = keep
        out[i] = (up - down) / (2 * h)
    return out


# -- every op of the registry ------------------------------------------------------------------

def linear_functional(g, outs, refs, rng):
    """loss = Σ sum(out_i · r_i) over the float outputs (non-finite entries, e.g. −inf fills, left out)."""
    weights, loss = [], None
    for i, (t, r) in enumerate(zip(outs, refs)):
        w = rng.standard_normal(r.shape)
        finite = np.isfinite(r.astype(np.float64))
        w = np.where(finite, w, 0.0)
        weights.append((w, finite))
        t = t if t.dtype == ag.float64 else t.astype("float64")
        if not finite.all():
            t = ag.mask(t, g.const(f"nonfinite{i}", ~finite), 0.0)
        term = ag.sum(t * g.const(f"r{i}", w))
        loss = term if loss is None else loss + term
    return loss, weights


@pytest.mark.parametrize("name, example", EXAMPLES)
def test_gradient_matches_finite_differences(name, example):
    op = get_op(name)
    inputs = [f64(a) for a in example.inputs]
    slots = [i for i, a in enumerate(inputs) if a.dtype == np.float64]
    if not slots:
        pytest.skip("no float input")
    g = ag.Graph("fd")
    handles = [g.input(f"in{i}", a.shape, a.dtype) for i, a in enumerate(inputs)]
    out = apply(name, handles, graph=g, **example.attrs)
    outs = list(out) if isinstance(out, tuple) else [out]
    attrs = dict(outs[0].node.attrs)

    def forward(arrays):
        with np.errstate(all="ignore"):
            res = op.reference(*arrays, **attrs)
        return [np.asarray(r) for r in (res if isinstance(res, (tuple, list)) else [res])]

    refs = forward(inputs)
    loss, weights = linear_functional(g, outs, refs, np.random.default_rng(1))
    grads = ag.grad(loss, [handles[i] for i in slots])
    g.output("loss", loss)
    for i, d in zip(slots, grads):
        assert d.shape == handles[i].shape and d.dtype == ag.float64
        g.output(f"d{i}", d)
    feeds = {f"in{i}": a for i, a in enumerate(inputs)}
    got, _ = run(g, feeds)

    # comparisons (no gradient flows through a bool result), and stop_gradient by definition
    if name == "stop_gradient" or all(r.dtype.kind != "f" for r in refs):
        for i in slots:
            assert np.all(got[f"d{i}"] == 0)
        return

    def loss_of(arrays):
        return sum(float(np.sum(np.where(finite, r.astype(np.float64), 0.0) * w))
                   for r, (w, finite) in zip(forward(arrays), weights))

    for i in slots:
        want = central_differences(loss_of, [a.copy() for a in inputs], i)
        np.testing.assert_allclose(got[f"d{i}"], want, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(want).max()),
                                   err_msg=f"gradient of {name} w.r.t. input {i}")


@pytest.mark.parametrize("name, example", NON_DIFFERENTIABLE)
def test_non_differentiable_ops_are_refused_by_name(name, example):
    g = ag.Graph("nd")
    handles = [g.input(f"in{i}", np.shape(a), np.asarray(a).dtype) for i, a in enumerate(example.inputs)]
    out = apply(name, handles, graph=g, **example.attrs)
    first = (list(out) if isinstance(out, tuple) else [out])[0]
    loss = ag.sum(first.astype("float32"))
    x = next(h for h in handles if h.dtype.is_float)
    with pytest.raises(errors.GradError) as info:
        ag.grad(loss, x)
    text = str(info.value)
    assert name in text and "not differentiable" in text
    assert "test_autodiff.py" in text  # the user's line of the node


def test_every_differentiable_op_has_a_rule():
    assert [op.name for op in OPS if op.differentiable and op.grad is None] == []
    assert {op.name for op in OPS if not op.differentiable} >= {"argmax", "full", "arange", "attention_grad",
                                                                 "max_pool2d_grad"}


def test_fused_ops_are_refused_with_a_hint():
    g = ag.Graph("f")
    x = g.input("x", (4, 8))
    g.output("y", ag.relu(x * 2.0 + 1.0))
    exe = ag.compile(g, backend="numpy", optimize=True)
    fused = [n for n in exe.graph.nodes if n.op not in SOURCE_OPS and get_op(n.op).family == "fused"]
    if not fused:
        pytest.skip("the pipeline fused nothing here")
    opt = exe.graph
    loss = ag.sum(opt.tensor(opt.outputs["y"]))
    with pytest.raises(errors.GradError, match="differentiate the graph before compiling"):
        ag.grad(loss, opt.tensor(opt.inputs["x"].out))


# -- the API ------------------------------------------------------------------------------------

def test_returns_a_list_in_order_or_a_single_tensor():
    g = ag.Graph("api")
    x = g.input("x", (3,), "float64")
    a = g.param("a", (3,), dtype="float64")
    b = g.param("b", (), dtype="float64")
    loss = ag.sum(a * x * x) + b
    single = ag.grad(loss, a)
    assert isinstance(single, ag.Tensor)
    grads = ag.grad(loss, [b, x, a])
    assert isinstance(grads, list) and [t.shape for t in grads] == [(), (3,), (3,)]
    for name, t in zip(("db", "dx", "da", "single"), grads + [single]):
        g.output(name, t)
    xv = np.array([1.0, -2.0, 3.0])
    got, exe = run(g, {"x": xv})
    np.testing.assert_allclose(got["db"], 1.0)
    np.testing.assert_allclose(got["dx"], 2 * exe.params["a"] * xv)
    np.testing.assert_allclose(got["da"], xv * xv)
    np.testing.assert_allclose(got["single"], xv * xv)


def test_loss_must_be_a_float_scalar():
    g = ag.Graph("bad")
    x = g.input("x", (3, 4))
    with pytest.raises(errors.GradError, match=r"scalar .*shape \(3, 4\)") as info:
        ag.grad(x * 2.0, x)
    assert "ag.sum" in str(info.value)
    ids = g.input("ids", (3,), "int64")
    with pytest.raises(errors.GradError, match="float"):
        ag.grad(ag.sum(ids), x)
    with pytest.raises(errors.GradError, match="only float tensors"):
        ag.grad(ag.sum(x), ids)
    other = ag.Graph("other").input("z", (3, 4))
    with pytest.raises(errors.GradError, match="graph"):
        ag.grad(ag.sum(x), other)


def test_intermediates_unused_inputs_and_the_loss_itself():
    g = ag.Graph("mid")
    x = g.input("x", (2, 3), "float64")
    unused = g.input("u", (5,), "float64")
    h = ag.tanh(x)
    loss = ag.sum(h * h)
    dh, du, dl, dx = ag.grad(loss, [h, unused, loss, x])
    for name, t in (("dh", dh), ("du", du), ("dl", dl), ("dx", dx)):
        g.output(name, t)
    xv = np.random.default_rng(0).standard_normal((2, 3))
    got, _ = run(g, {"x": xv, "u": np.ones(5)})
    np.testing.assert_allclose(got["dh"], 2 * np.tanh(xv))
    assert np.all(got["du"] == 0) and got["du"].shape == (5,)
    np.testing.assert_allclose(got["dl"], 1.0)
    np.testing.assert_allclose(got["dx"], 2 * np.tanh(xv) * (1 - np.tanh(xv) ** 2))


def test_int_and_bool_values_carry_no_gradient():
    # leaky relu through a comparison, an embedding lookup with repeated ids, a cast round trip
    g = ag.Graph("ints")
    x = g.input("x", (4,), "float64")
    ids = g.input("ids", (3,), "int64")
    table = g.param("table", (5, 4), dtype="float64")
    rows = ag.embedding(ids, table)                                   # (3, 4)
    y = ag.where(x > 0, x, 0.1 * x) + ag.sum(rows, axis=0)
    loss = ag.sum(y * y) + ag.sum(x.astype("int64").astype("float64"))
    dx, dt = ag.grad(loss, [x, table])
    g.output("dx", dx)
    g.output("dt", dt)
    xv, idv = np.array([1.5, -2.0, 0.5, -0.25]), np.array([1, 3, 1])
    got, exe = run(g, {"x": xv, "ids": idv})
    yv = np.where(xv > 0, xv, 0.1 * xv) + exe.params["table"][idv].sum(0)
    np.testing.assert_allclose(got["dx"], 2 * yv * np.where(xv > 0, 1, 0.1))
    want = np.zeros((5, 4))
    np.add.at(want, idv, np.broadcast_to(2 * yv, (3, 4)))
    np.testing.assert_allclose(got["dt"], want)


def test_a_value_read_twice_adds_its_gradients_and_split_fills_missing_outputs():
    g = ag.Graph("acc")
    x = g.input("x", (2, 6), "float64")
    a, b, c = ag.split(x, 3, axis=1)                                  # c is never used
    loss = ag.sum(a * b) + ag.sum(a)
    dx = ag.grad(loss, x)
    g.output("dx", dx)
    xv = np.arange(12.0).reshape(2, 6)
    got, _ = run(g, {"x": xv})
    want = np.concatenate([xv[:, 2:4] + 1, xv[:, 0:2], np.zeros((2, 2))], axis=1)
    np.testing.assert_allclose(got["dx"], want)


def test_ties_and_precision():
    # max splits evenly between tied maxima (torch's amax), maximum splits in half, max_pool2d
    # picks the first maximum of each window (torch's CPU kernel); float32 stays float32.
    g = ag.Graph("ties")
    x = g.input("x", (1, 1, 2, 4), "float32")
    flat = x.reshape(8)
    loss = (ag.max(flat) + ag.sum(ag.maximum(flat, 1.0)) + ag.sum(ag.max_pool2d(x, 2))
            + ag.sum(flat.astype("float64") * 0.5).astype("float32"))
    dx = ag.grad(loss, x)
    assert dx.dtype == ag.float32
    g.output("dx", dx)
    xv = np.array([[3.0, 3.0, 1.0, 1.0], [0.0, 2.0, 1.0, 0.5]], np.float32).reshape(1, 1, 2, 4)
    got, _ = run(g, {"x": xv})
    xt = torch.tensor(xv, requires_grad=True)
    f = xt.reshape(8)
    (torch.amax(f) + torch.maximum(f, torch.tensor(1.0)).sum() + torch.nn.functional.max_pool2d(xt, 2).sum()
     + (f.double() * 0.5).sum().float()).backward()
    assert got["dx"].dtype == np.float32
    np.testing.assert_array_equal(got["dx"], xt.grad.numpy())
    np.testing.assert_array_equal(got["dx"].reshape(8)[:4], [0.5 + 1 + 1 + 0.5, 0.5 + 1 + 0.5, 0.5 + 1 + 0.5, 1])


def test_backward_nodes_are_scoped_and_point_at_the_grad_call():
    g = ag.Graph("scoped")
    x = g.input("x", (2, 3))
    with g.scope("block"):
        y = ag.tanh(x)
    before = {n.id for n in g.nodes}
    dx = ag.grad(ag.sum(y), x)
    new = [n for n in g.nodes if n.id not in before]
    assert dx.node in new
    tanh_grad = [n for n in new if n.scope == ("backward", "block")]
    assert tanh_grad and all(n.source.short.startswith("test_autodiff.py") for n in new if n.source)


# -- symbolic shapes ---------------------------------------------------------------------------

def test_symbolic_dims_slices_means_and_convolutions():
    g = ag.Graph("sym")
    x = g.input("x", ("B", "T", 4), "float64")
    w = g.param("w", (4, 4), dtype="float64")
    gamma = g.param("gamma", (4,), init="ones", dtype="float64")
    h = ag.layernorm(x @ w, gamma)                                    # (B, T, 4)
    h = ag.concat([h[:, :1] * 2.0, h[:, 1:], h[:, -1:]], axis=1)      # (B, T+1, 4)
    h = ag.softmax(h, axis=1) - ag.mean(h, axis=(0, 1), keepdims=True)
    img = ag.reshape(h, ("B", 1, "T+1", 4))
    k = g.param("k", (2, 1, 3, 3), dtype="float64")
    y = ag.conv2d(img, k, padding=1)                                  # stride 1: H stays symbolic
    loss = ag.sum(y * y) + ag.mean(ag.max(h, axis=-1))
    dx, dw, dk = ag.grad(loss, [x, w, k])
    g.output("loss", loss)
    for name, t in (("dx", dx), ("dw", dw), ("dk", dk)):
        g.output(name, t)
    exe = ag.compile(g, backend="numpy")
    for shape in ((2, 3, 4), (1, 5, 4)):
        xv = np.random.default_rng(sum(shape)).standard_normal(shape)
        got = exe.run({"x": xv})

        def loss_of(arrays):
            return float(exe.run({"x": arrays[0]})["loss"])
        np.testing.assert_allclose(got["dx"], central_differences(loss_of, [xv.copy()], 0), rtol=1e-6, atol=1e-7)
        for name, param in (("dw", "w"), ("dk", "k")):
            base = exe.params[param].copy()

            def loss_of_param(arrays, param=param):
                exe.params[param] = arrays[0]
                return float(exe.run({"x": xv})["loss"])
            want = central_differences(loss_of_param, [base.copy()], 0)
            exe.params[param] = base
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)


# -- attention and a Transformer layer against torch autograd ----------------------------------

class Graph64(ag.Graph):
    """Parameters default to float64 (the benchmark models build params without a dtype)."""

    def param(self, name, shape, init="xavier_uniform", dtype="float64"):
        return super().param(name, shape, init=init, dtype=dtype)


def primitive_mha(g, x, d, heads, key_padding=None, causal=False):
    """torch.nn.MultiheadAttention's self-attention, written from primitives."""
    B, T = x.shape[0], x.shape[1]
    dh = d // heads
    w_in = g.param("in_proj_weight", (3 * d, d))
    b_in = g.param("in_proj_bias", (3 * d,))
    q, k, v = ag.split(x @ w_in.T + b_in, 3, axis=-1)
    q, k, v = (t.reshape(B, T, heads, dh).transpose(0, 2, 1, 3) for t in (q, k, v))   # (B, H, T, dh)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)                                 # (B, H, T, T)
    if key_padding is not None:
        scores = ag.mask(scores, key_padding.reshape(B, 1, 1, T))
    if causal:
        scores = ag.mask(scores, ag.causal_mask(g, T))
    ctx = (ag.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
    return ctx @ g.param("out_proj.weight", (d, d)).T + g.param("out_proj.bias", (d,))


def torch_grads(fn, module, x, r, **kwargs):
    """fn(x) and the gradients of sum(fn(x) · r) w.r.t. x and the module's parameters."""
    xt = torch.tensor(x, requires_grad=True)
    out = fn(xt, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.tensor(r)).sum().backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    grads["x"] = xt.grad.numpy()
    return out.detach().numpy(), grads


def build_and_check(g, y, x, r, params, want_out, want, optimize_check=True):
    loss = ag.sum(y * g.const("r", r))
    names = list(params)
    grads = ag.grad(loss, [g.tensor(g.inputs["x"].out)] + [params[n] for n in names])
    g.output("y", y)
    g.output("dx", grads[0])
    for n, t in zip(names, grads[1:]):
        g.output("d:" + n, t)
    got, _ = run(g, {"x": x})
    np.testing.assert_allclose(got["y"], want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["dx"], want["x"], rtol=1e-9, atol=1e-11)
    for n in names:
        np.testing.assert_allclose(got["d:" + n], want[n], rtol=1e-9, atol=1e-11, err_msg=n)
    if optimize_check:
        opt, exe = run(g, {"x": x}, optimize=True)
        for key in got:
            np.testing.assert_allclose(opt[key], got[key], rtol=1e-9, atol=1e-11, err_msg=key)
        return exe
    return None


@pytest.mark.parametrize("causal", [False, True], ids=["key padding", "causal"])
def test_primitive_attention_gradients_match_torch_and_the_forward_still_fuses(causal):
    B, T, d, heads = 2, 5, 8, 2
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, d))
    r = rng.standard_normal((B, T, d))
    padding = np.zeros((B, T), bool)
    padding[1, 3:] = True
    kwargs = {"key_padding_mask": torch.tensor(padding), "need_weights": False}
    if causal:
        kwargs["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
    want_out, want = torch_grads(lambda t, **kw: mha(t, t, t, **kw), mha, x, r, **kwargs)

    g = Graph64("mha")
    xin = g.input("x", (B, T, d), "float64")
    y = primitive_mha(g, xin, d, heads, key_padding=g.const("padding", padding), causal=causal)
    weights = {k: v.detach().numpy() for k, v in mha.state_dict().items()}
    for name, value in weights.items():
        g.values[name] = value.copy()
    params = {n: g.tensor(g.params[n].out) for n in weights}
    exe = build_and_check(g, y, x, r, params, want_out, want)
    ops = exe.graph.op_counts()
    assert ops.get("attention", 0) == 1 and ops.get("attention_grad", 0) == 1, ops
    assert "softmax" not in ops


def test_attention_from_primitives_with_a_learned_bias_is_differentiated_op_by_op():
    g = ag.Graph("bias")
    q = g.input("q", (2, 4, 3), "float64")
    k = g.input("k", (2, 5, 3), "float64")
    v = g.input("v", (2, 5, 3), "float64")
    bias = g.param("bias", (4, 5), dtype="float64")
    y = ag.softmax(q @ k.transpose(0, 2, 1) * 0.5 + bias, axis=-1) @ v
    loss = ag.sum(y * y)
    dq, db = ag.grad(loss, [q, bias])
    assert "attention_grad" not in g.op_counts()                      # the bias needs dS
    g.output("dq", dq)
    g.output("db", db)
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal(t.type.shape) for n, t in g.inputs.items()}
    got, exe = run(g, feeds)
    qt, kt, vt = (torch.tensor(feeds[n], requires_grad=True) for n in "qkv")
    bt = torch.tensor(exe.params["bias"], requires_grad=True)
    yt = torch.softmax(qt @ kt.transpose(1, 2) * 0.5 + bt, -1) @ vt
    (yt * yt).sum().backward()
    np.testing.assert_allclose(got["dq"], qt.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(got["db"], bt.grad.numpy(), rtol=1e-10)


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")], ids=["post-norm", "pre-norm"])
def test_transformer_encoder_layer_gradients_match_torch(norm_first, activation):
    B, T, d, heads, ffn = 2, 6, 16, 2, 32
    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation=activation, batch_first=True,
                                             norm_first=norm_first, dtype=torch.float64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, d))
    r = rng.standard_normal((B, T, d))
    want_out, want = torch_grads(layer, layer, x, r)
    weights = {f"layer.{k}": v.detach().numpy().copy() for k, v in layer.state_dict().items()}
    g = Graph64("encoder")
    xin = g.input("x", (B, T, d), "float64")
    y = encoder_layer(g, xin, weights, "layer", d, heads, norm_first=norm_first, activation=activation)
    params = {name: g.tensor(node.out) for name, node in g.params.items()}
    want = {"x": want["x"], **{f"layer.{k}": v for k, v in want.items() if k != "x"}}
    exe = build_and_check(g, y, x, r, params, want_out, want)
    ops = exe.graph.op_counts()
    assert ops.get("attention", 0) == 1 and ops.get("attention_grad", 0) == 1, ops


def test_fully_masked_attention_rows_have_finite_gradients():
    B, T, d, heads = 2, 4, 8, 2
    g = Graph64("masked")
    x = g.input("x", (B, T, d), "float64")
    padding = np.zeros((B, T), bool)
    padding[1] = True                                                  # every key of sequence 1 is padding
    y = primitive_mha(g, x, d, heads, key_padding=g.const("padding", padding))
    direct = ag.attention(x.reshape(B, 1, T, d), x.reshape(B, 1, T, d), x.reshape(B, 1, T, d),
                          mask=g.const("mask4", padding.reshape(B, 1, 1, T)))
    loss = ag.sum(y * y) + ag.sum(direct * direct)
    grads = ag.grad(loss, [x] + [g.tensor(n.out) for n in g.params.values()])
    for i, t in enumerate(grads):
        g.output(f"d{i}", t)
    xv = np.random.default_rng(3).standard_normal((B, T, d))
    got, _ = run(g, {"x": xv})
    opt, _ = run(g, {"x": xv}, optimize=True)
    for key in got:
        assert np.isfinite(got[key]).all(), key
        np.testing.assert_allclose(opt[key], got[key], rtol=1e-10, atol=1e-12)
    assert np.all(got["d0"][1] == 0)       # nothing of sequence 1 reaches the loss


# -- the backward through the optimizer ---------------------------------------------------------

def test_a_conv_net_backward_optimizes_to_the_same_numbers():
    g = ag.Graph("cnn")
    x = g.input("x", ("B", 3, 8, 8))
    w1 = g.param("w1", (4, 3, 3, 3))
    b1 = g.param("b1", (4,), init="zeros")
    w2 = g.param("w2", (4, 2, 2, 2))
    h = ag.relu(ag.conv2d(x, w1, b1, stride=1, padding=1))                # (B, 4, 8, 8)
    h = ag.max_pool2d(h, 2) + ag.avg_pool2d(h, 2)                          # (B, 4, 4, 4)
    h = ag.conv_transpose2d(h, w2, stride=2, groups=2)                     # (B, 4, 8, 8)
    h = ag.upsample(h, scale_factor=2) + ag.upsample(h, size=(16, 16), mode="bilinear")
    tokens = ag.patchify(h, 4)                                             # (B, 16, 64)
    loss = ag.mean(ag.log_softmax(tokens, axis=-1) * tokens)
    params = [g.tensor(n.out) for n in g.params.values()]
    for i, t in enumerate(ag.grad(loss, [x] + params)):
        g.output(f"d{i}", t)
    g.output("loss", loss)
    xv = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got, _ = run(g, {"x": xv})
    opt, _ = run(g, {"x": xv}, optimize=True)
    for key in got:
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(opt[key], got[key], rtol=1e-4, atol=1e-6, err_msg=key)
