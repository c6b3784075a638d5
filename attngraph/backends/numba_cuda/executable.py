"""CudaExecutable: runs a graph on a CUDA GPU (numba-cuda), tensors resident on the device.

At construction (``ag.compile(graph, backend="cuda")``):

- ``numba.cuda.is_available()`` must be true (a GPU, or the simulator switched on with
  ``NUMBA_ENABLE_CUDASIM=1`` before numba is imported); otherwise ``BackendError``.
- every node gets a device kernel from the table below, or is a *plan constant* (a node
  without a kernel whose inputs are all constants, e.g. ``full``/``arange``/``trilu`` building
  a causal mask: evaluated once per set of bindings by its numpy reference and uploaded), or
  raises ``BackendError`` naming the op and the user's line. With ``host_fallback=True``
  such ops run their numpy reference on the host instead (a device→host→device round trip
  each: a debugging aid, not a fast path). ``exe.kernel_sources`` says what each node got.
- parameters and constants are uploaded once into a weights arena.

Kernels (kernels.py): matmul → tiled SGEMM (batched, transposed operands by strides);
matmul_epilogue → SGEMM then the generated epilogue in place; attention → the flash forward;
attention_grad → the flash forward again (out, log-sum-exp) and the flash backward;
softmax / log_softmax, layernorm, residual_layernorm, sum / mean / max → row kernels (float32);
every elementwise op with a scalar template and every fused_elementwise region → a kernel
generated from its expression (any dtype); gather; concat, patchify and pad → strided copies
(and a fill); reshape / transpose / slice / broadcast_to / split → views on the device (a copy
only where the memory plan says so).

Per set of bindings (made on first use, cached for ``max_plans`` sets, like the CPU backend):
the memory plan (``attngraph.plan``) places every value; one device arena holds the plan's
buffers, the input slots and the kernels' scratch (copies made contiguous, the attention's
log-sum-exp, offset tables); every launch is prepared once (grid, block, arguments bound).

A run: the feeds are copied into the arena (one host→device copy per input), the prepared
launches run back to back with no synchronisation, and each output is copied back once
into a fresh host array. Parameters are re-uploaded only when ``exe.params[name]`` was
assigned a new array since the last run (in-place edits of a params array are not seen:
assign it, or call ``exe.sync_params()``). Not thread-safe.

Limits: the hot kernels are float32 (other float dtypes raise, or fall back with
``host_fallback``); ids out of range in ``gather`` give zeros instead of an error.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

from ...errors import BackendError
from ...ir import SOURCE_OPS, DType, Fusion, Graph, Node, eval_shape, get_op
from ...plan import VIEW_OPS, MemoryPlan, check_bindings
from ..arrays import c_contiguous
from ..executable import Executable
from ..numpy_ref import resolve_shape_attrs

__all__ = ["CudaExecutable", "require_device"]

_FLOAT32_OPS = {"matmul", "matmul_epilogue", "attention", "attention_grad", "softmax", "log_softmax", "layernorm",
                "residual_layernorm", "sum", "mean", "max"}
_COPY_OPS = {"concat", "patchify", "pad"}


def require_device() -> None:
    """Raise BackendError unless numba-cuda is installed and a GPU (or the simulator) is there."""
    try:
        from numba import cuda
    except Exception as err:   # numba-cuda missing or broken
        raise BackendError(f"the cuda backend needs numba-cuda, which cannot be imported ({err})",
                           hint="pip install 'attngraph[cuda]'") from None
    try:
        available = cuda.is_available()
    except Exception:
        available = False
    if not available:
        raise BackendError("no CUDA GPU is available: numba.cuda.is_available() is False",
                           hint="to run on the CUDA simulator (slow; for tests), set NUMBA_ENABLE_CUDASIM=1 "
                                "before numba is imported; or compile with backend='cpu'")


def _where(node: Node) -> str | None:
    if node.source is not None:
        return str(node.source)
    if node.origin:
        return "; ".join(str(s) for s in node.origin)
    return None


def _kernel_kind(node: Node) -> str | None:
    """The device kernel family for ``node``, or None when it has none."""
    from . import kernels as K

    op = node.op
    if op in VIEW_OPS:
        return "view"
    types = [v.type for v in node.inputs] + list(node.types)
    if op == "attention" and node.attrs.get("return_weights", False):
        return None                     # the weights-returning form has no device kernel
    if op in _FLOAT32_OPS:
        floats = [t.dtype for t in types if t.dtype != DType.bool]
        if any(d != DType.float32 for d in floats):
            return None
        if op in ("sum", "mean", "max") and node.inputs[0].type.rank == 0:
            return None
        return op
    if op in _COPY_OPS or op == "gather":
        return op
    if op == "fused_elementwise":
        return "elementwise"
    opdef = get_op(op)
    if opdef.fusion is Fusion.ELEMENTWISE and node.inputs and K.has_template(op, dict(node.attrs)):
        return "elementwise"
    return None


class _Context:
    """What a builder needs while a program is laid out."""

    def __init__(self, exe: "CudaExecutable", arena, bindings):
        self.exe = exe
        self.arena = arena
        self.bindings = bindings
        self.tiles = exe.tiles


# -- builders: node, input refs, output refs → launches -------------------------------------------
def _build_elementwise(node, ins, outs, ctx):
    from . import kernels as K

    origin = node.origin or ((node.source,) if node.source else ())
    title = "fused elementwise region" if node.op == "fused_elementwise" else node.op
    return K.prepare_elementwise(K.node_expression(node), outs[0], ins, tiles=ctx.tiles, origin=origin, title=title)


def _build_matmul(node, ins, outs, ctx):
    from . import kernels as K

    return K.prepare_matmul(outs[0], ins[0], ins[1], ctx.arena, tiles=ctx.tiles)


def _build_matmul_epilogue(node, ins, outs, ctx):
    from . import kernels as K

    out = outs[0]
    origin = node.origin or ((node.source,) if node.source else ())
    return K.prepare_matmul(out, ins[0], ins[1], ctx.arena, tiles=ctx.tiles) + \
        K.prepare_elementwise(node.attrs["expr"], out, [out, *ins[2:]], tiles=ctx.tiles, origin=origin,
                              title="matmul epilogue (in0 is the matmul result)")


def _build_attention(node, ins, outs, ctx):
    from . import kernels as K

    a = node.attrs
    rest = list(ins[3:])
    bias = rest.pop(0) if a["has_bias"] else None
    mask = rest.pop(0) if a["has_mask"] else None
    return K.prepare_attention_forward(outs[0], ins[0], ins[1], ins[2], bias, mask, scale=float(a["scale"]),
                                       causal=bool(a["causal"]), scratch=ctx.arena, tiles=ctx.tiles)


def _build_attention_grad(node, ins, outs, ctx):
    """dq, dk, dv: the flash forward again (for out and the log-sum-exp), then the backward
    kernels on contiguous operands broadcast to the full batch, then sums over the batch dims
    that broadcasting stretched."""
    from . import kernels as K

    a = node.attrs
    q, k, v, *rest, g = ins
    bias = rest.pop(0) if a["has_bias"] else None
    mask = rest.pop(0) if a["has_mask"] else None
    batch = tuple(g.shape[:-2])
    Z = int(np.prod(batch, dtype=np.int64)) if batch else 1
    arena, tiles = ctx.arena, ctx.tiles
    launches = []

    def full(x, target=None):
        shape = batch + tuple(x.shape[-2:])
        if target is not None and target.shape == shape and target.contiguous:
            return target
        if target is None and x.shape == shape and x.contiguous:
            return x
        tmp = arena.tensor(shape, np.float32)
        if target is None:
            launches.extend(K.prepare_copy(tmp, x.broadcast(shape), tiles=tiles))
        return tmp

    qc, kc, vc, gc = full(q), full(k), full(v), full(g)
    out = arena.tensor(gc.shape, np.float32)
    lse = arena.tensor((Z * qc.shape[-2],), np.float32)
    launches += K.prepare_attention_forward(out, qc, kc, vc, bias, mask, scale=float(a["scale"]),
                                            causal=bool(a["causal"]), scratch=arena, lse=lse, tiles=tiles)
    grads = [full(x, target) for x, target in zip((q, k, v), outs)]
    launches += K.prepare_attention_backward(*grads, qc, kc, vc, out, lse, gc, bias, mask, scale=float(a["scale"]),
                                             causal=bool(a["causal"]), scratch=arena, tiles=tiles)
    for grad, target in zip(grads, outs):
        if grad is not target:              # sum over the batch dims broadcasting stretched
            lead = len(grad.shape) - len(target.shape)
            axes = list(range(lead)) + [lead + i for i, d in enumerate(target.shape)
                                        if d == 1 and grad.shape[lead + i] != 1]
            launches += K.prepare_reduce(target, grad, axes, "sum", arena, tiles=tiles)
    return launches


def _build_softmax(node, ins, outs, ctx):
    from . import kernels as K

    return K.prepare_softmax(outs[0], ins[0], node.attrs["axis"], ctx.arena, log=node.op == "log_softmax",
                             tiles=ctx.tiles)


def _affine(node, refs):
    rest = list(refs)
    gamma = rest.pop(0) if node.attrs["has_gamma"] else None
    beta = rest.pop(0) if node.attrs["has_beta"] else None
    return gamma, beta


def _build_layernorm(node, ins, outs, ctx):
    from . import kernels as K

    gamma, beta = _affine(node, ins[1:])
    return K.prepare_layernorm(outs[0], ins[0], gamma, beta, float(node.attrs["eps"]), ctx.arena, tiles=ctx.tiles)


def _build_residual_layernorm(node, ins, outs, ctx):
    from . import kernels as K

    gamma, beta = _affine(node, ins[2:])
    return K.prepare_layernorm(outs[1], ins[0], gamma, beta, float(node.attrs["eps"]), ctx.arena,
                               residual=ins[1], total=outs[0], tiles=ctx.tiles)


def _build_reduce(node, ins, outs, ctx):
    from . import kernels as K

    return K.prepare_reduce(outs[0], ins[0], node.attrs["axis"], node.op, ctx.arena, tiles=ctx.tiles)


def _build_gather(node, ins, outs, ctx):
    from . import kernels as K

    return K.prepare_gather(outs[0], ins[0], ins[1], node.attrs["axis"], ctx.arena, tiles=ctx.tiles)


def _build_concat(node, ins, outs, ctx):
    from . import kernels as K

    out, axis = outs[0], node.attrs["axis"]
    launches, start = [], 0
    for x in ins:
        part = out.view(x.shape, out.strides, start * out.strides[axis])
        launches += K.prepare_copy(part, x, tiles=ctx.tiles)
        start += x.shape[axis]
    return launches


def _build_patchify(node, ins, outs, ctx):
    from . import kernels as K

    x, p = ins[0], int(node.attrs["patch"])
    b, c, h, w = x.shape
    s0, s1, s2, s3 = x.strides
    patches = x.view((b, h // p, w // p, c, p, p), (s0, p * s2, p * s3, s1, s2, s3))   # (B, H/p, W/p, C, p, p)
    out = outs[0]
    return K.prepare_copy(out.reshaped(patches.shape), patches, tiles=ctx.tiles)


def _build_pad(node, ins, outs, ctx):
    from . import kernels as K

    out, x = outs[0], ins[0]
    pads = node.attrs["pads"]
    offset = sum(before * st for (before, _), st in zip(pads, out.strides))
    interior = out.view(x.shape, out.strides, offset)
    value = node.attrs.get("value", 0.0)
    return K.prepare_fill(out, value, tiles=ctx.tiles) + K.prepare_copy(interior, x, tiles=ctx.tiles)


_BUILDERS: dict[str, Callable] = {
    "elementwise": _build_elementwise,
    "matmul": _build_matmul,
    "matmul_epilogue": _build_matmul_epilogue,
    "attention": _build_attention,
    "attention_grad": _build_attention_grad,
    "softmax": _build_softmax,
    "log_softmax": _build_softmax,
    "layernorm": _build_layernorm,
    "residual_layernorm": _build_residual_layernorm,
    "sum": _build_reduce,
    "mean": _build_reduce,
    "max": _build_reduce,
    "gather": _build_gather,
    "concat": _build_concat,
    "patchify": _build_patchify,
    "pad": _build_pad,
}


# -- views --------------------------------------------------------------------------------------
def _view_refs(node: Node, src, shapes, bindings) -> list | None:
    """The refs a view op's outputs are on the device (no copy), or None when it needs one."""
    op = node.op
    if op == "reshape":
        return [src.reshaped(shapes[0])] if src.contiguous else None
    if op == "transpose":
        return [src.permuted(node.attrs["axes"])]
    if op == "broadcast_to":
        return [src.broadcast(shapes[0])]
    if op == "slice":
        attrs = resolve_shape_attrs(node, ("starts", "stops"), bindings)
        offset, strides = 0, []
        for dim, st, a, b, c in zip(src.shape, src.strides, attrs["starts"], attrs["stops"], attrs["steps"]):
            start, _, step = slice(a, b, c).indices(dim)
            offset += start * st
            strides.append(st * step)
        if any(d == 0 for d in shapes[0]):
            offset = 0
        return [src.view(shapes[0], strides, offset)]
    if op == "split":
        axis, start, refs = node.attrs["axis"], 0, []
        for shape in shapes:
            refs.append(src.view(shape, src.strides, start * src.strides[axis]))
            start += shape[axis]
        return refs
    raise AssertionError(op)


