"""Data-parallel training: every rank holds the whole model and trains on its shard of each batch.

``train.fit`` uses this by itself when it runs under ``mpiexec -n N`` (N > 1); a script
needs no change. One step on N ranks:

1. every rank builds the same global batch (the same seeded order: :class:`~attngraph.train.Batches`)
   and takes its own contiguous rows of it, ``rows = shard_range(B, rank, N)``;
2. it runs the compiled forward + backward on those rows (its mean loss and mean gradients);
3. it writes ``(rows / B) · gradient`` of every parameter into one flat buffer, whose last
   element holds ``(rows / B) · loss``;
4. one in-place ``Allreduce`` (sum) of that buffer: every rank now holds the gradient and
   the loss of the mean over the whole global batch;
5. every rank runs the same optimizer step on the same numbers, so the parameters stay
   bit-identical without ever being sent again.

Unequal shards (a batch of B rows that N does not divide, a last batch smaller than the
others, even a rank with no rows) are handled by the weights ``rows / B``: the result is the
gradient of the mean over the B rows, as one process would compute it, for any loss that
is a mean over the rows of the batch. (A loss that is a mean over something else, such as
cross-entropy over the non-padding tokens with ``ignore_index``, gets the average of the
shards' means instead: close, but not that loss's exact gradient.)

Before the first step, :meth:`DataParallel.synchronize` broadcasts rank 0's parameters
and optimizer state (its initial values, or a checkpoint it loaded), so every rank starts
from the same place. Dropout masks come from a Generator per rank (rank 0 keeps the step's
own, seeded ``seed``; rank r > 0 gets ``default_rng([seed, r])``): the ranks drop different
units, as N processes must, and checkpoints keep every rank's Generator state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from .comm import Communicator, DistributedError

__all__ = ["DataParallel", "Shard", "shard_range", "shard_feeds", "iter_shards"]


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-row batch for ``rank`` of ``size``: contiguous, sizes differ by at most one."""
    return n * rank // size, n * (rank + 1) // size


@dataclass
class Shard:
    """One rank's part of one global batch."""

    feeds: dict[str, np.ndarray]    # the rank's rows of every batch-major feed (0-d feeds as they are)
    rows: int                       # how many rows this rank has
    total: int                      # rows of the global batch

    @property
    def weight(self) -> float:
        """The share of the global batch's mean this rank contributes."""
        return self.rows / self.total if self.total else 0.0


def shard_feeds(feeds: Mapping[str, Any], rank: int, size: int) -> Shard:
    """This rank's rows of a global batch. Every array feed with a dimension is cut along its
    first axis, which must be the batch axis of all of them; 0-d feeds go to every rank."""
    batched = {k: np.asarray(v) for k, v in feeds.items() if np.ndim(v) >= 1}
    lengths = {k: v.shape[0] for k, v in batched.items()}
    if len(set(lengths.values())) > 1:
        text = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise DistributedError(f"data-parallel training cuts every feed along its first axis, but the feeds "
                               f"have different first dimensions ({text}): which is the batch?",
                               hint="feed per-batch arrays only (batch first), and constants as parameters")
    total = next(iter(lengths.values()), 0)
    lo, hi = shard_range(total, rank, size)
    out = {k: (v[lo:hi] if k in batched else v) for k, v in feeds.items()}
    return Shard(out, hi - lo, total)


def iter_shards(data, epoch: int, rank: int, size: int) -> Iterator[Shard]:
    """The shards of one epoch of ``data`` (what ``train.fit`` accepts) for ``rank`` of ``size``.

    A :class:`~attngraph.train.Batches` is cut at the level of row indices, so a rank gathers
    only its own rows; any other data is cut feed dict by feed dict (:func:`shard_feeds`).
    """
    from ..train.trainer import Batches

    if isinstance(data, Batches):
        for idx in data.batch_indices(epoch):
            lo, hi = shard_range(len(idx), rank, size)
            yield Shard({k: v[idx[lo:hi]] for k, v in data.arrays.items()}, hi - lo, len(idx))
        return
    batches = data(epoch) if callable(data) else data
    for feeds in batches:
        yield shard_feeds(feeds, rank, size)


