"""The training step (forward + backward compiled as one executable, then the optimizer) and ``fit``.

>>> g = ag.Graph("reg")
>>> x, y = g.input("x", ("B", 8)), g.input("y", ("B", 1))
>>> w = g.param("w", (8, 1))
>>> g.output("loss", ag.train.mse_loss(x @ w, y))
>>> step = ag.train.compile_train_step(g, "loss", optimizer=ag.train.Adam(1e-2), backend="cpu")
>>> history = ag.train.fit(step, ag.train.Batches({"x": X, "y": Y}, 32), epochs=5,
...                        checkpoint="run.safetensors", resume=True)

:func:`compile_train_step` copies the graph, rewrites its dropouts to read fed masks
(:mod:`attngraph.train.dropout`), appends the backward with ``ag.grad`` for every
trained parameter and compiles one executable whose outputs are the loss, the graph's
other outputs and the gradients (``__grad__<param>``). A call of the step runs it and
hands the gradients to the optimizer, which updates ``step.params`` (the executable's
parameter store) in place. Eval mode (:meth:`TrainStep.evaluate`) runs the original
graph, compiled on first use, where dropout is the identity.

Data-parallel: under ``mpiexec -n N`` (N > 1) ``fit`` trains over the N ranks by itself
(:mod:`attngraph.distributed`): the forward + backward runs on this rank's rows of each
batch, the gradients meet in one allreduce, then the same optimizer step runs everywhere.
That is why the executable stops at the gradients and the optimizer is a separate call.

Reproducibility: the parameters start from the graph's initial values, the dropout
masks come from ``numpy.random.default_rng(seed)``, and a checkpoint saves the
parameters, the optimizer's state and step, the Generator's state and where ``fit``
was (epoch, batch), so a resumed run continues with the same numbers.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import AttngraphError, SerializationError
from .checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from .dropout import dropout_mask_feeds, symbol_bindings, with_dropout
from .optimizers import Adam, Optimizer

__all__ = ["TrainStep", "compile_train_step", "fit", "Batches", "Callback", "FitState", "History", "GRAD_PREFIX"]

GRAD_PREFIX = "__grad__"


class TrainStep:
    """A compiled training step; see :func:`compile_train_step`.

    - ``step(feeds)`` (or ``step.step(feeds)``): one update; returns the loss (before the update).
    - ``step.run_backward(feeds)``: the loss and the gradients (``__grad__<name>``), no update.
    - ``step.params``: the parameters (the executable's store), updated in place.
    - ``step.train()`` / ``step.eval()``: the mode of ``forward``; dropout masks are drawn in
      train mode only (in eval mode an update step feeds masks of ones).
    - ``step.forward(feeds)``: the graph's outputs without an update, in the current mode.
    - ``step.evaluate(feeds)``: the original graph's outputs (eval mode) with the current parameters.
    - ``step.save(path)`` / ``step.load(path)``: checkpoints (atomic writes).
    """

    def __init__(self, graph, loss: str = "loss", params: Sequence[str] | None = None, *,
                 optimizer: Optimizer | None = None, backend: str = "cpu", optimize: bool | None = None,
                 seed: int = 0, **compile_options):
        from .. import autodiff
        from ..compiler import compile as compile_graph

        if loss not in graph.outputs:
            raise AttngraphError(f"the graph has no output {loss!r} to minimize; its outputs are "
                                 f"{', '.join(graph.outputs) or '(none)'}", hint="g.output('loss', loss_tensor)")
        float_params = [n for n, node in graph.params.items() if node.type.dtype.is_float]
        if params is None:
            params = float_params
        else:
            params = list(params)
            unknown = [n for n in params if n not in graph.params]
            if unknown:
                raise AttngraphError(f"unknown parameter {unknown[0]!r}; the graph's parameters are "
                                     f"{', '.join(graph.params) or '(none)'}")
        if not params:
            raise AttngraphError("there are no parameters to train")
        self.graph = graph
        self.loss_name = loss
        self.param_names: list[str] = list(params)
        self.backend = backend
        self.seed = seed
        self.optimize = optimize
        self.compile_options = compile_options

        train_graph, self.dropout_sites = with_dropout(graph)
        loss_t = train_graph.tensor(train_graph.outputs[loss])
        wrt = [train_graph.tensor(train_graph.params[n].out) for n in self.param_names]
        grads = autodiff.grad(loss_t, wrt)
        for name, g in zip(self.param_names, grads):
            train_graph.output(GRAD_PREFIX + name, g)
        self.train_graph = train_graph
        self.exe = compile_graph(train_graph, backend=backend, optimize=optimize, **compile_options)
        self.optimizer = optimizer if optimizer is not None else Adam()
        self.optimizer.bind({n: self.exe.params[n] for n in self.param_names})
        self.rng = np.random.default_rng(seed)
        self.training = True
        self.last_outputs: dict[str, np.ndarray] = {}
        self._eval_exe = None
        self._mask_names = {s.input for s in self.dropout_sites}

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def params(self):
        """Parameter name → array (the executable's store; every parameter of the graph)."""
        return self.exe.params

    @property
    def step_count(self) -> int:
        """Updates made so far (restored by ``load``)."""
        return self.optimizer.step_count

    def train(self, mode: bool = True) -> "TrainStep":
        self.training = bool(mode)
        return self

    def eval(self) -> "TrainStep":
        return self.train(False)

    # -- running -----------------------------------------------------------------------------------
    def _run_train_graph(self, feeds: Mapping[str, Any], train: bool) -> dict[str, np.ndarray]:
        if self.dropout_sites:
            bindings = symbol_bindings(self.train_graph, feeds, skip=self._mask_names)
            feeds = {**feeds, **dropout_mask_feeds(self.dropout_sites, bindings, self.rng, train=train)}
        return self.exe.run(feeds)

    def run_backward(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Forward + backward on one batch, no update: the executable's outputs, the loss, the
        graph's other outputs and ``__grad__<param>`` for every trained parameter. (What ``step``
        does before the optimizer; data-parallel training reduces the gradients in between.)"""
        return self._run_train_graph(feeds, self.training)

    def step(self, feeds: Mapping[str, Any]) -> float:
        """One update on one batch; returns the loss computed before the update."""
        out = self._run_train_graph(feeds, self.training)
        grads = {n: out[GRAD_PREFIX + n] for n in self.param_names}
        self.optimizer.step(self.exe.params, grads)
        self.last_outputs = {k: v for k, v in out.items() if not k.startswith(GRAD_PREFIX)}
        return float(out[self.loss_name])

    __call__ = step

    def forward(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The graph's outputs for ``feeds``, no update: in train mode with fresh dropout masks
        (advancing the Generator), in eval mode through the original graph."""
        if not self.training:
            return self.evaluate(feeds)
        out = self._run_train_graph(feeds, True)
        return {k: v for k, v in out.items() if not k.startswith(GRAD_PREFIX)}

    def evaluate(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The original graph's outputs (dropout is the identity) with the current parameters."""
        from ..compiler import compile as compile_graph

        if self._eval_exe is None:
            self._eval_exe = compile_graph(self.graph, backend=self.backend, optimize=self.optimize,
                                           **self.compile_options)
        for name in self.exe.params:
            if name in self._eval_exe.params:
                self._eval_exe.params[name] = self.exe.params[name]
        return self._eval_exe.run(feeds)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays of the state: ``param/<name>`` (every parameter) and ``optimizer/<key>`` (copies)."""
        out = {f"param/{n}": np.array(a, copy=True) for n, a in self.exe.params.items()}
        out.update({f"optimizer/{k}": v for k, v in self.optimizer.state_dict().items()})
        return out

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore parameters and optimizer state from ``state_dict()``'s arrays."""
        missing = [n for n in self.exe.params if f"param/{n}" not in arrays]
        if missing:
            raise SerializationError(f"the checkpoint has no value for parameter {missing[0]!r}")
        for n in self.exe.params:
            np.copyto(self.exe.params[n], np.asarray(arrays[f"param/{n}"]).reshape(self.exe.params[n].shape),
                      casting="same_kind")
        self.optimizer.load_state_dict({k[len("optimizer/"):]: v for k, v in arrays.items()
                                        if k.startswith("optimizer/")})

    def save(self, path: str | os.PathLike, **info) -> None:
        """Write a checkpoint atomically (temp file + rename): parameters, optimizer state and step,
        the dropout Generator's state, and ``info`` (JSON-serializable, e.g. fit's position)."""
        record = {"step": self.step_count, "rng": self.rng.bit_generator.state,
                  "params": self.optimizer.layout.describe(), "optimizer": {
                      "type": type(self.optimizer).__name__, **self.optimizer.hyperparameters()},
                  **info}
        save_checkpoint(path, self.state_dict(), record)

    def load(self, path: str | os.PathLike) -> dict:
        """Restore a checkpoint written by ``save``; returns its JSON record."""
        arrays, info = load_checkpoint(path)
        if info.get("params") is not None and info["params"] != self.optimizer.layout.describe():
            raise SerializationError(f"checkpoint {os.fspath(path)} was written for other parameters "
                                     f"({len(info['params'])} of them) than this step trains")
        self.load_state_dict(arrays)
        state = info.get("rng")
        if state is not None:
            if state.get("bit_generator") != type(self.rng.bit_generator).__name__:
                self.rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
            self.rng.bit_generator.state = state
        return info

    def __repr__(self) -> str:
        return (f"<TrainStep {self.graph.name!r} backend={self.backend}: loss {self.loss_name!r}, "
                f"{len(self.param_names)} parameters, {len(self.dropout_sites)} dropouts, {self.optimizer!r}, "
                f"step {self.step_count}>")


def compile_train_step(graph, loss: str = "loss", params: Sequence[str] | None = None, *,
                       optimizer: Optimizer | None = None, backend: str = "cpu", optimize: bool | None = None,
                       seed: int = 0, **compile_options) -> TrainStep:
    """Build and compile the training step of ``graph``.

    - ``loss``: the name of the graph's scalar float output to minimize.
    - ``params``: the parameters to train (default: every float parameter).
    - ``optimizer``: an :class:`~attngraph.train.optimizers.Optimizer` (default ``Adam()``).
    - ``backend`` / ``optimize`` / ``compile_options``: as ``ag.compile``.
    - ``seed``: seeds the dropout masks' Generator.

    The graph itself is not changed.
    """
    return TrainStep(graph, loss, params, optimizer=optimizer, backend=backend, optimize=optimize, seed=seed,
                     **compile_options)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

class Batches:
    """Mini-batches of arrays, reshuffled each epoch by a Generator seeded with (seed, epoch).

    ``Batches({"x": X, "y": Y}, batch_size=32)(epoch)`` yields feeds dicts; the same
    epoch always gives the same batches, which is what makes a resumed ``fit`` exact.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {len(v) for v in self.arrays.values()}
        if len(sizes) != 1:
            raise AttngraphError(f"Batches: arrays have different lengths {sorted(sizes)}")
        self.n = sizes.pop()
        if batch_size <= 0:
            raise AttngraphError(f"Batches: batch_size must be > 0, got {batch_size}")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def batch_indices(self, epoch: int = 0) -> Iterable[np.ndarray]:
        """The row indices of each batch of ``epoch`` (data-parallel ranks cut these, not the rows)."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __call__(self, epoch: int = 0) -> Iterable[dict[str, np.ndarray]]:
        for idx in self.batch_indices(epoch):
            yield {k: v[idx] for k, v in self.arrays.items()}

    def __iter__(self):
        return iter(self(0))


# ------------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------------

@dataclass
class History:
    """What ``fit`` recorded: the loss of every step of this run, and per epoch the mean loss
    and the metrics of ``eval_fn`` (epochs before a resume come from the checkpoint)."""

    loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"epoch_loss": self.epoch_loss, "metrics": self.metrics}


@dataclass
class FitState:
    """What callbacks see. Set ``stop = True`` to end training after this step or epoch."""

    step: TrainStep
    epochs: int
    history: History
    epoch: int = 0
    batch: int = 0           # batches done in this epoch
    loss: float = math.nan
    metrics: dict = field(default_factory=dict)
    samples_per_s: float = 0.0
    stop: bool = False


class Callback:
    """Hooks of the fit loop; override the ones you need. A plain function given as a callback
    is called at the end of every epoch, ``fn(state)``."""

    def on_fit_start(self, state: FitState) -> None: ...
    def on_step_end(self, state: FitState) -> None: ...
    def on_epoch_end(self, state: FitState) -> None: ...
    def on_fit_end(self, state: FitState) -> None: ...


class _EpochFunction(Callback):
    def __init__(self, fn):
        self.fn = fn

    def on_epoch_end(self, state):
        self.fn(state)


def _batch_size(feeds: Mapping[str, Any]) -> int:
    for v in feeds.values():
        shape = np.shape(v)
        if shape:
            return int(shape[0])
    return 1


def fit(step: TrainStep, data, epochs: int = 1, *, eval_fn: Callable[[TrainStep], Any] | None = None,
        callbacks: Iterable = (), checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
        resume: bool = False, progress: bool = True, comm=None) -> History:
    """Train ``step`` for ``epochs`` passes over ``data``.

    - ``data``: a callable ``data(epoch)`` returning that epoch's feeds dicts (such as
      :class:`Batches`), or a re-iterable collection of feeds dicts (a list).
    - ``eval_fn(step) -> dict | float``: run after every epoch (in eval mode: use
      ``step.evaluate``); its metrics go to the history, the progress bar and the callbacks.
    - ``callbacks``: :class:`Callback` objects, or functions called after every epoch. A
      callback that sets ``state.stop`` ends training: after this step when set in
      ``on_step_end`` (no end-of-epoch evaluation or checkpoint), after this epoch when set
      in ``on_epoch_end``.
    - ``checkpoint``: a file written (atomically) after every epoch and, with
      ``checkpoint_every=n``, every n steps. ``resume=True`` continues from it when it exists:
      parameters, optimizer, dropout Generator and the position in ``data`` are restored,
      the batches already done in that epoch are skipped, and training goes on as if
      never interrupted.
    - ``progress``: a tqdm bar per epoch with the running loss and samples/s.
    - ``comm``: the ranks to train over (:mod:`attngraph.distributed`); default
      ``distributed.world()``: one process, or every rank of the job under ``mpiexec -n N``.

    Data-parallel (``comm.size > 1``, :class:`~attngraph.distributed.DataParallel`): each
    batch of ``data`` is the global batch; each rank trains on its rows of it, the gradients
    are averaged by one allreduce per step, and every rank takes the same optimizer step.
    The losses in the history are the global batch's, the same on every rank. Rank 0 alone
    loads and writes the checkpoint (the others receive its state), runs ``eval_fn`` (its
    metrics are sent to the others) and draws the progress bar; callbacks run on every
    rank, and training stops when any rank's callback sets ``stop``. A checkpoint does not
    depend on the number of ranks: resume with as many or a different number.
    """
    from tqdm.auto import tqdm

    from ..distributed import DataParallel, iter_shards, world

    comm = world() if comm is None else comm
    dp = DataParallel(step, comm) if comm.size > 1 else None
    root = comm.rank == 0
    callbacks = [c if isinstance(c, Callback) else _EpochFunction(c) for c in callbacks]
    step_hooks = any(type(c).on_step_end is not Callback.on_step_end for c in callbacks)
    history = History()
    state = FitState(step=step, epochs=epochs, history=history)
    start_epoch, skip, resumed_sum = 0, 0, 0.0
    info: dict = {}
    if checkpoint is not None and root:
        remove_stale_temporaries(checkpoint)
        if resume and os.path.exists(checkpoint):
            info = step.load(checkpoint)
    if dp is not None:
        info = comm.broadcast_object(info)
        dp.synchronize(info)
    if info and root:
        comm.last_checkpoint = f"{os.fspath(checkpoint)} (update {step.step_count}, resumed from)"
    if info:
        position = info.get("fit", {})
        start_epoch, skip = int(position.get("epoch", 0)), int(position.get("batch", 0))
        resumed_sum = float(position.get("loss_sum", 0.0))
        saved = position.get("history", {})
        history.epoch_loss = list(saved.get("epoch_loss", []))
        history.metrics = list(saved.get("metrics", []))

    def save(epoch: int, batch: int, loss_sum: float) -> None:
        extra = {}
        if dp is not None:            # collective: every rank's dropout Generator, gathered on rank 0
            extra = {"ranks": comm.size, "rng_ranks": dp.rng_states()}
        if root:
            step.save(checkpoint, fit={"epoch": epoch, "batch": batch, "loss_sum": loss_sum,
                                       "history": history.to_json()}, **extra)
            comm.last_checkpoint = f"{os.fspath(checkpoint)} (update {step.step_count})"

    for c in callbacks:
        c.on_fit_start(state)
    for epoch in range(start_epoch, epochs):
        state.epoch = epoch
        if dp is not None:
            batches = iter_shards(data, epoch, comm.rank, comm.size)
        else:
            batches = data(epoch) if callable(data) else data
        total = len(data) if hasattr(data, "__len__") else None
        # the epoch's loss so far (a running sum, restored on resume, so the epoch mean is exact)
        loss_sum, loss_count = (resumed_sum, skip) if epoch == start_epoch else (0.0, 0)
        bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and root), initial=0,
                   dynamic_ncols=True, leave=True)
        samples, busy = 0, 0.0
        state.stop = False
        for b, feeds in enumerate(batches):
            if epoch == start_epoch and b < skip:
                bar.update(1)
                continue
            t0 = time.perf_counter()
            if dp is not None:
                loss = dp.step_on(feeds)
                samples += feeds.total
            else:
                loss = step.step(feeds)
                samples += _batch_size(feeds)
            busy += time.perf_counter() - t0
            loss_sum += loss
            loss_count += 1
            history.loss.append(loss)
            state.batch, state.loss = b + 1, loss
            state.samples_per_s = samples / busy if busy > 0 else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4g}", samples_s=f"{state.samples_per_s:.0f}")
            for c in callbacks:
                c.on_step_end(state)
            if dp is not None and step_hooks:
                state.stop = dp.agree(state.stop)
            if checkpoint is not None and checkpoint_every and step.step_count % checkpoint_every == 0:
                save(epoch, b + 1, loss_sum)
            if state.stop:
                break
        bar.close()
        if state.stop:        # stopped mid-epoch: no end-of-epoch evaluation or checkpoint
            break
        history.epoch_loss.append(loss_sum / loss_count if loss_count else math.nan)
        metrics: dict = {}
        if eval_fn is not None:
            if root:
                result = eval_fn(step)
                result = dict(result) if isinstance(result, Mapping) else {"eval": result}
                metrics = {k: v.item() if isinstance(v, np.generic) else v for k, v in result.items()}
            if dp is not None:
                metrics = comm.broadcast_object(metrics)
            if progress and root:
                tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {history.epoch_loss[-1]:.4g}, "
                           + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in metrics.items()))
        history.metrics.append(metrics)
        state.metrics = metrics
        state.batch = 0
        for c in callbacks:
            c.on_epoch_end(state)
        if dp is not None and callbacks:
            state.stop = dp.agree(state.stop)
        if checkpoint is not None:
            save(epoch + 1, 0, 0.0)
        if state.stop:
            break
    for c in callbacks:
        c.on_fit_end(state)
    return history
