"""Diagrams of a graph through graphviz: SVG, PNG, PDF, or the DOT source.

>>> g.render("toy.svg")                       # doctest: +SKIP
>>> g.render("big.svg", max_depth=2)          # doctest: +SKIP  (deeper modules become one box)

Each op is a box showing the op, its output shape and dtype, and (small) the user's
line that made it. Inputs, parameters, constants and outputs have shapes and colours
of their own; outputs are sink nodes named by output name. Nodes made inside
``g.scope("encoder")`` blocks are drawn in nested clusters, one per scope level;
``max_depth=k`` folds every scope deeper than ``k`` levels into a single box that
counts the ops inside, so a 6-layer Transformer stays readable.

Without graphviz's ``dot`` program installed, :func:`render` writes the ``.dot``
source instead, warns (:class:`RenderWarning`) with how to get images, and returns
the ``.dot`` path. It never fails for want of ``dot``.
"""

from __future__ import annotations

import html
import pathlib
import shutil
import subprocess
import warnings
from collections import Counter

import graphviz

from .errors import RenderWarning
from .ir import Graph, Node, format_shape, has_op

__all__ = ["render", "to_dot", "RenderWarning", "FORMATS"]

# suffix → graphviz output format (None: the DOT source itself, no `dot` needed)
FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": None, ".gv": None}

_FONT = "Helvetica"
_COLOURS = {  # fill colours by kind of node
    "input": "#dbeafe", "param": "#fef3c7", "const": "#f3f4f6", "output": "#dcfce7", "box": "#ede9fe",
    "opaque": "#e0e7ff", "reduction": "#fce7f3", "injective": "#f5f5f4", "elementwise": "#ffffff",
}
_BOX_LISTED_OPS = 5      # a collapsed box names this many ops, then "..."
_LARGE = 1500            # above this many drawn nodes, ask dot for a cheaper layout
_FANOUT = 4              # an op read by more ops than this gets references beside the far readers



def to_dot(graph: Graph, *, max_depth: int | None = None, title: str | None = None,
           show_source: bool = True) -> str:
    """The DOT source of the diagram :func:`render` draws (same options)."""
    return _build(graph, max_depth=max_depth, title=title, show_source=show_source).source


