"""Optimizers (SGD, Adam, AdamW) with torch.optim's update formulas, one fused kernel per step.

>>> opt = AdamW(lr=3e-4, weight_decay=0.01)
>>> opt.step(exe.params, grads)          # updates every parameter array in place

How a step runs (the design):

1. **One flat gradient buffer.** The first step fixes a layout: the parameter names (in the
   order of ``grads``), their shapes, and each one's offset in one flat buffer of the
   parameters' dtype (float32 for float32 models). Every step copies the gradients into
   that buffer, one ``np.copyto`` per parameter.
2. **Flat state.** The optimizer's state (SGD's momentum, Adam's two moments) lives in flat
   buffers with the same layout, so the state of all parameters is a few arrays
   (``state_dict()``) however many parameters there are.
3. **One kernel over all parameters, in place.** The parameters stay where they are (the
   arrays of ``exe.params``, which the executable reads on its next run); no flat copy of
   them is made. A Numba ``@njit(parallel=True, cache=True)`` kernel receives them as a
   typed list of 1-D views and a table of chunks (parameter, start, stop) of at most
   ``CHUNK`` elements: ``prange`` runs over the chunks, so big and small parameters spread
   over the threads, and each chunk updates its slice of one parameter from its slice of
   the flat gradient and state buffers. The typed list is built once and rebuilt only when
   a parameter array is replaced (``exe.params[name] = new``). Below ``PARALLEL_MIN``
   elements a serial twin of the kernel (same chunk body) runs instead: waking the worker
   threads costs more than updating a small model.
4. **Optional clipping, fused.** With ``clip_norm``, the total 2-norm of the flat gradient
   is computed (float64 partial sums per chunk, added in a fixed order, so it is
   deterministic), and the kernel scales each gradient by min(1, clip_norm / (norm + 1e-6))
   as it reads it: ``torch.nn.utils.clip_grad_norm_`` followed by the step.

The arithmetic of each element is done in float64 and stored in the parameter dtype; it
agrees with torch's float32 arithmetic to a few ulps. The learning rate is a number or a
schedule (``attngraph.train.schedules``), evaluated at the 1-based number of the step.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numba
import numpy as np
from numba import njit, prange

from ..errors import AttngraphError

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "CHUNK", "PARALLEL_MIN", "OptimizerError"]

CHUNK = 1 << 15           # elements per parallel work item
PARALLEL_MIN = 1 << 18    # fewer elements than this: the serial kernel (a thread wake-up costs more)


class OptimizerError(AttngraphError):
    """A parameter or gradient that does not fit the optimizer's layout, or a bad state dict."""


# -- kernels --------------------------------------------------------------------------------------
# ``params``: typed list of 1-D parameter views; ``chunks``: (n, 3) rows of (parameter, start, stop);
# ``offsets[k]``: where parameter k starts in the flat buffers. Each update exists as a parallel
# kernel (prange over the chunks) and a serial one with the same body: below PARALLEL_MIN elements
# the serial one runs, since waking the worker threads costs more than the update itself.

@njit(cache=True)
def _sgd_chunk(p, base, start, stop, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first_step,
               grad_scale):
    for i in range(start, stop):
        j = base + i
        d = grad[j] * grad_scale
        if weight_decay != 0.0:
            d = d + weight_decay * p[i]
        if momentum != 0.0:
            if first_step:
                b = d
            else:
                b = momentum * buf[j] + (1.0 - dampening) * d
            buf[j] = b
            if nesterov:
                d = d + momentum * b
            else:
                d = b
        p[i] = p[i] - lr * d


@njit(parallel=True, cache=True)
def _sgd_parallel(params, chunks, offsets, grad, buf, lr, momentum, dampening, weight_decay, nesterov,
                  first_step, grad_scale):
    for c in prange(chunks.shape[0]):
        k = chunks[c, 0]
        _sgd_chunk(params[k], offsets[k], chunks[c, 1], chunks[c, 2], grad, buf, lr, momentum, dampening,
                   weight_decay, nesterov, first_step, grad_scale)


@njit(cache=True)
def _sgd_serial(params, chunks, offsets, grad, buf, lr, momentum, dampening, weight_decay, nesterov,
                first_step, grad_scale):
    for c in range(chunks.shape[0]):
        k = chunks[c, 0]
        _sgd_chunk(params[k], offsets[k], chunks[c, 1], chunks[c, 2], grad, buf, lr, momentum, dampening,
                   weight_decay, nesterov, first_step, grad_scale)


