"""The pass pipeline, in order. Each pass can be switched off by name (``disable=``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import AttngraphError, VerifyError
from ..ir import Graph, verify
from . import canonicalize, fold_constants, fuse_attention, fuse_elementwise, fuse_layernorm, fuse_matmul
from .cse import eliminate_common_subexpressions
from .rewrite import PassLog, eliminate_dead_code, rewrite

__all__ = ["Pass", "PIPELINE", "PASS_NAMES", "optimize", "DriftError"]


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, PassLog], Graph]
    doc: str = ""


def rule_pass(name: str, rules, doc: str = "", after=None) -> Pass:
    def run(graph: Graph, log: PassLog) -> Graph:
        out = rewrite(graph, rules, name, log)
        if after is not None:
            after(out, log)
        return out
    return Pass(name, run, doc)


PIPELINE: list[Pass] = [
    rule_pass("canonicalize", canonicalize.RULES, "one spelling per computation"),
    rule_pass("fold_constants", fold_constants.RULES, "evaluate nodes whose inputs are all consts"),
    Pass("cse", eliminate_common_subexpressions, "merge identical nodes and small identical consts"),
    Pass("dce", lambda g, log: eliminate_dead_code(g), "drop nodes no output needs"),
    rule_pass("fuse_attention", fuse_attention.RULES, "softmax(QKᵀ·s + mask) V → attention",
              after=fuse_attention.report_near_misses),
    Pass("fuse_layernorm", fuse_layernorm.run, "mean/sub/square/rsqrt chains → layernorm; add + layernorm → "
         "residual_layernorm"),
    Pass("fuse_matmul", fuse_matmul.run, "x @ w_i of one x → one matmul; matmul + elementwise → epilogue"),
    rule_pass("fuse_elementwise", fuse_elementwise.RULES, "regions of elementwise ops → fused_elementwise"),
    rule_pass("canonicalize_after_fusion", canonicalize.RULES, "fold the transposes fusion left behind"),
]

PASS_NAMES = tuple(p.name for p in PIPELINE)


class DriftError(AttngraphError):
    """Debug mode: a pass changed what the graph computes."""


def optimize(graph: Graph, *, disable=(), log: PassLog | None = None, debug: bool = False,
             debug_feeds: dict | None = None, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[Graph, PassLog]:
    """Run the pipeline; verify after every pass. With ``debug``, run the numpy reference
    after every pass and raise DriftError naming the first pass whose outputs drift."""
    unknown = set(disable) - set(PASS_NAMES)
    if unknown:
        raise AttngraphError(f"unknown pass {sorted(unknown)[0]!r} in disable=",
                             hint=f"passes are {', '.join(PASS_NAMES)}")
    log = log if log is not None else PassLog()
    reference = None
    if debug:
        feeds = debug_feeds if debug_feeds is not None else random_feeds(graph)
        reference = (feeds, _run_numpy(graph, feeds))
    for p in PIPELINE:
        if p.name in disable:
            continue
        graph = p.run(graph, log)
        try:
            verify(graph)
        except VerifyError as err:
            raise VerifyError(f"after pass {p.name}: {err.message}") from None
        if reference is not None:
            feeds, want = reference
            got = _run_numpy(graph, feeds)
            for name in want:
                if not np.allclose(got[name], want[name], rtol=rtol, atol=atol, equal_nan=True):
                    worst = float(np.nanmax(np.abs(got[name].astype(np.float64) - want[name])))
                    raise DriftError(f"pass {p.name} changed output {name!r} (max abs difference {worst:.3g})")
    return graph, log


def _run_numpy(graph: Graph, feeds: dict) -> dict:
    from ..backends.numpy_ref import NumpyExecutable

    return NumpyExecutable(graph).run(feeds)


def random_feeds(graph: Graph, size: int = 3, seed: int = 0) -> dict:
    """Random feeds for every input, binding each symbolic dim to ``size``."""
    from ..ir import eval_shape, shape_symbols

    rng = np.random.default_rng(seed)
    symbols = set().union(*(shape_symbols(n.type.shape) for n in graph.inputs.values())) if graph.inputs else set()
    bindings = {s: size for s in symbols}
    feeds = {}
    for name, node in graph.inputs.items():
        shape = eval_shape(node.type.shape, bindings)
        dtype = node.type.dtype
        if dtype.is_float:
            feeds[name] = rng.standard_normal(shape).astype(dtype.numpy)
        elif dtype.value == "bool":
            feeds[name] = rng.random(shape) > 0.7
        else:
            feeds[name] = rng.integers(0, size, shape).astype(dtype.numpy)
    return feeds
