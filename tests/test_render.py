"""Diagrams: DOT content, nested scope clusters, folded scopes, and life without `dot`."""

from __future__ import annotations

import re
import shutil
import time
import warnings

import graphviz
import numpy as np
import pytest

import attngraph as ag
from attngraph.render import RenderWarning, render, to_dot

has_dot = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not has_dot, reason="graphviz's `dot` is not installed")


def _model(layers: int = 2) -> ag.Graph:
    g = ag.Graph("toy")
    x = g.input("x", ("B", 16, 64))
    g.const("table", np.arange(4, dtype=np.int64))
    h = x
    with g.scope("encoder"):
        for i in range(layers):
            with g.scope(f"layer{i}"):
                with g.scope("attn"):
                    wq = g.param("wq", (64, 64)) if i == 0 else g.param(f"wq{i}", (64, 64))
                    wk = g.param(f"wk{i}", (64, 64))
                    q, k = h @ wq, h @ wk
                    s = ag.softmax(q @ k.transpose(0, 2, 1) * 0.125, axis=-1)
                    h = h + s @ h
                with g.scope("mlp"):
                    w1 = g.param(f"w1_{i}", (64, 64))
                    h = h + ag.gelu(h @ w1)
    lo, hi = ag.split(h, (32, 32), axis=-1)
    g.output("y", ag.tanh(h))
    g.output("lo", lo)
    g.output("hi", hi)
    return g


def _vertices(dot: str) -> dict[str, str]:
    """DOT vertex id → its attribute text."""
    return dict(re.findall(r"^\s*([nso]\d+) \[(.*)\]$", dot, flags=re.M))


def test_dot_shows_ops_shapes_dtypes_and_source():
    dot = to_dot(_model(1))
    assert "digraph" in dot
    for op in ("matmul", "softmax", "gelu", "split", "tanh", "add"):
        assert f"<B>{op}</B>" in dot
    assert "<B>matmul</B><BR/>(B, 16, 64) float32" in dot
    assert "(B, 16, 32) float32" in dot          # the split's outputs, both listed
    assert "test_render.py:" in dot              # the user's line, small
    assert 'POINT-SIZE="8"' in dot


def test_show_source_off():
    dot = to_dot(_model(1), show_source=False)
    assert "test_render.py" not in dot


def test_kinds_of_node_look_different():
    g = _model(1)
    verts = _vertices(to_dot(g))
    by_label = {re.search(r"<B>([^<]*)</B>", attrs).group(1): attrs for attrs in verts.values()}
    shapes = {name: re.search(r"shape=(\w+)", by_label[name]).group(1) for name in ("x", "wq", "table", "y", "matmul")}
    assert len(set(shapes.values())) == 5, shapes
    # outputs are their own sink nodes, named by output name
    for name in ("y", "lo", "hi"):
        assert any(f"<B>{name}</B>" in a and "shape=house" in a for a in verts.values())
    assert re.search(r"n\d+ -> o\d+", to_dot(g))


def test_auto_scalar_consts_show_their_value():
    assert "<B>0.125  float32</B>" in to_dot(_model(1))


def test_title():
    assert "<B>My model</B>" in to_dot(_model(1), title="My model")
    assert "<B>toy</B>" in to_dot(_model(1))


def test_scopes_become_nested_clusters():
    dot = to_dot(_model(2))
    for name in ("encoder", "layer0", "layer1", "attn", "mlp"):
        assert f"label=<<B>{name}</B>>" in dot
    assert len(re.findall(r"subgraph cluster_", dot)) == 1 + 2 * 3
    # attn's cluster sits inside layer0's, inside encoder's
    enc = dot.index("<B>encoder</B>")
    l0 = dot.index("<B>layer0</B>")
    attn = dot.index("<B>attn</B>", l0)
    assert enc < l0 < attn
    depth = {m.group(1).count("\t") for m in re.finditer(r"^(\t+)subgraph cluster_", dot, flags=re.M)}
    assert depth == {1, 2, 3}


