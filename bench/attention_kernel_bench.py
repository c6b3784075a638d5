"""Benchmark: attngraph flash-style CPU attention kernels vs torch SDPA vs numpy.

    python bench/attention_kernel_bench.py                 # everything
    python bench/attention_kernel_bench.py --only fwd,bwd  # subsets: fwd,bwd,mem,gemm,compile
    python bench/attention_kernel_bench.py --quick         # fewer repeats, no T=4096

Method: every implementation runs with 2 threads (numba.set_num_threads(2),
torch.set_num_threads(2), BLAS limited to 2 threads for numpy).  Repeats are interleaved
(round r runs attngraph, torch, numpy one after the other).  Three thread runtimes live in
this process (numba's libgomp, torch's bundled libgomp, numpy's OpenBLAS) and each keeps its
workers spinning for a while after a call, which on 2 cores starves the next runtime (torch
measured 30x slower right after numpy).  So each switch pauses SETTLE_S (spinners go to
sleep), warms up for WARM_S, then times ``inner`` calls.  Reported numbers are medians over rounds of the per-call mean, in ms.
float32 throughout.

Shared machines: the CPU time used by *other* processes during each measurement is taken from
/proc/stat and reported ("other load", in CPUs); a measurement is retried (after waiting for a
quiet moment) up to MAX_TRIES times while that exceeds QUIET.  ``--cpu-time`` instead runs
everyone on 1 thread and reports process CPU time, which stays meaningful under load.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

# torch first: its libtorch links "libgomp.so.1" and ships its own copy; if numba's OpenMP
# threading layer has already loaded the system libgomp.so.1, torch binds to that one and its
# SDPA became ~100x slower here (171 ms instead of 1.4 ms at (8,4,128,64)).
try:
    import torch as _torch
except ImportError:  # pragma: no cover
    _torch = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_FILE = ROOT / "attngraph" / "backends" / "numba_cpu" / "attention_kernels.py"
NTHREADS = 2


def load_kernels():
    sys.path.insert(0, str(ROOT))
    try:
        from attngraph.backends.numba_cpu import attention_kernels as mod
        return mod
    except Exception:  # package __init__ in flux: load the file on its own
        # the canonical name: numba's disk cache pickles the module name of each entry
        name = "attngraph.backends.numba_cpu.attention_kernels"
        spec = importlib.util.spec_from_file_location(name, KERNEL_FILE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod


# ----------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------


def numpy_attention(q, k, v, causal):
    s = (q @ k.swapaxes(-1, -2)) * np.float32(1.0 / np.sqrt(q.shape[-1]))
    if causal:
        T = s.shape[-1]
        s[..., np.triu(np.ones((s.shape[-2], T), dtype=bool), 1)] = -np.inf
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s @ v


CLOCK = time.perf_counter  # --cpu-time switches to time.process_time (1 thread, load robust)
QUIET = 0.2  # max CPUs used by *other* processes during a measurement (wall-clock mode)
MAX_TRIES = 6


def _busy_cpu_seconds():
    """CPU seconds spent busy by the whole machine (all CPUs) since boot (Linux)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds():
    """CPU seconds of this process and its waited-for children (the compile subprocesses)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def foreign_load(fn):
    """Run fn(); return (result, average number of CPUs used meanwhile by other processes)."""
    b0, o0, w0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    r = fn()
    b1, o1, w1 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    return r, max(0.0, ((b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9))


def wait_quiet(max_wait=600.0):
    """Wait (up to max_wait s) until other processes use less than QUIET CPUs."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        _, load = foreign_load(lambda: time.sleep(0.5))
        if load < QUIET:
            return True
        time.sleep(2.0)
    return False


def measure(fns, rounds, inner):
    """Interleaved timing; in wall-clock mode retried until no other process competed."""
    best = None
    for _ in range(1 if CLOCK is time.process_time else MAX_TRIES):
        if CLOCK is not time.process_time:
            wait_quiet()
        t, load = foreign_load(lambda: timeit_interleaved(fns, rounds, inner))
        if best is None or load < best[1]:
            best = (t, load)
        if load < QUIET:
            break
    return best


SETTLE_S = 0.3   # pause when switching implementation: the previous runtime's spinning
WARM_S = 0.05    # workers (libgomp, OpenBLAS) go to sleep; then warm up for >= WARM_S


