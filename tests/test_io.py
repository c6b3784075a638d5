"""Saving and loading graphs (JSON + safetensors) and plain weight files."""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest

import attngraph as ag
from attngraph import ir
from attngraph.errors import SerializationError
from attngraph.io import load_graph, load_safetensors, save_graph, save_safetensors, weights_path
from attngraph.ir.opdef import _REGISTRY

_ALL_DTYPES = (np.float32, np.float64, np.int32, np.int64, np.bool_)


@pytest.fixture
def attr_op():
    """A throwaway op that takes any attrs (removed again, so registry-wide tests never see it)."""
    op = ir.register(ir.OpDef("_io_test_any_attrs", infer=lambda x, **attrs: x,
                              reference=lambda x, **attrs: x, family="test"))
    yield op
    del _REGISTRY[op.name]


def _bits(a: np.ndarray) -> bytes:
    return a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()


def _big_graph() -> ag.Graph:
    """Every const dtype, params, symbolic dims, a multi-output node, DType and -inf attrs, nested scopes."""
    rng = np.random.default_rng(1)
    g = ag.Graph("everything", seed=3)
    x = g.input("x", ("B", "T", 8))
    ids = g.input("ids", ("B",), "int64")
    w = g.param("w", (8, 8))
    b = g.param("b", (8,), init="zeros")
    w64 = g.param("w64", (8,), dtype="float64")
    consts = {
        "c_f32": rng.standard_normal((8,)).astype(np.float32),
        "c_f64": np.array([np.nan, -np.inf, np.inf, -0.0, 1e-308, 5e-324, 1.0, -2.5]),
        "c_i32": np.array([[np.iinfo(np.int32).min, 0], [7, np.iinfo(np.int32).max]], dtype=np.int32),
        "c_i64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0], dtype=np.int64),
        "c_bool": rng.random((1, 8)) > 0.5,
        "c_empty": np.zeros((0, 3), dtype=np.float32),
    }
    c = {name: g.const(name, arr) for name, arr in consts.items()}
    with g.scope("encoder"):
        with g.scope("layer0"):
            with g.scope("attn"):
                h = ag.matmul(x, w) + b
                h = ag.mask(h, c["c_bool"])                    # value=-inf attr
                s = ag.softmax(h, axis=-1)
            lo, hi = ag.split(s, (3, 5), axis=-1)               # a node with two outputs
            h64 = s.astype("float64") * w64 + c["c_f64"]        # cast with a DType attr
        y = ag.where(c["c_bool"], ag.tanh(h + c["c_f32"]), h)
    k = ids.astype("int32") + c["c_i32"].sum()
    g.output("y", y)
    g.output("lo", lo)
    g.output("hi", hi)
    g.output("h64", h64)
    g.output("k", k)
    g.output("n", c["c_i64"].astype("float32"))
    return g


def _round_trip(g, tmp_path, name="g.json"):
    path = tmp_path / name
    save_graph(g, path)
    return load_graph(path)


def test_round_trip_is_structurally_equal_and_bit_exact(tmp_path):
    g = _big_graph()
    g2 = _round_trip(g, tmp_path)
    assert isinstance(g2, ag.Graph)
    assert ir.structural_diff(g, g2) is None
    assert g2.name == g.name and g2.seed == g.seed
    assert list(g2.inputs) == list(g.inputs)
    assert list(g2.params) == list(g.params)
    assert list(g2.consts) == list(g.consts)
    assert list(g2.outputs) == list(g.outputs)
    assert set(g2.values) == set(g.values)
    for name, arr in g.values.items():
        assert _bits(g2.values[name]) == _bits(arr), name
        assert g2.values[name].flags.writeable
    ir.verify(g2)


def test_round_trip_keeps_node_details(tmp_path):
    g = _big_graph()
    g2 = _round_trip(g, tmp_path)
    assert len(g2.nodes) == len(g.nodes)
    for a, b in zip(g.nodes, g2.nodes):
        assert (a.op, a.name, a.scope, a.types) == (b.op, b.name, b.scope, b.types)
        assert a.source == b.source
        assert [(v.index) for v in a.inputs] == [v.index for v in b.inputs]
    scopes = {n.scope for n in g2.nodes}
    assert ("encoder", "layer0", "attn") in scopes
    assert g2.nodes[0].type.shape == ("B", "T", 8)
    assert g2.outputs["hi"].index == 1


