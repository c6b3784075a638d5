"""GPU benchmarks of the CUDA backend, printed as markdown tables headed by the GPU's name.

    python bench/cuda_bench.py                     # everything (needs a CUDA GPU)
    python bench/cuda_bench.py attention sgemm     # some of: attention sgemm encoder launch
    python bench/cuda_bench.py --quick             # smaller sizes, fewer repeats
    NUMBA_ENABLE_CUDASIM=1 python bench/cuda_bench.py --smoke   # the script's own logic, tiny sizes

- attention: the flash forward kernel on (B, H, T, D) float32, causal and not, T up to 16384,
  against torch's scaled_dot_product_attention in float32 with TF32 off. Both sides time
  device-resident tensors (kernel time: CUDA-synchronized wall clock, median of repeats).
- sgemm: the tiled SGEMM against torch.matmul in float32 (``allow_tf32 = False``), GFLOP/s.
- encoder: the 4-layer encoder of attngraph/benchmarks/models.py, ``exe.run`` (inputs copied
  in, output copied out) against the same torch module on the GPU including ``.to`` / ``.cpu()``.
- launch: per-kernel launch overhead: a graph of many tiny kernels (a chain of unfused
  elementwise ops on 4 floats), (time of N runs) / N / kernels, for each launch mode
  (``ATTNGRAPH_CUDA_LAUNCH`` = fast | kernel | dispatch). The target is <= 30 µs.

Without a GPU it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _no_gpu(reason: str) -> None:
    print(f"cuda_bench: skipped: {reason}")
    sys.exit(0)


def _median_ms(fn, sync, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def _table(header, rows) -> str:
    from attngraph.benchmarks.harness import markdown_table

    return markdown_table(header, rows)


# -- attention ------------------------------------------------------------------------------------
def bench_attention(args, torch) -> str:
    from numba import cuda

    from attngraph.backends.numba_cuda import kernels as K

    if args.smoke:
        shapes = [(1, 2, 16, 8)]
    elif args.quick:
        shapes = [(4, 8, 512, 64), (1, 8, 4096, 64)]
    else:
        shapes = [(8, 8, 512, 64), (4, 8, 1024, 64), (2, 8, 4096, 64), (1, 8, 8192, 64), (1, 4, 16384, 64),
                  (2, 8, 1024, 128)]
    rows = []
    rng = np.random.default_rng(0)
    for (b, h, t, d) in shapes:
        for causal in (False, True):
            q, k, v = (rng.standard_normal((b, h, t, d)).astype(np.float32) for _ in range(3))
            arena = K.Arena("bench")
            rq, rk, rv = arena.upload(q), arena.upload(k), arena.upload(v)
            out = arena.tensor((b, h, t, d), np.float32)
            launches = K.prepare_attention_forward(out, rq, rk, rv, None, None, scale=1 / math.sqrt(d),
                                                   causal=causal, scratch=arena)
            arena.finalize()
            for launch in launches:
                launch.bind()

            def ours():
                for launch in launches:
                    launch.run()

            ms = _median_ms(ours, cuda.synchronize, args.repeats)
            flops = 4 * b * h * t * t * d / (2 if causal else 1)
            row = [f"({b}, {h}, {t}, {d})", "yes" if causal else "no", ms, flops / ms / 1e9]   # TFLOP/s
            if torch is not None:
                tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
                F = torch.nn.functional

                def theirs():
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                try:
                    tms = _median_ms(theirs, torch.cuda.synchronize, args.repeats)
                    err = float(np.abs(out.read() - theirs().cpu().numpy()).max())
                    row += [tms, tms / ms, f"{err:.1e}"]
                except RuntimeError as exc:          # e.g. out of memory on the math path
                    row += [f"error: {str(exc).splitlines()[0][:40]}", "", ""]
                del tq, tk, tv
                torch.cuda.empty_cache()
            else:
                row += ["n/a", "", ""]
            rows.append(row)
            arena.release()
    return "### attention forward (float32)\n\n" + _table(
        ["(B, H, T, D)", "causal", "attngraph ms", "TFLOP/s", "torch SDPA ms", "speed vs torch", "max |diff|"],
        rows)


# -- sgemm ----------------------------------------------------------------------------------------
def bench_sgemm(args, torch) -> str:
    from numba import cuda

    from attngraph.backends.numba_cuda import kernels as K

    if args.smoke:
        shapes = [((1, 20, 12), (12, 9))]
    elif args.quick:
        shapes = [((1, 1024, 1024), (1024, 1024)), ((1, 4096, 4096), (4096, 4096))]
    else:
        shapes = [((1, 512, 512), (512, 512)), ((1, 1024, 1024), (1024, 1024)), ((1, 2048, 2048), (2048, 2048)),
                  ((1, 4096, 4096), (4096, 4096)), ((32, 128, 256), (256, 1024)), ((64, 128, 64), (64, 128))]
    rows = []
    rng = np.random.default_rng(0)
    for sa, sb in shapes:
        a = rng.standard_normal(sa).astype(np.float32)
        b = rng.standard_normal(sb).astype(np.float32)
        arena = K.Arena("bench")
        ra, rb = arena.upload(a), arena.upload(b)
        out = arena.tensor(sa[:-1] + sb[-1:], np.float32)
        launches = K.prepare_matmul(out, ra, rb, arena)
        arena.finalize()
        for launch in launches:
            launch.bind()

        def ours():
            for launch in launches:
                launch.run()

        ms = _median_ms(ours, cuda.synchronize, args.repeats)
        flops = 2 * np.prod(sa) * sb[-1]
        row = [f"{sa} @ {sb}", ms, flops / ms / 1e6]
        if torch is not None:
            ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
            tms = _median_ms(lambda: ta @ tb, torch.cuda.synchronize, args.repeats)
            rel = float(np.abs(out.read() - (ta @ tb).cpu().numpy()).max() / np.abs(a).max() / np.sqrt(sa[-1]))
            row += [tms, flops / tms / 1e6, tms / ms, f"{rel:.1e}"]
        else:
            row += ["n/a", "", "", ""]
        rows.append(row)
        arena.release()
    return "### SGEMM (float32, TF32 off)\n\n" + _table(
        ["shape", "attngraph ms", "GFLOP/s", "torch ms", "torch GFLOP/s", "speed vs torch", "scaled max |diff|"],
        rows)


# -- encoder --------------------------------------------------------------------------------------
def bench_encoder(args, torch) -> str:
    import attngraph as ag
    from attngraph.benchmarks.models import ENCODER, attngraph_encoder, state_dict_numpy, torch_encoder

    cfg = dict(ENCODER, layers=1, d=32, heads=4, ffn=64, seq=16) if args.smoke else ENCODER
    batches = [2] if args.smoke else [1, 32]
    import importlib.util

    if importlib.util.find_spec("torch") is None:       # the weights come from torch's module
        return "### encoder\n\ntorch is not installed: skipped\n"
    module = torch_encoder(cfg)
    weights = state_dict_numpy(module)
    exe = ag.compile(attngraph_encoder(weights, cfg), backend="cuda")
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, cfg["seq"], cfg["d"])).astype(np.float32)
        ms = _median_ms(lambda: exe.run({"x": x}), lambda: None, args.repeats)
        row = [f"({b}, {cfg['seq']}, {cfg['d']})", len(exe.launches(B=b, T=cfg["seq"])), ms]
        if torch is not None:
            gpu_module = module.cuda()

            def theirs():
                with torch.no_grad():
                    return gpu_module(torch.from_numpy(x).cuda()).cpu().numpy()

            tms = _median_ms(theirs, torch.cuda.synchronize, args.repeats)
            err = float(np.abs(exe.run({"x": x})["y"] - theirs()).max())
            row += [tms, tms / ms, f"{err:.1e}"]
        else:
            row += ["n/a", "", ""]
        rows.append(row)
    return (f"### encoder forward ({cfg['layers']} layers, d={cfg['d']}, {cfg['heads']} heads, "
            f"FFN {cfg['ffn']}), host arrays in and out\n\n" +
            _table(["x", "kernels", "attngraph ms", "torch ms", "speed vs torch", "max |diff|"], rows))


# -- launch overhead ------------------------------------------------------------------------------
def _chain_graph(n_ops: int):
    import attngraph as ag

    g = ag.Graph("chain")
    x = g.input("x", (4,))
    for i in range(n_ops):
        x = ag.tanh(x) if i % 2 else x * 1.0001
    g.output("y", x)
    return g


def bench_launch(args, torch) -> str:
    import attngraph as ag

    n_ops = 20 if args.smoke else 200
    runs = 3 if args.smoke else 200
    rows = []
    feeds = {"x": np.ones(4, np.float32)}
    empty = ag.Graph("empty")
    empty.output("y", empty.input("x", (4,)) * 1.0)
    modes = ["dispatch"] if args.smoke else ["fast", "kernel", "dispatch"]
    saved = os.environ.get("ATTNGRAPH_CUDA_LAUNCH")
    try:
        for mode in modes:
            os.environ["ATTNGRAPH_CUDA_LAUNCH"] = mode
            exe = ag.compile(_chain_graph(n_ops), backend="cuda", disable=["fuse_elementwise"])
            base = ag.compile(empty, backend="cuda")
            kernels = len(exe.launches())
            used = sorted({launch.mode for launch in exe.launches()})
            for e in (exe, base):
                for _ in range(3):
                    e.run(feeds)
            t0 = time.perf_counter()
            for _ in range(runs):
                exe.run(feeds)
            total = (time.perf_counter() - t0) / runs
            t0 = time.perf_counter()
            for _ in range(runs):
                base.run(feeds)
            fixed = (time.perf_counter() - t0) / runs     # the transfers and Python of one run
            rows.append([mode, "/".join(used), kernels, total * 1e3, (total - fixed) / max(kernels - 1, 1) * 1e6,
                         total / kernels * 1e6])
    finally:
        if saved is None:
            os.environ.pop("ATTNGRAPH_CUDA_LAUNCH", None)
        else:
            os.environ["ATTNGRAPH_CUDA_LAUNCH"] = saved
    return ("### launch overhead (a chain of tiny unfused elementwise kernels)\n\n" +
            _table(["ATTNGRAPH_CUDA_LAUNCH", "used", "kernels", "ms per run",
                    "µs per kernel (run minus a 1-kernel run)", "µs per kernel (run / kernels)"], rows) +
            "\n\ntarget: <= 30 µs per kernel launch")


SUITES = {"attention": bench_attention, "sgemm": bench_sgemm, "encoder": bench_encoder, "launch": bench_launch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", help=f"some of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; allowed on the simulator")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 5 if args.quick else 10)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    args.suites = args.suites or list(SUITES)
    try:
        from numba import cuda
    except Exception as err:
        _no_gpu(f"numba-cuda cannot be imported ({err}); pip install 'attngraph[cuda]'")
    from attngraph.backends.numba_cuda import kernels as K

    if K.SIMULATOR and not args.smoke:
        _no_gpu("NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU (use --smoke to check the script)")
    if K.SIMULATOR:
        sys.setswitchinterval(5e-4)     # the simulator polls its threads: switch often
    if not cuda.is_available():
        _no_gpu("no CUDA GPU is available (numba.cuda.is_available() is False)")
    device = cuda.get_current_device()
    name = getattr(device, "name", "the CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    torch = None if K.SIMULATOR else _torch_cuda()
    import numba_cuda

    print(f"## attngraph CUDA benchmarks on {name}\n")
    print(f"numba-cuda {getattr(numba_cuda, '__version__', '?')}, numpy {np.__version__}"
          + (f", torch {torch.__version__} (CUDA {torch.version.cuda}), TF32 off" if torch else ", torch on GPU: n/a")
          + "\n")
    for suite in args.suites:
        t0 = time.perf_counter()
        print(SUITES[suite](args, torch))
        print(f"\n({suite}: {time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