class DataParallel:
    """The data-parallel side of one :class:`~attngraph.train.TrainStep` on one rank.

    - ``flat``: the gradients of every trained parameter and the loss, one buffer (the
      optimizer's layout, plus one element); ``grads[name]`` are views of it.
    - :meth:`synchronize`: rank 0's parameters and optimizer state to every rank.
    - :meth:`step`: one update from this rank's shard; returns the global batch's loss.
    - ``allreduce_seconds`` / ``steps``: time spent in the allreduce, for benchmarks.
    """

    def __init__(self, step, comm: Communicator):
        self.step = step
        self.comm = comm
        opt = step.optimizer
        if opt.layout is None:
            opt.bind({n: step.exe.params[n] for n in step.param_names})
        layout = opt.layout
        self.flat = np.zeros(layout.total + 1, dtype=layout.dtype)
        self.grads = {name: self.flat[off:off + size].reshape(layout.shapes[name])
                      for name, off, size in zip(layout.names, layout.offsets, layout.sizes)}
        self.allreduce_seconds = 0.0
        self.steps = 0

    def synchronize(self, info: Mapping | None = None) -> None:
        """Make every rank hold rank 0's parameters, optimizer state and step count.

        ``info``: the checkpoint record rank 0 resumed from (the same on every rank), whose
        ``rng_ranks`` restores each rank's dropout Generator; without it, rank r > 0 seeds
        its Generator with ``[seed, r]``.
        """
        comm, step, opt = self.comm, self.step, self.step.optimizer
        mine = [[n, list(np.shape(a)), str(np.asarray(a).dtype)] for n, a in sorted(step.exe.params.items())]
        theirs = comm.broadcast_object(mine)
        if mine != theirs:
            diff = next((a, b) for a, b in zip(mine + [None] * len(theirs), theirs + [None] * len(mine)) if a != b)
            raise DistributedError(f"rank {comm.rank} builds other parameters than rank 0 ({diff[0]} here, "
                                   f"{diff[1]} on rank 0): every rank must compile the same model")
        for name in sorted(step.exe.params):
            arr = step.exe.params[name]
            if isinstance(arr, np.ndarray) and arr.flags.c_contiguous and arr.flags.writeable:
                comm.broadcast_(arr)
            else:
                step.exe.params[name] = np.array(comm.broadcast_object(np.asarray(arr)))
        for name in sorted(opt.state):
            comm.broadcast_(opt.state[name])
        opt.step_count = int(comm.broadcast_object(opt.step_count))
        if step.dropout_sites and comm.rank > 0:
            saved = (info or {}).get("rng_ranks") or []
            if comm.rank < len(saved) and saved[comm.rank] is not None:
                step.rng = np.random.default_rng()
                step.rng.bit_generator.state = saved[comm.rank]
            else:
                step.rng = np.random.default_rng([step.seed, comm.rank])

    def rng_states(self) -> list | None:
        """Every rank's dropout Generator state, on rank 0 (a collective: call it on every rank)."""
        if not self.step.dropout_sites:
            return None
        return self.comm.gather_object(self.step.rng.bit_generator.state)

    def step_on(self, shard: Shard) -> float:
        """One update from this rank's ``shard``; returns the loss of the whole global batch."""
        step, flat = self.step, self.flat
        update = step.optimizer.step_count + 1
        self.comm.activity = f"in update {update}"
        if shard.rows:
            from ..train.trainer import GRAD_PREFIX

            out = step.run_backward(shard.feeds)
            w = shard.weight
            for name, view in self.grads.items():
                np.multiply(out[GRAD_PREFIX + name], w, out=view, casting="same_kind")
            flat[-1] = float(out[step.loss_name]) * w
            step.last_outputs = {k: v for k, v in out.items() if not k.startswith(GRAD_PREFIX)}
        else:                               # no rows here (a batch smaller than the ranks): add nothing
            flat[:] = 0
            step.last_outputs = {}
        t0 = time.perf_counter()
        self.comm.activity = f"while waiting in the gradient allreduce of update {update}"
        self.comm.allreduce_(flat)
        self.comm.activity = f"in update {update}"
        self.allreduce_seconds += time.perf_counter() - t0
        self.steps += 1
        step.optimizer.step(step.exe.params, self.grads)
        self.comm.activity = f"after update {update}"
        return float(flat[-1])

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (a callback's ``stop``)."""
        buf = np.array([1 if flag else 0], dtype=np.int64)
        return bool(self.comm.allreduce_(buf)[0])
