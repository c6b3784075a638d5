"""CpuExecutable: runs a graph on the CPU over a memory plan, one prepared kernel per node.

Kernels (see kernels.py for the exact contract)::

    kernel(inputs: tuple[np.ndarray, ...], outs: tuple[np.ndarray, ...], bindings: dict[str, int]) -> None

For every compute node the executable picks, once, at construction:

1. the op's own ``cpu`` slot when it is callable: ``op.cpu(node)`` → kernel (or None to decline);
   string templates (the elementwise ops' codegen) are not builders and are skipped;
2. else the builder in ``kernels.NATIVE`` (matmul, attention, softmax, layernorm, sum/mean/max);
3. else ``kernels.reference_kernel(node)``: the op's numpy reference, copied into the planned
   buffer with ``np.copyto``. Every op runs from day one.

``exe.kernel_sources`` (node label → "op.cpu" | "native" | "reference" | "view") says what each
compute node got; "view" marks a view op, which a plan may still run as a copy (below).

View ops (reshape of a contiguous value, transpose, slice, broadcast_to, split) run as numpy
views of their source and get no buffer; a reshape that cannot be a view copies into its
buffer (see attngraph/plan.py).

Running: ``run(feeds)`` validates the feeds (``bind_feeds``), takes the plan for the feeds'
bindings (made on first use and cached, with the buffers it allocates, for the last
``max_plans`` sets of bindings), and runs the prepared step list. Intermediate buffers are
allocated once per plan and reused by every later run with the same bindings. Output buffers
are allocated fresh by each run and handed to the caller, so the arrays a run returned are
never overwritten by a later run; they are C-contiguous and writeable, never views of the
feeds, params or internal buffers. Not thread-safe: two concurrent runs of one executable
share buffers.

Memory: ``exe.memory_plan(**bindings)`` gives the plan (``peak_bytes``, ``buffers``) before any
run; ``exe.measure_peak(feeds)`` runs once under tracemalloc (numpy's allocations are traced)
with the plan's buffers allocated inside the measurement and returns the traced peak in
bytes. It agrees with ``peak_bytes`` up to Python objects (a few hundred bytes per node) and
the temporaries kernels make: the reference fallback allocates its result before copying it,
the attention kernel allocates its output, log-sum-exp and packed keys/values, and strided or
read-only inputs of native kernels are copied first.
"""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict

import numpy as np

from ...ir import SOURCE_OPS, Graph
from ...plan import VIEW_OPS, MemoryPlan, check_bindings
from ..arrays import c_contiguous
from ..executable import Executable
from ..feeds import bind_feeds
from ..numpy_ref import resolve_shape_attrs
from .kernels import native_kernel, reference_kernel

__all__ = ["CpuExecutable"]


def _view_fn(node, plan: MemoryPlan, bindings):
    """x → the view(s) this view node produces under ``bindings`` (always a tuple)."""
    shapes = [plan.placements[(node.id, i)].shape for i in range(len(node.types))]
    op = node.op
    if op == "reshape":
        shape = shapes[0]
        return lambda x: (x.reshape(shape),)
    if op == "transpose":
        axes = node.attrs["axes"]
        return lambda x: (x.transpose(axes),)
    if op == "broadcast_to":
        shape = shapes[0]
        return lambda x: (np.broadcast_to(x, shape),)
    if op == "slice":
        attrs = resolve_shape_attrs(node, ("starts", "stops"), bindings)
        index = tuple(slice(a, b, c) for a, b, c in zip(attrs["starts"], attrs["stops"], attrs["steps"]))
        return lambda x: (x[index],)
    if op == "split":
        axis = node.attrs["axis"]
        bounds = np.cumsum([s[axis] for s in shapes])[:-1].tolist()
        return lambda x: tuple(np.split(x, bounds, axis=axis))
    raise AssertionError(op)