def test_attrs_come_back_with_their_python_types(tmp_path):
    g = _big_graph()
    g2 = _round_trip(g, tmp_path)
    cast = next(n for n in g2.nodes if n.op == "cast" and n.type.dtype == ag.float64)
    assert type(cast.attrs["dtype"]) is ag.DType and cast.attrs["dtype"] is ag.float64
    mask = next(n for n in g2.nodes if n.op == "mask")
    assert mask.attrs["value"] == -math.inf and isinstance(mask.attrs["value"], float)
    split = next(n for n in g2.nodes if n.op == "split")
    assert split.attrs["sizes"] == (3, 5) and type(split.attrs["sizes"]) is tuple


def test_every_kind_of_attr_value(tmp_path, attr_op):
    from attngraph.dsl import apply

    g = ag.Graph("attrs")
    x = g.input("x", (2,))
    attrs = dict(dtype=ag.int32, lo=-math.inf, hi=math.inf, nothing=None, flag=True, zero=0, one_f=1.0,
                 big=2 ** 62, text="tanh", axes=(0, -1), nested=((1, 2), (None, "a", ag.bool_), ()),
                 table={"k": (1, 2), "m": {"deep": -math.inf}}, list_in=[1, [2, 3]], nan=math.nan)
    y = apply(attr_op.name, [x], **attrs)
    g.output("y", y)
    g2 = _round_trip(g, tmp_path)
    got = g2.output_tensor("y").node.attrs
    want = y.node.attrs
    assert set(got) == set(want)
    for key in want:
        if key == "nan":
            assert isinstance(got[key], float) and math.isnan(got[key])
            continue
        assert got[key] == want[key], key
        assert type(got[key]) is type(want[key]), key
    assert type(got["one_f"]) is float and type(got["zero"]) is int and type(got["flag"]) is bool
    assert got["list_in"] == (1, (2, 3))
    assert got["nested"][1][2] is ag.bool_
    assert isinstance(got["table"], ir.Attrs) and got["table"]["m"]["deep"] == -math.inf


def test_json_is_strict_and_readable(tmp_path):
    g = _big_graph()
    path = tmp_path / "g.json"
    save_graph(g, path)
    text = path.read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["format"] == "attngraph.graph" and doc["version"] == 1
    assert doc["name"] == "everything"
    assert doc["inputs"] == ["x", "ids"] and "w" in doc["params"] and "c_bool" in doc["consts"]
    node = doc["nodes"][0]
    assert {"id", "op", "inputs", "attrs", "types", "name", "source"} <= set(node)
    assert node["types"] == [{"dtype": "float32", "shape": ["B", "T", 8]}]
    cast = next(n for n in doc["nodes"] if n["op"] == "cast")
    assert cast["attrs"]["dtype"] in ({"__dtype__": "float64"}, {"__dtype__": "int32"}, {"__dtype__": "float32"})
    assert any(n.get("scope") == ["encoder", "layer0", "attn"] for n in doc["nodes"])


def test_weights_sit_next_to_the_json(tmp_path):
    assert weights_path(tmp_path / "model.json") == tmp_path / "model.safetensors"
    assert weights_path("a/b.v2.json").name == "b.v2.safetensors"
    g = _big_graph()
    g.save(tmp_path / "model.json")  # Graph.save goes through io.save_graph
    assert (tmp_path / "model.safetensors").exists()
    weights = load_safetensors(tmp_path / "model.safetensors")
    assert set(weights) == set(g.values)


