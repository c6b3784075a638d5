"""Shape inference against numpy, with hypothesis: broadcasting, reshape, transpose; symbolic dims."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attngraph as ag
from attngraph import errors
from attngraph.ir.shapes import broadcast_shapes, dim_div, dim_mul, eval_dim, normalize_dim

small_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)


def _numpy_broadcast(a, b):
    try:
        return np.broadcast_shapes(a, b)
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(small_shapes, small_shapes)
def test_broadcast_matches_numpy(a, b):
    want = _numpy_broadcast(a, b)
    g = ag.Graph("b")
    x, y = g.input("x", a), g.input("y", b)
    if want is None:
        with pytest.raises(errors.ShapeError):
            x + y
        return
    z = x + y
    assert z.shape == want
    g.output("z", z)
    out = ag.compile(g).run({"x": np.ones(a, np.float32), "y": np.ones(b, np.float32)})["z"]
    assert out.shape == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_reshape_and_transpose_match_numpy(dims, data):
    shape = tuple(dims)
    size = int(np.prod(shape))
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    first = data.draw(st.sampled_from(divisors))
    g = ag.Graph("r")
    x = g.input("x", shape)
    t = x.transpose(perm)
    r = t.reshape(first, -1)
    a = np.arange(size, dtype=np.float32).reshape(shape)
    want = a.transpose(perm).reshape(first, -1)
    assert t.shape == a.transpose(perm).shape and r.shape == want.shape
    g.output("r", r)
    np.testing.assert_array_equal(ag.compile(g).run({"x": a})["r"], want)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5))
def test_symbolic_dims_evaluate_like_their_values(b, t, k):
    bindings = {"B": b, "T": t}
    assert eval_dim(dim_mul("B", dim_mul("T", k)), bindings) == b * t * k
    assert eval_dim(normalize_dim("T+1"), bindings) == t + 1
    assert dim_div(dim_mul("B*T", k), "T") == normalize_dim(f"{k}*B")


def test_symbolic_reshape_round_trip():
    g = ag.Graph("s")
    x = g.input("x", ("B", "T", 64))
    flat = x.reshape(-1, 64)
    assert flat.shape == ("B*T", 64)
    heads = x.reshape("B", "T", 4, -1).transpose(0, 2, 1, 3)
    assert heads.shape == ("B", 4, "T", 16)
    back = flat.reshape("B", "T", 64)
    assert back.shape == x.shape
    with pytest.raises(errors.ShapeError, match="symbolic sizes must match"):
        flat.reshape("N", 64)


def test_symbolic_broadcast_rules():
    assert broadcast_shapes(("B", 1, 4), ("T", 4)) == ("B", "T", 4)
    with pytest.raises(errors.ShapeError):
        broadcast_shapes(("B", 4), ("T", 4))
    with pytest.raises(errors.ShapeError):
        broadcast_shapes(("B",), (3,))
