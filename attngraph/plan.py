"""The memory plan: liveness of every intermediate value and the buffers that hold them.

``plan_memory(graph, bindings)`` walks ``graph.nodes`` in order (a *step* is an index into
that list) and decides, for every value a node produces, where it lives:

- **external**: graph inputs, params and consts. They are given; no buffer.
- **view**: the result of a view op (reshape, transpose, slice, broadcast_to, split) shares
  its source's storage; reading the view extends the source's lifetime. A reshape is a view
  only when its source is C-contiguous (the plan tracks strides, in elements, exactly as
  numpy would produce them); otherwise it is copied into a buffer of its own.
- **owned**: every other value is written by its node's kernel into a buffer.

Buffer assignment is greedy best fit over raw byte buffers: at each step the node's owned
outputs take the smallest free buffer that is large enough; if none is, the largest free
buffer is grown to fit (cheaper than a new one), and only when no buffer is free a new
one is made. A value's buffer returns to the free pool after the last step that reads it
or any view of it, and only *after* the step's outputs were placed, so a node never writes
into the storage of its own inputs. Buffers are raw bytes, so values of different dtypes
share them.

Graph outputs get dedicated buffers, never shared with any other value: they are handed to
the caller, so a later step (or a later run) must not overwrite them. Their ``last_step`` is
the last step of the graph (``len(graph.nodes) - 1``) and ``output`` is True. An output that
is a C-contiguous view of all of an intermediate (``y.reshape(B, T, D)``) is returned as that
view: the intermediate is then written straight into the dedicated buffer. Any other output
that would be a view, or is a source value (``g.output("y", x.T)``, ``g.output("w", w)``),
is materialized: copied into its dedicated buffer at its step. So outputs are always fresh,
C-contiguous, writeable arrays.

Every buffer is allocated for a whole run (the executor preallocates them), so the memory a
run holds is the *sum* of the buffer sizes: that is ``peak_bytes``. ``live_peak_bytes`` is the
lower bound no assignment can beat (the largest total of the values alive at one step); best
fit keeps ``peak_bytes`` close to it. Neither counts inputs, params or consts, nor the
temporaries a kernel allocates internally.

Shapes may be symbolic: a plan is made for one set of ``bindings`` (symbol → int), which must
bind every symbol the graph uses (``required_symbols``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BackendError
from .ir import SOURCE_OPS, Graph, Node, Value, eval_shape, shape_symbols

__all__ = ["Buffer", "Use", "Placement", "MemoryPlan", "plan_memory", "required_symbols", "check_bindings",
           "VIEW_OPS", "bindings_key"]

# Ops whose results may share their input's storage (see ``_view_strides``).
VIEW_OPS = frozenset({"reshape", "transpose", "slice", "broadcast_to", "split"})


@dataclass(frozen=True)
class Use:
    """One value stored in a buffer, from the step that writes it to the last step that reads it."""

    value: str
    bytes: int
    first_step: int
    last_step: int


@dataclass(frozen=True)
class Buffer:
    """A block of ``bytes`` bytes; ``uses`` lists the values it holds, one after another."""

    name: str
    bytes: int
    first_step: int
    last_step: int
    uses: tuple[Use, ...] = ()
    output: bool = False

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(u.value for u in self.uses)


@dataclass(frozen=True)
class Placement:
    """Where one value lives: ``kind`` is "external", "view" or "owned"."""

    kind: str
    shape: tuple[int, ...]
    dtype: object                      # numpy dtype
    strides: tuple[int, ...]           # in elements, as numpy would lay the value out
    buffer: int | None = None          # index into MemoryPlan.buffers (owned values only)
    root: tuple[int, int] | None = None  # (node id, output index) whose storage a view shares
    materialize: bool = False          # a view/source graph output copied into its own buffer
    writeable: bool = True             # False for views that pass through broadcast_to

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class MemoryPlan:
    """Buffers for one graph under one set of bindings."""

    bindings: dict
    steps: int
    buffers: list[Buffer]
    placements: dict = field(repr=False)   # (node id, output index) → Placement

    @property
    def peak_bytes(self) -> int:
        """Bytes held while the graph runs: every buffer is allocated for the whole run."""
        return sum(b.bytes for b in self.buffers)

    @property
    def live_peak_bytes(self) -> int:
        """The most bytes of owned values alive at one step (a lower bound for peak_bytes)."""
        live = [0] * max(self.steps, 1)
        for b in self.buffers:
            for u in b.uses:
                for s in range(u.first_step, u.last_step + 1):
                    live[s] += u.bytes
        return max(live)

    @property
    def output_bytes(self) -> int:
        return sum(b.bytes for b in self.buffers if b.output)

    def placement(self, value: Value) -> Placement:
        return self.placements[(value.node.id, value.index)]

    def buffer_of(self, value: Value) -> Buffer | None:
        """The buffer holding ``value`` (a view's is its source's); None for inputs, params, consts."""
        p = self.placement(value)
        if p.kind == "view":
            p = self.placements[p.root]
        return None if p.buffer is None else self.buffers[p.buffer]

    def summary(self) -> str:
        where = f" with {self.bindings}" if self.bindings else ""
        lines = [f"memory plan{where}: {len(self.buffers)} buffers, peak {_fmt(self.peak_bytes)} "
                 f"(live peak {_fmt(self.live_peak_bytes)}, outputs {_fmt(self.output_bytes)})"]
        for b in self.buffers:
            tag = " output" if b.output else ""
            vals = ", ".join(f"{u.value}@{u.first_step}-{u.last_step}" for u in b.uses)
            lines.append(f"  {b.name}: {_fmt(b.bytes)} steps {b.first_step}-{b.last_step}{tag}: {vals}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<MemoryPlan {len(self.buffers)} buffers, peak_bytes={self.peak_bytes}>"


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- bindings -------------------------------------------------------------------------------
def required_symbols(graph: Graph) -> set[str]:
    """Every symbol that appears in a shape of the graph."""
    names: set[str] = set()
    for node in graph.nodes:
        for t in node.types:
            names |= shape_symbols(t.shape)
    return names


def check_bindings(graph: Graph, bindings: dict | None) -> dict[str, int]:
    """``bindings`` restricted to plain ints, with a clear error for missing or unknown symbols."""
    bindings = dict(bindings or {})
    need = required_symbols(graph)
    missing = sorted(need - set(bindings))
    if missing:
        example = ", ".join(f"{s}=..." for s in sorted(need))
        raise BackendError(f"graph {graph.name!r} has symbolic dims {', '.join(missing)}: a memory plan needs "
                           f"a size for each", hint=f"pass them: exe.memory_plan({example})")
    unknown = sorted(set(bindings) - need)
    if unknown:
        raise BackendError(f"graph {graph.name!r} has no symbolic dim {', '.join(unknown)}; its symbols are "
                           f"{', '.join(sorted(need)) or '(none)'}")
    out = {}
    for name, value in bindings.items():
        if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
            raise BackendError(f"symbol {name} must be bound to an int, got {value!r}")
        value = int(value)
        if value < 0:
            raise BackendError(f"symbol {name} must be bound to a size >= 0, got {value}")
        out[name] = value
    return out


def bindings_key(bindings: dict) -> tuple:
    return tuple(sorted(bindings.items()))


# -- strides of views -----------------------------------------------------------------------
def _c_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _is_c_contiguous(shape, strides) -> bool:
    if any(d == 0 for d in shape):
        return True
    expected = 1
    for d, s in zip(reversed(shape), reversed(strides)):
        if d == 1:
            continue
        if s != expected:
            return False
        expected *= d
    return True


def _view_strides(node: Node, src: Placement, out_shapes) -> list[tuple[int, ...]] | None:
    """Strides of a view op's outputs over its source's storage, or None when it must copy."""
    op, shape, strides = node.op, src.shape, src.strides
    if op == "reshape":
        return [_c_strides(out_shapes[0])] if _is_c_contiguous(shape, strides) else None
    if op == "transpose":
        return [tuple(strides[a] for a in node.attrs["axes"])]
    if op == "slice":
        return [tuple(s * step for s, step in zip(strides, node.attrs["steps"]))]
    if op == "broadcast_to":
        out = out_shapes[0]
        pad = len(out) - len(shape)
        return [(0,) * pad + tuple(0 if shape[i] == 1 and out[pad + i] != 1 else strides[i]
                                   for i in range(len(shape)))]
    if op == "split":
        return [strides] * len(out_shapes)
    return None


def _whole_contiguous_view(view: Placement, root: Placement) -> bool:
    """A C-contiguous, writeable view covering all of an owned root (what reshape chains give)."""
    return (root.kind == "owned" and view.writeable and view.nbytes == root.nbytes
            and _is_c_contiguous(view.shape, view.strides))


# -- the plan -------------------------------------------------------------------------------
def plan_memory(graph: Graph, bindings: dict | None = None, *, views: bool = True) -> MemoryPlan:
    """Liveness and greedy best-fit buffer assignment for ``graph`` under ``bindings``.

    ``views=False`` gives every non-source value a buffer of its own kind (a backend that
    cannot alias storage, such as a device backend, asks for that).
    """
    bindings = check_bindings(graph, bindings)
    nodes = graph.nodes
    steps = len(nodes)
    end = max(steps - 1, 0)
    output_keys = {(v.node.id, v.index) for v in graph.outputs.values()}
    dedicated: set[tuple[int, int]] = set()     # owned values that an output is or views

    # 1. where each value lives, and what storage (root) it reads
    placements: dict[tuple[int, int], Placement] = {}
    labels: dict[tuple[int, int], str] = {}
    for node in nodes:
        out_shapes = [eval_shape(t.shape, bindings) for t in node.types]
        view_strides = None
        if views and node.op in VIEW_OPS:
            view_strides = _view_strides(node, placements[(node.inputs[0].node.id, node.inputs[0].index)],
                                         out_shapes)
        for i, (t, shape) in enumerate(zip(node.types, out_shapes)):
            key = (node.id, i)
            labels[key] = node.label if len(node.types) == 1 else f"{node.label}[{i}]"
            dtype = t.dtype.numpy
            is_output = key in output_keys
            if node.op in SOURCE_OPS:
                kind = "owned" if is_output else "external"
                placements[key] = Placement(kind, shape, dtype, _c_strides(shape), materialize=is_output)
                if is_output:
                    dedicated.add(key)
            elif view_strides is not None:
                src = node.inputs[0]
                src_key = (src.node.id, src.index)
                sp = placements[src_key]
                root = sp.root if sp.kind == "view" else src_key
                view = Placement("view", shape, dtype, view_strides[i], root=root,
                                 writeable=sp.writeable and node.op != "broadcast_to")
                if is_output and not _whole_contiguous_view(view, placements[root]):
                    placements[key] = Placement("owned", shape, dtype, _c_strides(shape), materialize=True)
                    dedicated.add(key)
                else:
                    placements[key] = view
                    if is_output:          # a reshape of an intermediate: return it, in a dedicated buffer
                        dedicated.add(root)
            else:
                placements[key] = Placement("owned", shape, dtype, _c_strides(shape))
                if is_output:
                    dedicated.add(key)

    def storage(key):
        p = placements[key]
        return p.root if p.kind == "view" else key

    # 2. liveness of each owned value: first step writes it, last step reads it or a view of it
    first: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    for step, node in enumerate(nodes):
        for i in range(len(node.types)):
            key = (node.id, i)
            if placements[key].kind == "owned":
                first[key] = last[key] = step
        for v in node.inputs:
            root = storage((v.node.id, v.index))
            if root in last:
                last[root] = max(last[root], step)
    for key in dedicated:
        last[key] = end

    # 3. greedy best fit, in step order
    sizes: list[int] = []
    owners: list[list[tuple[int, int]]] = []
    is_out: list[bool] = []
    free: list[int] = []
    release_at: dict[int, list[int]] = {}
    assigned: dict[tuple[int, int], int] = {}
    for step, node in enumerate(nodes):
        for i in range(len(node.types)):
            key = (node.id, i)
            if placements[key].kind != "owned":
                continue
            need = placements[key].nbytes
            if key in dedicated:
                b = len(sizes)
                sizes.append(need)
                owners.append([])
                is_out.append(True)
            else:
                fitting = [b for b in free if sizes[b] >= need]
                if fitting:
                    b = min(fitting, key=lambda j: (sizes[j], j))
                elif free:
                    b = max(free, key=lambda j: (sizes[j], -j))
                    sizes[b] = need
                else:
                    b = len(sizes)
                    sizes.append(need)
                    owners.append([])
                    is_out.append(False)
                if b in free:
                    free.remove(b)
                release_at.setdefault(last[key], []).append(b)
            owners[b].append(key)
            assigned[key] = b
        free.extend(release_at.pop(step, ()))

    buffers = []
    for b, keys in enumerate(owners):
        uses = tuple(Use(labels[k], placements[k].nbytes, first[k], last[k]) for k in keys)
        buffers.append(Buffer(f"buf{b}", sizes[b], min(u.first_step for u in uses), max(u.last_step for u in uses),
                              uses, is_out[b]))
    for key, b in assigned.items():
        p = placements[key]
        placements[key] = Placement(p.kind, p.shape, p.dtype, p.strides, buffer=b, materialize=p.materialize)
    return MemoryPlan(bindings, steps, buffers, placements)