@njit(cache=True)
def _adam_chunk(p, base, start, stop, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps,
                weight_decay, decoupled, amsgrad, bias_correction1, bias_correction2_sqrt, grad_scale):
    step_size = lr / bias_correction1
    decay = 1.0 - lr * weight_decay
    for i in range(start, stop):
        j = base + i
        g = grad[j] * grad_scale
        w = p[i] * 1.0
        if decoupled:                       # AdamW: p ← p·(1 - lr·wd) before the Adam step
            w = w * decay
        elif weight_decay != 0.0:           # Adam: L2 penalty added to the gradient
            g = g + weight_decay * w
        m = exp_avg[j] + (g - exp_avg[j]) * (1.0 - beta1)
        v = exp_avg_sq[j] * beta2 + (1.0 - beta2) * g * g
        exp_avg[j] = m
        exp_avg_sq[j] = v
        if amsgrad:
            v = max(float(max_exp_avg_sq[j]), v)
            max_exp_avg_sq[j] = v
        denom = math.sqrt(v) / bias_correction2_sqrt + eps
        p[i] = w - step_size * m / denom


@njit(parallel=True, cache=True)
def _adam_parallel(params, chunks, offsets, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps,
                   weight_decay, decoupled, amsgrad, bias_correction1, bias_correction2_sqrt, grad_scale):
    for c in prange(chunks.shape[0]):
        k = chunks[c, 0]
        _adam_chunk(params[k], offsets[k], chunks[c, 1], chunks[c, 2], grad, exp_avg, exp_avg_sq,
                    max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, bias_correction1,
                    bias_correction2_sqrt, grad_scale)


@njit(cache=True)
def _adam_serial(params, chunks, offsets, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps,
                 weight_decay, decoupled, amsgrad, bias_correction1, bias_correction2_sqrt, grad_scale):
    for c in range(chunks.shape[0]):
        k = chunks[c, 0]
        _adam_chunk(params[k], offsets[k], chunks[c, 1], chunks[c, 2], grad, exp_avg, exp_avg_sq,
                    max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, bias_correction1,
                    bias_correction2_sqrt, grad_scale)


@njit(cache=True)
def _chunk_sum_squares(x, start, stop):
    s = 0.0
    for i in range(start, stop):
        v = float(x[i])
        s += v * v
    return s


@njit(parallel=True, cache=True)
def _sum_squares_parallel(x, chunk):
    n = x.shape[0]
    count = (n + chunk - 1) // chunk
    parts = np.zeros(count)
    for c in prange(count):
        parts[c] = _chunk_sum_squares(x, c * chunk, min(n, (c + 1) * chunk))
    total = 0.0
    for c in range(count):
        total += parts[c]
    return total


