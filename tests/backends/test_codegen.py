"""Generated CPU kernels: readable files named by the hash of their code, cached across processes,
runnable un-jitted, and equal to the fused ops' references (which come from the registry)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import attngraph as ag
from attngraph.backends.numba_cpu import codegen, kernel_cache
from attngraph.dsl import apply
from attngraph.ir import DType, get_op

REPO = Path(__file__).resolve().parents[2]
F32, F64, I64, BOOL = DType.float32, DType.float64, DType.int64, DType.bool


@pytest.fixture(autouse=True, scope="module")
def shared_cache(tmp_path_factory):
    """One kernel cache for this module's tests (and the other fusion tests of the session)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attngraph-kernels"))
        yield


def node_of(op_name, inputs, attrs):
    g = ag.Graph(op_name)
    handles = [g.input(f"in{k}", a.shape, a.dtype) for k, a in enumerate(inputs)]
    out = apply(op_name, handles, graph=g, **attrs)
    return (out[0] if isinstance(out, tuple) else out).node


def run_cpu(node, inputs):
    outs = tuple(np.empty(t.shape, t.dtype.numpy) for t in node.types)
    get_op(node.op).cpu(node)(tuple(inputs), outs, {})
    return outs


FUSED_EXAMPLES = [pytest.param(name, ex, id=f"{name}-{ex.label}")
                  for name in ("fused_elementwise", "matmul_epilogue", "residual_layernorm")
                  for ex in get_op(name).examples(np.random.default_rng(0))]


@pytest.mark.parametrize("name, example", FUSED_EXAMPLES)
def test_kernels_match_the_fused_ops_references(name, example):
    node = node_of(name, example.inputs, example.attrs)
    got = run_cpu(node, example.inputs)
    want = get_op(name).reference(*example.inputs, **node.attrs)
    want = want if isinstance(want, tuple) else (want,)
    for g_, w in zip(got, want):
        assert g_.dtype == w.dtype
        tol = 1e-6 if g_.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(g_, w, rtol=10 * tol, atol=tol)


# -- the files --------------------------------------------------------------------------------

def test_the_file_is_named_by_its_code_and_has_a_readable_header(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path))
    g = ag.Graph("gelu")
    x = g.input("x", ("B", 4))
    b = g.param("b", (4,), init="normal")
    h = x + b
    g.output("y", 0.5 * h * (1 + ag.erf(h / math.sqrt(2))))        # the fused line
    exe = ag.compile(g, backend="cpu")
    (node,) = [n for n in exe.graph.nodes if n.op == "fused_elementwise"]
    files = sorted(tmp_path.glob("*.py"))
    assert len(files) == 1
    text = files[0].read_text()
    header, code = text.split("\n\n\n", 1)[0], text[text.index("import math"):]
    assert files[0].name == kernel_cache.source_digest(code) + ".py"
    assert code == codegen.elementwise_source(node.attrs["expr"], [F32, F32], F32, kinds=("full", "row"))
    assert "# ops: add, mul, mul, erf, add, mul" in header
    assert "# types: in0 float32 full, in1 float32 row -> out float32" in header
    line = g.outputs["y"].node.source.line
    assert f"test_codegen.py:{line}" in header and "ag.erf(h / math.sqrt(2))" in header
    assert f"test_codegen.py:{line - 1}   h = x + b" in header
    assert "for i in prange(rows):" in code and "math.erf(" in code and "# erf" in code
    assert "x0 = in0[i, j]" in code and "x1 = in1[j]" in code        # the bias is read as one row
    feeds = {"x": np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)}
    np.testing.assert_allclose(exe.run(feeds)["y"], ag.compile(g).run(feeds)["y"], rtol=1e-6, atol=1e-7)


def test_load_kernel_writes_once_and_the_header_is_not_hashed(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path))
    source = "def kernel(x):\n    return x + 1\n"
    f = kernel_cache.load_kernel(source, "kernel", header="# first\n")
    assert f(1) == 2
    assert kernel_cache.load_kernel(source, "kernel", header="# second\n") is f
    (path,) = tmp_path.glob("*.py")
    assert path.name == kernel_cache.source_digest(source) + ".py"
    assert path.read_text() == "# first\n" + source
    with pytest.raises(AttributeError, match="defines no 'nothing'"):
        kernel_cache.load_kernel(source, "nothing")


CHILD = textwrap.dedent("""
    import json, math, sys, time
    t0 = time.perf_counter()
    import numpy as np
    import attngraph as ag
    from attngraph.ir import get_op
    g = ag.Graph("child")
    x = g.input("x", ("B", 6))
    m = g.input("m", ("B", 1), "bool")
    h = x * 1.5 - 0.25
    g.output("y", ag.where(m, 0.5 * h * (1 + ag.erf(h / math.sqrt(2))), ag.tanh(h)))
    g.output("k", (x > 0) & (x < 1))
    t1 = time.perf_counter()
    exe = ag.compile(g, backend="cpu")
    t2 = time.perf_counter()
    feeds = {"x": np.linspace(-2, 2, 24, dtype=np.float32).reshape(4, 6),
             "m": np.array([[True], [False], [True], [False]])}
    out = exe.run(feeds)
    stats = []
    for node in exe.graph.nodes:
        if node.op == "fused_elementwise":
            for fn in get_op(node.op).cpu(node).variants.values():
                s = getattr(fn, "stats", None)
                stats.append([s.cache_hits.total() if s else -1, s.cache_misses.total() if s else -1])
    np.save(sys.argv[1], out["y"])
    print(json.dumps({"build_s": t2 - t1, "total_s": time.perf_counter() - t0, "stats": stats,
                      "k": out["k"].tolist()}))
""")


