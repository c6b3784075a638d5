"""ag.compile: verify the graph, run the pass pipeline, hand it to a backend."""

from __future__ import annotations

from .errors import BackendError
from .ir import Graph, verify

__all__ = ["compile", "BACKENDS"]

BACKENDS = ("numpy", "cpu", "cuda")


def compile(graph: Graph, backend: str = "numpy", *, optimize: bool | None = None, disable=(),  # noqa: A001
            explain: bool = False, debug: bool = False, debug_feeds: dict | None = None, **options):
    """Compile ``graph`` for ``backend`` ("numpy" | "cpu" | "cuda") and return an Executable.

    - ``optimize``: run the pass pipeline (default: on for "cpu"/"cuda", off for "numpy",
      which then interprets the graph exactly as written — the oracle).
    - ``disable=["fuse_attention", ...]``: skip passes by name (see ``attngraph.passes.PASS_NAMES``).
    - ``explain=True``: ``exe.explain`` holds a report of the rules that fired (with source lines)
      and of the softmax-of-matmul patterns that did not become attention, and why.
    - ``debug=True``: run the numpy reference after every pass; a pass that changes the
      outputs beyond tolerance raises ``DriftError`` naming it.

    Parameters start from the graph's initial values (``graph.values``), copied, so the
    graph itself is never changed by training or by ``exe.params[...] = ...``.
    """
    from .passes import PassLog
    from .passes import optimize as run_pipeline

    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    verify(graph)
    if optimize is None:
        optimize = backend != "numpy"
    log = PassLog()
    optimized = graph
    if optimize:
        optimized, log = run_pipeline(graph, disable=disable, log=log, debug=debug, debug_feeds=debug_feeds)
    if backend == "numpy":
        from .backends.numpy_ref import NumpyExecutable

        exe = NumpyExecutable(optimized, **options)
    elif backend == "cpu":
        from .backends.numba_cpu import CpuExecutable

        exe = CpuExecutable(optimized, **options)
    else:
        from .backends.numba_cuda import CudaExecutable

        exe = CudaExecutable(optimized, **options)
    exe.source_graph = graph
    exe.pass_log = log
    exe.explain = _report(graph, optimized, log) if explain else None
    return exe


def _report(before: Graph, after: Graph, log) -> str:
    lines = [f"graph {before.name!r}: {len(before.nodes)} nodes → {len(after.nodes)} after optimization"]
    fired = log.fired()
    lines.append(f"rules fired: {len(fired)}")
    lines += [f"  {e}" for e in fired]
    misses = log.near_misses()
    if misses:
        lines.append("near misses:")
        lines += [f"  {e}" for e in misses]
    return "\n".join(lines)
