"""Timing that survives noisy machines: interleaved repeats, medians, ratios in one run."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Timing", "interleaved", "set_threads", "machine_line", "markdown_table"]


@dataclass
class Timing:
    name: str
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 10, warmup: int = 2,
                min_time_s: float = 0.0) -> dict[str, Timing]:
    """Time each function ``repeats`` times, rotating the order every round, after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(name) for name in fns}
    names = list(fns)
    start = time.perf_counter()
    r = 0
    while r < repeats or time.perf_counter() - start < min_time_s:
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            timings[name].samples_ms.append((time.perf_counter() - t0) * 1e3)
        r += 1
        if r >= 10 * repeats:
            break
    return timings


def set_threads(n: int = 2) -> None:
    """The same thread budget for every engine: numba, BLAS (threadpoolctl) and torch."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def machine_line() -> str:
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [cpu, f"{os.cpu_count()} cores", f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    for mod in ("numba", "torch", "onnxruntime"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