def test_max_depth_folds_deep_scopes_into_boxes():
    g = _model(2)
    dot = to_dot(g, max_depth=1)
    verts = _vertices(dot)
    boxes = {k: v for k, v in verts.items() if k.startswith("s")}
    assert len(boxes) == 2
    labels = sorted(re.search(r"<B>([^<]*)</B>", v).group(1) for v in boxes.values())
    assert labels == ["layer0", "layer1"]
    layer0 = next(v for v in boxes.values() if "<B>layer0</B>" in v)
    # attn: 4 matmuls, transpose, mul, softmax, add; mlp: matmul, gelu, add
    assert "11 ops: matmul×5, add×2, gelu, mul, softmax, ..." in layer0 and "..." in layer0
    assert "3 params" in layer0
    assert "softmax" not in "".join(a for k, a in verts.items() if k.startswith("n"))  # folded away
    assert "subgraph cluster_" in dot and "<B>attn</B>" not in dot
    # edges rerouted: layer0's box feeds layer1's box, labelled with the tensor's type
    s0, s1 = (k for k, v in boxes.items() if "layer0" in v), (k for k, v in boxes.items() if "layer1" in v)
    s0, s1 = next(s0), next(s1)
    assert re.search(rf"{s0} -> {s1} \[label=\"\(B, 16, 64\) float32\"\]", dot)
    assert not re.search(r"(s\d+) -> \1\b", dot)  # no self-loops
    assert len(re.findall(rf"{s0} -> {s1}\b", dot)) == 1  # one edge however many tensors cross


def test_max_depth_zero_folds_everything_scoped():
    dot = to_dot(_model(2), max_depth=0)
    assert "subgraph cluster_" not in dot
    boxes = [v for k, v in _vertices(dot).items() if k.startswith("s")]
    assert len(boxes) == 1 and "<B>encoder</B>" in boxes[0] and "22 ops" in boxes[0]
    assert "<B>x</B>" in dot and "<B>split</B>" in dot  # unscoped nodes stay


def test_max_depth_deeper_than_the_scopes_changes_nothing():
    g = _model(1)
    assert to_dot(g, max_depth=5) == to_dot(g)


def test_bad_max_depth():
    with pytest.raises(ValueError):
        to_dot(_model(1), max_depth=-1)


def test_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.svg"):
        render(_model(1), tmp_path / "x.jpeg")


@pytest.mark.parametrize("suffix", [".dot", ".gv"])
def test_dot_source_needs_no_dot(tmp_path, suffix, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = render(_model(1), tmp_path / f"g{suffix}")
    assert out == tmp_path / f"g{suffix}"
    assert out.read_text().startswith("digraph")


@needs_dot
def test_svg_is_written(tmp_path):
    g = _model(2)
    out = g.render(tmp_path / "g.svg", max_depth=2)
    assert out == tmp_path / "g.svg"
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "softmax" in svg and "layer1" in svg


@needs_dot
@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_png_and_pdf(tmp_path, suffix, magic):
    out = render(_model(1), tmp_path / f"g{suffix}", max_depth=1)
    assert out.read_bytes().startswith(magic)


def _assert_fell_back(out, tmp_path, caught, fmt="svg"):
    assert out == tmp_path / "g.dot"
    assert out.read_text().startswith("digraph")
    assert not (tmp_path / f"g.{fmt}").exists()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RenderWarning)]
    assert len(msgs) == 1
    msg = msgs[0]
    assert "apt-get install graphviz" in msg and "brew install graphviz" in msg
    assert str(tmp_path / "g.dot") in msg and f"dot -T{fmt}" in msg


def test_without_dot_on_path_writes_dot_and_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.warns(RenderWarning) as caught:
        out = render(_model(1), tmp_path / "g.svg")
    _assert_fell_back(out, tmp_path, caught)


