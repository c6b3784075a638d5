"""Feed validation: every bad feed is a FeedError that names the input and what was expected."""

import numpy as np
import pytest

import attngraph as ag
from attngraph.errors import FeedError


@pytest.fixture
def exe():
    g = ag.Graph("feeds")
    x = g.input("x", ("B", "T", 4))
    m = g.input("mask", ("B", "T"), "bool")
    ids = g.input("ids", ("B",), "int64")
    w = g.param("w", (4, 4))
    g.output("y", ag.mask(x @ w, m[:, :, None], 0.0))
    g.output("ids2", ids * 2)
    return ag.compile(g)


def good():
    return {"x": np.ones((2, 3, 4), np.float32), "mask": np.zeros((2, 3), bool), "ids": np.arange(2)}


def test_good_feeds_run(exe):
    out = exe.run(good())
    assert out["y"].shape == (2, 3, 4)
    assert exe(**good())["ids2"].tolist() == [0, 2]


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("mask"), "missing feed mask: bool(B, T)"),
    (lambda f: f.update(z=1), "unknown feed 'z'"),
    (lambda f: f.update(w=np.eye(4)), "'w' is a parameter"),
    (lambda f: f.update(x=np.ones((2, 3, 4))), "input 'x' expects float32, got float64"),
    (lambda f: f.update(x=np.ones((2, 3), np.float32)), "input 'x' expects rank 3"),
    (lambda f: f.update(x=np.ones((2, 3, 5), np.float32)), "dim 2 is 5, not 4"),
    (lambda f: f.update(mask=np.zeros((2, 7), bool)), "T=7"),
    (lambda f: f.update(ids=np.arange(5)), "B=5"),
    (lambda f: f.update(ids=np.arange(2, dtype=np.int32)), "expects int64, got int32"),
])
def test_bad_feeds(exe, change, message):
    feeds = good()
    change(feeds)
    with pytest.raises(FeedError) as info:
        exe.run(feeds)
    assert message in str(info.value)


def test_feeds_must_be_a_mapping(exe):
    with pytest.raises(FeedError, match="dict"):
        exe.run([1, 2])


def test_lists_are_converted_to_the_declared_dtype():
    g = ag.Graph("lists")
    g.output("y", g.input("x", (3,)) * 2)
    out = ag.compile(g).run({"x": [1, 2, 3]})["y"]
    assert out.dtype == np.float32 and out.tolist() == [2, 4, 6]


def test_expression_dims_in_inputs_are_checked():
    g = ag.Graph("expr")
    a = g.input("a", ("T", 2))
    b = g.input("b", ("T+1", 2))
    g.output("c", ag.concat([a, b], axis=0))
    exe = ag.compile(g)
    assert exe.run({"a": np.zeros((3, 2), np.float32), "b": np.zeros((4, 2), np.float32)})["c"].shape == (7, 2)
    with pytest.raises(FeedError, match="T\\+1=4"):
        exe.run({"a": np.zeros((3, 2), np.float32), "b": np.zeros((5, 2), np.float32)})


def test_outputs_do_not_alias_inputs():
    g = ag.Graph("alias")
    x = g.input("x", (2,))
    g.output("x", x)
    a = np.zeros(2, np.float32)
    out = ag.compile(g).run({"x": a})["x"]
    out[0] = 5
    assert a[0] == 0
