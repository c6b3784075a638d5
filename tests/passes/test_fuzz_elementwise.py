"""Fuzzing elementwise fusion: random small graphs of the registry's elementwise ops, with random
broadcasting, dtypes, scalars, bools and ints, give the same numbers fused and unfused.

- numpy backend, optimize on vs off (every op, NaN and inf included);
- the generated kernels run as plain Python (numba stubbed out) inside the numpy interpreter;
- the cpu backend, compiled for real, on a few graphs (each new region costs a compilation).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

import attngraph as ag
from attngraph.backends.numba_cpu import codegen
from attngraph.errors import AttngraphError
from attngraph.ir import SOURCE_OPS, get_op
from attngraph.passes import random_feeds

TOTAL_UNARY = ["neg", "abs", "tanh", "erf", "sigmoid", "sin", "cos", "relu", "gelu", "gelu_tanh"]
PARTIAL_UNARY = ["exp", "log", "sqrt", "rsqrt"]            # NaN / inf / overflow on some inputs
TOTAL_BINARY = ["add", "sub", "mul", "maximum", "minimum"]
PARTIAL_BINARY = ["div", "pow"]
COMPARE = ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]
SCALARS = [0.5, -1.0, 2.0, 3, 0]
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True, scope="module")
def kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attngraph-kernels"))
        yield


def _unary(name, x):
    if name == "gelu_tanh":
        return ag.gelu(x, approximate="tanh")
    return getattr(ag, name)(x)


@st.composite
def elementwise_graphs(draw, partial: bool = True):
    rank = draw(st.integers(0, 3))
    full = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    dtype = draw(st.sampled_from(["float32", "float64"]))

    def shape():
        keep = draw(st.integers(0, rank))
        return tuple(d if draw(st.booleans()) else 1 for d in full[rank - keep:])

    g = ag.Graph("fuzz")
    floats = [g.input(f"x{i}", shape(), dtype) for i in range(draw(st.integers(1, 3)))]
    bools = [g.input("m", shape(), "bool")] if draw(st.booleans()) else []
    ints = [g.input("n", shape(), "int64")] if draw(st.booleans()) else []
    unary = TOTAL_UNARY + (PARTIAL_UNARY if partial else [])
    binary = TOTAL_BINARY + (PARTIAL_BINARY if partial else [])
    for _ in range(draw(st.integers(2, 10))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "scalar", "compare", "logic", "where", "mask",
                                     "cast", "int"]))
        f = lambda: floats[-1] if draw(st.booleans()) else draw(st.sampled_from(floats))  # noqa: E731  (chains)
        try:
            if kind == "unary":
                floats.append(_unary(draw(st.sampled_from(unary)), f()))
            elif kind == "binary":
                floats.append(getattr(ag, draw(st.sampled_from(binary)))(f(), f()))
            elif kind == "scalar":                              # weak scalars, on either side
                op, c = draw(st.sampled_from(TOTAL_BINARY)), draw(st.sampled_from(SCALARS))
                floats.append(getattr(ag, op)(f(), c) if draw(st.booleans()) else getattr(ag, op)(c, f()))
            elif kind == "compare":
                rhs = f() if draw(st.booleans()) else draw(st.sampled_from(SCALARS))
                bools.append(getattr(ag, draw(st.sampled_from(COMPARE)))(f(), rhs))
            elif kind == "logic" and bools:
                a, b = draw(st.sampled_from(bools)), draw(st.sampled_from(bools))
                bools.append(draw(st.sampled_from([~a, a & b, a | b])))
            elif kind == "where" and bools:
                other = f() if draw(st.booleans()) else draw(st.sampled_from(SCALARS))
                floats.append(ag.where(draw(st.sampled_from(bools)), f(), other))
            elif kind == "mask" and bools:
                floats.append(ag.mask(f(), draw(st.sampled_from(bools)), value=draw(st.sampled_from([0.0, -1e9]))))
            elif kind == "cast":
                choice = draw(st.sampled_from(["float", "bool", "int"]))
                if choice == "float":
                    floats.append(f().astype("float64" if dtype == "float32" else "float32"))
                elif choice == "bool" and bools:
                    floats.append(draw(st.sampled_from(bools)).astype(dtype))
                elif choice == "int":
                    ints.append((f() * 3.0).astype("int64"))
            elif kind == "int" and ints:
                n = draw(st.sampled_from(ints))
                op = draw(st.sampled_from(["add", "sub", "mul", "maximum", "minimum", "neg", "abs", "cmp", "float"]))
                if op in ("neg", "abs"):
                    ints.append(getattr(ag, op)(n))
                elif op == "cmp":
                    bools.append(n > draw(st.sampled_from(ints + [1])))
                elif op == "float":
                    floats.append(n.astype(dtype))
                else:
                    ints.append(getattr(ag, op)(n, draw(st.sampled_from(ints + [2, -1]))))
        except AttngraphError:
            continue  # e.g. a mask that would enlarge its tensor: not a graph we can build
    g.output("y", floats[-1])
    for name, pool in (("b", bools), ("i", ints)):        # the last bool and int results too
        if pool and pool[-1].node.op not in SOURCE_OPS:
            g.output(name, pool[-1])
    extra = [t for t in floats[:-1] + bools[:-1] + ints[:-1] if t.node.op not in SOURCE_OPS]
    for i, t in enumerate(draw(st.lists(st.sampled_from(extra), max_size=2, unique_by=id)) if extra else []):
        g.output(f"extra{i}", t)
    return g


def _compare(got, want, graph, rtol, atol):
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, equal_nan=True,
                                   err_msg=f"output {k}\n{graph.summary()}")


@settings(max_examples=300, **SETTINGS)
@given(elementwise_graphs(), st.integers(0, 1000))
def test_fused_equals_unfused_on_the_numpy_backend(g, seed):
    feeds = random_feeds(g, seed=seed)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    exe = ag.compile(g, backend="numpy", optimize=True)
    _compare(exe.run(feeds), want, exe.graph, rtol=1e-6, atol=1e-6)


# -- the generated code, run as plain Python --------------------------------------------------

class _NoNumba:
    @staticmethod
    def njit(*args, **kwargs):
        return lambda fn: fn


_plain_kernels: dict = {}


def _plain_kernel(node, kinds):
    """The node's generated kernel, executed as plain Python (what NUMBA_DISABLE_JIT=1 runs)."""
    key = (node.attrs["expr"], tuple(v.type.dtype for v in node.inputs), node.type.dtype, kinds)
    if key not in _plain_kernels:
        source = codegen.elementwise_source(*key)
        source = source.replace("import numba\n", "").replace("from numba import prange\n", "")
        namespace = {"numba": _NoNumba, "prange": range}
        exec(compile(source, "<generated>", "exec"), namespace)  # noqa: S102
        _plain_kernels[key] = namespace["kernel"]
    return _plain_kernels[key]