def timeit_interleaved(fns, rounds, inner):
    res = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            while time.perf_counter() - t0 < WARM_S:
                fn()
            t0 = CLOCK()
            for _ in range(inner):
                fn()
            res[name].append((CLOCK() - t0) / inner)
    return {name: float(np.median(v)) * 1e3 for name, v in res.items()}


def _md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


FWD_SHAPES = [
    ((1, 12, 197, 64), False),
    ((8, 4, 128, 64), False),
    ((8, 4, 128, 64), True),
    ((1, 8, 1024, 64), False),
    ((1, 8, 1024, 64), True),
    ((1, 8, 4096, 64), False),
    ((1, 8, 4096, 64), True),
    ((32, 3, 65, 64), False),
]
BWD_SHAPES = [
    ((8, 4, 128, 64), False),
    ((8, 4, 128, 64), True),
    ((1, 8, 1024, 64), False),
    ((1, 8, 1024, 64), True),
]


def _budget(shape, quick):
    B, H, T, D = shape
    work = B * H * T * T * D
    if work >= 5e9:
        return (3, 1) if quick else (5, 1)
    if work >= 3e8:
        return (5, 2) if quick else (9, 3)
    return (7, 10) if quick else (15, 20)


def bench_forward(ak, torch, quick):
    from threadpoolctl import threadpool_limits

    F = torch.nn.functional
    rows = []
    for shape, causal in FWD_SHAPES:
        if quick and shape[2] >= 4096:
            continue
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        fns = {
            "attngraph": lambda: ak.attention_forward(q, k, v, causal=causal),
            "torch": lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal),
        }
        if shape[2] <= 4096:
            fns["numpy"] = lambda: numpy_attention(q, k, v, causal)
        # sanity: same answer
        ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).numpy()
        err = float(np.max(np.abs(ak.attention_forward(q, k, v, causal=causal) - ref)))
        assert err < 1e-4, err
        rounds, inner = _budget(shape, quick)
        with threadpool_limits(NTHREADS):
            t, load = measure(fns, rounds, inner)
        rows.append([f"{shape}", "yes" if causal else "no", f"{t['attngraph']:.3f}",
                     f"{t['torch']:.3f}", f"{t['numpy']:.3f}" if "numpy" in t else "-",
                     f"{t['attngraph'] / t['torch']:.2f}", f"{load:.2f}"])
        print("  fwd", rows[-1], flush=True)
    return _md_table(["(B,H,T,D)", "causal", "attngraph ms", "torch SDPA ms", "numpy ms",
                      "attngraph/torch", "other load (CPUs)"], rows)


