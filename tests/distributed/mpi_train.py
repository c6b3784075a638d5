"""A tiny training run for the data-parallel tests, started as ``mpiexec -n N python mpi_train.py ...``
(or plainly, as one process) by tests/distributed/test_distributed.py.

    python mpi_train.py OUT --steps 8 [--checkpoint F --every 2 --stop-after 4 --resume]
                        [--die-at 5 --how kill|exit|raise] [--dropout 0.1] [--snapshot-at 4]

Trains :func:`model` on :func:`data` with ``train.fit`` (which finds the MPI job by itself)
and writes ``OUT/rank<r>.npz``: every parameter and the losses of the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time

import numpy as np

import attngraph as ag
from attngraph import distributed, train


def model(dropout: float = 0.0) -> ag.Graph:
    """A 2-layer classifier with a LayerNorm (and dropout when asked), loss = mean cross-entropy over rows."""
    g = ag.Graph("dp", seed=3)
    x, t = g.input("x", ("B", 6)), g.input("t", ("B",), "int64")
    w1, b1 = g.param("w1", (6, 16)), g.param("b1", (16,), init="zeros")
    gamma, beta = g.param("gamma", (16,), init="ones"), g.param("beta", (16,), init="zeros")
    w2 = g.param("w2", (16, 3))
    h = ag.layernorm(ag.gelu(x @ w1 + b1), gamma, beta)
    if dropout:
        h = ag.dropout(h, dropout)
    g.output("loss", train.cross_entropy(h @ w2, t))
    return g


def data(rows: int = 43, batch: int = 8) -> train.Batches:
    """43 rows in batches of 8: the last batch has 3 rows, so 2 ranks get unequal shards (1 and 2)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 6)).astype(np.float32)
    t = (x[:, 0] > 0).astype(np.int64) + (x[:, 3] > 0.3)
    return train.Batches({"x": x, "t": t}, batch_size=batch, seed=1)


def new_step(dropout: float = 0.0, backend: str = "numpy") -> train.TrainStep:
    return train.compile_train_step(model(dropout), "loss", optimizer=train.AdamW(1e-2, clip_norm=1.0),
                                    backend=backend, seed=7)


class Stop(train.Callback):
    """Stops after ``stop_after`` updates; on rank ``die_rank`` dies at update ``die_at``."""

    def __init__(self, stop_after=None, die_at=None, how="kill", rank=0, die_rank=1, out=".", checkpoint=None,
                 snapshot_at=None):
        self.stop_after, self.die_at, self.how, self.rank, self.die_rank = stop_after, die_at, how, rank, die_rank
        self.out, self.checkpoint, self.snapshot_at = out, checkpoint, snapshot_at

    def on_step_end(self, state):
        n = state.step.step_count
        if self.snapshot_at is not None and n == self.snapshot_at + 1 and self.rank == 0:
            # fit saved the checkpoint of update ``snapshot_at`` after that step; keep a copy of it
            shutil.copyfile(self.checkpoint, f"{self.checkpoint}.step{self.snapshot_at}")
        if self.die_at is not None and n == self.die_at and self.rank == self.die_rank:
            with open(os.path.join(self.out, "died_at"), "w") as f:
                f.write(repr(time.time()))
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.how == "exit":
                os._exit(3)
            raise RuntimeError(f"injected failure at step {n}")
        if self.stop_after is not None and n >= self.stop_after:
            state.stop = True


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--how", default="kill", choices=["kill", "exit", "raise"])
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--snapshot-at", type=int, default=None, help="copy the checkpoint of this update aside")
    args = p.parse_args(argv)

    comm = distributed.world()
    batches = data()
    epochs = -(-args.steps // len(batches))
    step = new_step(args.dropout, args.backend)
    os.makedirs(args.out, exist_ok=True)
    stop = Stop(args.stop_after if args.stop_after is not None else args.steps, args.die_at, args.how, comm.rank,
                out=args.out, checkpoint=args.checkpoint, snapshot_at=args.snapshot_at)
    history = train.fit(step, batches, epochs, callbacks=[stop], checkpoint=args.checkpoint,
                        checkpoint_every=args.every, resume=args.resume, progress=False)
    np.savez(os.path.join(args.out, f"rank{comm.rank}.npz"), losses=np.array(history.loss),
             step_count=np.array(step.step_count), size=np.array(comm.size),
             **{f"param/{k}": v for k, v in step.params.items()})
    print(f"rank {comm.rank} of {comm.size}: {step.step_count} steps, last loss {history.loss[-1]:.6f}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