# -- host steps ----------------------------------------------------------------------------------
class _HostStep:
    """Runs a node's numpy reference on the host: device → host → device (``host_fallback``)."""

    def __init__(self, node: Node, ins, outs, bindings):
        from numba import cuda

        self._sync = cuda.synchronize
        self.node = node
        self.ins, self.outs = ins, outs
        op = get_op(node.op)
        self.reference = op.reference
        self.attrs = resolve_shape_attrs(node, op.shape_attrs, bindings) if op.shape_attrs else dict(node.attrs)
        self.name = f"host:{node.op}"

    def __call__(self) -> None:
        self._sync()
        arrays = [r.read() for r in self.ins]
        with np.errstate(all="ignore"):
            result = self.reference(*arrays, **self.attrs)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for ref, value in zip(self.outs, results):
            value = c_contiguous(np.asarray(value, dtype=ref.dtype).reshape(ref.shape))
            ref.arena.write(ref.offset * ref.dtype.itemsize, value)


# -- the program for one set of bindings ------------------------------------------------------------
class _Program:
    """The plan, the arena, the prepared launches and the transfers for one set of bindings."""

    def __init__(self, exe: "CudaExecutable", plan: MemoryPlan):
        from . import kernels as K

        self.plan = plan
        bindings = plan.bindings
        graph = exe.graph
        arena = K.Arena("activations")
        ctx = _Context(exe, arena, bindings)
        tiles = exe.tiles
        buffer_offsets = [arena.alloc(b.bytes) for b in plan.buffers]

        def owned(key) -> "K.Ref":
            p = plan.placements[key]
            dtype = np.dtype(p.dtype)
            return K.Ref(arena, dtype, buffer_offsets[p.buffer] // dtype.itemsize, tuple(p.shape),
                         K.c_strides(p.shape))

        refs: dict[tuple[int, int], K.Ref] = {}
        host_values: dict[tuple[int, int], np.ndarray] = {}   # plan constants (and consts) on the host
        steps: list = []
        self.inputs: list[tuple[str, K.Ref]] = []

        def contiguous(ref):
            if ref.contiguous:
                return ref
            tmp = arena.tensor(ref.shape, ref.dtype)
            steps.extend(K.prepare_copy(tmp, ref, tiles=tiles))
            return tmp

        def place(node: Node) -> None:
            keys = [(node.id, i) for i in range(len(node.types))]
            shapes = [tuple(eval_shape(t.shape, bindings)) for t in node.types]
            places = [plan.placements[k] for k in keys]
            if node.op in SOURCE_OPS:
                if node.op == "input":
                    ref = arena.tensor(shapes[0], node.type.dtype.numpy)
                    self.inputs.append((node.name, ref))
                else:
                    ref = exe._weight_refs[node.name]
                    if node.op == "const":
                        host_values[keys[0]] = exe.graph.values[node.name]
                refs[keys[0]] = ref
                if places[0].materialize:
                    dst = owned(keys[0])
                    steps.extend(K.prepare_copy(dst, ref, tiles=tiles))
                    refs[keys[0]] = dst
                return
            ins = [refs[(v.node.id, v.index)] for v in node.inputs]
            kind = exe._kinds[node.id]
            if kind == "view":
                views = _view_refs(node, ins[0], shapes, bindings)
                for i, (key, p) in enumerate(zip(keys, places)):
                    src = views[i] if views is not None else ins[0]
                    if p.kind == "view" and views is not None:
                        refs[key] = src
                        continue
                    dst = owned(key) if p.kind == "owned" else arena.tensor(shapes[i], p.dtype)
                    if views is None:                 # a reshape of a strided value: copy in source order
                        steps.extend(K.prepare_copy(dst.reshaped(src.shape), src, tiles=tiles))
                    else:
                        steps.extend(K.prepare_copy(dst, src, tiles=tiles))
                    refs[key] = dst
                return
            if kind == "constant":
                args = [host_values[(v.node.id, v.index)] for v in node.inputs]
                op = get_op(node.op)
                attrs = resolve_shape_attrs(node, op.shape_attrs, bindings) if op.shape_attrs else node.attrs
                with np.errstate(all="ignore"):
                    result = op.reference(*args, **attrs)
                results = result if isinstance(result, (tuple, list)) else (result,)
                for key, shape, t, value in zip(keys, shapes, node.types, results):
                    value = c_contiguous(np.asarray(value, dtype=t.dtype.numpy).reshape(shape))
                    host_values[key] = value
                    refs[key] = arena.upload(value)
                return
            outs = [owned(k) for k in keys]
            for key, ref in zip(keys, outs):
                refs[key] = ref
            if kind == "host":
                steps.append(_HostStep(node, [contiguous(r) for r in ins], outs, bindings))
            else:
                steps.extend(_BUILDERS[kind](node, ins, outs, ctx))

        self.schedule: list[tuple[Node, int, int]] = []    # node, its first step, one past its last
        for node in graph.nodes:
            first = len(steps)
            place(node)
            self.schedule.append((node, first, len(steps)))

        self.refs = refs                 # (node id, output index) → where the value lives on the device
        self.outputs = [(name, refs[(v.node.id, v.index)]) for name, v in graph.outputs.items()]
        arena.finalize()
        self.arena = arena
        self.steps = steps
        self.launches = [s for s in steps if isinstance(s, K.Launch)]
        for launch in self.launches:
            launch.bind()
        self.runs = [s.run if isinstance(s, K.Launch) else s for s in steps]
        # device slices for the transfers, made once
        self.input_copies = [(name, _slice(ref), ref) for name, ref in self.inputs if ref.size]
        self.output_copies = [(name, _slice(ref), ref) for name, ref in self.outputs]

    @property
    def device_bytes(self) -> int:
        return self.arena.nbytes