def test_graph_save_overwrites_atomically(tmp_path):
    g = _big_graph()
    g.save(tmp_path / "m.json")
    g.save(tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_scalar_consts_round_trip(tmp_path):
    g = ag.Graph("scalars")
    x = g.input("x", (3,))
    y = x * 0.5 + g.const("k", np.float64(2.0)).astype("float32")
    g.output("y", y)
    g2 = _round_trip(g, tmp_path)
    assert ir.structural_diff(g, g2) is None


def test_scalar_consts_are_saved_in_their_declared_shape(tmp_path):
    g = ag.Graph("scalars")
    x = g.input("x", (3,))
    g.output("y", x * 0.5)
    g2 = _round_trip(g, tmp_path)
    (name,) = g2.consts
    assert g2.values[name].shape == () and g2.values[name] == np.float32(0.5)


def test_optimized_graph_round_trips(tmp_path):
    """Fused ops carry nested-tuple attrs (an elementwise expression, a scale): they survive too."""
    g = ag.Graph("enc")
    x = g.input("x", ("B", "T", 16))
    with g.scope("layer0"):
        q, k, v = (x @ g.param(f"w{n}", (16, 16)) for n in "qkv")
        a = ag.softmax(q @ k.transpose(0, 2, 1) / 4.0, axis=-1) @ v
        h = ag.layernorm(x + a, g.param("gamma", (16,), init="ones"), None)
        h = h + ag.gelu(h @ g.param("w1", (16, 16)) + 1.0) * 0.5
    g.output("y", h)
    opt = ag.compile(g, backend="numpy", optimize=True).graph
    assert {"attention", "matmul_epilogue"} & set(opt.op_counts())
    opt2 = _round_trip(opt, tmp_path)
    assert ir.structural_diff(opt, opt2) is None
    assert opt2.op_counts() == opt.op_counts()


def test_loading_runs_like_the_original(tmp_path):
    g = _big_graph()
    g2 = _round_trip(g, tmp_path)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32), "ids": np.array([1, 2], dtype=np.int64)}
    a = ag.compile(g).run(feeds)
    b = ag.compile(g2).run(feeds)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# -- errors ------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    g = ag.Graph("small")
    x = g.input("x", ("B", 4))
    w = g.param("w", (4, 4))
    g.const("c", np.arange(4, dtype=np.int64))
    g.output("y", ag.tanh(x @ w))
    path = tmp_path / "small.json"
    save_graph(g, path)
    return path


def _edit(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_missing_file(tmp_path):
    with pytest.raises(SerializationError, match="does not exist"):
        load_graph(tmp_path / "nope.json")


def test_missing_weights_file(saved):
    weights_path(saved).unlink()
    with pytest.raises(SerializationError, match=r"small\.safetensors does not exist"):
        load_graph(saved)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "not json at all", '{"format": "attngraph.graph"'])
def test_corrupt_json(saved, text):
    saved.write_text(text)
    with pytest.raises(SerializationError):
        load_graph(saved)


def test_not_utf8(saved):
    saved.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SerializationError):
        load_graph(saved)


def test_wrong_format_version(saved):
    _edit(saved, lambda d: d.update(version=99))
    with pytest.raises(SerializationError, match="version 99"):
        load_graph(saved)


def test_not_a_graph_file(saved):
    saved.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(SerializationError, match="not an attngraph graph file"):
        load_graph(saved)


def test_unknown_op(saved):
    def change(doc):
        next(n for n in doc["nodes"] if n["op"] == "tanh")["op"] = "tanhh"
    _edit(saved, change)
    with pytest.raises(SerializationError, match="unknown op 'tanhh'"):
        load_graph(saved)


@pytest.mark.parametrize("ref", [[99, 0], [-1, 0], [0, 5], "x", [0], [True, 0]])
def test_bad_node_reference(saved, ref):
    def change(doc):
        next(n for n in doc["nodes"] if n["op"] == "tanh")["inputs"] = [ref]
    _edit(saved, change)
    with pytest.raises(SerializationError):
        load_graph(saved)


def test_forward_reference(saved):
    def change(doc):
        last = len(doc["nodes"]) - 1
        doc["nodes"][1]["inputs"] = [[last, 0]]
    _edit(saved, change)
    with pytest.raises(SerializationError, match="not defined before it"):
        load_graph(saved)


def test_bad_output_reference(saved):
    _edit(saved, lambda d: d["outputs"].update(y=[42, 0]))
    with pytest.raises(SerializationError, match="output 'y'"):
        load_graph(saved)


