"""ag.compile: verify the graph, run the pass pipeline, hand it to a backend."""

from __future__ import annotations

from .errors import BackendError
from .ir import Graph, verify

__all__ = ["compile", "BACKENDS"]

BACKENDS = ("numpy", "cpu", "cuda")


def compile(graph: Graph, backend: str = "numpy", *, seed: int | None = None, **options):  # noqa: A001
    """Compile ``graph`` for ``backend`` ("numpy" | "cpu" | "cuda") and return an Executable.

    Parameters start from the graph's initial values (``graph.values``), copied, so the
    graph itself is never changed by training or by ``exe.params[...] = ...``.
    """
    verify(graph)
    if backend == "numpy":
        from .backends.numpy_ref import NumpyExecutable

        return NumpyExecutable(graph, **options)
    if backend in BACKENDS:
        raise BackendError(f"backend {backend!r} is not built yet", hint="use backend='numpy'")
    raise BackendError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
