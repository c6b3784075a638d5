"""The DSL and the pinned API details of DESIGN.md ("The details, pinned")."""

from __future__ import annotations

import os

import numpy as np
import pytest

import attngraph as ag
from attngraph import errors
from attngraph.ir import Node

HERE = os.path.basename(__file__)


def line_of(marker: str) -> int:
    with open(__file__) as f:
        for number, text in enumerate(f, 1):
            if marker in text and "line_of(" not in text:
                return number
    raise AssertionError(marker)


def run(g, **feeds):
    return ag.compile(g, backend="numpy").run(feeds)


# -- graph building -----------------------------------------------------------------------
def test_sources_defaults_and_dtypes():
    g = ag.Graph("g")
    x = g.input("x", ("B", 4))
    assert x.dtype == ag.float32 and x.shape == ("B", 4)
    w = g.param("w", (4, 3))
    assert w.dtype == ag.float32 and g.values["w"].dtype == np.float32
    bound = np.sqrt(6 / 7)
    assert np.abs(g.values["w"]).max() <= bound and g.values["w"].std() > 0  # xavier_uniform
    mask = g.const("m", np.array([True, False]))
    assert mask.dtype == ag.bool_
    c64 = g.const("c", np.zeros(2, np.float64))
    assert c64.dtype == ag.float64
    i = g.input("ids", (2,), "int64")
    assert i.dtype == ag.int64
    g.output("y", x @ w)
    assert list(g.outputs) == ["y"]


def test_params_with_named_and_custom_initializers():
    g = ag.Graph("g", seed=3)
    assert np.all(g.param("z", (2, 2), init="zeros").graph.values["z"] == 0)
    g.param("o", (3,), init="ones")
    g.param("f", (3,), init=0.5)
    g.param("a", (2,), init=np.array([1.0, 2.0]))
    assert g.values["o"].tolist() == [1, 1, 1] and g.values["f"].tolist() == [0.5] * 3
    assert g.values["a"].dtype == np.float32
    with pytest.raises(errors.AttngraphError, match="unknown initializer"):
        g.param("bad", (2,), init="glorot")
    with pytest.raises(errors.ShapeError, match="symbolic"):
        g.param("s", ("B", 2))


def test_duplicate_names_are_refused():
    g = ag.Graph("g")
    g.input("x", (2,))
    with pytest.raises(errors.VerifyError, match="already used"):
        g.param("x", (2,))


def test_transpose_reshape_T_take_varargs_or_tuple():
    g = ag.Graph("g")
    x = g.input("x", (2, 3, 4))
    assert x.transpose(0, 2, 1).shape == (2, 4, 3)
    assert x.transpose((0, 2, 1)).shape == (2, 4, 3)
    assert x.T.shape == (4, 3, 2)
    assert x.reshape(6, 4).shape == (6, 4)
    assert x.reshape((6, -1)).shape == (6, 4)
    assert ag.reshape(x, 3, 8).shape == (3, 8)
    g.output("t", x.T)
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(run(g, x=a)["t"], a.T)


def test_weak_scalars_keep_the_tensor_dtype():
    g = ag.Graph("g")
    x = g.input("x", (3,))
    for y in (x * np.float64(0.5), x * 0.5, 0.5 * x, np.float64(2) * x, x / 3, x + 1, 2 ** x, x ** 2):
        assert y.dtype == ag.float32
    i = g.input("i", (3,), "int64")
    assert (i + 1).dtype == ag.int64
    assert (i * 0.5).dtype == ag.float32
    assert (x + g.input("d", (3,), "float64")).dtype == ag.float64  # two tensors promote


