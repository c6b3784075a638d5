"""The kernel cache: a second process compiling the same graph finds every kernel on disk
(generated sources in ATTNGRAPH_CACHE_DIR, numba's compiled code in NUMBA_CACHE_DIR) and
compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, math, time
    import numpy as np
    import attngraph as ag
    g = ag.Graph("warm")
    x = g.input("x", ("B", "T", 16))
    w = g.param("w", (16, 48))
    b = g.param("b", (48,), init="zeros")
    q, k, v = ag.split(x @ w + b, 3, axis=-1)
    heads = lambda t: t.reshape("B", "T", 2, 8).transpose(0, 2, 1, 3)
    s = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(8)
    y = (ag.softmax(ag.mask(s, ag.causal_mask(g, "T")), axis=-1) @ heads(v)).transpose(0, 2, 1, 3).reshape("B", "T", 16)
    g.output("y", ag.layernorm(ag.gelu(y) + x))
    t0 = time.perf_counter()
    exe = ag.compile(g, backend="cpu")
    out = exe.run({"x": np.ones((2, 5, 16), np.float32)})["y"]
    print(json.dumps({"seconds": time.perf_counter() - t0, "sum": float(out.sum()),
                      "ops": sorted(exe.graph.op_counts())}))
""")


def snapshot(*dirs):
    files = {}
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file():
                files[str(p)] = p.stat().st_mtime_ns
    return files


@pytest.mark.slow
def test_second_process_compiles_nothing(tmp_path):
    cache, numba_cache = tmp_path / "kernels", tmp_path / "numba"
    env = dict(os.environ, ATTNGRAPH_CACHE_DIR=str(cache), NUMBA_CACHE_DIR=str(numba_cache),
               PYTHONPATH=str(REPO))
    script = tmp_path / "warm.py"
    script.write_text(SCRIPT)

    def run():
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    after_first = snapshot(cache, numba_cache)
    assert any(p.endswith(".py") for p in after_first), "generated kernels are written as .py files"
    assert any(p.endswith(".nbi") for p in after_first), "numba caches compiled code"
    second = run()
    assert snapshot(cache, numba_cache) == after_first, "the second process wrote to the caches: it compiled"
    assert second["sum"] == first["sum"]
    print(f"cold {first['seconds']:.2f} s, warm {second['seconds']:.2f} s")