def test_when_which_finds_no_dot(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(RenderWarning) as caught:
        out = render(_model(1), tmp_path / "g.png")
    _assert_fell_back(out, tmp_path, caught, "png")


def test_when_graphviz_cannot_run_dot(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/dot")

    def missing(self, *args, **kwargs):
        raise graphviz.ExecutableNotFound(("dot", "-Tsvg"))

    monkeypatch.setattr(graphviz.Digraph, "pipe", missing)
    with pytest.warns(RenderWarning) as caught:
        out = render(_model(1), tmp_path / "g.svg")
    _assert_fell_back(out, tmp_path, caught)


def test_when_dot_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/dot")

    def broken(self, *args, **kwargs):
        raise graphviz.CalledProcessError(1, ["dot"], output=b"", stderr=b"Error: syntax error in line 3")

    monkeypatch.setattr(graphviz.Digraph, "pipe", broken)
    with pytest.warns(RenderWarning, match="syntax error in line 3"):
        out = render(_model(1), tmp_path / "g.svg")
    assert out.suffix == ".dot"


def test_names_that_need_escaping():
    g = ag.Graph('odd "name" <&>')
    x = g.input("x<1>", (2,))
    with g.scope('a "b" & <c>'):
        y = ag.exp(x)
    g.output("out & <more>", y)
    dot = to_dot(g, title="a < b")
    assert "x&lt;1&gt;" in dot and "out &amp; &lt;more&gt;" in dot and "a &lt; b" in dot


@needs_dot
def test_names_that_need_escaping_render(tmp_path):
    g = ag.Graph('odd "name" <&>')
    x = g.input("x<1>", (2,))
    with g.scope('a "b" & <c>'):
        y = ag.exp(x)
    g.output("out & <more>", y)
    assert "x&lt;1&gt;" in render(g, tmp_path / "g.svg").read_text()


def _large(n_layers=6, per_layer=200) -> ag.Graph:
    g = ag.Graph("large")
    h = g.input("x", ("B", 8))
    w = g.param("w", (8,))
    with g.scope("encoder"):
        for layer in range(n_layers):
            with g.scope(f"layer{layer}"):
                for k in range(per_layer // 2):
                    with g.scope("attn" if k % 2 else "mlp"):
                        h = ag.tanh(h * w)
    g.output("y", h)
    return g


def test_thousands_of_nodes_build_quickly():
    g = _large()
    assert len(g.nodes) > 1200
    start = time.perf_counter()
    dot = to_dot(g)
    folded = to_dot(g, max_depth=1)
    assert time.perf_counter() - start < 3.0
    assert dot.count("<B>tanh</B>") == 600
    assert len([k for k in _vertices(folded) if k.startswith("s")]) == 6


@needs_dot
def test_thousands_of_nodes_render_in_reasonable_time(tmp_path):
    g = _large()
    start = time.perf_counter()
    render(g, tmp_path / "full.svg")
    render(g, tmp_path / "folded.svg", max_depth=2)
    assert time.perf_counter() - start < 20.0


def test_shared_weights_are_drawn_beside_each_reader():
    g = ag.Graph("shared")
    h = g.input("x", (8,))
    w = g.param("w", (8,))
    for i in range(3):
        with g.scope(f"layer{i}"):
            h = ag.tanh(h * w)
    g.output("y", h)
    dot = to_dot(g)
    copies = re.findall(r"^\s*(n1_\d+) \[label=<<B>w</B>", dot, flags=re.M)
    assert len(copies) == 3
    assert not re.search(r"^\s*n1 \[", dot, flags=re.M)  # the weight itself is not drawn apart from its copies
    for i, copy in enumerate(copies):                      # each copy sits in its reader's cluster
        cluster = dot[dot.index(f"<B>layer{i}</B>"):]
        assert copy in cluster.split("}")[0]


def test_an_op_read_far_away_gets_references():
    g = ag.Graph("fanout")
    x = g.input("x", (8,))
    m = ag.tanh(x)
    h = x
    for i in range(8):
        with g.scope(f"layer{i}"):
            h = ag.exp(h) * m
    g.output("y", h)
    dot = to_dot(g)
    ref = r"^\s*(n\d+_to_n\d+) \[label=<<FONT[^>]*>from tanh \(test_render\.py:\d+\)</FONT>>"
    refs = re.findall(ref, dot, flags=re.M)
    assert len(refs) == 8
    assert all(re.search(rf"{r} -> n\d+ \[style=dashed\]", dot) for r in refs)


def test_wide_fanout_renders_quickly(tmp_path):
    """One weight read by hundreds of ops: drawn naively, dot takes minutes."""
    if not has_dot:
        pytest.skip("graphviz's `dot` is not installed")
    g = ag.Graph("fan")
    h = g.input("x", (8,))
    w = g.param("w", (8,))
    m = ag.sigmoid(h)
    for i in range(200):
        with g.scope(f"block{i // 50}"):
            h = ag.tanh(h * w) + m
    g.output("y", h)
    start = time.perf_counter()
    render(g, tmp_path / "fan.svg")
    assert time.perf_counter() - start < 10.0
