"""The CUDA backend, from the main test process, which never switches the simulator on.

``NUMBA_ENABLE_CUDASIM`` only works when set before numba is imported, and it would change
numba for every other test, so each check here runs in a subprocess:

- the kernel and backend cases (``cuda_sim_cases.py``) on the simulator, or on the GPU when
  the machine has one (the same file, unchanged);
- ``backend="cuda"`` without a GPU and without the simulator raises ``BackendError``;
- every kernel family compiles to PTX for a real GPU (NVVM, no GPU needed), and the float32
  kernels contain no float64 arithmetic: the typing the simulator never does.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("cuda_sim_cases.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                reason="numba-cuda is not installed (the 'cuda' extra)")


def _env(simulator: bool) -> dict:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _python(code: str, *, simulator: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(simulator),
                          capture_output=True, text=True, timeout=timeout)


_GPU: list[bool] = []


def gpu_present() -> bool:
    """Whether numba-cuda sees a real GPU (asked once, in a subprocess without the simulator)."""
    if not _GPU:
        result = _python("from numba import cuda; print('GPU' if cuda.is_available() else 'none')",
                         simulator=False, timeout=120)
        _GPU.append(result.stdout.strip().endswith("GPU"))
    return _GPU[0]


@pytest.mark.slow
def test_kernels_and_backend_match_numpy_on_the_simulator_or_gpu():
    simulator = not gpu_present()
    result = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider",
                             "-W", "ignore::RuntimeWarning"],
                            cwd=ROOT, env=_env(simulator), capture_output=True, text=True, timeout=600)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "skipped" not in summary, tail


def test_cuda_backend_without_gpu_or_simulator_raises_backend_error():
    if gpu_present():
        pytest.skip("this machine has a CUDA GPU")
    result = _python("""
        import attngraph as ag
        from attngraph.errors import BackendError
        g = ag.Graph("g")
        x = g.input("x", (2, 3))
        g.output("y", ag.softmax(x, axis=-1))
        try:
            ag.compile(g, backend="cuda")
        except BackendError as err:
            print("BackendError:", err)
        else:
            print("compiled")
    """, simulator=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "BackendError:" in out, out + result.stderr[-3000:]
    assert "no CUDA GPU" in out and "NUMBA_ENABLE_CUDASIM=1" in out


@pytest.mark.slow
def test_every_kernel_family_compiles_to_float32_ptx():
    """NVVM compiles each kernel as a GPU would (the simulator only runs Python)."""
    result = _python("""
        import math, re, sys
        import numpy as np
        from attngraph.backends.numba_cuda import kernels as K
        try:  # the toolchain: libNVVM and NVRTC (the cu12 extra brings both)
            from numba import cuda, float32
            from numba.cuda.cudadrv import nvvm
            nvvm.NVVM()

            def probe(a):
                a[0] = 1.0

            cuda.compile_ptx(probe, (float32[:],), cc=(9, 0))
        except Exception as err:
            print("NO-NVVM", type(err).__name__, str(err).splitlines()[0])
            sys.exit(0)
        T = K.GPU_TILES
        ar = K.Arena()
        f = lambda *s: ar.tensor(s, np.float32)
        q, k, v, o = f(2, 4, 100, 64), f(2, 4, 90, 64), f(2, 4, 90, 64), f(2, 4, 100, 64)
        bias, mask = f(100, 90), ar.tensor((2, 1, 1, 90), np.bool_)
        families = {
            "attention_fwd": K.prepare_attention_forward(o, q, k, v, bias, mask, scale=0.1, causal=True,
                                                         scratch=ar, tiles=T),
            "attention_bwd": K.prepare_attention_backward(f(2, 4, 100, 64), f(2, 4, 90, 64), f(2, 4, 90, 64), q, k, v,
                                                          o, f(800), f(2, 4, 100, 64), bias, mask, scale=0.1,
                                                          causal=True, scratch=ar, tiles=T),
            "sgemm": K.prepare_matmul(f(300, 700), f(300, 100), f(700, 100).permuted((1, 0)), ar, tiles=T),
            "softmax": K.prepare_softmax(f(10, 50), f(10, 50), -1, ar, tiles=T),
            "layernorm": K.prepare_layernorm(f(10, 50), f(10, 50), f(50), f(50), 1e-5, ar, residual=f(10, 50),
                                             total=f(10, 50), tiles=T),
            "reduce": K.prepare_reduce(f(10), f(10, 50), (1,), "max", ar, tiles=T),
            "gather": K.prepare_gather(f(6, 50), f(100, 50), ar.tensor((6,), np.int64), 0, ar, tiles=T),
            "elementwise": K.prepare_elementwise(
                ("gelu", (("approximate", "none"),), ("add", (), ("in", 0), ("in", 1))), f(10, 50),
                [f(10, 50), f(50)], tiles=T),
            "compare": K.prepare_elementwise(("less", (), ("in", 0), ("in", 1)), ar.tensor((10, 5), np.bool_),
                                             [f(10, 5), f(5)], tiles=T),
        }
        for family, launches in families.items():
            seen = set()
            for launch in launches:
                if id(launch.dispatcher) in seen:
                    continue
                seen.add(id(launch.dispatcher))
                ptx = K.ptx_of(launch, (9, 0))
                f64 = sorted(set(re.findall(r"\\b[a-z]+(?:\\.[a-z0-9]+)*\\.f64\\b", ptx)))
                print(family, launch.name, "f64:" + ",".join(f64))
    """, simulator=False, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    if "NO-NVVM" in result.stdout:
        pytest.skip("the CUDA compiler toolchain (libNVVM, NVRTC) is not installed: " + result.stdout.strip())
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 10, result.stdout
    for line in lines:
        assert line.endswith("f64:"), f"float64 arithmetic in a float32 kernel: {line}"