def test_reductions_have_numpy_names_and_arguments(rng):
    g = ag.Graph("g")
    x = g.input("x", (2, 3, 4))
    outs = {
        "all": ag.sum(x), "ax": ag.mean(x, axis=1), "tup": ag.max(x, axis=(0, 2), keepdims=True),
        "neg": x.sum(axis=-1, keepdims=True), "m": x.mean(), "mx": x.max(axis=0),
    }
    for k, v in outs.items():
        g.output(k, v)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    r = run(g, x=a)
    np.testing.assert_allclose(r["all"], a.sum(), rtol=1e-5)
    np.testing.assert_allclose(r["ax"], a.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(r["tup"], a.max(axis=(0, 2), keepdims=True))
    np.testing.assert_allclose(r["neg"], a.sum(axis=-1, keepdims=True), rtol=1e-6)
    assert r["all"].shape == () and r["tup"].shape == (1, 3, 1)


def test_layernorm_gamma_beta_optional(rng):
    g = ag.Graph("g")
    x = g.input("x", (2, 8))
    gamma = g.param("g", (8,), init="ones")
    g.output("plain", ag.layernorm(x))
    g.output("scaled", ag.layernorm(x, gamma, None, eps=1e-6))
    a = rng.standard_normal((2, 8)).astype(np.float32)
    r = run(g, x=a)
    want = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(r["plain"], want, rtol=1e-5, atol=1e-6)


def test_embedding_and_take_argument_orders(rng):
    g = ag.Graph("g")
    ids = g.input("ids", (2, 3), "int64")
    table = g.param("table", (10, 4))
    x = g.input("x", (3, 5))
    g.output("emb", ag.embedding(ids, table))
    g.output("take", ag.take(x, np.array([4, 0]), axis=1))
    idx = np.array([[1, 2, 3], [9, 0, 1]])
    a = rng.standard_normal((3, 5)).astype(np.float32)
    exe = ag.compile(g)
    r = exe.run({"ids": idx, "x": a})
    np.testing.assert_array_equal(r["emb"], exe.params["table"][idx])
    np.testing.assert_array_equal(r["take"], np.take(a, [4, 0], axis=1))
    with pytest.raises(errors.ShapeError, match="out of range"):
        exe.run({"ids": np.full((2, 3), 10), "x": a})


def test_mask_is_masked_fill_and_where_is_numpy(rng):
    g = ag.Graph("g")
    x = g.input("x", (2, 3))
    m = g.input("m", (3,), "bool")
    g.output("filled", ag.mask(x, m))
    g.output("zero", ag.mask(x, m, value=0.0))
    g.output("w", ag.where(m, x, 7.0))
    a = rng.standard_normal((2, 3)).astype(np.float32)
    mm = np.array([True, False, True])
    r = run(g, x=a, m=mm)
    assert np.all(np.isneginf(r["filled"][:, mm])) and np.all(r["filled"][:, ~mm] == a[:, ~mm])
    np.testing.assert_array_equal(r["zero"], np.where(mm, 0, a))
    np.testing.assert_array_equal(r["w"], np.where(mm, a, 7.0))
    assert r["w"].dtype == np.float32


def test_fully_masked_rows_give_zeros_through_the_dsl():
    g = ag.Graph("g")
    s = g.input("s", (3, 4))
    m = g.input("m", (3, 4), "bool")
    g.output("p", ag.softmax(ag.mask(s, m), axis=-1))
    mm = np.zeros((3, 4), bool)
    mm[1] = True
    p = run(g, s=np.ones((3, 4), np.float32), m=mm)["p"]
    assert np.all(p[1] == 0) and np.allclose(p[[0, 2]].sum(-1), 1)


def test_indexing_lowers_to_slice_and_reshape(rng):
    g = ag.Graph("g")
    x = g.input("x", (4, 5, 6))
    cases = {"a": x[1], "b": x[:, 1:4], "c": x[..., ::2], "d": x[None, -1, :, 2], "e": x[1:, ..., None]}
    for k, v in cases.items():
        g.output(k, v)
    a = rng.standard_normal((4, 5, 6)).astype(np.float32)
    r = run(g, x=a)
    for k, want in {"a": a[1], "b": a[:, 1:4], "c": a[..., ::2], "d": a[None, -1, :, 2], "e": a[1:, ..., None]}.items():
        np.testing.assert_array_equal(r[k], want)
        assert cases[k].shape == want.shape


def test_symbolic_slicing_and_split():
    g = ag.Graph("g")
    x = g.input("x", ("B", "T", 6))
    pos = g.param("pos", (16, 6))
    assert x[:, 1:].shape == ("B", "T-1", 6)
    assert x[:, -1].shape == ("B", 6)
    y = x + pos[: x.shape[1]]
    assert y.shape == ("B", "T", 6)
    a, b = ag.split(x, 2, axis=-1)
    assert a.shape == ("B", "T", 3)
    g.output("y", y)
    g.output("b", b)
    r = ag.compile(g).run({"x": np.ones((2, 5, 6), np.float32)})
    assert r["y"].shape == (2, 5, 6) and r["b"].shape == (2, 5, 3)


def test_causal_mask_with_symbolic_length():
    g = ag.Graph("g")
    x = g.input("x", ("T", 4))
    g.output("m", ag.causal_mask(g, x.shape[0]))
    m = ag.compile(g).run({"x": np.zeros((5, 4), np.float32)})["m"]
    np.testing.assert_array_equal(m, np.triu(np.ones((5, 5), bool), 1))


def test_tensor_misuse_is_explained():
    g = ag.Graph("g")
    x = g.input("x", (2,))
    with pytest.raises(errors.AttngraphError, match="truth value"):
        if x > 0:
            pass
    with pytest.raises(errors.AttngraphError, match="no value"):
        np.asarray(x)
    other = ag.Graph("other").input("y", (2,))
    with pytest.raises(errors.VerifyError, match="different graphs"):
        x + other


# -- errors point at the user's line -------------------------------------------------------
def test_shape_error_names_op_shapes_file_and_line():
    g = ag.Graph("g")
    x = g.input("x", ("B", 16, 64))
    w = g.param("w", (32, 64))
    with pytest.raises(errors.ShapeError) as info:
        x @ w  # MATMUL-LINE
    text = str(info.value)
    assert "matmul of (B, 16, 64) and (32, 64)" in text
    assert "inner dims 64 and 32 differ" in text
    assert f"{HERE}:{line_of('# MATMUL-LINE')}" in text
    assert "hint: did you mean to transpose" in text
    assert isinstance(info.value, errors.AttngraphError)


def test_dtype_error_names_the_line():
    g = ag.Graph("g")
    x = g.input("x", (2, 3), "int64")
    with pytest.raises(errors.DTypeError) as info:
        ag.softmax(x)  # SOFTMAX-LINE
    assert f"{HERE}:{line_of('# SOFTMAX-LINE')}" in str(info.value)
    assert "softmax" in str(info.value) and "int64" in str(info.value)


def test_broadcast_and_reshape_errors_name_the_line():
    g = ag.Graph("g")
    x = g.input("x", ("B", 3))
    with pytest.raises(errors.ShapeError) as info:
        x + g.input("y", (4,))  # ADD-LINE
    assert f"{HERE}:{line_of('# ADD-LINE')}" in str(info.value)
    with pytest.raises(errors.ShapeError) as info:
        x.reshape("B", 4)  # RESHAPE-LINE
    assert f"{HERE}:{line_of('# RESHAPE-LINE')}" in str(info.value)
    assert "(B, 3)" in str(info.value)


def test_errors_share_one_base_class():
    for name in ("ShapeError", "DTypeError", "FeedError", "BackendError", "UnknownOpError", "VerifyError",
                 "SerializationError"):
        assert issubclass(getattr(errors, name), errors.AttngraphError)


# -- the executable ------------------------------------------------------------------------
def test_executable_contract(rng):
    g = ag.Graph("toy")
    x = g.input("x", ("B", 16, 64), "float32")
    w = g.param("w", (64, 64), init="xavier_uniform")
    y = ag.softmax(x @ w, axis=-1)
    g.output("y", y)
    exe = ag.compile(g, backend="numpy")
    a = rng.standard_normal((2, 16, 64)).astype(np.float32)
    out = exe.run({"x": a})
    assert isinstance(out, dict) and set(out) == {"y"} and isinstance(out["y"], np.ndarray)
    e = np.exp(a @ exe.params["w"] - (a @ exe.params["w"]).max(-1, keepdims=True))
    np.testing.assert_allclose(out["y"], e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    assert isinstance(exe.graph.nodes, list) and all(isinstance(n, Node) for n in exe.graph.nodes)
    assert all(isinstance(n.op, str) for n in exe.graph.nodes)
    position = {n.id: i for i, n in enumerate(exe.graph.nodes)}
    assert all(position[v.node.id] < position[n.id] for n in exe.graph.nodes for v in n.inputs)
    # parameters live on the executable and can be overridden by name
    exe.params["w"] = np.eye(64)  # float64 in, cast to the param's float32
    e = np.exp(a - a.max(-1, keepdims=True))
    np.testing.assert_allclose(exe.run({"x": a})["y"], e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    assert exe.params["w"].dtype == np.float32
    assert g.values["w"].std() > 0.05  # the graph's own initial value is untouched
    with pytest.raises(errors.FeedError, match="shape"):
        exe.params["w"] = np.eye(3)
    with pytest.raises(errors.FeedError, match="unknown parameter"):
        exe.params["nope"] = np.eye(3)
