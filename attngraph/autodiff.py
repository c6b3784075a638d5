"""Reverse-mode autodiff: ``ag.grad(loss, wrt)`` appends the backward graph to the same IR.

>>> g = ag.Graph("fit")
>>> x = g.input("x", ("B", 8))
>>> w = g.param("w", (8, 4))
>>> loss = ag.mean((x @ w) * (x @ w))
>>> dw = ag.grad(loss, w)                 # a Tensor of the same graph, shape (8, 4)
>>> g.output("loss", loss); g.output("dw", dw)

How it works:

- Only the nodes on a path from a ``wrt`` tensor to the loss are differentiated. A path
  may run through int or bool values (a comparison feeding a ``where``); no gradient
  flows along them, but every op on the path must be differentiable: an op marked
  ``differentiable=False`` (``argmax``) or without a rule (the ``fused_*`` ops, which
  only exist after ``compile``) is a :class:`GradError` naming the op and its source line.
- Nodes are visited in reverse topological order. Each calls its op's ``grad`` rule (see
  :class:`~attngraph.ir.OpDef`): ``grad(ctx, *out_grads)`` returns one gradient per
  input, built from DSL ops, so the passes optimize and fuse the backward like the forward.
- A rule may return a gradient in the broadcast shape of the output; :func:`unbroadcast`
  sums it back to the input's shape. Gradients of a value read several times are added.
- Only float inputs get gradients; int and bool inputs get None internally. A multi-output
  node whose outputs are not all used gets zeros for the missing output gradients.
- A ``wrt`` tensor the loss does not depend on gets a gradient of zeros.
- Backward nodes live in the scope ``("backward", *forward_scope)`` (diagrams draw them
  as their own cluster) and remember the line that called ``ag.grad``.

Attention written from primitives: the fuser turns ``softmax(QKᵀ·s + mask) V`` into one
``attention`` node only when the probabilities and scores have no other reader, and the
primitive backward would read them (dV = Pᵀ·dO, the softmax rule reads P). So where the
forward matches the fuser's pattern (:func:`attngraph.passes.fuse_attention.analyze`),
the whole pattern is differentiated at once by an ``attention_grad`` node reading only
Q, K, V, the mask and the bias: the forward still fuses, and the backward is the flash
kernel's recomputation instead of the T×T chain. The pattern is differentiated op by op
instead when a ``wrt`` tensor is inside it or its additive bias needs a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .dsl import Tensor, apply, binary, scalar_like
from .errors import AttngraphError, GradError
from .ir import Attrs, Node, get_op
from .ir.shapes import format_shape

__all__ = ["grad", "unbroadcast", "GradContext"]


@dataclass(frozen=True)
class GradContext:
    """What a grad rule sees of the forward node.

    - ``inputs`` / ``outputs``: the node's input and output Tensors (outputs are the
      forward values, e.g. softmax's ``y``, so a rule can reuse them).
    - ``attrs``: the node's normalized attrs.
    - ``needs``: one bool per input, True where a gradient is wanted; a rule may skip
      the work for the others (returning None there), and must return None for them
      or a gradient that is then ignored.
    """

    node: Node
    inputs: tuple
    outputs: tuple
    needs: tuple

    @property
    def attrs(self) -> Attrs:
        return self.node.attrs

    @property
    def graph(self):
        return self.outputs[0].graph

    def zeros(self, shape, dtype) -> Tensor:
        """A tensor of zeros (``shape`` may hold symbolic dims)."""
        return self.graph.full(tuple(shape), 0.0, dtype)


def unbroadcast(g: Tensor, shape) -> Tensor:
    """Sum ``g`` over the axes that broadcasting added or stretched, so it has ``shape``.

    ``g`` of shape (B, T, D) against (D,) sums over B and T; against (1, T, 1) over B and D.
    One ``sum`` node and, when axes of size 1 are kept, one ``reshape``.
    """
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.ndim - len(shape)
    if lead < 0:
        raise GradError(f"cannot reduce a gradient of shape {format_shape(g.shape)} to the larger rank "
                        f"{format_shape(shape)}")
    stretched = tuple(lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
    for i, d in enumerate(shape):
        if d != 1 and g.shape[lead + i] != d:
            raise GradError(f"a gradient of shape {format_shape(g.shape)} does not broadcast from "
                            f"{format_shape(shape)}")
    axes = tuple(range(lead)) + stretched
    if axes:
        g = g.sum(axis=axes)
    return g if tuple(g.shape) == shape else g.reshape(shape)


def grad(loss: Tensor, wrt):
    """Gradients of the scalar ``loss`` w.r.t. ``wrt``: a Tensor (then one Tensor comes back)
    or a list of Tensors (then a list, in the same order). The gradient tensors are new
    nodes of the loss's graph; mark them as outputs to compute them.
    """
    single = isinstance(wrt, Tensor)
    targets = [wrt] if single else list(wrt)
    _check_arguments(loss, targets)
    graph = loss.graph
    reach, on_path = _path(graph, loss, targets)
    for node in on_path:
        op = get_op(node.op)
        if not op.differentiable or op.grad is None:
            why = "is not differentiable" if not op.differentiable else "has no gradient rule"
            hint = ("fused ops exist only after compile(); differentiate the graph before compiling it"
                    if op.family == "fused" else "keep this op off the path from the tensors in wrt to the loss")
            raise GradError(f"cannot differentiate through {node.op} ({node.label}): the op {why}",
                            where=_source(node), hint=hint)

    builder = _Backward(graph, reach)
    builder.seed(loss)
    shortcuts = _attention_shortcuts(graph, on_path, targets, reach)
    absorbed: set[int] = set()
    saved_scope = list(getattr(graph, "_scope", []))
    try:
        for node in reversed(on_path):
            if node.id in absorbed:
                continue
            graph._scope = ["backward", *node.scope]
            m = shortcuts.get(node.id)
            if m is not None and builder.attention(node, m):
                absorbed.update(n.id for n in m.nodes[1:])
            else:
                builder.node(node)
    finally:
        graph._scope = saved_scope
    result = [builder.total((t.value.node.id, t.value.index)) for t in targets]
    result = [r if r is not None else graph.full(t.shape, 0.0, t.dtype) for r, t in zip(result, targets)]
    return result[0] if single else result


# -- checks and the path -------------------------------------------------------------------

def _check_arguments(loss, targets) -> None:
    if not isinstance(loss, Tensor):
        raise GradError(f"the loss must be a graph Tensor, got {type(loss).__name__}")
    if loss.shape != ():
        raise GradError(f"the loss must be a scalar (shape ()), got shape {format_shape(loss.shape)} "
                        f"from {loss.node.op}", where=_source(loss.node),
                        hint="reduce it first: ag.sum(loss) or ag.mean(loss)")
    if not loss.dtype.is_float:
        raise GradError(f"the loss must be a float tensor, got {loss.dtype}", where=_source(loss.node))
    if not targets:
        raise GradError("ag.grad needs at least one tensor to differentiate with respect to")
    for t in targets:
        if not isinstance(t, Tensor):
            raise GradError(f"gradients are taken w.r.t. graph Tensors, got {type(t).__name__}")
        if t.graph is not loss.graph:
            raise GradError(f"{t.name} belongs to graph {t.graph.name!r}, the loss to {loss.graph.name!r}")
        if not t.dtype.is_float:
            raise GradError(f"{t.name} is {t.dtype}; only float tensors have gradients", where=_source(t.node))


def _path(graph, loss: Tensor, targets) -> tuple[set, list[Node]]:
    """Values reachable from the targets, and the nodes on a path from a target to the loss."""
    reach = {(t.value.node.id, t.value.index) for t in targets}
    touched: set[int] = set()
    nodes = graph.nodes
    for n in nodes:
        if any((v.node.id, v.index) in reach for v in n.inputs):
            touched.add(n.id)
            reach.update((n.id, i) for i in range(len(n.types)))
    needed = {loss.value.node.id}
    for n in reversed(nodes):
        if n.id in needed:
            needed.update(v.node.id for v in n.inputs)
    return reach, [n for n in nodes if n.id in touched and n.id in needed]


def _source(node: Node) -> str | None:
    return str(node.source) if node.source else None


# -- building the backward -------------------------------------------------------------------

class _Backward:
    """The gradient contributions of every value, and the code that propagates them."""

    def __init__(self, graph, reach: set):
        self.graph = graph
        self.reach = reach
        self.grads: dict[tuple[int, int], list[Tensor]] = {}

    def seed(self, loss: Tensor) -> None:
        self.grads[(loss.value.node.id, loss.value.index)] = [scalar_like(self.graph, 1.0, loss.dtype)]

    def total(self, key) -> Tensor | None:
        """The sum of the contributions to one value (made once, then reused)."""
        parts = self.grads.get(key)
        if not parts:
            return None
        total = parts[0]
        for p in parts[1:]:
            total = binary("add", total, p)
        self.grads[key] = [total]
        return total

    def wants(self, value) -> bool:
        return (value.node.id, value.index) in self.reach and value.type.dtype.is_float

    def add(self, node: Node, slot: int, g: Tensor | None) -> None:
        """Record ``g`` as a contribution to the gradient of ``node``'s input ``slot``."""
        value = node.inputs[slot]
        if g is None or not self.wants(value):
            return
        if not isinstance(g, Tensor):
            raise GradError(f"the grad rule of {node.op} returned {type(g).__name__} for input {slot}, "
                            "not a Tensor or None", where=_source(node))
        try:
            g = unbroadcast(g, value.type.shape)
        except GradError as err:
            raise GradError(f"the grad rule of {node.op} returned a gradient of shape {format_shape(g.shape)} "
                            f"for input {slot} of shape {format_shape(value.type.shape)} ({err.message})",
                            where=_source(node)) from None
        if g.dtype != value.type.dtype:
            raise GradError(f"the grad rule of {node.op} returned a {g.dtype} gradient for the {value.type.dtype} "
                            f"input {slot}", where=_source(node))
        self.grads.setdefault((value.node.id, value.index), []).append(g)

    def node(self, node: Node) -> None:
        outs = [self.total((node.id, i)) for i in range(len(node.types))]
        if all(g is None for g in outs):
            return
        needs = tuple(self.wants(v) for v in node.inputs)
        if not any(needs):
            return
        op = get_op(node.op)
        outputs = tuple(self.graph.tensor(v) for v in node.outputs())
        if op.multiple_outputs:
            outs = [g if g is not None or not t.dtype.is_float else self.graph.full(t.shape, 0.0, t.dtype)
                    for g, t in zip(outs, outputs)]
        ctx = GradContext(node, tuple(self.graph.tensor(v) for v in node.inputs), outputs, needs)
        try:
            result = op.grad(ctx, *outs)
        except GradError:
            raise
        except AttngraphError as err:
            raise GradError(f"the gradient of {node.op} ({node.label}) could not be built: {err.message}",
                            where=_source(node), hint=err.hint) from None
        result = list(result)
        if len(result) != len(node.inputs):
            raise GradError(f"the grad rule of {node.op} returned {len(result)} gradients for "
                            f"{len(node.inputs)} inputs", where=_source(node))
        for slot, g in enumerate(result):
            self.add(node, slot, g)

    def attention(self, root: Node, m) -> bool:
        """The gradient of a whole softmax(QKᵀ·s + bias, masked) V pattern, by ``attention_grad``;
        False when attention_grad refuses the shapes (then the pattern is differentiated op by op)."""
        g = self.total((root.id, 0))
        if g is None:
            return True
        t = self.graph.tensor
        q, kt, v = t(m.q), t(m.kt), t(m.v)
        k = _k_from_kt(kt)
        bias = None
        for b, c in m.biases:
            b = t(b)
            b = b if c == 1.0 else b * c
            bias = b if bias is None else bias + b
        mask = None
        for where, negate in m.masks:
            where = t(where)
            if negate:
                where = apply("logical_not", [where])
            mask = where if mask is None else apply("logical_or", [mask, where])
        extra = [x for x in (bias, mask) if x is not None]
        try:
            dq, dk, dv = apply("attention_grad", [q, k, v, *extra, g], scale=float(m.scale),
                               causal=bool(m.causal), has_bias=bias is not None, has_mask=mask is not None)
        except AttngraphError:
            return False
        self._accumulate(m.q, dq)
        if self.wants(m.kt):
            rank = dk.ndim
            self._accumulate(m.kt, dk.transpose(*range(rank - 2), rank - 1, rank - 2))
        self._accumulate(m.v, dv)
        return True

    def _accumulate(self, value, g: Tensor) -> None:
        if self.wants(value):
            self.grads.setdefault((value.node.id, value.index), []).append(unbroadcast(g, value.type.shape))