def _slice(ref):
    start = ref.offset * ref.dtype.itemsize
    if not ref.contiguous:
        raise BackendError("internal error: a graph input or output is not contiguous on the device")
    return ref.arena.device[start:start + ref.nbytes]


class CudaExecutable(Executable):
    backend = "cuda"

    def __init__(self, graph: Graph, *, max_plans: int = 8, host_fallback: bool = False, tiles=None):
        require_device()
        from . import kernels as K

        super().__init__(graph)
        self.tiles = tiles or K.default_tiles()
        self.host_fallback = host_fallback
        self.max_plans = max_plans
        self.kernel_sources: dict[str, str] = {}
        self._kinds: dict[int, str] = {}
        constant_keys = {n.id for n in graph.nodes if n.op == "const"}
        for node in graph.nodes:
            if node.op in SOURCE_OPS:
                continue
            kind = _kernel_kind(node)
            if kind in (None, "view") and all(v.node.id in constant_keys for v in node.inputs):
                kind = "constant"           # computed once per set of bindings, on the host
                constant_keys.add(node.id)
            if kind is None:
                if host_fallback:
                    kind = "host"
                else:
                    raise self._no_kernel(node)
            self._kinds[node.id] = kind
            self.kernel_sources[node.label] = {"view": "view", "constant": "plan constant",
                                               "host": "host"}.get(kind, f"cuda:{kind}")
        # parameters and constants live in their own arena, uploaded once
        weights = K.Arena("weights")
        self._weight_refs = {}
        for name in graph.params:
            self._weight_refs[name] = weights.upload(c_contiguous(self.params[name]))
        for name in graph.consts:
            self._weight_refs[name] = weights.upload(c_contiguous(graph.values[name]))
        weights.finalize()
        self._weights = weights
        self._param_seen = {name: self.params[name] for name in graph.params}
        self._programs: OrderedDict[tuple, _Program] = OrderedDict()

    @staticmethod
    def _no_kernel(node: Node) -> BackendError:
        types = ", ".join(str(v.type) for v in node.inputs)
        why = ""
        if node.op == "attention" and node.attrs.get("return_weights", False):
            why = " with return_weights=True (the attention weights as a second output)"
        elif node.op in _FLOAT32_OPS:
            why = " for these dtypes (its CUDA kernel runs float32)"
        return BackendError(f"the cuda backend has no kernel for {node.op}({types}){why}",
                            where=_where(node),
                            hint="compile with backend='cuda', host_fallback=True to run it on the host "
                                 "(slow), or use backend='cpu'")

    # -- plans -----------------------------------------------------------------------------------
    def memory_plan(self, **bindings) -> MemoryPlan:
        """The memory plan for ``bindings`` (one int per symbolic dim; none for a static graph)."""
        return self._program(check_bindings(self.graph, bindings)).plan

    def device_bytes(self, **bindings) -> int:
        """Bytes of the activation arena for ``bindings``: the plan's buffers, the input slots and
        the kernels' scratch (the weights arena is separate: ``weights_bytes``)."""
        return self._program(check_bindings(self.graph, bindings)).device_bytes

    @property
    def weights_bytes(self) -> int:
        return self._weights.nbytes

    def launches(self, **bindings) -> list:
        """The prepared kernel launches for ``bindings``, in order."""
        return list(self._program(check_bindings(self.graph, bindings)).launches)

    def _program(self, bindings: dict) -> _Program:
        return self._cached_program(bindings, lambda plan: _Program(self, plan))

    # -- parameters --------------------------------------------------------------------------------
    def sync_params(self, names=None) -> None:
        """Upload parameters to the device (all, or ``names``), e.g. after editing one in place."""
        for name in (self.graph.params if names is None else names):
            self._upload_param(name, self.params[name])

    def _upload_param(self, name: str, array: np.ndarray) -> None:
        ref = self._weight_refs[name]
        self._weights.write(ref.offset * ref.dtype.itemsize, c_contiguous(array, dtype=ref.dtype))
        self._param_seen[name] = array

    def _sync_changed_params(self) -> None:
        params, seen = self.params, self._param_seen
        for name in seen:
            array = params[name]
            if array is not seen[name]:
                self._upload_param(name, array)

    # -- running ---------------------------------------------------------------------------------
    def _execute(self, feeds, bindings):
        program = self._program(bindings)
        self._sync_changed_params()
        for name, dev, ref in program.input_copies:
            host = c_contiguous(feeds[name])
            dev.copy_to_device(host.reshape(-1).view(np.uint8))
        for run in program.runs:
            run()
        outputs = {}
        for name, dev, ref in program.output_copies:
            out = np.empty(ref.shape, dtype=ref.dtype)
            if out.size:
                dev.copy_to_host(out.reshape(-1).view(np.uint8))
            outputs[name] = out
        return outputs