def bench_backward(ak, torch, quick):
    F = torch.nn.functional
    rows = []
    for shape, causal in BWD_SHAPES:
        rng = np.random.default_rng(1)
        q, k, v, do = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
        out, lse = ak.attention_forward(q, k, v, causal=causal, return_lse=True)
        tq, tk, tv = (torch.from_numpy(x.copy()).requires_grad_(True) for x in (q, k, v))
        tout = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        tdo = torch.from_numpy(do)
        grads = ak.attention_backward(q, k, v, out, lse, do, causal=causal)
        tg = torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)
        err = max(float(np.max(np.abs(a - b.numpy()))) for a, b in zip(grads, tg))
        assert err < 1e-3, err
        fns = {
            "attngraph": lambda: ak.attention_backward(q, k, v, out, lse, do, causal=causal),
            "torch": lambda: torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True),
        }
        rounds, inner = _budget(shape, quick)
        t, load = measure(fns, rounds, max(1, inner // 2))
        rows.append([f"{shape}", "yes" if causal else "no", f"{t['attngraph']:.3f}",
                     f"{t['torch']:.3f}", f"{t['attngraph'] / t['torch']:.2f}", f"{load:.2f}"])
        print("  bwd", rows[-1], flush=True)
    return _md_table(["(B,H,T,D)", "causal", "attngraph bwd ms", "torch SDPA bwd ms",
                      "attngraph/torch", "other load (CPUs)"], rows)


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------

_MEM_CHILD = textwrap.dedent("""
    import importlib.util, sys, numpy as np, numba
    name = "attngraph.backends.numba_cpu.attention_kernels"  # numba's cache pickles the name
    spec = importlib.util.spec_from_file_location(name, {kfile!r})
    ak = importlib.util.module_from_spec(spec)
    sys.modules[name] = ak
    spec.loader.exec_module(ak)
    numba.set_num_threads({nt})
    B, H, T, D = {shape}
    x = np.ones((1, 1, 8, D), np.float32)
    ak.attention_forward(x, x, x, causal=True)          # load kernels, start the thread pool
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(3))
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
    with open("/proc/self/clear_refs", "w") as f:       # reset the peak-RSS high-water mark
        f.write("5")
    before = status("VmRSS:")
    o = ak.attention_forward(q, k, v, causal={causal})
    print(status("VmHWM:") - before)
""")




def scratch_bytes(ak, B, H, T, D, itemsize=4, nthreads=NTHREADS):
    """Extra memory of one forward besides inputs and the output/lse arrays."""
    lanes = ak._VB // itemsize
    bq, bk = ak._fwd_blocks(T, T, D, D, itemsize)
    bqp = -(-bq // lanes) * lanes
    bkp = -(-bk // 4) * 4
    Dvp = -(-D // lanes) * lanes
    per_thread = (D * bqp + bkp * bqp + 4 * D + bqp * Dvp + 6 * bqp) * itemsize
    return per_thread * nthreads, (bq, bk)


def bench_memory(ak, quick):
    rows = []
    for T in (4096, 16384):
        B, H, D = 1, 8, 64
        scratch, (bq, bk) = scratch_bytes(ak, B, H, T, D, nthreads=NTHREADS)
        outb = B * H * T * D * 4 + B * H * T * 4
        measured = []
        for causal in (False, True):
            code = _MEM_CHILD.format(kfile=str(KERNEL_FILE), nt=NTHREADS,
                                     shape=(B, H, T, D), causal=causal)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=600)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            measured.append(int(r.stdout.strip().splitlines()[-1]))
        naive = B * H * T * T * 4
        rows.append([f"(1,8,{T},64)", f"{bq}x{bk}", f"{scratch / 1024:.0f} KiB",
                     f"{(scratch + outb) / 2**20:.2f} MiB",
                     " / ".join(f"{m / 2**20:.2f} MiB" for m in measured),
                     f"{naive / 2**30:.2f} GiB"])
        print("  mem", rows[-1], flush=True)
    return _md_table(["shape", "block q x k", "scratch (computed, 2 threads)",
                      "scratch + out + lse (computed)",
                      "measured peak RSS increase (non-causal / causal)",
                      "numpy scores matrix alone"], rows)


# ----------------------------------------------------------------------------------------
# micro-kernel vs np.dot (scipy BLAS) inside numba, single thread
# ----------------------------------------------------------------------------------------


def bench_gemm(ak):
    import numba
    from threadpoolctl import threadpool_limits

    @numba.njit(cache=False)
    def mk_loop(A, B, C, reps):
        M, K = A.shape
        N = B.shape[1]
        for _ in range(reps):
            ak._gemm(C[0, 0], ak._ptr(A), 0, K, 1, ak._ptr(B), 0, N, ak._ptr(C), 0, N, M, N, K, 1,
                     0, 0)

    @numba.njit(cache=False)
    def dot_loop(A, B, C, reps):
        for _ in range(reps):
            np.dot(A, B, C)

    rows = []
    for (M, N, K) in [(64, 64, 64), (64, 256, 64), (128, 64, 256), (256, 64, 256)]:
        A = np.random.rand(M, K).astype(np.float32)
        B = np.random.rand(K, N).astype(np.float32)
        C = np.zeros((M, N), np.float32)
        res = {}
        with threadpool_limits(1):
            for name, f in (("micro-kernel", mk_loop), ("np.dot (BLAS)", dot_loop)):
                f(A, B, C, 1)
                assert np.allclose(C, A @ B, rtol=1e-4, atol=1e-4)
                reps = max(10, int(2e8 / (M * N * K)))
                best = 1e9
                for _ in range(5):
                    t0 = time.perf_counter()
                    f(A, B, C, reps)
                    best = min(best, (time.perf_counter() - t0) / reps)
                res[name] = 2 * M * N * K / best / 1e9
        rows.append([f"{M}x{N}x{K}", f"{res['micro-kernel']:.1f}", f"{res['np.dot (BLAS)']:.1f}"])
        print("  gemm", rows[-1], flush=True)
    return _md_table(["block GEMM MxNxK (f32, 1 thread)", "micro-kernel GFLOP/s",
                      "np.dot in numba GFLOP/s"], rows)


# ----------------------------------------------------------------------------------------
# compile / cache-load time (fresh processes, private cache dir)
# ----------------------------------------------------------------------------------------

_COMPILE_CHILD = textwrap.dedent("""
    import time, sys
    t0, c0 = time.perf_counter(), time.process_time()
    import importlib.util, numpy as np
    name = "attngraph.backends.numba_cpu.attention_kernels"  # numba's cache pickles the name
    spec = importlib.util.spec_from_file_location(name, {kfile!r})
    ak = importlib.util.module_from_spec(spec)
    sys.modules[name] = ak
    spec.loader.exec_module(ak)
    res = [(time.perf_counter() - t0, time.process_time() - c0)]
    for dt in (np.float32, np.float64):
        x = np.ones((1, 1, 8, 16), dt)
        t, c = time.perf_counter(), time.process_time()
        o, l = ak.attention_forward(x, x, x, return_lse=True)
        t2, c2 = time.perf_counter(), time.process_time()
        ak.attention_backward(x, x, x, o, l, x)
        res += [(t2 - t, c2 - c), (time.perf_counter() - t2, time.process_time() - c2)]
    print(" ".join("%.3f/%.3f" % r for r in res))
""")


def bench_compile():
    """Cold compile and warm (cache hit) load, each in a fresh process with a private
    NUMBA_CACHE_DIR; wall / CPU seconds (CPU time is the robust number on a shared machine)."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        code = _COMPILE_CHILD.format(kfile=str(KERNEL_FILE))
        for label in ("cold (empty cache)", "warm (cache hit)"):
            r, load = foreign_load(lambda: subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env,
                timeout=1800))
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            vals = r.stdout.split()[-5:]
            rows.append([label] + vals + [f"{load:.2f}"])
            print("  compile", rows[-1], flush=True)
    return _md_table(["process", "import numba + module s (wall/cpu)", "fwd f32 s", "bwd f32 s", "fwd f64 s",
                      "bwd f64 s", "other load (CPUs)"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="fwd,bwd,mem,gemm,compile")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread for everyone and process CPU time instead of wall time: "
                         "robust when other jobs share the machine")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    global NTHREADS, CLOCK
    if args.cpu_time:
        NTHREADS = 1
        CLOCK = time.process_time

    import numba
    numba.set_num_threads(NTHREADS)
    ak = load_kernels()
    torch = None
    if parts & {"fwd", "bwd"}:
        if _torch is None:
            raise SystemExit("torch is needed for --only fwd/bwd")
        torch = _torch
        torch.set_num_threads(NTHREADS)
    print(f"# attention kernel benchmark  (threads={NTHREADS}, numba {numba.__version__}, "
          f"clock={'process CPU time' if args.cpu_time else 'wall'}, vector bytes={ak._VB})")
    if torch is not None:
        x = np.ones((1, 1, 8, 16), np.float32)
        ak.attention_forward(x, x, x)
        print(f"# torch {torch.__version__}, numba threading layer: {numba.threading_layer()}")
    load = os.getloadavg()
    print(f"# load average at start: {load[0]:.2f} (machine has {os.cpu_count()} CPUs)")
    out = []
    if "fwd" in parts:
        out.append("## forward (float32)\n\n" + bench_forward(ak, torch, args.quick))
    if "bwd" in parts:
        out.append("## backward (float32, dq/dk/dv given out, lse, dout)\n\n"
                   + bench_backward(ak, torch, args.quick))
    if "mem" in parts:
        out.append("## peak extra memory of one forward\n\n" + bench_memory(ak, args.quick))
    if "gemm" in parts:
        out.append("## block GEMM engine\n\n" + bench_gemm(ak))
    if "compile" in parts:
        out.append("## compile time (fresh processes)\n\n" + bench_compile())
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