@pytest.mark.parametrize("change", [
    lambda d: d["nodes"].__setitem__(0, {"op": "input"}),                        # missing fields
    lambda d: d["nodes"][0].update(types=[{"dtype": "float16", "shape": [4]}]),  # unknown dtype
    lambda d: d["nodes"][0].update(types=[{"dtype": "float32", "shape": [1.5]}]),
    lambda d: d["nodes"][0].update(attrs={"x": {"__what__": 1}}),
    lambda d: d.update(params=["w", "ghost"]),
    lambda d: d.pop("nodes"),
    lambda d: d.update(nodes=5),
], ids=["fields", "dtype", "shape", "attr-marker", "names", "no-nodes", "nodes-not-list"])
def test_malformed_structure(saved, change):
    _edit(saved, change)
    with pytest.raises(SerializationError):
        load_graph(saved)


def test_types_that_do_not_verify(saved):
    def change(doc):
        next(n for n in doc["nodes"] if n["op"] == "tanh")["types"] = [{"dtype": "float32", "shape": [7]}]
    _edit(saved, change)
    with pytest.raises(SerializationError, match="does not verify"):
        load_graph(saved)


def test_truncated_safetensors(saved):
    wpath = weights_path(saved)
    data = wpath.read_bytes()
    for cut in (len(data) - 5, 20, 4, 0):
        wpath.write_bytes(data[:cut])
        with pytest.raises(SerializationError, match="not a valid safetensors file"):
            load_graph(saved)


def test_missing_weight(saved):
    wpath = weights_path(saved)
    weights = load_safetensors(wpath)
    del weights["w"]
    save_safetensors(weights, wpath)
    with pytest.raises(SerializationError, match="no weight 'w'"):
        load_graph(saved)


@pytest.mark.parametrize("bad", [np.zeros((4, 5), np.float32), np.zeros((4, 4), np.float64), np.zeros(16, np.float32)])
def test_weight_of_wrong_shape_or_dtype(saved, bad):
    wpath = weights_path(saved)
    weights = load_safetensors(wpath)
    weights["w"] = bad
    save_safetensors(weights, wpath)
    with pytest.raises(SerializationError, match="weight 'w'"):
        load_graph(saved)


def test_unserializable_attr_is_refused_when_saving(tmp_path, attr_op):
    from attngraph.dsl import apply

    g = ag.Graph("bad")
    g.output("y", apply(attr_op.name, [g.input("x", (2,))], thing=object()))
    with pytest.raises(SerializationError, match="thing"):
        save_graph(g, tmp_path / "bad.json")


def test_no_pickle_is_involved(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(np, "load", refuse)
    g = load_graph(saved)
    assert g.values["c"].dtype == np.int64
    assert isinstance(load_safetensors(weights_path(saved))["w"], np.ndarray)
    # and the files carry no pickle protocol marker
    assert b"\x80\x04" not in saved.read_bytes()


# -- plain weight files --------------------------------------------------------------------

def test_safetensors_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t_{np.dtype(dt).name}": (rng.standard_normal((3, 4)) * 100).astype(dt) for dt in _ALL_DTYPES}
    tensors["scalar"] = np.array(3.5, dtype=np.float64)
    tensors["layer.0.weight"] = np.asfortranarray(rng.standard_normal((5, 3)).astype(np.float32))
    tensors["view"] = np.arange(20, dtype=np.int32)[::3]
    save_safetensors(tensors, tmp_path / "w.safetensors")
    back = load_safetensors(tmp_path / "w.safetensors")
    assert set(back) == set(tensors)
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape, name
        np.testing.assert_array_equal(back[name], arr)
        assert back[name].flags.writeable
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_save_safetensors_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": np.ones(3, np.float32)}, path)
    before = path.read_bytes()
    with pytest.raises(SerializationError, match="complex128"):
        save_safetensors({"a": np.ones(3, np.complex128)}, path)
    with pytest.raises(SerializationError):
        save_safetensors({1: np.ones(3, np.float32)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_save_safetensors_into_missing_folder(tmp_path):
    with pytest.raises(SerializationError, match="cannot write"):
        save_safetensors({"a": np.ones(3, np.float32)}, tmp_path / "nope" / "w.safetensors")


def test_load_safetensors_errors(tmp_path):
    with pytest.raises(SerializationError, match="does not exist"):
        load_safetensors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(SerializationError, match="not a valid safetensors file"):
        load_safetensors(tmp_path / "junk.safetensors")