class _Program:
    """Everything one set of bindings needs: the plan, env slots, the steps, the buffers."""

    def __init__(self, exe: "CpuExecutable", plan: MemoryPlan):
        self.plan = plan
        self.bindings = plan.bindings
        slot: dict[tuple[int, int], int] = {}
        for node in exe._nodes:
            for i in range(len(node.types)):
                slot[(node.id, i)] = len(slot)
        self.n_slots = len(slot)
        self.feeds: list[tuple[int, str]] = []
        self.params: list[tuple[int, str]] = []
        self.consts: list[tuple[int, np.ndarray]] = []
        self.fresh: list[tuple[int, tuple, np.dtype]] = []      # output buffers, new every run
        self.steps: list[tuple] = []
        # (kind, fn, input slots, output slots, materialize: tuple of output positions to copy)
        for node in exe._nodes:
            outs = tuple(slot[(node.id, i)] for i in range(len(node.types)))
            ins = tuple(slot[(v.node.id, v.index)] for v in node.inputs)
            places = [plan.placements[(node.id, i)] for i in range(len(node.types))]
            for s, p in zip(outs, places):
                if p.kind == "owned" and p.buffer is not None and plan.buffers[p.buffer].output:
                    self.fresh.append((s, p.shape, p.dtype))
            if node.op in SOURCE_OPS:
                if places[0].materialize:
                    self.steps.append(("source", (node.op, node.name), (), outs, None))
                elif node.op == "input":
                    self.feeds.append((outs[0], node.name))
                elif node.op == "param":
                    self.params.append((outs[0], node.name))
                else:
                    self.consts.append((outs[0], exe._consts[node.name]))
            elif node.op in VIEW_OPS and all(p.kind == "view" or p.materialize for p in places):
                copies = tuple(i for i, p in enumerate(places) if p.materialize)
                self.steps.append(("view", _view_fn(node, plan, self.bindings), ins, outs, copies))
            elif node.op in VIEW_OPS:       # a reshape that must copy: view its buffer in the source's shape
                self.steps.append(("copy", None, ins, outs, None))
            else:
                self.steps.append(("kernel", exe._kernels[node.id], ins, outs, None))
        self.slot = slot
        self.buffers: list[np.ndarray] | None = None
        self.template: list | None = None

    def allocate(self) -> None:
        """The plan's shared buffers (raw bytes) and the typed views every run starts from."""
        plan = self.plan
        self.buffers = [None if b.output else np.empty(b.bytes, dtype=np.uint8) for b in plan.buffers]
        template = [None] * self.n_slots
        for key, p in plan.placements.items():
            if p.kind == "owned" and not plan.buffers[p.buffer].output:
                raw = self.buffers[p.buffer][:p.nbytes]
                template[self.slot[key]] = raw.view(p.dtype).reshape(p.shape)
        for s, arr in self.consts:
            template[s] = arr
        self.template = template

    def release(self) -> None:
        self.buffers = self.template = None


class CpuExecutable(Executable):
    backend = "cpu"

    def __init__(self, graph: Graph, *, max_plans: int = 8):
        super().__init__(graph)
        self._nodes = graph.nodes
        self._consts = {name: c_contiguous(graph.values[name]) for name in graph.consts}
        self._kernels = {}
        self.kernel_sources: dict[str, str] = {}
        for node in self._nodes:
            if node.op in SOURCE_OPS:
                continue
            if node.op in VIEW_OPS:
                self._kernels[node.id] = None
                self.kernel_sources[node.label] = "view"
                continue
            kernel, source = native_kernel(node)
            if kernel is None:
                kernel, source = reference_kernel(node), "reference"
            self._kernels[node.id] = kernel
            self.kernel_sources[node.label] = source
        self.max_plans = max_plans
        self._programs: OrderedDict[tuple, _Program] = OrderedDict()

    # -- plans ---------------------------------------------------------------------------------
    def memory_plan(self, **bindings) -> MemoryPlan:
        """The memory plan for ``bindings`` (one int per symbolic dim; none for a static graph)."""
        return self._program(check_bindings(self.graph, bindings)).plan

    def _program(self, bindings: dict) -> _Program:
        return self._cached_program(bindings, lambda plan: _Program(self, plan))

    # -- running -------------------------------------------------------------------------------
    def _execute(self, feeds, bindings):
        program = self._program(bindings)
        if program.template is None:
            program.allocate()
        env = list(program.template)
        for s, name in program.feeds:
            env[s] = c_contiguous(feeds[name])
        params = self.params
        for s, name in program.params:
            env[s] = params[name]
        for s, shape, dtype in program.fresh:
            env[s] = np.empty(shape, dtype)
        for kind, fn, ins, outs, extra in program.steps:
            if kind == "kernel":
                fn(tuple([env[i] for i in ins]), tuple([env[o] for o in outs]), bindings)
            elif kind == "view":
                views = fn(env[ins[0]])
                for i, (o, view) in enumerate(zip(outs, views)):
                    if i in extra:
                        np.copyto(env[o], view)
                    else:
                        env[o] = view
            elif kind == "copy":
                src = env[ins[0]]
                np.copyto(env[outs[0]].reshape(src.shape), src)
            else:   # a source node that is also a graph output: copy it out
                op, name = fn
                src = feeds[name] if op == "input" else params[name] if op == "param" else self._consts[name]
                np.copyto(env[outs[0]], src)
        return {name: env[program.slot[(v.node.id, v.index)]] for name, v in self.graph.outputs.items()}

    def measure_peak(self, feeds, *, cold: bool = True) -> int:
        """Run once under tracemalloc and return the traced peak in bytes above the start.

        ``cold=True`` drops this plan's buffers first, so their allocation is measured (compare
        with ``memory_plan(...).peak_bytes``); ``cold=False`` measures a warm run, which only
        allocates its outputs and the kernels' temporaries. Feed validation happens before the
        measurement starts. If tracemalloc is already tracing, its peak is reset.
        """
        arrays, bindings = bind_feeds(self.graph, feeds)
        program = self._program(bindings)
        if cold:
            program.release()
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            self._execute(arrays, bindings)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            if started:
                tracemalloc.stop()
        return peak
