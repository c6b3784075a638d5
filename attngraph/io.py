"""Saving and loading graphs (JSON structure + safetensors weights) and plain weight files.

A graph saved as ``model.json`` is two files side by side:

- ``model.json``: the structure. Nodes in topological order, each with its position
  (``id``), op, inputs as ``[node_id, output_index]``, attrs, output types, name,
  source line and scope; the names of the inputs, params, consts and outputs.
- ``model.safetensors``: the weights (``graph.values``: every param's initial value
  and every const), read back bit for bit.

Loading never unpickles anything: the structure is JSON and the weights are
safetensors. Anything wrong with the files (missing, corrupt, an op this version
does not know, a weight missing or of the wrong shape) raises
:class:`~attngraph.errors.SerializationError` saying which file and what.

>>> g.save("model.json")                      # doctest: +SKIP
>>> g2 = ag.io.load_graph("model.json")       # doctest: +SKIP
>>> m.load_state_dict(ag.io.load_safetensors("w.safetensors"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any, Mapping

import numpy as np

from .errors import AttngraphError, SerializationError
from .ir import SOURCE_OPS, Attrs, DType, Node, Source, TensorType, Value, has_op, verify

__all__ = ["save_graph", "load_graph", "save_safetensors", "load_safetensors", "weights_path",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "attngraph.graph"
FORMAT_VERSION = 1

_WEIGHT_DTYPES = {np.dtype(d.value) for d in DType}

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------
# plain weight files
# ----------------------------------------------------------------------------------------

def save_safetensors(tensors: Mapping[str, Any], path: PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name → array; torch tensors are converted) to ``path`` atomically.

    The file appears complete or not at all: it is written to a temporary file in the
    same folder, then renamed over ``path``.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise SerializationError(f"weight names must be strings, got {name!r}")
        arr = _to_numpy(value, name)
        if arr.dtype not in _WEIGHT_DTYPES:
            supported = ", ".join(d.value for d in DType)
            raise SerializationError(f"weight {name!r} has dtype {arr.dtype}; attngraph saves {supported}")
        # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    import safetensors.numpy

    def write(tmp: str) -> None:
        try:
            safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
        except OSError:
            raise
        except Exception as err:  # safetensors' own error type varies between versions
            raise SerializationError(f"cannot encode weights for {os.fspath(path)}: {err}") from err

    _atomic_write(pathlib.Path(path), write)


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read a safetensors file into name → writable numpy array (never unpickles anything)."""
    path = pathlib.Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise SerializationError(f"weights file {path} {what}")
    import safetensors.numpy

    try:
        loaded = safetensors.numpy.load_file(path)
    except OSError as err:
        raise SerializationError(f"cannot read weights file {path}: {err.strerror or err}") from None
    except Exception as err:  # SafetensorError, or a dtype numpy lacks
        raise SerializationError(f"weights file {path} is not a valid safetensors file: {err}") from None
    return {name: arr if arr.flags.writeable else arr.copy() for name, arr in loaded.items()}


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as err:
        raise SerializationError(f"weight {name!r} is not an array: {type(value).__name__}") from err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: pathlib.Path, data) -> None:
    """Write ``data`` (bytes, or a function that writes a given file name) to ``path`` atomically:
    to a temporary file in the same folder, renamed over ``path`` once complete."""
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise SerializationError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
        if not isinstance(data, bytes):
            data(tmp)
        os.chmod(tmp, 0o666 & ~_umask())    # mkstemp makes 0600 files; give what open() would
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise SerializationError(f"cannot write {path}: {err.strerror or err}") from None
        raise


# ----------------------------------------------------------------------------------------
# graphs
# ----------------------------------------------------------------------------------------

