"""The training loop every task shares: ``train.fit`` with the tasks' Config conventions."""

from __future__ import annotations

import time
from typing import Callable

from .. import train

__all__ = ["fit_and_evaluate"]


def fit_and_evaluate(step, batches, cfg, evaluate: Callable[[object], dict], log: Callable[[str], None],
                     t_start: float):
    """Train ``step`` for ``cfg.epochs`` over ``batches``, then ``evaluate(step)`` once more.

    The Config conventions: ``cfg.eval_every`` (if the Config has it; 0 = only at the end)
    evaluates the held-out data every n epochs into the epoch's log line; ``cfg.checkpoint``
    is a resumable ``train.fit`` checkpoint; ``cfg.progress`` draws tqdm bars. ``log`` gets
    one line per epoch with the time since ``t_start``.
    Returns (history, metrics of the final evaluation, train seconds, eval seconds)."""
    eval_every = getattr(cfg, "eval_every", 0)

    def eval_fn(step_):
        epoch = step_.step_count // len(batches)          # epochs done (right after a resume too)
        if eval_every and epoch % eval_every == 0 and epoch < cfg.epochs:
            return evaluate(step_)
        return {}

    def log_epoch(state):
        extra = "".join(f", {k} {v:.4f}" for k, v in state.metrics.items())
        log(f"epoch {state.epoch + 1}/{cfg.epochs}: loss {state.history.epoch_loss[-1]:.4f}{extra} "
            f"({time.perf_counter() - t_start:.0f} s)")

    history = train.fit(step, batches, cfg.epochs, eval_fn=eval_fn if eval_every else None,
                        callbacks=[log_epoch], checkpoint=cfg.checkpoint, resume=cfg.checkpoint is not None,
                        progress=cfg.progress)
    train_seconds = time.perf_counter() - t_start
    t_eval = time.perf_counter()
    metrics = evaluate(step)
    return history, metrics, train_seconds, time.perf_counter() - t_eval