def _interpret(graph, feeds):
    """The numpy interpreter, with every fused region run by its generated (plain Python) kernel."""
    env = {}
    for node in graph.nodes:
        if node.op == "input":
            out = (feeds[node.name],)
        elif node.op in ("param", "const"):
            out = (graph.values[node.name],)
        elif node.op == "fused_elementwise":
            arr = np.empty(node.type.shape, node.type.dtype.numpy)
            codegen.run_elementwise(lambda kinds, node=node: _plain_kernel(node, kinds), arr,
                                    [env[v.node.id][v.index] for v in node.inputs])
            out = (arr,)
        else:
            res = get_op(node.op).reference(*(env[v.node.id][v.index] for v in node.inputs), **node.attrs)
            out = tuple(res) if isinstance(res, (tuple, list)) else (res,)
        env[node.id] = out
    return {k: np.asarray(env[v.node.id][v.index]) for k, v in graph.outputs.items()}


@settings(max_examples=100, **SETTINGS)
@given(elementwise_graphs(partial=False), st.integers(0, 1000))
def test_generated_code_as_plain_python_equals_numpy(g, seed):
    feeds = random_feeds(g, seed=seed)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    optimized = ag.compile(g, backend="numpy", optimize=True).graph
    try:
        with np.errstate(all="ignore"):
            got = _interpret(optimized, feeds)
    except (OverflowError, ValueError, ZeroDivisionError):
        reject()  # Python's math raises where numba (error_model="numpy") gives inf/nan
    _compare(got, want, optimized, rtol=2e-5, atol=1e-5)


@settings(max_examples=4, **SETTINGS)
@given(elementwise_graphs(partial=False), st.integers(0, 1000))
def test_cpu_backend_equals_numpy(g, seed):
    feeds = random_feeds(g, seed=seed)
    want = ag.compile(g, backend="numpy", optimize=False).run(feeds)
    exe = ag.compile(g, backend="cpu")
    assume("fused_elementwise" in exe.graph.op_counts())
    _compare(exe.run(feeds), want, exe.graph, rtol=2e-5, atol=1e-5)