def weights_path(path: PathLike) -> pathlib.Path:
    """The weights file next to a graph file: ``model.json`` → ``model.safetensors``."""
    path = pathlib.Path(path)
    stem = path.name[:-len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(stem + ".safetensors")


def save_graph(graph, path: PathLike) -> None:
    """Write ``graph`` to ``path`` (JSON) and its weights to ``weights_path(path)``."""
    path = pathlib.Path(path)
    doc = _graph_to_json(graph)
    text = _dump_json(doc)
    weights = {name: _declared_shape(graph, name, np.asarray(arr)) for name, arr in graph.values.items()}
    save_safetensors(weights, weights_path(path), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    _atomic_write(path, (text + "\n").encode("utf-8"))


def _dump_json(doc: dict) -> str:
    """Pretty at the top level, one line per node: diffable and still short."""
    def dumps(value):
        return json.dumps(value, allow_nan=False, ensure_ascii=False)

    lines = []
    for key, value in doc.items():
        if key == "nodes" and value:
            body = ",\n".join("  " + dumps(n) for n in value)
            lines.append(f' {dumps(key)}: [\n{body}\n ]')
        else:
            lines.append(f" {dumps(key)}: {dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def _declared_shape(graph, name: str, arr: np.ndarray) -> np.ndarray:
    """A weight in the shape its node declares (a hand-built graph may hold a 0-d const as shape (1,))."""
    node = graph.params.get(name) or graph.consts.get(name)
    if node is not None and arr.shape != node.type.shape and all(isinstance(d, int) for d in node.type.shape):
        if arr.size == int(np.prod(node.type.shape, dtype=np.int64)):
            return arr.reshape(node.type.shape)
    return arr


def load_graph(path: PathLike):
    """Read a graph saved by :func:`save_graph`; returns a verified :class:`attngraph.Graph`."""
    from .dsl import Graph

    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SerializationError(f"graph file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SerializationError(f"cannot read graph file {path}: {err}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise SerializationError(f"graph file {path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{path} is not an attngraph graph file (no \"format\": \"{FORMAT}\")")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise SerializationError(f"graph file {path} has format version {version!r}; this attngraph reads "
                                 f"version {FORMAT_VERSION}",
                                 hint="save it again with the attngraph version that reads it")
    try:
        graph = _graph_from_json(doc, Graph)
    except SerializationError as err:
        raise SerializationError(f"graph file {path}: {err.message}", hint=err.hint) from None
    except AttngraphError as err:  # a bad shape or dtype, a repeated name
        raise SerializationError(f"graph file {path} is malformed: {err.message}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise SerializationError(f"graph file {path} is malformed: {what}") from None

    wpath = weights_path(path)
    values = load_safetensors(wpath)
    for node in graph.nodes:
        if node.op not in ("param", "const"):
            continue
        arr = values.get(node.name)
        if arr is None:
            raise SerializationError(f"weights file {wpath} has no weight {node.name!r} ({node.op} of graph "
                                     f"{graph.name!r})")
        want = node.type
        if arr.shape != want.shape or arr.dtype != want.dtype.numpy:
            raise SerializationError(f"weight {node.name!r} in {wpath} is {arr.dtype}{arr.shape} but the graph "
                                     f"declares {want}")
    graph.values.update(values)
    try:
        verify(graph)
    except AttngraphError as err:
        raise SerializationError(f"graph file {path} does not verify: {err.message}") from None
    return graph


def _graph_to_json(graph) -> dict:
    index: dict[int, int] = {}
    nodes = []
    for i, node in enumerate(graph.nodes):
        index[node.id] = i
        entry: dict[str, Any] = {
            "id": i,
            "op": node.op,
            "inputs": [[index[v.node.id], v.index] for v in node.inputs],
            "attrs": {k: _encode_attr(v, node, k) for k, v in node.attrs.items()},
            "types": [_encode_type(t) for t in node.types],
        }
        if node.name is not None:
            entry["name"] = node.name
        if node.source is not None:
            entry["source"] = {"file": node.source.file, "line": node.source.line, "code": node.source.code}
        if node.scope:
            entry["scope"] = list(node.scope)
        nodes.append(entry)
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": graph.name,
        "nodes": nodes,
        "inputs": list(graph.inputs),
        "params": list(graph.params),
        "consts": list(graph.consts),
        "outputs": {name: [index[v.node.id], v.index] for name, v in graph.outputs.items()},
    }
    if isinstance(getattr(graph, "seed", None), int):
        doc["seed"] = graph.seed
    return doc


def _graph_from_json(doc: dict, graph_cls):
    name = doc["name"]
    if not isinstance(name, str):
        raise SerializationError(f"graph name must be a string, got {name!r}")
    seed = doc.get("seed", 0)
    graph = graph_cls(name, seed=seed if isinstance(seed, int) else 0)
    made: list[Node] = []
    for position, entry in enumerate(doc["nodes"]):
        op = entry["op"]
        if entry.get("id", position) != position:
            raise SerializationError(f"node {position} is numbered {entry.get('id')!r}; nodes must be listed in order")
        if not isinstance(op, str) or (op not in SOURCE_OPS and not has_op(op)):
            raise SerializationError(f"node {position} uses unknown op {op!r}",
                                     hint="it may come from a newer attngraph or a plugin that is not imported")
        inputs = []
        for ref in entry["inputs"]:
            src, out = _pair(ref, f"an input of node {position}")
            if not 0 <= src < len(made):
                raise SerializationError(f"node {position} ({op}) reads node {src}, which is not defined before it")
            if not 0 <= out < len(made[src].types):
                raise SerializationError(f"node {position} ({op}) reads output {out} of node {src}, which has "
                                         f"{len(made[src].types)}")
            inputs.append(Value(made[src], out))
        attrs = Attrs({k: _decode_attr(v) for k, v in entry["attrs"].items()})
        types = tuple(_decode_type(t) for t in entry["types"])
        if not types:
            raise SerializationError(f"node {position} ({op}) has no output types")
        src_doc = entry.get("source")
        source = None
        if src_doc is not None:
            source = Source(str(src_doc["file"]), int(src_doc["line"]), str(src_doc.get("code", "")))
        scope = tuple(str(s) for s in entry.get("scope", ()))
        node_name = entry.get("name")
        if node_name is not None and not isinstance(node_name, str):
            raise SerializationError(f"node {position} has a non-string name {node_name!r}")
        node = Node(op, tuple(inputs), attrs, types, name=node_name, source=source, scope=scope)
        graph.add_node(node)
        made.append(node)
    for kind in ("inputs", "params", "consts"):
        listed, table = list(doc[kind]), getattr(graph, kind)
        if sorted(listed) != sorted(table):
            raise SerializationError(f"the {kind} listed ({listed}) differ from the {kind} nodes ({list(table)})")
    for out_name, ref in doc["outputs"].items():
        src, out = _pair(ref, f"output {out_name!r}")
        if not 0 <= src < len(made) or not 0 <= out < len(made[src].types):
            raise SerializationError(f"output {out_name!r} refers to [{src}, {out}], which is not in the graph")
        graph.set_output(out_name, Value(made[src], out))
    return graph


def _pair(ref, what: str) -> tuple[int, int]:
    if (not isinstance(ref, list) or len(ref) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in ref)):
        raise SerializationError(f"{what} must be [node_id, output_index], got {ref!r}")
    return ref[0], ref[1]


def _encode_type(t: TensorType) -> dict:
    return {"dtype": t.dtype.value, "shape": list(t.shape)}


def _decode_type(doc: dict) -> TensorType:
    shape = doc["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
        raise SerializationError(f"bad shape {shape!r}")
    return TensorType(DType(doc["dtype"]), tuple(shape))


# -- attrs: JSON lists are tuples; markers keep what JSON cannot say ----------------------
# {"__dtype__": "float32"}  a DType
# {"__float__": "inf"}      inf, -inf, nan (JSON has none of them)
# {"__dict__": {...}}       a nested mapping (kept apart from the markers above)

def _encode_attr(value: Any, node: Node, key: str) -> Any:
    if isinstance(value, DType):  # before str: DType is a str Enum
        return {"__dtype__": value.value}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return _encode_attr(value.item(), node, key)
    if isinstance(value, (tuple, list)):
        return [_encode_attr(v, node, key) for v in value]
    if isinstance(value, Mapping):
        return {"__dict__": {str(k): _encode_attr(v, node, key) for k, v in value.items()}}
    raise SerializationError(f"cannot save attr {key}={value!r} of node {node.label} ({node.op}): "
                             f"{type(value).__name__} values are not serializable",
                             hint="attrs may hold None, bool, int, float, str, DType, tuples and dicts of them")


def _decode_attr(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return tuple(_decode_attr(v) for v in value)
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag == "__dtype__":
            return DType(body)
        if tag == "__float__":
            if body not in ("inf", "-inf", "nan"):
                raise SerializationError(f"bad float marker {body!r}")
            return float(body)
        if tag == "__dict__" and isinstance(body, dict):
            return Attrs({k: _decode_attr(v) for k, v in body.items()})
    raise SerializationError(f"bad attr value {value!r}")
