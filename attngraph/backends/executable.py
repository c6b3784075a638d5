"""Executable: what ``ag.compile`` returns; the backends fill in ``_execute``."""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from ..errors import FeedError
from ..ir import Graph
from .feeds import bind_feeds

__all__ = ["Executable", "ParamStore"]


class ParamStore(MutableMapping):
    """``exe.params``: name → array. Setting a value checks its shape and casts floats to the param's dtype."""

    def __init__(self, graph: Graph):
        self._types = {name: node.type for name, node in graph.params.items()}
        self._arrays = {name: graph.values[name].copy() for name in graph.params}

    def __getitem__(self, name):
        try:
            return self._arrays[name]
        except KeyError:
            raise FeedError(f"unknown parameter {name!r}; parameters are {', '.join(self._arrays) or '(none)'}") from None

    def __contains__(self, name) -> bool:
        return name in self._arrays

    def __setitem__(self, name, value):
        if name not in self._types:
            raise FeedError(f"unknown parameter {name!r}; parameters are {', '.join(self._types) or '(none)'}")
        ttype = self._types[name]
        arr = np.asarray(value)
        if arr.shape != tuple(ttype.shape):
            raise FeedError(f"parameter {name!r} has shape {tuple(ttype.shape)}, got {arr.shape}")
        if arr.dtype != ttype.dtype.numpy:
            if not (arr.dtype.kind == "f" and ttype.dtype.is_float):
                raise FeedError(f"parameter {name!r} is {ttype.dtype}, got {arr.dtype}")
        self._arrays[name] = np.array(arr, dtype=ttype.dtype.numpy, order="C")

    def __delitem__(self, name):
        raise FeedError("parameters cannot be removed from an executable")

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)

    def __repr__(self):
        return "ParamStore(" + ", ".join(f"{k}: {v.dtype}{v.shape}" for k, v in self._arrays.items()) + ")"


class Executable:
    """A compiled graph. ``run(feeds)`` → dict of output name → numpy array."""

    backend = "abstract"

    def __init__(self, graph: Graph):
        self.graph = graph
        self.params = ParamStore(graph)

    def run(self, feeds) -> dict[str, np.ndarray]:
        arrays, bindings = bind_feeds(self.graph, feeds)
        return self._execute(arrays, bindings)

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        return self.run(feeds)

    def _execute(self, feeds: dict[str, np.ndarray], bindings: dict[str, int]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _cached_program(self, bindings: dict, make):
        """The program (plan + buffers + prepared steps) for ``bindings``: made by ``make(plan)`` on
        first use, kept for the ``max_plans`` most recently used sets of bindings."""
        from ..plan import bindings_key, plan_memory

        key = bindings_key(bindings)
        program = self._programs.get(key)
        if program is None:
            program = make(plan_memory(self.graph, bindings))
            self._programs[key] = program
            while len(self._programs) > self.max_plans:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(key)
        return program

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.graph.name!r} backend={self.backend}: "
                f"{len(self.graph.nodes)} nodes, inputs {list(self.graph.inputs)}, outputs {list(self.graph.outputs)}>")