def render(graph: Graph, path, *, max_depth: int | None = None, title: str | None = None,
           show_source: bool = True) -> pathlib.Path:
    """Draw ``graph`` to ``path``; the suffix picks the format (.svg, .png, .pdf, or .dot/.gv for the source).

    Returns the path written: ``path`` itself, or the ``.dot`` file next to it when
    graphviz's ``dot`` program is missing (a :class:`RenderWarning` says so).
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise ValueError(f"cannot render to {path}: unknown suffix {path.suffix!r} (use one of {known})")
    dot = _build(graph, max_depth=max_depth, title=title, show_source=show_source)
    fmt = FORMATS[suffix]
    if fmt is None:
        path.write_text(dot.source, encoding="utf-8")
        return path
    if shutil.which("dot") is None:
        return _fallback(dot, path, fmt, "graphviz's `dot` program is not installed (not found on PATH)")
    try:
        data = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        return _fallback(dot, path, fmt, "graphviz's `dot` program is not installed (not found on PATH)")
    except (graphviz.CalledProcessError, subprocess.CalledProcessError, OSError) as err:
        detail = getattr(err, "stderr", None)
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        lines = (detail or str(err)).strip().splitlines()
        return _fallback(dot, path, fmt, f"`dot` failed ({lines[-1] if lines else err})")
    path.write_bytes(data)
    return path


def _fallback(dot: graphviz.Digraph, path: pathlib.Path, fmt: str, reason: str) -> pathlib.Path:
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(dot.source, encoding="utf-8")
    warnings.warn(
        f"{reason}, so {path} was not drawn; wrote the diagram source to {dot_path} instead. "
        f"To get images, install graphviz (`apt-get install graphviz` on Debian/Ubuntu, "
        f"`brew install graphviz` on macOS), then run: dot -T{fmt} {dot_path} -o {path}",
        RenderWarning, stacklevel=3)
    return dot_path


# ----------------------------------------------------------------------------------------
# building the diagram
# ----------------------------------------------------------------------------------------

def _build(graph: Graph, *, max_depth: int | None, title: str | None, show_source: bool) -> graphviz.Digraph:
    if max_depth is not None and (not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < 0):
        raise ValueError(f"max_depth must be None or an int >= 0, got {max_depth!r}")
    nodes = graph.nodes

    # 1. Where each node goes: its own vertex in the cluster of its scope, or the box of a folded scope.
    rep: dict[int, str] = {}                             # node id → DOT vertex id
    place: dict[str, tuple[str, ...]] = {}               # vertex id → cluster path it sits in
    boxes: dict[tuple[str, ...], list[Node]] = {}        # folded scope → the nodes inside
    box_ids: dict[tuple[str, ...], str] = {}
    for i, node in enumerate(nodes):
        scope = tuple(node.scope)
        if max_depth is not None and len(scope) > max_depth and node.op != "input":
            key = scope[:max_depth + 1]
            if key not in boxes:
                boxes[key] = []
                box_ids[key] = f"s{len(box_ids)}"
                place[box_ids[key]] = key[:-1]
            boxes[key].append(node)
            rep[node.id] = box_ids[key]
        else:
            rep[node.id] = f"n{i}"
            place[f"n{i}"] = scope if max_depth is None else scope[:max_depth]

    # 2. The edges between vertices: one per (tail, head) pair, none inside a box.
    edges: dict[str, list[tuple[str, dict]]] = {}        # tail vertex → [(head vertex, edge attrs)]
    seen: set[tuple[str, str]] = set()
    outputs = []
    for k, (name, value) in enumerate(graph.outputs.items()):
        place[f"o{k}"] = ()
        outputs.append((f"o{k}", name, value))
    uses = [(rep[v.node.id], v, rep[n.id]) for n in nodes for v in n.inputs]
    uses += [(rep[v.node.id], v, oid) for oid, _, v in outputs]
    for tail, v, head in uses:
        if tail == head or (tail, head) in seen:
            continue
        seen.add((tail, head))
        attrs = {}
        if tail.startswith("s") or head.startswith("s"):
            attrs["label"] = _type_text(v.type)
        elif len(v.node.types) > 1:
            attrs["taillabel"] = str(v.index)
        if head.startswith("o"):
            attrs["color"] = "#16a34a"
        edges.setdefault(tail, []).append((head, attrs))

    # 3. Vertices. A weight read in several places is drawn next to each reader, and an op read
    # by many gets a small reference beside each far reader: long edges fanning out across the
    # diagram make dot's layout take minutes, and are hard to follow anyway.
    members: dict[tuple[str, ...], list[tuple[str, dict]]] = {(): []}  # cluster path → vertices in it
    final_edges: list[tuple[str, str, dict]] = []
    for i, node in enumerate(nodes):
        vid = f"n{i}"
        if rep[node.id] != vid:
            continue
        attrs = _node_attrs(graph, node, show_source)
        heads = edges.get(vid, [])
        copy = (node.op in ("param", "const") and len(heads) > 1) or (node.op == "input" and len(heads) > _FANOUT)
        if copy:
            for j, (head, eattrs) in enumerate(heads):
                copy_attrs = dict(attrs, tooltip=f"{node.label}: read by {len(heads)} ops (drawn once per reader)")
                _add_member(members, place[head], (f"{vid}_{j}", copy_attrs))
                final_edges.append((f"{vid}_{j}", head, eattrs))
            continue
        _add_member(members, place[vid], (vid, attrs))
        if len(heads) > _FANOUT:
            near = set([h for h, _ in heads if place[h] == place[vid]][:_FANOUT])
            where = f" ({node.source.short})" if show_source and node.source is not None else ""
            ref_label = _html(f'<FONT POINT-SIZE="8" COLOR="#6b7280">from {html.escape(node.op + where)}</FONT>')
            for head, eattrs in heads:
                if head in near:
                    final_edges.append((vid, head, eattrs))
                    continue
                ref = f"{vid}_to_{head}"
                _add_member(members, place[head], (ref, {"label": ref_label, "shape": "plaintext",
                                                        "tooltip": f"{node.label} is read by {len(heads)} ops"}))
                final_edges.append((ref, head, dict(eattrs, style="dashed")))
        else:
            final_edges.extend((vid, head, eattrs) for head, eattrs in heads)
    for key, inside in boxes.items():
        _add_member(members, key[:-1], (box_ids[key], _box_attrs(key, inside)))
        final_edges.extend((box_ids[key], head, eattrs) for head, eattrs in edges.get(box_ids[key], []))

    drawn = sum(len(v) for v in members.values()) + len(outputs)
    dot = graphviz.Digraph(name=_safe_name(graph.name), strict=False)
    dot.attr(rankdir="TB", fontname=_FONT, labelloc="t", fontsize="14", nodesep="0.25", ranksep="0.35",
             newrank="true", label=_html(f"<B>{html.escape(title if title is not None else graph.name)}</B>"))
    if drawn > _LARGE:
        dot.attr(nslimit="1", nslimit1="1", mclimit="0.2", searchsize="10", remincross="false")
    dot.attr("node", fontname=_FONT, fontsize="10", margin="0.08,0.04", height="0.3")
    dot.attr("edge", color="#9ca3af", arrowsize="0.6", penwidth="0.8", fontname=_FONT, fontsize="8",
             fontcolor="#6b7280")

    children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for path in members:
        if path:
            children.setdefault(path[:-1], []).append(path)
    cluster_ids = {path: f"cluster_{i}" for i, path in enumerate(sorted(p for p in members if p))}
    _emit(dot, (), members, children, cluster_ids)
    for oid, name, value in outputs:
        label = f"<B>{html.escape(name)}</B><BR/>{html.escape(_type_text(value.type))}"
        dot.node(oid, _html(label), shape="house", style="filled", fillcolor=_COLOURS["output"])
    # Edges last: a vertex belongs to the cluster that first names it.
    for tail, head, eattrs in final_edges:
        dot.edge(tail, head, **eattrs)
    return dot


def _add_member(members: dict, path: tuple[str, ...], item) -> None:
    for i in range(len(path) + 1):  # every enclosing cluster exists, even when it holds only sub-clusters
        members.setdefault(path[:i], [])
    members[path].append(item)


def _emit(container: graphviz.Digraph, path, members, children, cluster_ids) -> None:
    for vid, attrs in members[path]:
        container.node(vid, **attrs)
    for child in children.get(path, ()):
        with container.subgraph(name=cluster_ids[child]) as sub:
            depth = len(child)
            sub.attr(label=_html(f"<B>{html.escape(child[-1])}</B>"), style="rounded,filled",
                     fillcolor="#fafafa" if depth % 2 else "#f4f4f5", color="#d4d4d8", fontsize="11",
                     labeljust="l")
            _emit(sub, child, members, children, cluster_ids)


def _node_attrs(graph: Graph, node: Node, show_source: bool) -> dict:
    lines: list[str]
    if node.op in ("input", "param", "const"):
        lines = [f"<B>{html.escape(node.name or node.label)}</B>", html.escape(_type_text(node.type))]
        if node.op == "const":
            value = graph.values.get(node.name)
            if value is not None and value.size == 1:
                text = html.escape(f"{_scalar_text(value)}  {node.type.dtype}")
                # an automatic scalar (x * 0.5 makes "_c3") shows just its value
                lines = [f"<B>{text}</B>"] if (node.name or "").startswith("_") else [lines[0], "= " + text]
        shape, style = {"input": ("ellipse", "filled"), "param": ("cylinder", "filled"),
                        "const": ("note", "filled")}[node.op]
        fill = _COLOURS[node.op]
    else:
        lines = [f"<B>{html.escape(node.op)}</B>"]
        attrs_text = _attrs_text(node)
        if attrs_text:
            lines.append(f'<FONT POINT-SIZE="9">{html.escape(attrs_text)}</FONT>')
        lines.extend(html.escape(_type_text(t)) for t in node.types)
        shape, style = "box", "rounded,filled"
        fill = _COLOURS[_fusion(node.op)]
    if show_source and node.source is not None:
        lines.append(f'<FONT POINT-SIZE="8" COLOR="#6b7280">{html.escape(node.source.short)}</FONT>')
    attrs = {"label": _html("<BR/>".join(lines)), "shape": shape, "style": style, "fillcolor": fill}
    if node.op == "const":
        attrs.update(fontsize="8", color="#9ca3af")
    if show_source and node.source is not None and node.source.code:
        attrs["tooltip"] = f"{node.source.short}: {node.source.code}"
    return attrs


def _box_attrs(scope: tuple[str, ...], inside: list[Node]) -> dict:
    ops = Counter(n.op for n in inside if n.op not in ("input", "param", "const"))
    total = sum(ops.values())
    listed = [op if c == 1 else f"{op}×{c}" for op, c in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))]
    summary = ", ".join(listed[:_BOX_LISTED_OPS]) + (", ..." if len(listed) > _BOX_LISTED_OPS else "")
    lines = [f"<B>{html.escape(scope[-1])}</B>",
             html.escape(f"{total} op{'s' if total != 1 else ''}" + (f": {summary}" if summary else ""))]
    params = sum(1 for n in inside if n.op == "param")
    if params:
        lines.append(f'<FONT POINT-SIZE="9">{params} param{"s" if params != 1 else ""}</FONT>')
    return {"label": _html("<BR/>".join(lines)), "shape": "box", "style": "filled,bold",
            "fillcolor": _COLOURS["box"], "tooltip": "/".join(scope)}


def _fusion(op: str) -> str:
    if not has_op(op):
        return "opaque"
    from .ir import get_op

    return get_op(op).fusion.value


def _attrs_text(node: Node, limit: int = 40) -> str:
    if not node.attrs:
        return ""
    text = ", ".join(f"{k}={v!r}" for k, v in node.attrs.items())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_text(t) -> str:
    return f"{format_shape(t.shape)} {t.dtype}"


def _scalar_text(value) -> str:
    item = value.reshape(()).item()
    return f"{item:.4g}" if isinstance(item, float) else str(item)


def _html(body: str) -> str:
    return f"<{body}>"  # graphviz treats <...> as an HTML-like label


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "graph"