@njit(cache=True)
def _sum_squares_serial(x, chunk):
    n = x.shape[0]
    total = 0.0
    for c in range((n + chunk - 1) // chunk):
        total += _chunk_sum_squares(x, c * chunk, min(n, (c + 1) * chunk))
    return total


def _sum_squares(x: np.ndarray) -> float:
    """Σ x² in float64: per-chunk partial sums added in chunk order, so serial and parallel agree bit for bit."""
    fn = _sum_squares_parallel if x.shape[0] >= PARALLEL_MIN else _sum_squares_serial
    return fn(x, CHUNK)


# -- layout ---------------------------------------------------------------------------------------

class _Layout:
    """Names, shapes and flat offsets of the parameters, and the chunk table the kernels run over."""

    def __init__(self, shapes: Mapping[str, tuple], dtype):
        self.names = list(shapes)
        self.shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self.sizes = [int(np.prod(self.shapes[n], dtype=np.int64)) for n in self.names]
        self.offsets = np.zeros(len(self.names), dtype=np.int64)
        if self.names:
            self.offsets[1:] = np.cumsum(self.sizes)[:-1]
        self.total = int(sum(self.sizes))
        self.dtype = np.dtype(dtype)
        rows = [(k, start, min(start + CHUNK, size))
                for k, size in enumerate(self.sizes) for start in range(0, size, CHUNK)]
        self.chunks = np.array(rows, dtype=np.int64).reshape(-1, 3)

    def describe(self) -> list:
        return [[n, list(self.shapes[n])] for n in self.names]


def _float_dtype_of(arrays, what: str):
    dtypes = {np.asarray(a).dtype for a in arrays}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        have = ", ".join(sorted(str(d) for d in dtypes))
        raise OptimizerError(f"the optimizer updates parameters of one float dtype (float32 or float64); "
                             f"{what} are {have}")
    return next(iter(dtypes))


# -- the optimizers -------------------------------------------------------------------------------

class Optimizer:
    """Base class: the layout, the flat buffers, the step counter and the learning rate.

    Subclasses name their state buffers in ``state_names`` and implement ``_update``.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float | Callable[[int], float], *, clip_norm: float | None = None):
        if not callable(lr) and not lr >= 0.0:
            raise OptimizerError(f"learning rate must be >= 0, got {lr}")
        if clip_norm is not None and not clip_norm > 0:
            raise OptimizerError(f"clip_norm must be > 0, got {clip_norm}")
        self.lr = lr
        self.clip_norm = clip_norm
        self.step_count = 0
        self.last_lr: float | None = None
        self.last_grad_norm: float | None = None   # set when clip_norm is used
        self.layout: _Layout | None = None
        self.state: dict[str, np.ndarray] = {}
        self._grad: np.ndarray | None = None
        self._views = None          # (the parameter arrays, the typed list of their 1-D views)
        self._pending: dict[str, np.ndarray] | None = None

    # -- the learning rate ----------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of update number ``step`` (1-based)."""
        return float(self.lr(step)) if callable(self.lr) else float(self.lr)

    # -- layout ---------------------------------------------------------------------------------
    def bind(self, params: Mapping[str, np.ndarray]) -> "Optimizer":
        """Fix the layout: these parameters, in this order. The first ``step`` calls it with its
        ``grads``' names; call it earlier to choose the order or to load a state dict first."""
        if self.layout is not None:
            raise OptimizerError("the optimizer is already bound to a set of parameters")
        dtype = _float_dtype_of([params[n] for n in params], "the parameters") if params else np.float32
        self.layout = _Layout({n: np.shape(params[n]) for n in params}, dtype)
        self._grad = np.zeros(self.layout.total, dtype=dtype)
        self.state = {name: np.zeros(self.layout.total, dtype=dtype) for name in self.state_names}
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)
        return self

    # -- the step -------------------------------------------------------------------------------
    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Update ``params[name]`` in place from ``grads[name]``, for every name in ``grads``."""
        if self.layout is None:
            self.bind({n: params[n] for n in grads})
        layout = self.layout
        if set(grads) != set(layout.names):
            extra = sorted(set(grads) - set(layout.names))
            missing = sorted(set(layout.names) - set(grads))
            raise OptimizerError(f"gradients do not match the optimizer's parameters: "
                                 f"missing {missing or 'none'}, unknown {extra or 'none'}")
        grad = self._grad
        for name, off, size in zip(layout.names, layout.offsets, layout.sizes):
            g = np.asarray(grads[name])
            if g.shape != layout.shapes[name]:
                raise OptimizerError(f"gradient of {name!r} has shape {g.shape}, the parameter {layout.shapes[name]}")
            np.copyto(grad[off:off + size], g.reshape(-1), casting="same_kind")
        scale = 1.0
        if self.clip_norm is not None:
            norm = math.sqrt(_sum_squares(grad)) if layout.total else 0.0
            self.last_grad_norm = norm
            scale = min(1.0, self.clip_norm / (norm + 1e-6))
        views = self._param_views(params)
        self.step_count += 1
        self.last_lr = self.lr_at(self.step_count)
        if layout.total:
            self._update(views, grad, self.last_lr, scale)

    def _param_views(self, params: Mapping[str, np.ndarray]):
        layout = self.layout
        arrays = tuple(params[n] for n in layout.names)
        if self._views is not None and all(a is b for a, b in zip(arrays, self._views[0])):
            return self._views[1]
        lst = numba.typed.List.empty_list(numba.types.Array(numba.from_dtype(layout.dtype), 1, "C"))
        for name, arr in zip(layout.names, arrays):
            if not isinstance(arr, np.ndarray) or arr.dtype != layout.dtype or not arr.flags.c_contiguous \
                    or not arr.flags.writeable or arr.shape != layout.shapes[name]:
                what = (f"{type(arr).__name__}" if not isinstance(arr, np.ndarray)
                        else f"{arr.dtype}{arr.shape}, contiguous={arr.flags.c_contiguous}, "
                             f"writeable={arr.flags.writeable}")
                raise OptimizerError(f"parameter {name!r} must be a writeable C-contiguous "
                                     f"{layout.dtype}{layout.shapes[name]} array (updated in place), got {what}")
            lst.append(arr.reshape(-1))
        self._views = (arrays, lst)
        return lst

    def _update(self, views, grad: np.ndarray, lr: float, grad_scale: float) -> None:  # pragma: no cover
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------------
    def hyperparameters(self) -> dict:
        """The settings, JSON-friendly (a schedule is shown by its repr)."""
        return {"lr": self.lr if not callable(self.lr) else repr(self.lr), "clip_norm": self.clip_norm}

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"step": int64 scalar, <buffer name>: flat buffer, ...}`` (copies)."""
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        out.update({k: v.copy() for k, v in self.state.items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` gave (before binding, it is kept until ``bind``)."""
        if "step" not in state:
            raise OptimizerError("optimizer state has no 'step'")
        if self.layout is None:
            self._pending = {k: np.array(v) for k, v in state.items()}
            self.step_count = int(np.asarray(state["step"]))
            return
        for name in self.state_names:
            if name not in state:
                raise OptimizerError(f"optimizer state has no {name!r} ({type(self).__name__} keeps "
                                     f"{', '.join(self.state_names)})")
            arr = np.asarray(state[name])
            if arr.shape != self.state[name].shape:
                raise OptimizerError(f"optimizer state {name!r} has {arr.shape[0] if arr.ndim else 0} entries, the "
                                     f"parameters {self.state[name].shape[0]}: a checkpoint of another model?")
        for name in self.state_names:
            np.copyto(self.state[name], np.asarray(state[name]), casting="same_kind")
        self.step_count = int(np.asarray(state["step"]))

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({settings})"


class SGD(Optimizer):
    """torch.optim.SGD: with weight decay λ, momentum μ, dampening τ:

    d = g + λ·p;  b = d on the first step, else μ·b + (1-τ)·d;  d = d + μ·b (Nesterov) or b;  p ← p - lr·d
    """

    def __init__(self, lr: float | Callable[[int], float] = 1e-2, *, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, clip_norm: float | None = None):
        super().__init__(lr, clip_norm=clip_norm)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise OptimizerError("Nesterov momentum requires momentum > 0 and dampening = 0 (as in torch)")
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.state_names = ("momentum_buffer",) if momentum else ()

    def _update(self, views, grad, lr, grad_scale):
        buf = self.state.get("momentum_buffer", grad[:0])
        kernel = _sgd_parallel if self.layout.total >= PARALLEL_MIN else _sgd_serial
        kernel(views, self.layout.chunks, self.layout.offsets, grad, buf, lr, self.momentum, self.dampening,
               self.weight_decay, self.nesterov, self.step_count == 1, grad_scale)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov}


class Adam(Optimizer):
    """torch.optim.Adam (``decoupled=False``: weight decay is an L2 term added to the gradient):

    m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  (AMSGrad: v̂ ← max(v̂, v))
    p ← p - lr/(1-β1ᵗ) · m / (√v / √(1-β2ᵗ) + ε)
    """

    decoupled = False

    def __init__(self, lr: float | Callable[[int], float] = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 clip_norm: float | None = None):
        super().__init__(lr, clip_norm=clip_norm)
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise OptimizerError(f"betas must be in [0, 1), got {betas}")
        self.betas = (float(beta1), float(beta2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.amsgrad = bool(amsgrad)
        self.state_names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

    def _update(self, views, grad, lr, grad_scale):
        beta1, beta2 = self.betas
        t = self.step_count
        bias_correction1 = 1.0 - beta1 ** t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
        vmax = self.state.get("max_exp_avg_sq", grad[:0])
        kernel = _adam_parallel if self.layout.total >= PARALLEL_MIN else _adam_serial
        kernel(views, self.layout.chunks, self.layout.offsets, grad, self.state["exp_avg"], self.state["exp_avg_sq"],
               vmax, lr, beta1, beta2, self.eps, self.weight_decay, self.decoupled, self.amsgrad, bias_correction1,
               bias_correction2_sqrt, grad_scale)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "amsgrad": self.amsgrad}


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, p ← p·(1 - lr·λ) before the Adam step
    (default λ = 0.01, as in torch)."""

    decoupled = True

    def __init__(self, lr: float | Callable[[int], float] = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 clip_norm: float | None = None):
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, clip_norm=clip_norm)