def _k_from_kt(kt: Tensor) -> Tensor:
    """K from Kᵀ, folding a transpose that made Kᵀ (as the fuser does, so CSE shares it)."""
    rank = kt.ndim
    swap = tuple(range(rank - 2)) + (rank - 1, rank - 2)
    node = kt.node
    if node.op == "transpose":
        inner = node.attrs["axes"]
        combined = tuple(inner[a] for a in swap)
        source = kt.graph.tensor(node.inputs[0])
        return source if combined == tuple(range(rank)) else source.transpose(combined)
    return kt.transpose(swap)


def _attention_shortcuts(graph, on_path: Sequence[Node], targets, reach: set) -> dict:
    """Root matmul id → the fuser's match, for attention patterns differentiated as a whole."""
    candidates = [n for n in on_path if n.op == "matmul" and n.inputs[0].node.op == "softmax"]
    if not candidates:
        return {}
    from .passes.fuse_attention import _GraphCtx, analyze

    ctx = _GraphCtx(graph)
    wrt_nodes = {t.value.node.id for t in targets}
    found = {}
    for node in candidates:
        m = analyze(ctx, node)
        if m is None or isinstance(m, str):
            continue
        if any(n.id in wrt_nodes for n in m.nodes[1:]):
            continue  # a gradient w.r.t. the scores or the probabilities was asked for
        if any((b.node.id, b.index) in reach for b, _ in m.biases):
            continue  # a learned bias: its gradient needs the probabilities
        found[node.id] = m
    return found