def _child(tmp_path, cache, tag, **env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    full_env = dict(os.environ, ATTNGRAPH_CACHE_DIR=str(cache), **env)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / f"{tag}.npy")], capture_output=True,
                         text=True, cwd=REPO, env=full_env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), np.load(tmp_path / f"{tag}.npy")


def _files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def test_a_second_process_only_loads_and_nojit_gives_the_same_numbers(tmp_path):
    cache = tmp_path / "cache"
    cold, y_cold = _child(tmp_path, cache, "cold")
    files = _files(cache)
    assert sum(1 for f in files if f.endswith(".py")) == 2                 # two regions: y and k
    assert any(f.endswith(".nbi") for f in files), "numba saved its cache index next to the kernels"
    assert all(miss >= 1 for _, miss in cold["stats"])

    warm, y_warm = _child(tmp_path, cache, "warm")
    assert _files(cache) == files, "the second process wrote nothing new"
    assert all(hits >= 1 and miss == 0 for hits, miss in warm["stats"]), warm["stats"]
    np.testing.assert_array_equal(y_warm, y_cold)
    print(f"kernel build: cold {cold['build_s']:.2f}s, warm {warm['build_s']:.2f}s")

    plain, y_plain = _child(tmp_path, cache, "plain", NUMBA_DISABLE_JIT="1")
    np.testing.assert_allclose(y_plain, y_cold, rtol=1e-6, atol=1e-7)
    assert plain["k"] == cold["k"]


# -- broadcasting and layouts -------------------------------------------------------------------

class _NoNumba:
    @staticmethod
    def njit(*args, **kwargs):
        return lambda fn: fn


def plain_python(expr, in_dtypes, out_dtype):
    """A selector of generated kernels executed as plain Python (what NUMBA_DISABLE_JIT=1 runs)."""
    def select(kinds):
        source = codegen.elementwise_source(expr, in_dtypes, out_dtype, kinds)
        source = source.replace("import numba\n", "").replace("from numba import prange\n", "")
        namespace = {"numba": _NoNumba, "prange": range}
        exec(compile(source, "<generated>", "exec"), namespace)  # noqa: S102
        return namespace["kernel"]
    return select


def test_broadcasting_strides_and_shapes(rng):
    expr = ("where", (), ("in", 2), ("mul", (), ("in", 0), ("in", 1)), ("sub", (), ("in", 0), ("in", 1)))
    dtypes = [F32, F32, BOOL]
    kernel = codegen.elementwise_kernel(expr, dtypes, F32)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    b = lambda *s: rng.random(s) > 0.5  # noqa: E731
    n = 5 * codegen.CHUNK + 3
    cases = [  # (shape, inputs, the kinds they are read as, compile them?)
        ((2, 3, 4), (f(2, 3, 4), f(4), b(2, 1, 4)), ("full", "row", "row"), True),      # bias; mask: leading loop
        ((2, 3, 4), (f(1, 3, 1), f(2, 1, 4), b()), ("col", "row", "scalar"), True),      # 0-d mask
        ((4, 3), (f(3, 4).T, f(4, 3)[:, ::-1], b(4, 3)), ("strided", "strided", "full"), True),  # transposed
        ((n,), (f(n), f(1), b(n)), ("full", "scalar", "full"), True),           # one long axis: CHUNK rows + tail
        ((2, 3, 4, 5), (f(2, 1, 4, 1), f(3, 1, 5), b(2, 3, 1, 5)), ("col", "row", "row"), False),
        ((2, 8 * codegen.CHUNK), (f(2, 8 * codegen.CHUNK), f(1), b(1)), ("full", "scalar", "scalar"), False),
        ((6, 7), (f(12, 14)[::2, ::2], f(7), b(6, 1)), ("strided", "row", "col"), False),   # strided slices
        ((), (f(), f(), b()), ("scalar", "scalar", "scalar"), False),
        ((0, 3), (f(0, 3), f(3), b(3)), None, False),                         # empty: no call at all
    ]
    plain = plain_python(expr, dtypes, F32)
    for shape, inputs, kinds, compiled in cases:
        want = get_op("fused_elementwise").reference(*inputs, expr=expr)
        seen = []
        out = np.full(shape, np.nan, np.float32)
        codegen.run_elementwise(lambda k: seen.append(k) or plain(k), out, inputs)
        assert set(seen) == ({kinds} if kinds else set()), shape
        np.testing.assert_array_equal(out, want, err_msg=str(shape))
        if compiled:
            out = np.full(shape, np.nan, np.float32)
            kernel(inputs, (out,), {})
            np.testing.assert_array_equal(out, want, err_msg=str(shape))
    assert set(kernel.variants) == {kinds for _, _, kinds, compiled in cases if compiled}


def test_int_and_bool_kernels(rng):
    expr = ("logical_and", (), ("greater", (), ("in", 0), ("const", 0, "int64")),
            ("logical_not", (), ("equal", (), ("mul", (), ("in", 0), ("in", 1)), ("const", 6, "int64"))))
    kernel = codegen.elementwise_kernel(expr, [I64, I64], BOOL)
    a, c = rng.integers(-4, 5, (3, 5)), rng.integers(-3, 4, (5,))
    out = np.empty((3, 5), bool)
    kernel((a, c), (out,), {})
    np.testing.assert_array_equal(out, (a > 0) & ~(a * c == 6))

    source = codegen.elementwise_source(expr, [I64, I64], BOOL)
    assert "bool((x0 > np.int64(0)))" in source and "boolean[:, ::1]" in source


def test_node_expression_of_a_single_op():
    node = node_of("gelu", (np.zeros(3, np.float32),), {"approximate": "tanh"})
    assert codegen.node_expression(node) == ("gelu", (("approximate", "tanh"),), ("in", 0))
