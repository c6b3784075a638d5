"""numba-cuda kernels for the CUDA backend, and the device memory they run over.

Everything here works on one idea: a tensor on the device is a ``Ref``, a place in a flat
device buffer (an ``Arena``): element offset, shape and strides in elements. Kernels take the
arena's flat typed view plus offsets and strides, so every view the memory plan makes
(reshape, transpose, slice, broadcast, split) costs nothing on the device, and one kernel
serves every layout.

A kernel launch is a ``Launch``: the kernel, its grid, its block and its arguments, prepared
once per memory plan (``prepare_*`` functions below return lists of them). ``Launch.bind()``
turns the arguments into what the driver takes, once; after that a launch does little
Python work (see ``Launch`` for the three launch paths).

Kernels (all float32 unless said otherwise)::

    elementwise   generated from an expression over the registry's scalar templates
                  (the same ``fused_elementwise`` regions the CPU backend gets); any dtype;
                  also the strided copy behind reshape/concat/patchify/pad and the
                  materialized outputs
    sgemm         C = A @ B, tiled: a (BM x BN) tile per block, K in steps of BK through
                  shared memory, a (TM x TN) register block per thread; batched through a
                  table of per-batch offsets; transposed operands through strides
    softmax       one block per row, max and sum by block reductions (log_softmax too)
    layernorm     one block per row, two-pass mean and variance; the residual form writes
                  a + b and layernorm(a + b)
    reduce        sum / mean / max over the last axis (other axes are permuted there first)
    gather        data.take(indices, axis)
    attention     flash forward: one query row per thread, a tile of BQ queries per block,
                  K and V tiles through shared memory, online softmax (running max and sum,
                  exp once per score), key tiles above the diagonal skipped when causal,
                  bias and boolean mask, log-sum-exp saved. Backward (FlashAttention-2): the
                  row dots D = rowsum(dO * O), then dK/dV with one key row per thread and dQ
                  with one query row per thread, both recomputing p = exp(s - lse).

A fully masked row gives zeros (forward), lse = -inf and zero gradients (backward).

Tile sizes: ``GPU_TILES`` on a real GPU, ``SIM_TILES`` (tens of threads per block) under the
simulator (``NUMBA_ENABLE_CUDASIM=1``, which must be set before numba is imported). Every
``prepare_*`` takes ``tiles=`` so tests can force small tiles on a real GPU too.

The simulator runs kernels as Python and never types them; ``ptx_of(launch)`` compiles a
prepared launch with NVVM for a real GPU without one (the tests check every kernel family
that way, and that the float32 kernels hold no float64 arithmetic). ``sgemm``, ``softmax``,
``attention_forward`` ... at the end are numpy-in, numpy-out wrappers for tests and benchmarks.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numba import cuda
from numba.core import config as numba_config

from ...ir import DType, TensorType, as_dtype, get_op
from ..arrays import c_contiguous
from ..expression import literal as _literal, scalar_template as _template

__all__ = [
    "SIMULATOR", "Tiles", "GPU_TILES", "SIM_TILES", "default_tiles", "Arena", "Ref", "Arg", "Sub", "Launch",
    "c_strides", "collapse", "rows_view", "node_expression", "has_template", "ptx_of",
    "elementwise_source", "elementwise_kernel", "prepare_elementwise", "prepare_copy",
    "prepare_fill", "prepare_matmul", "prepare_softmax", "prepare_layernorm", "prepare_reduce", "prepare_gather",
    "prepare_attention_forward", "prepare_attention_backward",
    "sgemm", "softmax", "layernorm", "residual_layernorm", "row_reduce", "elementwise", "attention_forward",
    "attention_backward", "gather",
]

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)

F32 = np.float32
ZERO = np.float32(0.0)
ONE = np.float32(1.0)
NEG_INF = np.float32(-np.inf)


# ============================================================================================
# tiles
# ============================================================================================

@dataclass(frozen=True)
class Tiles:
    """Block and tile sizes. ``gemm``: (BM, BN, BK, TM, TN) for big and ``gemm_small`` for small
    products; ``attn``: (BQ, BK) for head dims up to 64 (halved BK above); ``rows``: threads per
    row for softmax/layernorm/reduce (a power of two); ``flat``: threads per block of the
    elementwise kernels."""

    gemm: tuple = (128, 128, 8, 8, 8)
    gemm_small: tuple = (64, 64, 16, 4, 4)
    attn: tuple = (64, 32)
    attn_bwd: tuple = (32, 32)
    rows: int = 128
    flat: int = 256
    max_blocks: int = 65535


GPU_TILES = Tiles()
SIM_TILES = Tiles(gemm=(8, 8, 4, 2, 2), gemm_small=(8, 8, 4, 2, 2), attn=(8, 4), attn_bwd=(4, 4), rows=8,
                  flat=32, max_blocks=4)


def default_tiles() -> Tiles:
    return SIM_TILES if SIMULATOR else GPU_TILES


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ============================================================================================
# device memory: the arena and references into it
# ============================================================================================

_ALIGN = 256


def _storage_dtype(dtype) -> np.dtype:
    """How a dtype is stored for kernels: bools as uint8 (kernels compare with 0)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint8) if dtype == np.bool_ else dtype


class Arena:
    """One flat device allocation, laid out before it exists.

    ``alloc`` hands out aligned byte offsets; ``upload`` also remembers host data to copy in
    when the arena is made (``finalize``). ``typed(dtype)`` is the flat view of the whole
    arena in that dtype, which kernels index with element offsets.
    """

    def __init__(self, name: str = "arena"):
        self.name = name
        self.nbytes = 0
        self.device = None
        self._uploads: list[tuple[int, np.ndarray]] = []
        self._typed: dict = {}

    def alloc(self, nbytes: int) -> int:
        if self.device is not None:
            raise RuntimeError(f"{self.name} is already allocated")
        offset = _cdiv(self.nbytes, _ALIGN) * _ALIGN
        self.nbytes = offset + max(int(nbytes), 0)
        return offset

    def tensor(self, shape, dtype) -> "Ref":
        """A fresh C-contiguous tensor in this arena."""
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        offset = self.alloc(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return Ref(self, dtype, offset // dtype.itemsize, shape, c_strides(shape))

    def upload(self, array: np.ndarray) -> "Ref":
        """A tensor holding ``array`` once the arena is made."""
        array = c_contiguous(array)
        ref = self.tensor(array.shape, array.dtype)
        self._uploads.append((ref.offset * array.dtype.itemsize, array))
        return ref

    def finalize(self) -> None:
        size = max(_cdiv(self.nbytes, _ALIGN) * _ALIGN, _ALIGN)
        self.device = cuda.device_array(size, dtype=np.uint8)
        for offset, array in self._uploads:
            self.write(offset, array)
        self._uploads = []

    def write(self, byte_offset: int, array: np.ndarray) -> None:
        """Copy a C-contiguous host array into the arena at ``byte_offset``."""
        if array.size:
            raw = array.reshape(-1).view(np.uint8)
            self.device[byte_offset:byte_offset + raw.size].copy_to_device(raw)

    def read(self, byte_offset: int, out: np.ndarray) -> np.ndarray:
        """Copy bytes from the arena into the C-contiguous host array ``out``."""
        if out.size:
            raw = out.reshape(-1).view(np.uint8)
            self.device[byte_offset:byte_offset + raw.size].copy_to_host(raw)
        return out

    def typed(self, dtype):
        dtype = _storage_dtype(dtype)
        view = self._typed.get(dtype)
        if view is None:
            if self.device is None:
                raise RuntimeError(f"{self.name} is not allocated yet")
            view = self._typed[dtype] = self.device.view(dtype)
        return view

    def release(self) -> None:
        self.device = None
        self._typed = {}


def c_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(int(d), 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Ref:
    """A tensor in an arena: element ``offset``, ``shape`` and ``strides`` (in elements)."""

    arena: Arena
    dtype: np.dtype
    offset: int
    shape: tuple
    strides: tuple

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def contiguous(self) -> bool:
        return _is_c_contiguous(self.shape, self.strides)

    @property
    def array(self):
        """The arena's flat typed device array (kernels add ``offset``)."""
        return self.arena.typed(self.dtype)

    def view(self, shape, strides, offset: int = 0) -> "Ref":
        return Ref(self.arena, self.dtype, self.offset + offset, tuple(shape), tuple(strides))

    def reshaped(self, shape) -> "Ref":
        if not self.contiguous:
            raise ValueError("only a contiguous tensor can be reshaped in place")
        return self.view(shape, c_strides(shape))

    def permuted(self, axes) -> "Ref":
        return self.view([self.shape[a] for a in axes], [self.strides[a] for a in axes])

    def broadcast(self, shape) -> "Ref":
        shape = tuple(shape)
        pad = len(shape) - len(self.shape)
        src_shape = (1,) * pad + self.shape
        src_strides = (0,) * pad + self.strides
        strides = tuple(0 if s == 1 and d != 1 else st for s, d, st in zip(src_shape, shape, src_strides))
        return self.view(shape, strides)

    def read(self) -> np.ndarray:
        """A host copy (C-contiguous) of a contiguous ref; for tests and host fallbacks."""
        if not self.contiguous:
            raise ValueError("read() needs a contiguous ref")
        out = np.empty(self.shape, dtype=_storage_dtype(self.dtype))
        self.arena.read(self.offset * self.dtype.itemsize, out)
        return out.view(self.dtype) if self.dtype == np.bool_ else out


def _is_c_contiguous(shape, strides) -> bool:
    expected = 1
    for d, s in zip(reversed(shape), reversed(strides)):
        if d == 0:
            return True
        if d == 1:
            continue
        if s != expected:
            return False
        expected *= d
    return True


def collapse(shape, *stride_sets) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent axes wherever every operand allows it; drop size-1 axes.

    Returns (sizes, strides per operand), outermost axis first; at least one axis."""
    sizes: list[int] = []
    strides: list[list[int]] = [[] for _ in stride_sets]
    for d, size in enumerate(shape):
        if size == 1:
            continue
        cur = [st[d] for st in stride_sets]
        if sizes and all(s[-1] == c * size for s, c in zip(strides, cur)):
            sizes[-1] *= size
            for s, c in zip(strides, cur):
                s[-1] = c
            continue
        sizes.append(int(size))
        for s, c in zip(strides, cur):
            s.append(int(c))
    if not sizes:
        return [1], [[0] for _ in stride_sets]
    return sizes, strides


def rows_view(ref: Ref) -> tuple[int, int, int, int] | None:
    """(rows, n, row stride, column stride) when ``ref``'s leading axes merge into one
    strided row axis, else None (the caller makes a contiguous copy first)."""
    shape = ref.shape
    n = shape[-1] if shape else 1
    col = ref.strides[-1] if shape else 1
    lead = shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    sizes, (strides,) = collapse(lead, ref.strides[:-1]) if lead else ([1], [[0]])
    if len(sizes) > 1:
        return None
    return rows, int(n), int(strides[0]), int(col)


# ============================================================================================
# launches
# ============================================================================================

class Arg:
    """A launch argument that is the arena's flat array of a ref's dtype (kernels add offsets)."""

    __slots__ = ("ref",)

    def __init__(self, ref: Ref):
        self.ref = ref


class Sub(Arg):
    """A launch argument that is the part of the arena starting at a ref (kernels index from 0)."""

    __slots__ = ()


def _resolve(a):
    if isinstance(a, Sub):
        r = a.ref
        return r.array[r.offset:r.offset + max(r.size, 1)]
    if isinstance(a, Arg):
        return a.ref.array
    return a


def _launch_mode() -> str:
    mode = os.environ.get("ATTNGRAPH_CUDA_LAUNCH", "fast")
    return "dispatch" if SIMULATOR else mode


class Launch:
    """One prepared kernel launch.

    ``bind()`` resolves the arguments (arena views) and picks how to launch, by
    ``$ATTNGRAPH_CUDA_LAUNCH`` (default ``fast``; the simulator always uses ``dispatch``):

    - ``fast``: the arguments are marshalled once, exactly as numba-cuda's own
      ``_Kernel.launch`` does (``_prepare_args``), with a prebuilt ``LaunchConfig``; a run
      calls ``cuda.core.launch`` directly. Falls back to ``kernel`` if anything is missing.
    - ``kernel``: the compiled ``_Kernel`` for these argument types, ``kernel.launch(...)``
      per run (skips the dispatcher's typing of the arguments).
    - ``dispatch``: ``dispatcher[grid, block](*args)``, numba's ordinary path.
    """

    __slots__ = ("dispatcher", "grid", "block", "args", "name", "shared", "run", "mode")

    def __init__(self, dispatcher, grid, block, args, name: str = "", shared: int = 0):
        self.dispatcher = dispatcher
        self.grid = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
        self.block = tuple(int(b) for b in (block if isinstance(block, tuple) else (block,)))
        self.args = tuple(args)
        self.name = name or getattr(dispatcher, "__name__", "kernel")
        self.shared = shared
        self.run = None
        self.mode = None

    def bind(self) -> "Launch":
        with warnings.catch_warnings():      # small grids are expected here (tests, tiny graphs)
            warnings.filterwarnings("ignore", message=".*under-utilization.*")
            return self._bind()

    def _bind(self) -> "Launch":
        args = tuple(_resolve(a) for a in self.args)
        mode = _launch_mode()
        if mode == "fast":
            run = _fast_launch(self.dispatcher, self.grid, self.block, args, self.shared)
            if run is not None:
                self.run, self.mode = run, "fast"
                return self
            mode = "kernel"
        if mode == "kernel":
            run = _kernel_launch(self.dispatcher, self.grid, self.block, args, self.shared)
            if run is not None:
                self.run, self.mode = run, "kernel"
                return self
        dispatcher, config = self.dispatcher, (self.grid, self.block, 0, self.shared)
        # configure at every call: the simulator's kernel object keeps the last configuration
        self.run = lambda: dispatcher[config](*args)
        self.mode = "dispatch"
        return self

    def __call__(self) -> None:
        if self.run is None:
            self.bind()
        self.run()

    def __repr__(self) -> str:
        return f"<Launch {self.name} grid={self.grid} block={self.block} mode={self.mode}>"


def _compiled(dispatcher, args):
    argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
    return dispatcher.compile(argtypes)


def _kernel_launch(dispatcher, grid, block, args, shared):   # pragma: no cover (GPU only)
    """``_Kernel.launch`` with what ``CUDADispatcher.call`` would pass it (normalized dims, the
    launch configuration's stream), minus the typing of the arguments."""
    try:
        kernel = _compiled(dispatcher, args)
        configured = dispatcher[grid, block, 0, shared]
        launch = kernel.launch
        griddim, blockdim, stream = configured.griddim, configured.blockdim, configured.stream
    except Exception:
        return None
    return lambda: launch(args, griddim, blockdim, stream, shared)


def _fast_launch(dispatcher, grid, block, args, shared):   # pragma: no cover (GPU only)
    """A launch with every argument marshalled once (mirrors numba-cuda 0.30's _Kernel.launch)."""
    try:
        from cuda.core import LaunchConfig, launch
        from numba.cuda._compat import CUDA_CORE_GE_1_0

        kernel = _compiled(dispatcher, args)
        if getattr(kernel, "debug", False) or getattr(kernel, "cooperative", False):
            return None
        configured = dispatcher[grid, block, 0, shared]
        stream = configured.stream
        kernelargs, retr = [], []
        for ty, value in zip(kernel.argument_types, args):
            kernel._prepare_args(ty, value, stream, retr, kernelargs)
        if retr:            # a host array was auto-copied: not a prepared launch
            return None
        options = dict(grid=configured.griddim, block=configured.blockdim, shmem_size=shared)
        options["is_cooperative" if CUDA_CORE_GE_1_0 else "cooperative_launch"] = False
        launch_config = LaunchConfig(**options)
        cukernel = kernel._codelibrary.get_cufunc().kernel
        kernelargs = tuple(kernelargs)
    except Exception:
        return None

    def run():
        launch(stream, launch_config, cukernel, *kernelargs)
    return run


def _grid_1d(n: int, threads: int, tiles: Tiles) -> int:
    return max(1, min(_cdiv(n, threads), tiles.max_blocks if SIMULATOR else 65535 * 16))


# ============================================================================================
# elementwise: generated from an expression tree (ops/fused.py), over strided operands
# ============================================================================================

_CONVERT = {DType.float32: "np.float32", DType.float64: "np.float64", DType.int32: "np.int32",
            DType.int64: "np.int64", DType.bool: "_bool"}
_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?)")


def has_template(op_name: str, attrs: dict) -> bool:
    try:
        _template(op_name, attrs)
        return True
    except (NotImplementedError, KeyError):
        return False


def node_expression(node) -> tuple:
    """The expression of one elementwise node over its own inputs."""
    if node.op == "fused_elementwise":
        return node.attrs["expr"]
    return (node.op, tuple(sorted(node.attrs.items()))) + tuple(("in", k) for k in range(len(node.inputs)))


def _statements(expr, in_dtypes, index_of) -> tuple[list[str], str, DType]:
    lines: list[str] = []
    done: dict = {}
    counter = iter(range(1 << 30))

    def walk(e):
        if e in done:
            return done[e]
        tag = e[0]
        if tag == "in":
            k = e[1]
            dtype = in_dtypes[k]
            name = f"x{k}"
            load = f"in{k}[{index_of(k)}]"
            lines.append(f"{name} = ({load} != 0)" if dtype == DType.bool else f"{name} = {load}")
        elif tag == "const":
            dtype = as_dtype(e[2])
            name = f"{_CONVERT[dtype]}({_literal(e[1])})" if dtype != DType.bool else repr(bool(e[1]))
        else:
            attrs = dict(e[1])
            operands = [walk(c) for c in e[2:]]
            dtype = get_op(tag).infer(*(TensorType(d, ()) for _, d in operands), **attrs).dtype
            text = _template(tag, attrs)
            if dtype == DType.float32 and all(d != DType.float64 for _, d in operands):
                text = _FLOAT_LITERAL.sub(r"np.float32(\1)", text)      # keep float32 math in float32
            text = text.format(*(n for n, _ in operands), *(_literal(v) for _, v in e[1]))
            name = f"t{next(counter)}"
            lines.append(f"{name} = {_CONVERT[dtype]}({text})".ljust(60) + f"  # {tag}")
        done[e] = (name, dtype)
        return name, dtype

    result, dtype = walk(expr)
    return lines, result, dtype


def elementwise_source(expr, in_dtypes: Sequence, out_dtype, ndim: int) -> str:
    """A grid-stride CUDA kernel computing ``expr`` over ``ndim`` collapsed axes.

    Arguments: ``n`` (elements), then the output and each input as (flat array, offset,
    strides...), then the sizes of axes 1..ndim-1."""
    in_dtypes = [as_dtype(d) for d in in_dtypes]
    out_dtype = as_dtype(out_dtype)
    axes = range(ndim)

    def index(prefix):
        return " + ".join([f"{prefix}_off"] + [f"c{d} * {prefix}_s{d}" for d in axes])

    body, result, dtype = _statements(expr, in_dtypes, lambda k: index(f"in{k}"))
    if expr[0] in ("in", "const") or dtype != out_dtype:
        body.append(f"r = {_CONVERT[out_dtype]}({result})")
        result = "r"
    operands = ["out"] + [f"in{k}" for k in range(len(in_dtypes))]
    params = ["n"]
    for name in operands:
        params += [name, f"{name}_off"] + [f"{name}_s{d}" for d in axes]
    params += [f"n{d}" for d in range(1, ndim)]
    decompose = []
    if ndim == 1:
        decompose.append("c0 = i")
    else:
        decompose.append("r0 = i")
        for d in range(ndim - 1, 0, -1):
            decompose.append(f"c{d} = r0 % n{d}")
            decompose.append(f"r0 = r0 // n{d}")
        decompose.append("c0 = r0")
    ind = " " * 8
    lines = [
        "import math",
        "",
        "import numpy as np",
        "from numba import cuda",
        "",
        "",
        "@cuda.jit(device=True)",
        "def _bool(x):",
        "    return x != 0",
        "",
        "",
        "@cuda.jit",
        f"def kernel({', '.join(params)}):",
        "    i = cuda.grid(1)",
        "    step = cuda.gridsize(1)",
        "    while i < n:",
        *(ind + line for line in decompose),
        *(ind + line for line in body),
        ind + f"out[{index('out')}] = {result}",
        ind + "i += step",
        "",
    ]
    return "\n".join(lines)


_ELEMENTWISE: dict[str, object] = {}


def elementwise_kernel(expr, in_dtypes, out_dtype, ndim: int, *, title: str = "fused elementwise region",
                       origin=()):
    """The generated kernel (a readable .py file in the kernel cache, loaded once per process)."""
    from ..numba_cpu.kernel_cache import load_kernel

    source = elementwise_source(expr, in_dtypes, out_dtype, ndim)
    kernel = _ELEMENTWISE.get(source)
    if kernel is None:
        lines = [f"# attngraph generated CUDA kernel: {title}",
                 f"# types: {', '.join(f'in{k} {as_dtype(d).value}' for k, d in enumerate(in_dtypes))} "
                 f"-> out {as_dtype(out_dtype).value}; {ndim} collapsed axes"]
        for src in origin:
            code = f"   {src.code}" if getattr(src, "code", None) else ""
            lines.append(f"#   {src.short}{code}")
        header = "\n".join(lines) + "\n\n"
        kernel = _ELEMENTWISE[source] = load_kernel(source, "kernel", header=header)
    return kernel


def prepare_elementwise(expr, out: Ref, inputs: Sequence[Ref], *, tiles: Tiles | None = None,
                        origin=(), title: str = "fused elementwise region") -> list[Launch]:
    """``out = expr(inputs)``, each input broadcast to ``out``'s shape; any strides."""
    tiles = tiles or default_tiles()
    n = out.size
    if n == 0:
        return []
    views = [out] + [x.broadcast(out.shape) for x in inputs]
    sizes, strides = collapse(out.shape, *(v.strides for v in views))
    ndim = len(sizes)
    in_dtypes = [as_dtype(x.dtype) for x in inputs]
    kernel = elementwise_kernel(expr, in_dtypes, as_dtype(out.dtype), ndim, origin=origin, title=title)
    args: list = [n]
    for v, st in zip(views, strides):
        args += [Arg(v), v.offset] + st
    args += sizes[1:]
    threads = tiles.flat
    return [Launch(kernel, _grid_1d(n, threads, tiles), threads, args, name=title)]


def prepare_copy(dst: Ref, src: Ref, *, tiles: Tiles | None = None) -> list[Launch]:
    """dst[...] = src (same shape, any strides on both sides; src may broadcast)."""
    return prepare_elementwise(("in", 0), dst, [src], tiles=tiles, title="copy")


def prepare_fill(dst: Ref, value, *, tiles: Tiles | None = None) -> list[Launch]:
    dtype = as_dtype(dst.dtype)
    value = bool(value) if dtype == DType.bool else float(value) if dtype.is_float else int(value)
    return prepare_elementwise(("const", value, dtype.value), dst, [], tiles=tiles, title="fill")


# ============================================================================================
# sgemm
# ============================================================================================

_CACHE: dict = {}


def _sgemm_kernel(bm, bn, bk, tm, tn, a_k_contig: bool, b_n_contig: bool):
    key = ("sgemm", bm, bn, bk, tm, tn, a_k_contig, b_n_contig)
    if key in _CACHE:
        return _CACHE[key]
    tx_n, ty_n = bn // tn, bm // tm          # threads along N and along M
    nthreads = tx_n * ty_n
    a_loads, b_loads = _cdiv(bm * bk, nthreads), _cdiv(bk * bn, nthreads)

    @cuda.jit
    def sgemm(A, sam, sak, B, sbk, sbn, C, ldc, M, N, K, table, t_off):
        """C[z] = A[z] @ B[z]; table[t_off + 3z + (0, 1, 2)] = element offsets of A, B, C."""
        z = cuda.blockIdx.z
        ao = table[t_off + 3 * z]
        bo = table[t_off + 3 * z + 1]
        co = table[t_off + 3 * z + 2]
        tid = cuda.threadIdx.x
        tx = tid % tx_n
        ty = tid // tx_n
        m0 = cuda.blockIdx.y * bm
        n0 = cuda.blockIdx.x * bn
        As = cuda.shared.array((bk, bm), dtype=np.float32)
        Bs = cuda.shared.array((bk, bn), dtype=np.float32)
        acc = cuda.local.array((tm, tn), dtype=np.float32)
        a_reg = cuda.local.array(tm, dtype=np.float32)
        b_reg = cuda.local.array(tn, dtype=np.float32)
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = ZERO
        for k0 in range(0, K, bk):
            for r in range(a_loads):
                e = tid + r * nthreads
                if e < bm * bk:
                    if a_k_contig:           # neighbouring threads read neighbouring k
                        kk = e % bk
                        mm = e // bk
                    else:
                        mm = e % bm
                        kk = e // bm
                    gm = m0 + mm
                    gk = k0 + kk
                    value = ZERO
                    if gm < M and gk < K:
                        value = A[ao + gm * sam + gk * sak]
                    As[kk, mm] = value
            for r in range(b_loads):
                e = tid + r * nthreads
                if e < bk * bn:
                    if b_n_contig:
                        nn = e % bn
                        kk = e // bn
                    else:
                        kk = e % bk
                        nn = e // bk
                    gn = n0 + nn
                    gk = k0 + kk
                    value = ZERO
                    if gn < N and gk < K:
                        value = B[bo + gk * sbk + gn * sbn]
                    Bs[kk, nn] = value
            cuda.syncthreads()
            for kk in range(bk):
                for i in range(tm):
                    a_reg[i] = As[kk, ty + i * ty_n]
                for j in range(tn):
                    b_reg[j] = Bs[kk, tx + j * tx_n]
                for i in range(tm):
                    for j in range(tn):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()
        for i in range(tm):
            gm = m0 + ty + i * ty_n
            if gm < M:
                for j in range(tn):
                    gn = n0 + tx + j * tx_n
                    if gn < N:
                        C[co + gm * ldc + gn] = acc[i, j]

    _CACHE[key] = (sgemm, nthreads)
    return _CACHE[key]


def _batch_offsets(batch, *operands) -> np.ndarray:
    """(Z, len(operands)) element offsets: operand k is (offset, batch strides broadcast to ``batch``)."""
    z = int(np.prod(batch, dtype=np.int64)) if batch else 1
    table = np.zeros((z, len(operands)), dtype=np.int64)
    if batch:
        index = np.indices(batch).reshape(len(batch), -1)       # (rank, Z), C order
        for k, (offset, strides) in enumerate(operands):
            table[:, k] = offset + (np.asarray(strides, dtype=np.int64)[:, None] * index).sum(axis=0)
    else:
        for k, (offset, _) in enumerate(operands):
            table[:, k] = offset
    return table


def _batch_strides(ref: Ref, core: int, batch) -> list[int]:
    """Strides of ``ref``'s leading (batch) axes broadcast to ``batch`` (0 where broadcast)."""
    lead_shape, lead_strides = ref.shape[:len(ref.shape) - core], ref.strides[:len(ref.strides) - core]
    pad = len(batch) - len(lead_shape)
    shape = (1,) * pad + tuple(lead_shape)
    strides = (0,) * pad + tuple(lead_strides)
    return [0 if s == 1 and b != 1 else st for s, b, st in zip(shape, batch, strides)]


def prepare_matmul(out: Ref, a: Ref, b: Ref, table_arena: Arena, *, tiles: Tiles | None = None) -> list[Launch]:
    """out = a @ b with numpy's matmul rules (1-D operands, broadcast batch dims); float32.

    ``out`` must be C-contiguous. A batch whose ``b`` is shared and whose ``a`` rows merge
    into one strided axis runs as one tall product (batch folded into M)."""
    tiles = tiles or default_tiles()
    if out.size == 0:
        return []
    if a.size == 0 or b.size == 0 or (a.shape[-1] if a.shape else 0) == 0:
        return prepare_fill(out, 0.0, tiles=tiles)
    a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
    a2 = a.view((1,) + a.shape, (0,) + a.strides) if a_vec else a
    b2 = b.view(b.shape + (1,), b.strides + (0,)) if b_vec else b
    M, K = a2.shape[-2:]
    N = b2.shape[-1]
    batch = tuple(np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]))
    sa = _batch_strides(a2, 2, batch)
    sb = _batch_strides(b2, 2, batch)
    sc = list(c_strides(batch + (M, N))[:len(batch)])
    sam, sak = a2.strides[-2:]
    sbk, sbn = b2.strides[-2:]
    if batch and all(s == 0 for s in sb):
        sizes, (lead,) = collapse(batch + (M,), sa + [sam])
        if len(sizes) == 1 and M > 1:                   # fold the batch into the rows of one product
            M, sam, batch, sa, sb, sc = sizes[0], lead[0], (), [], [], []
    table = _batch_offsets(batch, (a2.offset, sa), (b2.offset, sb), (out.offset, sc))
    t_ref = table_arena.upload(table.reshape(-1))
    Z = table.shape[0]
    bm, bn, bk, tm, tn = tiles.gemm
    if _cdiv(M, bm) * _cdiv(N, bn) * Z < 264:               # not enough big tiles to fill a GPU
        bm, bn, bk, tm, tn = tiles.gemm_small
    kernel, threads = _sgemm_kernel(bm, bn, bk, tm, tn, sak == 1, sbn == 1)
    launches = []
    for z0 in range(0, Z, 65535):                           # gridDim.z is at most 65535
        zn = min(Z - z0, 65535)
        launches.append(Launch(kernel, (_cdiv(N, bn), _cdiv(M, bm), zn), threads,
                               [Arg(a2), sam, sak, Arg(b2), sbk, sbn, Arg(out), N, M, N, K, Arg(t_ref),
                                t_ref.offset + 3 * z0], name="sgemm"))
    return launches


# ============================================================================================
# block reductions and row kernels (softmax, layernorm, reduce)
# ============================================================================================

@cuda.jit(device=True)
def _block_sum(red, value, nthreads):
    tid = cuda.threadIdx.x
    cuda.syncthreads()
    red[tid] = value
    cuda.syncthreads()
    step = nthreads // 2
    while step > 0:
        if tid < step:
            red[tid] += red[tid + step]
        cuda.syncthreads()
        step //= 2
    return red[0]


@cuda.jit(device=True)
def _block_max(red, value, nthreads):
    tid = cuda.threadIdx.x
    cuda.syncthreads()
    red[tid] = value
    cuda.syncthreads()
    step = nthreads // 2
    while step > 0:
        if tid < step:
            other = red[tid + step]
            if other > red[tid] or other != other:
                red[tid] = other
        cuda.syncthreads()
        step //= 2
    return red[0]


def _softmax_kernel(rb: int, log: bool):
    key = ("softmax", rb, log)
    if key in _CACHE:
        return _CACHE[key]

    @cuda.jit
    def softmax_rows(X, x_off, xrs, xcs, Y, y_off, yrs, rows, n):
        """Row softmax (or log_softmax); a row of all -inf gives zeros (-inf for log)."""
        red = cuda.shared.array(rb, dtype=np.float32)
        tid = cuda.threadIdx.x
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            xo = x_off + r * xrs
            yo = y_off + r * yrs
            m = NEG_INF
            for j in range(tid, n, rb):
                v = X[xo + j * xcs]
                if v > m or v != v:
                    m = v
            m = _block_max(red, m, rb)
            if m == NEG_INF:
                m = ZERO
            s = ZERO
            for j in range(tid, n, rb):
                s += math.exp(X[xo + j * xcs] - m)
            s = _block_sum(red, s, rb)
            if log:
                lg = NEG_INF
                if s > ZERO:
                    lg = math.log(s)
                for j in range(tid, n, rb):
                    if s > ZERO:
                        Y[yo + j] = X[xo + j * xcs] - m - lg
                    else:
                        Y[yo + j] = NEG_INF
            else:
                inv = ONE
                if s != ZERO:
                    inv = ONE / s
                for j in range(tid, n, rb):
                    Y[yo + j] = math.exp(X[xo + j * xcs] - m) * inv

    _CACHE[key] = softmax_rows
    return softmax_rows


def _layernorm_kernel(rb: int, residual: bool, has_gamma: bool, has_beta: bool):
    key = ("layernorm", rb, residual, has_gamma, has_beta)
    if key in _CACHE:
        return _CACHE[key]

    @cuda.jit
    def layernorm_rows(X, x_off, xrs, xcs, R, r_off, rrs, rcs, G, g_off, gs, Bt, b_off, bs, S, s_off, Y, y_off,
                       rows, n, eps):
        """y = (x - mean) / sqrt(var + eps) * gamma + beta per row; with ``residual`` x = X + R,
        and the sum is also written to S. Y and S rows are contiguous (stride n)."""
        red = cuda.shared.array(rb, dtype=np.float32)
        tid = cuda.threadIdx.x
        inv_n = ONE / np.float32(n)
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            xo = x_off + r * xrs
            ro = r_off + r * rrs
            so = s_off + r * n
            yo = y_off + r * n
            acc = ZERO
            for j in range(tid, n, rb):
                v = X[xo + j * xcs]
                if residual:
                    v += R[ro + j * rcs]
                    S[so + j] = v
                acc += v
            mean = _block_sum(red, acc, rb) * inv_n
            acc = ZERO
            for j in range(tid, n, rb):
                if residual:
                    c = S[so + j] - mean
                else:
                    c = X[xo + j * xcs] - mean
                acc += c * c
            var = _block_sum(red, acc, rb) * inv_n
            inv = ONE / math.sqrt(var + eps)
            for j in range(tid, n, rb):
                if residual:
                    y = (S[so + j] - mean) * inv
                else:
                    y = (X[xo + j * xcs] - mean) * inv
                if has_gamma:
                    y = y * G[g_off + j * gs]
                if has_beta:
                    y = y + Bt[b_off + j * bs]
                Y[yo + j] = y

    _CACHE[key] = layernorm_rows
    return layernorm_rows


_SUM, _MEAN, _MAX = 0, 1, 2


def _reduce_kernel(rb: int, mode: int):
    key = ("reduce", rb, mode)
    if key in _CACHE:
        return _CACHE[key]

    @cuda.jit
    def reduce_rows(X, x_off, xrs, xcs, Y, y_off, rows, n):
        """Y[r] = sum / mean / max of row r (max propagates NaN)."""
        red = cuda.shared.array(rb, dtype=np.float32)
        tid = cuda.threadIdx.x
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            xo = x_off + r * xrs
            if mode == 2:
                m = NEG_INF
                for j in range(tid, n, rb):
                    v = X[xo + j * xcs]
                    if v > m or v != v:
                        m = v
                m = _block_max(red, m, rb)
                if tid == 0:
                    Y[y_off + r] = m
            else:
                s = ZERO
                for j in range(tid, n, rb):
                    s += X[xo + j * xcs]
                s = _block_sum(red, s, rb)
                if tid == 0:
                    if mode == 1:
                        Y[y_off + r] = s / np.float32(n)
                    else:
                        Y[y_off + r] = s

    _CACHE[key] = reduce_rows
    return reduce_rows


def _rows_of(x: Ref, scratch: Arena, tiles: Tiles, launches: list) -> tuple[Ref, tuple]:
    """``x`` as (rows, n, row stride, col stride), copying it to a contiguous scratch first
    when its leading axes do not merge."""
    view = rows_view(x)
    if view is None:
        tmp = scratch.tensor(x.shape, x.dtype)
        launches += prepare_copy(tmp, x, tiles=tiles)
        x = tmp
        view = rows_view(x)
    return x, view


def _row_grid(rows: int, tiles: Tiles) -> int:
    return max(1, min(rows, tiles.max_blocks if SIMULATOR else 65535 * 16))


def _check_f32(what: str, *refs: Ref) -> None:
    for r in refs:
        if r.dtype != np.float32:
            raise TypeError(f"the CUDA {what} kernel runs float32, got {r.dtype}")


def prepare_softmax(out: Ref, x: Ref, axis: int, scratch: Arena, *, log: bool = False,
                    tiles: Tiles | None = None) -> list[Launch]:
    """Softmax (or log_softmax) of ``x`` along ``axis`` into ``out``; a non-last axis goes
    through a transposed copy and back."""
    tiles = tiles or default_tiles()
    _check_f32("softmax", out, x)
    if out.size == 0:
        return []
    launches: list[Launch] = []
    rank = len(x.shape)
    axis = axis % rank
    target = out
    if axis != rank - 1:
        perm = [a for a in range(rank) if a != axis] + [axis]
        x = x.permuted(perm)
        target = scratch.tensor(x.shape, out.dtype)
    elif not out.contiguous:
        target = scratch.tensor(out.shape, out.dtype)
    x, (rows, n, xrs, xcs) = _rows_of(x, scratch, tiles, launches)
    kernel = _softmax_kernel(tiles.rows, log)
    launches.append(Launch(kernel, _row_grid(rows, tiles), tiles.rows,
                           [Arg(x), x.offset, xrs, xcs, Arg(target), target.offset, n, rows, n],
                           name="log_softmax" if log else "softmax"))
    if target is not out:
        if axis != rank - 1:
            inverse = np.argsort(perm).tolist()
            launches += prepare_copy(out, target.permuted(inverse), tiles=tiles)
        else:
            launches += prepare_copy(out, target, tiles=tiles)
    return launches


def prepare_layernorm(out: Ref, x: Ref, gamma: Ref | None, beta: Ref | None, eps: float, scratch: Arena, *,
                      residual: Ref | None = None, total: Ref | None = None,
                      tiles: Tiles | None = None) -> list[Launch]:
    """out = layernorm(x [+ residual]) over the last axis; with ``residual`` the sum goes to
    ``total``. ``out``/``total`` are contiguous (the plan's buffers)."""
    tiles = tiles or default_tiles()
    _check_f32("layernorm", out, x, *(r for r in (gamma, beta, residual, total) if r is not None))
    if out.size == 0:
        return []
    launches: list[Launch] = []
    shape = out.shape
    x = x.broadcast(shape)
    x, (rows, n, xrs, xcs) = _rows_of(x, scratch, tiles, launches)
    dummy = x
    if residual is not None:
        r, (_, _, rrs, rcs) = _rows_of(residual.broadcast(shape), scratch, tiles, launches)
        s = total if total is not None and total.contiguous else scratch.tensor(shape, np.float32)
    else:
        r, rrs, rcs, s = dummy, 0, 0, dummy
    y = out if out.contiguous else scratch.tensor(shape, np.float32)
    g = gamma if gamma is not None else dummy
    b = beta if beta is not None else dummy
    gs = gamma.strides[-1] if gamma is not None else 0
    bs = beta.strides[-1] if beta is not None else 0
    kernel = _layernorm_kernel(tiles.rows, residual is not None, gamma is not None, beta is not None)
    launches.append(Launch(kernel, _row_grid(rows, tiles), tiles.rows,
                           [Arg(x), x.offset, xrs, xcs, Arg(r), r.offset, rrs, rcs, Arg(g), g.offset, gs,
                            Arg(b), b.offset, bs, Arg(s), s.offset, Arg(y), y.offset, rows, n, np.float32(eps)],
                           name="residual_layernorm" if residual is not None else "layernorm"))
    if y is not out:
        launches += prepare_copy(out, y, tiles=tiles)
    if residual is not None and total is not None and s is not total:
        launches += prepare_copy(total, s, tiles=tiles)
    return launches


def prepare_reduce(out: Ref, x: Ref, axes: Sequence[int], mode: str, scratch: Arena, *,
                   tiles: Tiles | None = None) -> list[Launch]:
    """sum / mean / max of ``x`` over ``axes`` into ``out`` (keepdims or not: same order)."""
    tiles = tiles or default_tiles()
    _check_f32(mode, out, x)
    if out.size == 0:
        return []
    rank = len(x.shape)
    axes = sorted(a % rank for a in axes)
    keep = [a for a in range(rank) if a not in axes]
    launches: list[Launch] = []
    n = int(np.prod([x.shape[a] for a in axes], dtype=np.int64)) if axes else 1
    if n == 0:
        if mode == "max":
            raise ValueError("max of an empty axis")
        return prepare_fill(out, 0.0 if mode == "sum" else np.nan, tiles=tiles)
    rows = int(np.prod([x.shape[a] for a in keep], dtype=np.int64)) if keep else 1
    permuted = x.permuted(keep + axes)
    sizes, (strides,) = collapse(permuted.shape[len(keep):], permuted.strides[len(keep):])
    lead, (lead_strides,) = collapse(permuted.shape[:len(keep)], permuted.strides[:len(keep)])
    if len(sizes) == 1 and len(lead) == 1:
        xrs, xcs = lead_strides[0], strides[0]
    else:
        tmp = scratch.tensor(permuted.shape, x.dtype)
        launches += prepare_copy(tmp, permuted, tiles=tiles)
        permuted, xrs, xcs = tmp, n, 1
    y = out if out.contiguous else scratch.tensor(out.shape, out.dtype)
    kernel = _reduce_kernel(tiles.rows, {"sum": _SUM, "mean": _MEAN, "max": _MAX}[mode])
    launches.append(Launch(kernel, _row_grid(rows, tiles), tiles.rows,
                           [Arg(permuted), permuted.offset, xrs, xcs, Arg(y), y.offset, rows, n], name=mode))
    if y is not out:
        launches += prepare_copy(out, y, tiles=tiles)
    return launches


# ============================================================================================
# gather
# ============================================================================================

def _gather_kernel(dtype):
    key = ("gather", np.dtype(dtype).str)
    if key in _CACHE:
        return _CACHE[key]
    zero = _storage_dtype(dtype).type(0)

    @cuda.jit
    def gather(X, x_off, xs0, xs1, xs2, I, i_off, Y, y_off, outer, T, inner, size):
        """Y[o, t, c] = X[o, I[t], c] (negative ids count from the end; ids out of range give 0)."""
        e = cuda.grid(1)
        step = cuda.gridsize(1)
        total = outer * T * inner
        while e < total:
            c = e % inner
            rest = e // inner
            t = rest % T
            o = rest // T
            idx = I[i_off + t]
            if idx < 0:
                idx += size
            value = zero
            if idx >= 0 and idx < size:
                value = X[x_off + o * xs0 + idx * xs1 + c * xs2]
            Y[y_off + e] = value
            e += step

    _CACHE[key] = gather
    return gather


def prepare_gather(out: Ref, data: Ref, indices: Ref, axis: int, scratch: Arena, *,
                   tiles: Tiles | None = None) -> list[Launch]:
    """out = data.take(indices, axis). ``out`` contiguous; ids outside the axis give zeros
    (the numpy backend raises; a kernel cannot)."""
    tiles = tiles or default_tiles()
    if out.size == 0:
        return []
    launches: list[Launch] = []
    if not indices.contiguous:
        tmp = scratch.tensor(indices.shape, indices.dtype)
        launches += prepare_copy(tmp, indices, tiles=tiles)
        indices = tmp
    shape, strides = data.shape, data.strides
    outer_sizes, (outer_strides,) = collapse(shape[:axis], strides[:axis]) if axis else ([1], [[0]])
    inner_sizes, (inner_strides,) = collapse(shape[axis + 1:], strides[axis + 1:]) if axis + 1 < len(shape) \
        else ([1], [[0]])
    if len(outer_sizes) > 1 or len(inner_sizes) > 1:
        tmp = scratch.tensor(shape, data.dtype)
        launches += prepare_copy(tmp, data, tiles=tiles)
        data = tmp
        return launches + prepare_gather(out, data, indices, axis, scratch, tiles=tiles)
    outer = int(np.prod(shape[:axis], dtype=np.int64)) if axis else 1
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) if axis + 1 < len(shape) else 1
    y = out if out.contiguous else scratch.tensor(out.shape, out.dtype)
    threads = tiles.flat
    launches.append(Launch(_gather_kernel(data.dtype), _grid_1d(out.size, threads, tiles), threads,
                           [Arg(data), data.offset, outer_strides[0], strides[axis], inner_strides[0],
                            Arg(indices), indices.offset, Arg(y), y.offset, outer, indices.size, inner,
                            shape[axis]], name="gather"))
    if y is not out:
        launches += prepare_copy(out, y, tiles=tiles)
    return launches


# ============================================================================================
# attention
# ============================================================================================

def _attention_fwd_kernel(bq, bk, D, DV, causal, has_bias, has_mask):
    key = ("attn_fwd", bq, bk, D, DV, causal, has_bias, has_mask)
    if key in _CACHE:
        return _CACHE[key]

    @cuda.jit
    def attention_fwd(Q, sqt, sqd, K, skt, skd, V, svt, svd, O, sot, LSE, lse_off, Bias, sbq, sbk, Mask, smq, smk,
                      table, t_off, Tq, Tk, scale):
        """One query row per thread, BQ rows per block; K/V tiles of BK keys in shared memory.
        table[t_off + 6z + (0..5)] = offsets of q, k, v, out, bias, mask for batch z."""
        z = cuda.blockIdx.y
        base = t_off + 6 * z
        qo = table[base]
        ko = table[base + 1]
        vo = table[base + 2]
        oo = table[base + 3]
        bo = table[base + 4]
        mo = table[base + 5]
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * bq + tid
        Ks = cuda.shared.array((bk, D), dtype=np.float32)
        Vs = cuda.shared.array((bk, DV), dtype=np.float32)
        q = cuda.local.array(D, dtype=np.float32)
        acc = cuda.local.array(DV, dtype=np.float32)
        s = cuda.local.array(bk, dtype=np.float32)
        row_ok = i < Tq
        for d in range(D):
            q[d] = ZERO
            if row_ok:
                q[d] = Q[qo + i * sqt + d * sqd]
        for d in range(DV):
            acc[d] = ZERO
        m = NEG_INF
        l = ZERO
        k_end = Tk
        if causal:                                   # keys after the block's last query are never seen
            k_end = min(Tk, (cuda.blockIdx.x + 1) * bq)
        for j0 in range(0, k_end, bk):
            for e in range(tid, bk * D, bq):
                jj = e // D
                d = e % D
                value = ZERO
                if j0 + jj < Tk:
                    value = K[ko + (j0 + jj) * skt + d * skd]
                Ks[jj, d] = value
            for e in range(tid, bk * DV, bq):
                jj = e // DV
                d = e % DV
                value = ZERO
                if j0 + jj < Tk:
                    value = V[vo + (j0 + jj) * svt + d * svd]
                Vs[jj, d] = value
            cuda.syncthreads()
            if row_ok:
                tile_max = NEG_INF
                for jj in range(bk):
                    j = j0 + jj
                    x = NEG_INF
                    if j < Tk and (not causal or j <= i):
                        dot = ZERO
                        for d in range(D):
                            dot += q[d] * Ks[jj, d]
                        x = dot * scale
                        if has_bias:
                            x += Bias[bo + i * sbq + j * sbk]
                        if has_mask:
                            if Mask[mo + i * smq + j * smk] != 0:
                                x = NEG_INF
                    s[jj] = x
                    if x > tile_max:
                        tile_max = x
                m_new = max(m, tile_max)
                if m_new != NEG_INF:
                    corr = math.exp(m - m_new)
                    l *= corr
                    for d in range(DV):
                        acc[d] *= corr
                    for jj in range(bk):
                        p = math.exp(s[jj] - m_new)
                        l += p
                        for d in range(DV):
                            acc[d] += p * Vs[jj, d]
                    m = m_new
            cuda.syncthreads()
        if row_ok:
            if l > ZERO:
                inv = ONE / l
                for d in range(DV):
                    O[oo + i * sot + d] = acc[d] * inv
                LSE[lse_off + z * Tq + i] = m + math.log(l)
            else:                                    # every key masked: zeros, lse = -inf
                for d in range(DV):
                    O[oo + i * sot + d] = ZERO
                LSE[lse_off + z * Tq + i] = NEG_INF

    _CACHE[key] = attention_fwd
    return attention_fwd


def _attn_tiles(tiles: Tiles, D: int, DV: int, pair: tuple) -> tuple[int, int]:
    bq, bk = pair
    if not SIMULATOR:
        while bk > 8 and bk * (D + DV) * 4 > 40 * 1024:     # stay inside 48 KiB of static shared memory
            bk //= 2
        if max(D, DV) > 64:
            bk = max(8, bk // 2)
    return bq, bk


def _scores_strides(x: Ref | None, batch, tq, tk) -> tuple[int, list[int], int, int]:
    """(offset, batch strides, query stride, key stride) of a bias/mask broadcast to batch + (Tq, Tk)."""
    if x is None:
        return 0, [0] * len(batch), 0, 0
    full = x.broadcast(tuple(batch) + (tq, tk))
    return x.offset, list(full.strides[:len(batch)]), full.strides[-2], full.strides[-1]


def prepare_attention_forward(out: Ref, q: Ref, k: Ref, v: Ref, bias: Ref | None, mask: Ref | None, *,
                              scale: float, causal: bool, scratch: Arena, lse: Ref | None = None,
                              tiles: Tiles | None = None) -> list[Launch]:
    """out = softmax(q kᵀ · scale + bias, −inf where mask / above the diagonal) v; float32.

    q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) with broadcast batch dims; ``out``
    (batch..., Tq, Dv) contiguous in its last axis; ``lse`` (Z·Tq floats) receives the
    log-sum-exp of every row (a scratch buffer when None)."""
    tiles = tiles or default_tiles()
    _check_f32("attention", out, q, k, v, *(r for r in (bias,) if r is not None))
    if out.size == 0:
        return []
    Tq, D = q.shape[-2:]
    Tk, DV = v.shape[-2:]
    batch = tuple(out.shape[:-2])
    Z = int(np.prod(batch, dtype=np.int64)) if batch else 1
    if lse is None:
        lse = scratch.tensor((Z * Tq,), np.float32)
    if Tk == 0:
        return prepare_fill(out, 0.0, tiles=tiles) + prepare_fill(lse, -np.inf, tiles=tiles)
    if out.strides[-1] != 1:
        raise ValueError("attention output must be contiguous along its last axis")
    b_off, b_bs, sbq, sbk = _scores_strides(bias, batch, Tq, Tk)
    m_off, m_bs, smq, smk = _scores_strides(mask, batch, Tq, Tk)
    table = _batch_offsets(batch, (q.offset, _batch_strides(q, 2, batch)), (k.offset, _batch_strides(k, 2, batch)),
                           (v.offset, _batch_strides(v, 2, batch)), (out.offset, list(out.strides[:-2])),
                           (b_off, b_bs), (m_off, m_bs))
    t_ref = scratch.upload(table.reshape(-1))
    bq, bk = _attn_tiles(tiles, D, DV, tiles.attn)
    kernel = _attention_fwd_kernel(bq, bk, D, DV, bool(causal), bias is not None, mask is not None)
    b_arg = Arg(bias) if bias is not None else Arg(q)
    m_arg = Arg(mask) if mask is not None else Arg(_dummy_u8(scratch))
    launches = []
    for z0 in range(0, Z, 65535):
        zn = min(Z - z0, 65535)
        launches.append(Launch(kernel, (_cdiv(Tq, bq), zn), bq,
                               [Arg(q), q.strides[-2], q.strides[-1], Arg(k), k.strides[-2], k.strides[-1],
                                Arg(v), v.strides[-2], v.strides[-1], Arg(out), out.strides[-2], Arg(lse),
                                lse.offset + z0 * Tq, b_arg, sbq, sbk, m_arg, smq, smk, Arg(t_ref),
                                t_ref.offset + 6 * z0, Tq, Tk, np.float32(scale)], name="attention_fwd"))
    return launches


def _dummy_u8(arena: Arena) -> Ref:
    dummy = getattr(arena, "_dummy_u8", None)
    if dummy is None:
        dummy = arena._dummy_u8 = arena.upload(np.zeros(1, np.uint8))
    return dummy


def _attention_bwd_kernels(bq, bk, D, DV, causal, has_bias, has_mask):
    key = ("attn_bwd", bq, bk, D, DV, causal, has_bias, has_mask)
    if key in _CACHE:
        return _CACHE[key]

    @cuda.jit
    def attention_bwd_dot(dO, O, Dvec, rows, DVn):
        """Dvec[r] = sum_d dO[r, d] * O[r, d] (rows of all batches; contiguous)."""
        r = cuda.grid(1)
        step = cuda.gridsize(1)
        while r < rows:
            acc = ZERO
            for d in range(DVn):
                acc += dO[r * DVn + d] * O[r * DVn + d]
            Dvec[r] = acc
            r += step

    @cuda.jit
    def attention_bwd_dkdv(Q, K, V, dO, LSE, Dvec, dK, dV, Bias, sbq, sbk, Mask, smq, smk, table, Tq, Tk, scale):
        """One key row per thread: dV_j = Σ_i p_ij dO_i, dK_j = scale Σ_i ds_ij Q_i. Contiguous
        (Z, T, D) operands; table[2z], table[2z + 1] = bias and mask offsets of batch z."""
        z = cuda.blockIdx.y
        bo = table[2 * z]
        mo = table[2 * z + 1]
        tid = cuda.threadIdx.x
        j0 = cuda.blockIdx.x * bk
        j = j0 + tid
        Qs = cuda.shared.array((bq, D), dtype=np.float32)
        dOs = cuda.shared.array((bq, DV), dtype=np.float32)
        Ls = cuda.shared.array(bq, dtype=np.float32)
        Ds = cuda.shared.array(bq, dtype=np.float32)
        kj = cuda.local.array(D, dtype=np.float32)
        vj = cuda.local.array(DV, dtype=np.float32)
        dk = cuda.local.array(D, dtype=np.float32)
        dv = cuda.local.array(DV, dtype=np.float32)
        col_ok = j < Tk
        for d in range(D):
            kj[d] = ZERO
            dk[d] = ZERO
            if col_ok:
                kj[d] = K[(z * Tk + j) * D + d]
        for d in range(DV):
            vj[d] = ZERO
            dv[d] = ZERO
            if col_ok:
                vj[d] = V[(z * Tk + j) * DV + d]
        i_start = 0
        if causal:                                   # queries before the block's first key see none of it
            i_start = (j0 // bq) * bq
        for i0 in range(i_start, Tq, bq):
            for e in range(tid, bq * D, bk):
                ii = e // D
                d = e % D
                value = ZERO
                if i0 + ii < Tq:
                    value = Q[(z * Tq + i0 + ii) * D + d]
                Qs[ii, d] = value
            for e in range(tid, bq * DV, bk):
                ii = e // DV
                d = e % DV
                value = ZERO
                if i0 + ii < Tq:
                    value = dO[(z * Tq + i0 + ii) * DV + d]
                dOs[ii, d] = value
            for ii in range(tid, bq, bk):
                lv = NEG_INF
                dv_ = ZERO
                if i0 + ii < Tq:
                    lv = LSE[z * Tq + i0 + ii]
                    dv_ = Dvec[z * Tq + i0 + ii]
                Ls[ii] = lv
                Ds[ii] = dv_
            cuda.syncthreads()
            if col_ok:
                for ii in range(bq):
                    i = i0 + ii
                    lse = Ls[ii]
                    if i < Tq and lse != NEG_INF and (not causal or j <= i):
                        dot = ZERO
                        for d in range(D):
                            dot += Qs[ii, d] * kj[d]
                        x = dot * scale
                        if has_bias:
                            x += Bias[bo + i * sbq + j * sbk]
                        if has_mask:
                            if Mask[mo + i * smq + j * smk] != 0:
                                x = NEG_INF
                        p = math.exp(x - lse)
                        dp = ZERO
                        for d in range(DV):
                            dv[d] += p * dOs[ii, d]
                            dp += dOs[ii, d] * vj[d]
                        ds = p * (dp - Ds[ii]) * scale
                        for d in range(D):
                            dk[d] += ds * Qs[ii, d]
            cuda.syncthreads()
        if col_ok:
            for d in range(D):
                dK[(z * Tk + j) * D + d] = dk[d]
            for d in range(DV):
                dV[(z * Tk + j) * DV + d] = dv[d]

    @cuda.jit
    def attention_bwd_dq(Q, K, V, dO, LSE, Dvec, dQ, Bias, sbq, sbk, Mask, smq, smk, table, Tq, Tk, scale):
        """One query row per thread: dQ_i = scale Σ_j ds_ij K_j, ds_ij = p_ij (dO_i·V_j − D_i)."""
        z = cuda.blockIdx.y
        bo = table[2 * z]
        mo = table[2 * z + 1]
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * bq + tid
        Ks = cuda.shared.array((bk, D), dtype=np.float32)
        Vs = cuda.shared.array((bk, DV), dtype=np.float32)
        qi = cuda.local.array(D, dtype=np.float32)
        doi = cuda.local.array(DV, dtype=np.float32)
        dq = cuda.local.array(D, dtype=np.float32)
        row_ok = i < Tq
        lse = NEG_INF
        di = ZERO
        if row_ok:
            lse = LSE[z * Tq + i]
            di = Dvec[z * Tq + i]
        for d in range(D):
            qi[d] = ZERO
            dq[d] = ZERO
            if row_ok:
                qi[d] = Q[(z * Tq + i) * D + d]
        for d in range(DV):
            doi[d] = ZERO
            if row_ok:
                doi[d] = dO[(z * Tq + i) * DV + d]
        k_end = Tk
        if causal:
            k_end = min(Tk, (cuda.blockIdx.x + 1) * bq)
        for j0 in range(0, k_end, bk):
            for e in range(tid, bk * D, bq):
                jj = e // D
                d = e % D
                value = ZERO
                if j0 + jj < Tk:
                    value = K[(z * Tk + j0 + jj) * D + d]
                Ks[jj, d] = value
            for e in range(tid, bk * DV, bq):
                jj = e // DV
                d = e % DV
                value = ZERO
                if j0 + jj < Tk:
                    value = V[(z * Tk + j0 + jj) * DV + d]
                Vs[jj, d] = value
            cuda.syncthreads()
            if row_ok and lse != NEG_INF:
                for jj in range(bk):
                    j = j0 + jj
                    if j < Tk and (not causal or j <= i):
                        dot = ZERO
                        for d in range(D):
                            dot += qi[d] * Ks[jj, d]
                        x = dot * scale
                        if has_bias:
                            x += Bias[bo + i * sbq + j * sbk]
                        if has_mask:
                            if Mask[mo + i * smq + j * smk] != 0:
                                x = NEG_INF
                        p = math.exp(x - lse)
                        dp = ZERO
                        for d in range(DV):
                            dp += doi[d] * Vs[jj, d]
                        ds = p * (dp - di) * scale
                        for d in range(D):
                            dq[d] += ds * Ks[jj, d]
            cuda.syncthreads()
        if row_ok:
            for d in range(D):
                dQ[(z * Tq + i) * D + d] = dq[d]

    _CACHE[key] = (attention_bwd_dot, attention_bwd_dkdv, attention_bwd_dq)
    return _CACHE[key]


def prepare_attention_backward(dq, dk, dv, q, k, v, out, lse, dout, bias, mask, *, scale: float, causal: bool,
                               scratch: Arena, tiles: Tiles | None = None) -> list[Launch]:
    """dq, dk, dv of attention (FlashAttention-2 recomputation from the saved ``lse``).

    q, k, v, out, dout, dq, dk, dv: contiguous (batch..., T, D) refs with the same batch
    dims; bias and mask broadcast to batch + (Tq, Tk); lse: (Z·Tq,) from the forward."""
    tiles = tiles or default_tiles()
    Tq, D = q.shape[-2:]
    Tk, DV = v.shape[-2:]
    batch = tuple(q.shape[:-2])
    Z = int(np.prod(batch, dtype=np.int64)) if batch else 1
    for name, r in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout), ("dq", dq), ("dk", dk),
                    ("dv", dv)):
        if not r.contiguous or tuple(r.shape[:-2]) != batch:
            raise ValueError(f"attention backward needs contiguous (batch..., T, D) tensors; {name} is {r.shape}")
    if Z * max(Tq, Tk) == 0:
        return prepare_fill(dq, 0.0, tiles=tiles) + prepare_fill(dk, 0.0, tiles=tiles) + \
            prepare_fill(dv, 0.0, tiles=tiles)
    if Z > 65535:
        raise ValueError("attention backward supports at most 65535 (batch x heads)")
    b_off, b_bs, sbq, sbk = _scores_strides(bias, batch, Tq, Tk)
    m_off, m_bs, smq, smk = _scores_strides(mask, batch, Tq, Tk)
    table = _batch_offsets(batch, (b_off, b_bs), (m_off, m_bs))
    t_ref = scratch.upload(table.reshape(-1))
    dvec = scratch.tensor((Z * Tq,), np.float32)
    bq, bk = _attn_tiles(tiles, D, DV, tiles.attn_bwd)
    dot, dkdv, dqk = _attention_bwd_kernels(bq, bk, D, DV, bool(causal), bias is not None, mask is not None)
    b_ref = bias if bias is not None else q
    m_ref = mask if mask is not None else _dummy_u8(scratch)
    threads = tiles.flat
    s32 = np.float32(scale)
    return [
        Launch(dot, _grid_1d(Z * Tq, threads, tiles), threads,
               [Sub(dout), Sub(out), Sub(dvec), Z * Tq, DV], name="attention_bwd_dot"),
        Launch(dkdv, (_cdiv(Tk, bk), Z), bk,
               [Sub(q), Sub(k), Sub(v), Sub(dout), Sub(lse), Sub(dvec), Sub(dk), Sub(dv),
                Arg(b_ref), sbq, sbk, Arg(m_ref), smq, smk, Sub(t_ref), Tq, Tk, s32],
               name="attention_bwd_dkdv"),
        Launch(dqk, (_cdiv(Tq, bq), Z), bq,
               [Sub(q), Sub(k), Sub(v), Sub(dout), Sub(lse), Sub(dvec), Sub(dq), Arg(b_ref), sbq, sbk,
                Arg(m_ref), smq, smk, Sub(t_ref), Tq, Tk, s32],
               name="attention_bwd_dq"),
    ]




# ============================================================================================
# host wrappers: numpy in, numpy out (tests, benchmarks, and anyone who wants one kernel)
# ============================================================================================

def _run(arena: Arena, launches: Sequence[Launch]) -> None:
    arena.finalize()
    for launch in launches:
        launch.bind()()
    cuda.synchronize()


def _f32(x) -> np.ndarray:
    return c_contiguous(x, dtype=np.float32)


def sgemm(a, b, *, tiles: Tiles | None = None) -> np.ndarray:
    """a @ b on the device (numpy's matmul rules; float32)."""
    a, b = _f32(a), _f32(b)
    arena = Arena("sgemm")
    ra, rb = arena.upload(a), arena.upload(b)
    out = arena.tensor(_matmul_shape(a.shape, b.shape), np.float32)
    _run(arena, prepare_matmul(out, ra, rb, arena, tiles=tiles))
    return out.read()


def _matmul_shape(sa, sb) -> tuple:
    a2 = (1,) + tuple(sa) if len(sa) == 1 else tuple(sa)
    b2 = tuple(sb) + (1,) if len(sb) == 1 else tuple(sb)
    batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    return batch + ((a2[-2],) if len(sa) > 1 else ()) + ((b2[-1],) if len(sb) > 1 else ())


def softmax(x, axis: int = -1, *, log: bool = False, tiles: Tiles | None = None) -> np.ndarray:
    x = _f32(x)
    arena = Arena("softmax")
    rx = arena.upload(x)
    out = arena.tensor(x.shape, np.float32)
    _run(arena, prepare_softmax(out, rx, axis, arena, log=log, tiles=tiles))
    return out.read()


def layernorm(x, gamma=None, beta=None, eps: float = 1e-5, *, tiles: Tiles | None = None) -> np.ndarray:
    x = _f32(x)
    arena = Arena("layernorm")
    rx = arena.upload(x)
    rg = arena.upload(_f32(gamma)) if gamma is not None else None
    rbeta = arena.upload(_f32(beta)) if beta is not None else None
    out = arena.tensor(x.shape, np.float32)
    _run(arena, prepare_layernorm(out, rx, rg, rbeta, eps, arena, tiles=tiles))
    return out.read()


def residual_layernorm(a, b, gamma=None, beta=None, eps: float = 1e-5, *,
                       tiles: Tiles | None = None) -> tuple[np.ndarray, np.ndarray]:
    a, b = _f32(a), _f32(b)
    shape = np.broadcast_shapes(a.shape, b.shape)
    arena = Arena("residual_layernorm")
    ra, rb = arena.upload(a), arena.upload(b)
    rg = arena.upload(_f32(gamma)) if gamma is not None else None
    rbeta = arena.upload(_f32(beta)) if beta is not None else None
    total, out = arena.tensor(shape, np.float32), arena.tensor(shape, np.float32)
    _run(arena, prepare_layernorm(out, ra, rg, rbeta, eps, arena, residual=rb, total=total, tiles=tiles))
    return total.read(), out.read()


def row_reduce(x, axis=-1, mode: str = "sum", *, keepdims: bool = False, tiles: Tiles | None = None) -> np.ndarray:
    x = _f32(x)
    axes = tuple(range(x.ndim)) if axis is None else (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a % x.ndim for a in axes)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims else \
        tuple(d for i, d in enumerate(x.shape) if i not in axes)
    arena = Arena("reduce")
    rx = arena.upload(x)
    out = arena.tensor(shape, np.float32)
    _run(arena, prepare_reduce(out, rx, axes, mode, arena, tiles=tiles))
    return out.read()


def elementwise(expr, *inputs, out_dtype=None, tiles: Tiles | None = None) -> np.ndarray:
    """Evaluate a fused expression (ops/fused.py's form) on the device."""
    from attngraph.ops.fused import expression_type

    arrays = [c_contiguous(x) for x in inputs]
    ttype = expression_type(expr, [TensorType(as_dtype(a.dtype), a.shape) for a in arrays])
    arena = Arena("elementwise")
    refs = [arena.upload(a) for a in arrays]
    dtype = ttype.dtype.numpy if out_dtype is None else np.dtype(out_dtype)
    out = arena.tensor(tuple(ttype.shape), dtype)
    _run(arena, prepare_elementwise(expr, out, refs, tiles=tiles))
    return out.read()


def gather(data, indices, axis: int = 0, *, tiles: Tiles | None = None) -> np.ndarray:
    data = c_contiguous(data, dtype=np.float32)
    indices = c_contiguous(indices)
    axis = axis % data.ndim
    arena = Arena("gather")
    rd, ri = arena.upload(data), arena.upload(indices)
    out = arena.tensor(data.shape[:axis] + indices.shape + data.shape[axis + 1:], np.float32)
    _run(arena, prepare_gather(out, rd, ri, axis, arena, tiles=tiles))
    return out.read()


def _scores_input(arena: Arena, x, dtype):
    if x is None:
        return None
    return arena.upload(np.asarray(x, dtype=dtype))


def attention_forward(q, k, v, *, scale=None, causal=False, bias=None, mask=None, return_lse=False,
                      tiles: Tiles | None = None):
    """The flash forward on the device: q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv)."""
    q, k, v = _f32(q), _f32(k), _f32(v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    batch = tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    arena = Arena("attention")
    rq, rk, rv = arena.upload(q), arena.upload(k), arena.upload(v)
    rb, rm = _scores_input(arena, bias, np.float32), _scores_input(arena, mask, np.bool_)
    out = arena.tensor(batch + (q.shape[-2], v.shape[-1]), np.float32)
    Z = int(np.prod(batch, dtype=np.int64)) if batch else 1
    lse = arena.tensor((Z * q.shape[-2],), np.float32)
    _run(arena, prepare_attention_forward(out, rq, rk, rv, rb, rm, scale=scale, causal=causal, scratch=arena,
                                          lse=lse, tiles=tiles))
    result = out.read()
    if return_lse:
        return result, lse.read().reshape(batch + (q.shape[-2],))
    return result


def attention_backward(q, k, v, out, lse, dout, *, scale=None, causal=False, bias=None, mask=None,
                       tiles: Tiles | None = None):
    """(dq, dk, dv) on the device from the forward's ``out`` and ``lse``; q, k, v share batch dims."""
    q, k, v, out, lse, dout = (_f32(x) for x in (q, k, v, out, lse, dout))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    arena = Arena("attention_backward")
    rq, rk, rv, ro, rl, rdo = (arena.upload(x) for x in (q, k, v, out, lse.reshape(-1), dout))
    rb, rm = _scores_input(arena, bias, np.float32), _scores_input(arena, mask, np.bool_)
    dq, dk, dv = (arena.tensor(x.shape, np.float32) for x in (q, k, v))
    _run(arena, prepare_attention_backward(dq, dk, dv, rq, rk, rv, ro, rl, rdo, rb, rm, scale=scale,
                                           causal=causal, scratch=arena, tiles=tiles))
    return dq.read(), dk.read(), dv.read()


# ============================================================================================
# PTX: compile prepared launches without a GPU (checks typing and float32-ness where no GPU is)
# ============================================================================================

def ptx_of(launch: Launch, cc: tuple[int, int] = (9, 0)) -> str:
    """The PTX of ``launch``'s kernel for compute capability ``cc``, compiled by NVVM without a
    GPU (needs libNVVM, e.g. the ``cuda-toolkit`` wheels; not under the simulator).

    Array arguments are typed from their refs, so the arena need not exist. Device functions
    a kernel calls ask numba for the current device's compute capability; that lookup is
    answered with ``cc`` while this runs."""
    import types as _types

    import numba.cuda.dispatcher as dispatcher_module

    if SIMULATOR:
        raise RuntimeError("PTX cannot be made under the simulator")
    args = tuple(np.zeros(1, _storage_dtype(a.ref.dtype)) if isinstance(a, Arg) else a for a in launch.args)
    argtypes = tuple(launch.dispatcher.typeof_pyval(a) for a in args)
    saved = dispatcher_module.get_current_device
    dispatcher_module.get_current_device = lambda: _types.SimpleNamespace(compute_capability=cc)
    try:
        ptx, _ = cuda.compile_ptx(launch.dispatcher.py_func, argtypes, cc=cc)
    finally:
        dispatcher_module.get_current_device = saved
    return ptx
